"""What ``lipdet eval`` writes and prints: result files (JSON, COCO detections + ground truth, report)
and the closing lines (attack settings, sweep, certificates, the seed-style row)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lipdet.errors import LipdetError
from lipdet.eval.evaluate import EvalResult, ground_truth_path, quant_line, seed_row
from lipdet.eval.report import ensure_lipschitz, write_report
from lipdet.io import write_text_atomic


@dataclass(frozen=True)
class ResultFiles:
    """Where an evaluation's results go (None: not written)."""

    json: Path | None = None
    detections: Path | None = None
    report: Path | None = None

    def check(self) -> "ResultFiles":
        """Refuse (one line) an output whose folder does not exist, before anything is evaluated."""
        for opt, path in (("--json", self.json), ("--save-detections", self.detections)):
            if path is not None and not Path(path).parent.is_dir():
                raise LipdetError(f"{opt}: folder {Path(path).parent} does not exist")
        return self

    def write(self, result: EvalResult, model: Any) -> list[str]:
        """Write every requested file (each atomically); returns one note per file for stderr."""
        notes = []
        if self.json is not None:
            named = result.with_paths_relative_to(Path(self.json).parent)
            write_text_atomic(self.json, json.dumps(named.to_dict(), indent=2, sort_keys=True) + "\n")
        if self.detections is not None:
            gt_path = ground_truth_path(self.detections)
            write_text_atomic(gt_path, json.dumps(result.coco_ground_truth()) + "\n")
            write_text_atomic(self.detections, json.dumps(result.coco_detections()) + "\n")
            notes.append(f"detections: {self.detections} (COCO results; ground truth with file names: {gt_path})")
        if self.report is not None:
            ensure_lipschitz(result, model)
            notes.append(f"report: {write_report(result.with_paths_relative_to(Path(self.report)), self.report)}")
        return notes


def result_lines(s: dict[str, Any]) -> list[str]:
    """The closing lines of ``lipdet eval`` for a result summary; the seed-style row comes last."""
    lines = []
    if s.get("pgd"):
        p = s["pgd"]
        diff = p["max_twin_engine_diff"]
        lines.append(f"pgd: eps {p['eps']:g}, {p['steps']} steps, alpha {p['alpha']:.4g}, {p['restarts']} restart(s), "
                     f"loss {p['loss']}: max |twin - engine| on adversarial inputs "
                     f"{'n/a' if diff is None else format(diff, '.3g')}")
        if len(p.get("per_loss") or {}) > 1:
            each = ", ".join(f"{k} {100 * v['map_50']:.2f} ({v['images_won']} won)" for k, v in p["per_loss"].items())
            lines.append(f"pgd per loss: adversarial mAP50 {each}; kept per image: {100 * p['map_50']:.2f}")
    if s.get("blackbox"):
        b = s["blackbox"]
        flag = "  (stronger than PGD: suspect gradient masking / twin divergence)" if b.get("stronger_than_pgd") else ""
        lines.append(f"{b['method']}: eps {b['eps']:g}, {b['queries']} queries: adversarial mAP50 "
                     f"{100 * b['map_50']:.2f}{flag}")
    for p in s.get("sweep") or []:
        lines.append(f"sweep: eps {p['eps']:g}: adversarial mAP50 {100 * p['map_50']:.2f}, mAP {100 * p['map']:.2f}")
    if s.get("certify"):
        c = s["certify"]
        lines.append(f"certify: {c['objects']} objects, detected {100 * c['detected_share']:.2f}%, "
                     f"certified at eps {c['eps']:g}: {100 * c['certified_share']:.2f}%")
        q = quant_line(c.get("quantised_check"))
        if q:
            lines.append(q)
    lines.append(seed_row(s))
    return lines
