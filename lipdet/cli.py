"""The ``lipdet`` command line: one typer app, one subcommand per stage.

Every user-facing problem is a :class:`~lipdet.errors.LipdetError`; :func:`main` prints it as a
single ``error: ...`` line on stderr and exits with its code (2 for usage and input errors).
"""

from __future__ import annotations

import sys
from typing import Optional

import typer
from typer._click.exceptions import NoArgsIsHelpError  # typer 0.29 vendors click
from typer.exceptions import TyperException

import lipdet
from lipdet.errors import LipdetError

app = typer.Typer(
    name="lipdet",
    help=(
        "Train Lipschitz-constrained Tinier SSD detectors on Ray, export them to ONNX/TensorRT, "
        "and measure their robustness on the deployed artifact.\n\n"
        "Typical flow: lipdet train --workers 2 ; lipdet export --trt ; lipdet eval engine.plan --pgd ; "
        "lipdet serve engine.plan"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lipdet {lipdet.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the lipdet version and exit."
    ),
) -> None:
    """lipdet: certifiably robust detectors, from training to deployed engine."""


def _register() -> None:
    """Attach every stage's command, in the order a user runs them."""
    from lipdet.data.cli import app as data_app
    from lipdet.deploy.cli import command as serve_command
    from lipdet.eval.cli import command as eval_command
    from lipdet.experiment import command as experiment_command
    from lipdet.export.cli import command as export_command
    from lipdet.lipschitz_command import lipschitz_command
    from lipdet.train.cli import command as train_command

    app.command("train")(train_command)
    app.command("export")(export_command)
    app.command("eval")(eval_command)
    app.command("serve")(serve_command)
    app.command("experiment")(experiment_command)
    app.command("lipschitz")(lipschitz_command)
    app.add_typer(data_app, name="data", help="Make, inspect and download SVHN format-1 data.")


_register()


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point: usage errors (typer's and lipdet's) are one ``error:`` line, exit 2."""
    try:
        rc = app(args=argv, prog_name="lipdet", standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except typer.Exit as e:  # --help, --version
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except TyperException as e:  # typer's usage errors: bad option value, missing argument, unknown command
        if isinstance(e, NoArgsIsHelpError):  # a bare group: show its help, as typer does
            typer.echo(e.ctx.get_help() if e.ctx is not None else e.format_message(), err=True)
            sys.exit(2)
        ctx = getattr(e, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        typer.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    except LipdetError as e:
        typer.echo(f"error: {e.message}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
