"""The evaluation report: one offline HTML page with its PNGs beside it.

``write_report(result, out_dir)`` writes ``out_dir/index.html`` plus

* ``detections_<k>.png`` -- clean (left) vs adversarial (right) detections of the deployed engine
  on the same image, ground truth in white (the seed post's Figures 2-3);
* ``lipschitz.png`` -- per-layer Lipschitz bounds of the artifact's weights (``plot_bounds``, the
  seed's Figure 4), when the artifact has a model card;
* ``eps_curve.png`` -- adversarial mAP50 (and the certified object share) against eps, when an
  eps sweep or certificates were computed;
* ``results.json`` -- the same object as ``lipdet eval --json``.

The page holds the seed-style table (clean mAP, adversarial mAP, drop) and every setting needed
to reproduce the numbers. It uses no scripts, fonts or network resources.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import torch

from lipdet.errors import LipdetError
from lipdet.eval.evaluate import EvalResult, quant_line
from lipdet.io import atomic_path, write_text_atomic

UPSCALE = 4
"""Drawing scale of the 74x74 crops in the detection figures."""
WHITE, GREEN, RED = (255, 255, 255), (0, 200, 0), (230, 0, 0)


def _pct(v: Any) -> str:
    return "&ndash;" if v is None else f"{100.0 * float(v):.2f}"


def _fmt(v: Any) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _new_figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def plot_eps_curve(summary: dict[str, Any], out_png: Path) -> Path | None:
    """Adversarial mAP50 / mAP vs eps (sweep) and certified object share vs eps, one PNG."""
    sweep = summary.get("sweep") or []
    cert = summary.get("certify")
    if not sweep and not cert:
        return None
    fig = _new_figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    if sweep:
        xs = [p["eps"] for p in sweep]
        ax.plot(xs, [100 * p["map_50"] for p in sweep], "o-", color="#c44e52", label="adversarial mAP50 (PGD)")
        ax.plot(xs, [100 * p["map"] for p in sweep], "s--", color="#dd8452", label="adversarial mAP (0.5:0.95)")
    if cert:
        curve = cert["curve"]
        ax.plot([p["eps"] for p in curve], [100 * p["certified_share"] for p in curve], "-", color="#4c72b0",
                label="certified objects (%)")
    ax.set_xlabel("eps (L2 over the 3xSxS image, [0,1] pixels)")
    ax.set_ylabel("percent")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Robustness of the deployed model vs attack radius")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110)
    return out_png


def _panel(image: torch.Tensor, dets: dict[str, torch.Tensor] | None, gt: dict[str, torch.Tensor], color: Any) -> Any:
    """One drawn panel: detections in ``color``, ground truth in white on top, upscaled for legibility."""
    from lipdet.data.show import draw_detections

    empty = torch.zeros(0, 4)
    if dets is not None:
        img = draw_detections(image, dets["boxes"], dets["labels"], dets["scores"], color=color, scale=UPSCALE)
    else:
        img = draw_detections(image, empty, [], None, color=color, scale=UPSCALE)
    return draw_detections(image, gt["boxes"], gt["labels"], None, color=WHITE, scale=UPSCALE, base=img)


def draw_side_by_side(result: EvalResult, out_dir: Path) -> list[tuple[str, str]]:
    """``detections_<k>.png`` for each kept sample: clean | adversarial. Returns (file, plain-text caption) pairs."""
    from PIL import Image

    s = result.summary
    which = "pgd" if s.get("pgd") else ("square" if s.get("blackbox") else None)
    out = []
    for r in result.records:
        if r.image is None:
            continue
        left = _panel(r.image, r.clean, r.target, GREEN)
        panels = [left]
        adv_dets = getattr(r, which) if which else None
        if which and r.adv_image is not None:
            panels.append(_panel(r.adv_image, adv_dets, r.target, RED))
        gap = 8
        w = sum(p.width for p in panels) + gap * (len(panels) - 1)
        h = max(p.height for p in panels)
        canvas = Image.new("RGB", (w, h), "white")
        x = 0
        for p in panels:
            canvas.paste(p.convert("RGB"), (x, 0))
            x += p.width + gap
        name = f"detections_{r.index}.png"
        with atomic_path(out_dir / name) as tmp:
            canvas.save(tmp)
        gt_txt = "".join(str(int(v)) for v in r.target["labels"].tolist())
        cap = f"image {r.index} ({r.name}), ground truth {gt_txt or '(none)'}: clean, {r.clean['boxes'].shape[0]} detections"
        if which and r.adv_image is not None:
            n_adv = adv_dets["boxes"].shape[0] if adv_dets is not None else 0
            eps = s["pgd"]["eps"] if which == "pgd" else s["blackbox"]["eps"]
            cap += f" | {'PGD' if which == 'pgd' else 'Square'} eps {eps:g}, {n_adv} detections"
        out.append((name, cap))
    return out


def _per_class_table(summary: dict[str, Any]) -> str:
    clean = summary["clean"].get("per_class") or {}
    adv = (summary.get("pgd") or {}).get("per_class") or {}
    if not clean:
        return ""
    digits = sorted(set(clean) | set(adv), key=lambda d: int(d))
    rows = "".join(
        f"<tr><td>{html.escape(d)}</td><td>{_pct(clean.get(d))}</td><td>{_pct(adv.get(d)) if adv else '&ndash;'}</td></tr>"
        for d in digits
    )
    return ("<h2>Per digit (mAP, COCO 0.5:0.95)</h2><table><tr><th>digit</th><th>clean</th><th>adversarial</th></tr>"
            f"{rows}</table>")


def _main_table(summary: dict[str, Any]) -> str:
    pgd = summary.get("pgd") or {}
    bb = summary.get("blackbox") or {}
    cert = summary.get("certify") or {}
    eps = summary["settings"]["eps"]
    head = ("<tr><th>model</th><th>backend</th><th>clean mAP50</th><th>clean mAP</th>"
            f"<th>adversarial mAP50 (PGD, eps {eps:g})</th><th>adversarial mAP</th><th>drop (mAP50)</th>"
            f"<th>Square mAP50 (eps {eps:g})</th><th>certified objects @ {eps:g}</th></tr>")
    b = summary["backend"]
    row = (f"<tr><td>{html.escape(Path(str(summary['model'])).name)}</td>"
           f"<td>{html.escape(str(b.get('name')))} {html.escape(str(b.get('precision') or ''))}</td>"
           f"<td><b>{_pct(summary['clean']['map_50'])}</b></td><td>{_pct(summary['clean']['map'])}</td>"
           f"<td><b>{_pct(pgd.get('map_50'))}</b></td><td>{_pct(pgd.get('map'))}</td><td>{_pct(pgd.get('drop_map_50'))}</td>"
           f"<td>{_pct(bb.get('map_50'))}</td><td>{_pct(cert.get('certified_share'))}</td></tr>")
    return f"<table>{head}{row}</table><p class='note'>Percentages (the JSON holds fractions in [0, 1]).</p>"


def _per_loss_table(summary: dict[str, Any]) -> str:
    """PGD per attack loss: each loss's own adversarial mAP50 / mAP and the images it won, then the
    attack's kept result (for ``ensemble``, the per-image worst); empty without PGD."""
    pgd = summary.get("pgd") or {}
    per_loss = pgd.get("per_loss") or {}
    if not per_loss:
        return ""
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{_pct(v['map_50'])}</td><td>{_pct(v['map'])}</td>"
                   f"<td>{v['images_won']}</td></tr>" for name, v in per_loss.items())
    images = (summary.get("data") or {}).get("images")
    rows += (f"<tr><th>{html.escape(str(pgd['loss']))} (kept)</th><th>{_pct(pgd['map_50'])}</th>"
             f"<th>{_pct(pgd['map'])}</th><th>{_fmt(images)}</th></tr>")
    note = f"<p class='note'>{html.escape(pgd['selection'])}</p>" if pgd.get("selection") else ""
    return (f"<h2>PGD per attack loss (eps {pgd['eps']:g})</h2><table><tr><th>loss</th><th>adversarial mAP50</th>"
            f"<th>adversarial mAP</th><th>images won</th></tr>{rows}</table>{note}")


