"""The HTML page: tables per run, a comparison of several runs, plots embedded as base64 PNG."""

from __future__ import annotations

import html
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from ..data import atomic_write_bytes
from ..errors import VitqError
from .plots import Plotter
from .runs import as_float, bits_label, is_number, load_run

# the reconstruction settings worth a line on the page; the Fisher ones only for the FIMA-Q losses
RECON_KEYS = ("loss", "iters", "optim_size", "batch_size", "input_mode", "drop_prob", "adaround", "weight_lr",
              "act_lr", "round_lambda")
FISHER_KEYS = ("rank", "alpha", "lowrank_form", "snapshot_schedule", "renormalize", "temperature")
AIQ_KEYS = ("lrc", "lrc_mode", "rank_policy", "fixed_rank", "search_iters", "curriculum")


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if is_number(value) else "–"


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(css_class: str, header: Sequence[str], rows: list[Sequence[str]]) -> str:
    """A table whose cells are already HTML (callers escape text)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _config_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    config = report.get("config") or {}
    rows = [("command", report.get("command")), ("model", report.get("model")), ("data", report.get("data")),
            ("images evaluated", report.get("limit") or "all"), ("device", report.get("device")),
            ("recipe", report.get("recipe") or config.get("name")),
            ("bits", bits_label(report.get("w_bits"), report.get("a_bits"))
             if report.get("w_bits") is not None else None),
            ("seed", report.get("seed")), ("calibration images", report.get("calib_size")),
            ("post-softmax quantizer", config.get("softmax_quantizer"))]
    for key, label in (("head_w_bits", "head bits"), ("patch_embed_w_bits", "patch-embed weight bits")):
        if config.get(key) is not None:
            rows.append((label, config[key]))
    calib = config.get("calibration") or {}
    if calib:
        shown = ("method", "eq_n", "search_rounds", "fine_grid", "fine_grid_span", "bias_correction")
        rows.append(("calibration", ", ".join(f"{k}={calib[k]}" for k in shown if k in calib)))
    recon = config.get("reconstruction")
    if isinstance(recon, dict):
        keys = RECON_KEYS + (FISHER_KEYS if str(recon.get("loss", "")).startswith("fimaq") else ())
        rows.append(("reconstruction", ", ".join(f"{k}={recon[k]}" for k in keys if k in recon)))
    aiq = config.get("aiq")
    if isinstance(aiq, dict):
        rows.append(("AIQViT", ", ".join(f"{k}={aiq[k]}" for k in AIQ_KEYS if k in aiq)))
    versions = report.get("versions") or {}
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or None))
    return [(k, _e(v)) for k, v in rows if v is not None]


def _accuracy_rows(report: dict[str, Any]) -> list[list[str]]:
    w, a = report.get("w_bits", "–"), report.get("a_bits", "–")
    rows = []
    for key, label, bits in (("fp", "FP32", ("32", "32")), ("calibrated", "calibrated (no reconstruction)", (w, a)),
                             ("quant", "quantized", (w, a))):
        result = report.get(key) or {}
        top1, top5 = report.get(f"{key}_top1", result.get("top1")), report.get(f"{key}_top5", result.get("top5"))
        if top1 is not None:
            rows.append([label, _e(bits[0]), _e(bits[1]), _fmt(top1, ".2f"), _fmt(top5, ".2f"),
                         _e(result.get("images", "–"))])
    if not rows and is_number(report.get("top1")):  # a `vitq eval` folder
        rows.append(["evaluated", "32", "32", _fmt(report["top1"], ".2f"), _fmt(report.get("top5"), ".2f"),
                     _e(report.get("images", "–"))])
    return rows


def _block_rows(blocks: list[dict[str, Any]], with_ranks: bool) -> list[list[str]]:
    rows = []
    for b in blocks:
        ranks = b.get("lrc_ranks")
        prefix = b["block"] + "."
        ranks_txt = (", ".join(f"{k.removeprefix(prefix)} {v}" for k, v in ranks.items())
                     if isinstance(ranks, dict) and ranks else "–")
        rows.append([_e(b["block"]), _fmt(b.get("seconds"), ".2f"),
                     f"{_fmt(b.get('output_mse_calibrated'), '.3e')} → {_fmt(b.get('output_mse_fp_input'), '.3e')}",
                     _fmt(b.get("final_rec_loss"), ".4g"), _fmt(b.get("final_round_loss"), ".4g"),
                     _e(b.get("snapshots", "–")), _fmt(b.get("peak_mem_mb"), ".0f")] + ([_e(ranks_txt)] * with_ranks))
    return rows


def _run_section(index: int, run_dir: Path, report: dict[str, Any], plots: Plotter) -> str:
    parts = [f'<section class="run" id="run-{index}"><h2>{_e(run_dir.name or run_dir)}</h2>',
             f'<p class="path">{_e(run_dir.resolve())}</p>', "<h3>Configuration</h3>",
             _table("config", ["setting", "value"], [[f"<b>{_e(k)}</b>", v] for k, v in _config_rows(report)]),
             "<h3>Accuracy</h3>"]
    acc = _accuracy_rows(report)
    parts.append(_table("accuracy", ["model", "W bits", "A bits", "top-1 %", "top-5 %", "images"], acc) if acc
                 else '<p class="note">This run holds no accuracy results (it stopped before evaluating).</p>')
    calib = report.get("calibration") or {}
    if calib:
        parts.append(f'<p>Calibration: {_e(calib.get("modules", "–"))} quantized modules in '
                     f'{_fmt(calib.get("seconds"), ".2f")} s; LayerNorm affine folded into '
                     f'{len(calib.get("folded_layers") or [])} layers.</p>')
    parts.append("<h3>Reconstruction</h3>")
    blocks = report.get("reconstruction_blocks") or []
    if blocks:
        with_ranks = any("lrc_ranks" in b for b in blocks)  # AIQViT's low-rank compensation only
        header = ["block", "seconds", "output MSE before → after", "final rec loss", "final round loss",
                  "snapshots", "peak MB"] + ["LRC ranks"] * with_ranks
        parts += [_table("blocks", header, _block_rows(blocks, with_ranks)),
                  plots.loss_curves(blocks), plots.output_error(blocks)]
    elif isinstance((report.get("config") or {}).get("reconstruction"), dict):
        parts.append('<p class="note no-reconstruction">The recipe has a reconstruction stage, but this run holds '
                     "no results of it (it stopped before its first block finished).</p>")
    else:
        parts.append(f'<p class="note no-reconstruction">This run has no reconstruction stage (recipe '
                     f'{_e(report.get("recipe", "–"))} is calibration only): the page shows its configuration, '
                     "accuracy and stage times.</p>")
    stages = report.get("stages") or {}
    if stages:
        cuda = any("peak_cuda_mem_mb" in s for s in stages.values())  # runs on a GPU only
        parts += ["<h3>Time and memory per stage</h3>",
                  _table("stages", ["stage", "seconds", "peak MB"] + ["peak CUDA MB"] * cuda,
                         [[_e(n), _fmt(s.get("seconds"), ".3f"), _fmt(s.get("peak_mem_mb"), ".0f")]
                          + [_fmt(s.get("peak_cuda_mem_mb"), ".0f")] * cuda for n, s in stages.items()]),
                  plots.stage_times(stages)]
    return "\n".join(parts + ["</section>"])


def _comparison(names: list[str], reports: list[dict[str, Any]], plots: Plotter) -> str:
    rows = []
    for name, r in zip(names, reports):
        recon = (r.get("config") or {}).get("reconstruction")
        blocks = r.get("reconstruction_blocks") or []
        fp, q = r.get("fp_top1"), r.get("quant_top1")
        stages = r.get("stages") or {}
        peak = max((s.get("peak_mem_mb") for s in stages.values() if is_number(s.get("peak_mem_mb"))), default=None)
        rows.append([_e(name), _e(r.get("model", "–")), _e(r.get("recipe", "–")),
                     _e(bits_label(r.get("w_bits"), r.get("a_bits"))), _e(r.get("seed", "–")),
                     _e(recon.get("iters", "–") if isinstance(recon, dict) else "–"),
                     _fmt(fp, ".2f"), _fmt(r.get("calibrated_top1"), ".2f"), _fmt(q, ".2f"),
                     _fmt(r.get("quant_top5"), ".2f"),
                     _fmt(q - fp, "+.2f") if is_number(fp) and is_number(q) else "–",
                     _fmt(sum(as_float(b.get("seconds")) for b in blocks) if blocks else None, ".1f"),
                     _fmt((stages.get("quantize") or {}).get("seconds"), ".1f"), _fmt(peak, ".0f")])
    parts = ['<section id="comparison"><h2>Comparison</h2>',
             _table("comparison", ["run", "model", "recipe", "bits", "seed", "iters", "FP top-1", "calibrated top-1",
                                   "quantized top-1", "quantized top-5", "Δ top-1", "reconstruction s",
                                   "quantize s", "peak MB"], rows)]
    bits = {(r.get("w_bits"), r.get("a_bits")) for r in reports if is_number(r.get("quant_top1"))}
    if len(bits) > 1:
        parts.append(plots.accuracy_vs_bits(reports))
    else:
        parts.append('<p class="note">The runs share their bits: no accuracy-vs-bits plot.</p>')
    return "\n".join(parts + ["</section>"])


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
.runs { display: flex; flex-wrap: wrap; gap: 2em; }
section.run { flex: 1 1 600px; min-width: 0; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.path { color: #666; font-size: 0.85em; word-break: break-all; }
.note { background: #fff6d5; padding: 0.4em 0.8em; border-left: 4px solid #e0b000; }
"""


