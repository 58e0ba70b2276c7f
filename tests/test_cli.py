"""The top-level CLI: help, version, and that every command documents an example."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

import lipdet
from lipdet.cli import app

runner = CliRunner()
COMMANDS = ["train", "export", "eval", "lipschitz", "data"]


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and lipdet.__version__ in r.output


def test_help_lists_every_stage():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in r.output


@pytest.mark.parametrize("cmd", ["train", "export", "eval", "lipschitz"])
def test_each_command_has_help_with_an_example(cmd):
    r = runner.invoke(app, [cmd, "--help"])
    assert r.exit_code == 0, r.output
    assert f"lipdet {cmd}" in r.output  # an example invocation


def test_console_script_reports_errors_in_one_line(tmp_path):
    """Through the real entry point: a user error is one line on stderr and exit 2."""
    r = subprocess.run(
        [sys.executable, "-m", "lipdet.cli", "lipschitz", str(tmp_path / "nope.pt")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")
    assert "Traceback" not in r.stderr


def test_experiment_help_and_bad_options_exit_2(tmp_path, capsys, monkeypatch):
    """The first refusal through the real entry point, the others through the same ``main`` in this process
    (each new process would spend seconds importing torch before the same one line)."""
    from lipdet.cli import main

    r = runner.invoke(app, ["experiment", "--help"])
    assert r.exit_code == 0 and "lipdet experiment" in r.output
    cases = ((["--archs", "bogus"], "--archs"), (["--precision", "fp8"], "--precision"),
             (["--data", str(tmp_path / "missing")], "data folder not found"))
    monkeypatch.chdir(tmp_path)
    for i, (args, word) in enumerate(cases):
        argv = ["experiment", *args, "--out", str(tmp_path / "x")]
        if i == 0:
            r = subprocess.run([sys.executable, "-m", "lipdet.cli", *argv], capture_output=True, text=True, cwd=tmp_path)
            code, err = r.returncode, r.stderr
        else:
            with pytest.raises(SystemExit) as exc:
                main(argv)
            code, err = exc.value.code, capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and word in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_experiment_table_has_the_seed_columns_and_the_certified_radius():
    from lipdet.experiment import to_markdown

    row = {"arch": "sll-spectral", "precision": "fp32", "params": 399096, "clean_map_50": 0.5, "adv_map_50": 0.4,
           "drop": 0.1, "certified_share": 0.0123, "median_radius": 0.0042, "lipschitz_loc": 1.0,
           "lipschitz_cls": 33.5, "latency_ms": 3.99}
    head, rule, line = to_markdown([row, {**row, "certified_share": None, "median_radius": None}]).splitlines()[:3]
    assert head.count("|") == rule.count("|") == line.count("|")
    assert "certified @0.5 (%)" in head and "median cert. radius" in head
    assert "| 50.00 | 40.00 | 10.00 | 1.23 | 0.004 | 1 | 33.5 | 3.99 |" in line
    assert "| - | - |" in to_markdown([{**row, "certified_share": None, "median_radius": None}])