def _details(summary: dict[str, Any]) -> str:
    items: list[tuple[str, Any]] = []
    pgd = summary.get("pgd")
    if pgd:
        losses = pgd.get("losses") or [pgd["loss"]]
        loss_txt = pgd["loss"] if losses == [pgd["loss"]] else f"{pgd['loss']} of {', '.join(losses)}"
        on = f"{pgd.get('mean_loss_name', pgd['loss'])}, {pgd.get('mean_loss_adv_on', 'twin')}"
        items += [("PGD", f"L2, eps {pgd['eps']:g}, {pgd['steps']} steps, alpha {pgd['alpha']:.4g}, "
                          f"{pgd['restarts']} restart(s), loss {loss_txt}"),
                  ("max |twin - engine| on adversarial inputs", pgd["max_twin_engine_diff"]),
                  (f"attack loss clean -> adversarial ({on})", f"{_fmt(pgd['mean_loss_clean'])} -> {_fmt(pgd['mean_loss_adv'])}")]
    items.append(("max |twin - engine| on clean inputs", summary["clean"].get("max_twin_engine_diff")))
    bb = summary.get("blackbox")
    if bb:
        items += [("black-box", f"{bb['method']}, eps {bb['eps']:g}, {bb['queries']} queries/image, loss {bb['loss']}"),
                  ("attack loss clean -> adversarial (engine)", f"{_fmt(bb['mean_loss_clean'])} -> {_fmt(bb['mean_loss_adv'])}")]
        if bb.get("stronger_than_pgd"):
            items.append(("warning", "the query-only attack beats twin-crafted PGD: suspect gradient masking "
                                     "or twin/engine divergence"))
    cert = summary.get("certify")
    if cert:
        items += [("objects", cert["objects"]), ("detected correctly (clean)", _pct(cert["detected_share"]) + " %"),
                  ("median certified radius (detected objects)", cert["median_radius_detected"]),
                  ("Lipschitz bounds L_loc / L_cls (max over scales)",
                   f"{_fmt(cert['bounds']['loc'])} / {_fmt(cert['bounds']['cls'])}")]
    d = summary.get("data") or {}
    items += [("data", f"{d.get('source')} &mdash; {d.get('images')} images, {d.get('objects')} objects, split {d.get('split')}"),
              ("post-processing", json.dumps(summary.get("postprocess")))]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{v if isinstance(v, str) else _fmt(v)}</td></tr>" for k, v in items)
    return f"<table class='kv'>{rows}</table>"