def render_html(run_dirs: Sequence[str | Path]) -> str:
    """The page for these run folders, as a string (see :func:`write_report`)."""
    from .. import __version__

    paths = [Path(d) for d in run_dirs]
    if not paths:
        raise VitqError("no run folders given: name at least one")
    reports = [load_run(p) for p in paths]  # every input checked before any drawing
    plots = Plotter()
    names = [p.name or str(p) for p in paths]
    title = "vitq report: " + ", ".join(names)
    body = [f"<h1>{_e(title)}</h1>",
            f"<p>{len(paths)} run{'s' if len(paths) > 1 else ''}; written by vitq {_e(__version__)} on "
            f"{datetime.now():%Y-%m-%d %H:%M}.</p>"]
    if len(paths) > 1:
        body.append(_comparison(names, reports, plots))
    body.append('<div class="runs">')
    body += [_run_section(i, p, r, plots) for i, (p, r) in enumerate(zip(paths, reports))]
    body.append("</div>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write one self-contained HTML page for ``run_dirs`` to ``out`` (a file, or a folder to hold
    ``report.html``), atomically; returns the file's path.

    Per run: configuration, accuracy, per-block reconstruction table, loss curves, block output error
    before/after reconstruction, time per stage. For several runs also a comparison table and, when
    their bits differ, quantized top-1 against bits per recipe.
    """
    out = Path(out)
    if out.is_dir():
        out = out / "report.html"
    page = render_html(run_dirs).encode("utf-8")
    atomic_write_bytes(out, lambda fh: fh.write(page))
    return out