def _certificate_section(cert: dict[str, Any] | None) -> str:
    """The definition, and what binds (class vs box radius) at up to eight eps of the curve."""
    if not cert:
        return ""
    out = f"<h2>Certificates</h2><p>{html.escape(cert['definition'])}</p>"
    out += f"<p>{html.escape(quant_line(cert.get('quantised_check')) or '')}</p>" if cert.get("quantised_check") else ""
    curve, counts = cert.get("binding_curve"), cert.get("binding")
    if not curve or not counts:  # results written before binding was reported
        return out
    keep = {cert["eps"]} | {p["eps"] for p in curve[:: max(1, len(curve) // 7)]}
    rows = "".join(f"<tr><td>{p['eps']:g}</td><td>{p['certified']}</td><td>{p['failed_cls']}</td><td>{p['failed_box']}</td></tr>"
                   for p in curve if p["eps"] in keep)
    return (out + f"<h3>What binds</h3><p>Detected objects whose best certificate is bound by the class radius: "
            f"{counts['cls']}, by the box radius: {counts['box']}; median r_cls {_fmt(cert['median_r_cls_detected'])}, "
            f"median r_box {_fmt(cert['median_r_box_detected'])} (detected objects).</p>"
            "<table><tr><th>eps</th><th>certified objects</th><th>not certified: class binds</th>"
            f"<th>not certified: box binds</th></tr>{rows}</table>")


def ensure_lipschitz(result: EvalResult, model: Any) -> None:
    """Fill ``result``'s per-layer table and head bounds from the artifact's twin if still missing.

    An evaluation without attacks or certificates never builds the twin; the report's Lipschitz
    chart needs it. Artifacts without a model card have no twin: the chart is then left out.
    """
    if result.lipschitz_table is not None and result.head_bounds is not None:
        return
    if not isinstance(model, (str, Path)):
        return
    try:
        from lipdet.deploy.twin import load_twin
        from lipdet.models.lipschitz import head_bounds, layer_table

        twin = load_twin(Path(model))
        result.lipschitz_table = layer_table(twin)
        if result.head_bounds is None:
            result.head_bounds = head_bounds(twin, result.lipschitz_table)
    except LipdetError:
        return


def write_report(result: EvalResult, out_dir: str | Path) -> Path:
    """Write the HTML report and its PNGs into ``out_dir`` (created if needed); returns index.html."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LipdetError(f"report: cannot create {out}: {e.strerror or e}") from None
    s = result.summary
    figs: list[str] = []

    pairs = draw_side_by_side(result, out)
    if pairs:
        figs.append("<h2>Detections: clean (left) vs adversarial (right)</h2>"
                    "<p class='note'>White: ground truth. Green: clean detections. Red: detections of the deployed "
                    "engine on the adversarial image.</p>")
        figs += [f"<figure><img src='{n}' alt='{html.escape(c, quote=True)}'><figcaption>{html.escape(c)}</figcaption></figure>"
                 for n, c in pairs]

    curve = plot_eps_curve(s, out / "eps_curve.png")
    if curve is not None:
        figs.append("<h2>Robustness vs eps</h2><figure><img src='eps_curve.png' alt='eps curve'></figure>")
        if s.get("sweep"):
            rows = "".join(f"<tr><td>{p['eps']:g}</td><td>{_pct(p['map_50'])}</td><td>{_pct(p['map'])}</td>"
                           f"<td>{_fmt(p['max_twin_engine_diff'])}</td></tr>" for p in s["sweep"])
            figs.append("<table><tr><th>eps</th><th>adversarial mAP50</th><th>adversarial mAP</th>"
                        f"<th>max |twin - engine|</th></tr>{rows}</table>")

    if result.lipschitz_table is not None and result.head_bounds is not None:
        from lipdet.models.lipschitz import plot_bounds

        with atomic_path(out / "lipschitz.png") as tmp:
            plot_bounds(result.lipschitz_table, result.head_bounds, tmp)
        figs.append("<h2>Per-layer Lipschitz bounds (from the artifact's weights)</h2>"
                    "<figure><img src='lipschitz.png' alt='Lipschitz bounds per layer'></figure>")

    cert_html = _certificate_section(s.get("certify"))

    write_text_atomic(out / "results.json", json.dumps(result.to_dict(), indent=2, sort_keys=True))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lipdet eval: {html.escape(Path(str(s['model'])).name)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 0.8em 0; }}
th, td {{ border: 1px solid #bbb; padding: 4px 8px; text-align: right; }}
th {{ background: #f0f0f0; }}
table.kv th, table.kv td {{ text-align: left; }}
figure {{ margin: 1em 0; }} figcaption, .note {{ color: #555; font-size: 0.9em; }}
img {{ max-width: 100%; image-rendering: pixelated; }}
</style></head><body>
<h1>lipdet eval &mdash; {html.escape(str(s['model']))}</h1>
{_main_table(s)}
{_details(s)}
{_per_loss_table(s)}
{''.join(figs)}
{cert_html}
{_per_class_table(s)}
<h2>Settings</h2><pre>{html.escape(json.dumps(s['settings'], indent=2, sort_keys=True))}</pre>
<p class="note">Raw numbers: <a href="results.json">results.json</a>.</p>
</body></html>
"""
    index = out / "index.html"
    write_text_atomic(index, page)
    return index


__all__ = ["draw_side_by_side", "plot_eps_curve", "write_report"]
