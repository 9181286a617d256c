"""The page's plots, drawn off-screen with matplotlib's object API.

``Figure`` + ``FigureCanvasAgg`` instead of pyplot: nothing here touches pyplot's global state or
the user's chosen backend, and matplotlib is imported only when a page is drawn.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from ..errors import VitqError
from .runs import as_float, bits_label, is_number

MATPLOTLIB_HINT = "the HTML report draws its plots with matplotlib: pip install matplotlib (or vitq[report])"


def plots_available() -> bool:
    """Whether matplotlib can be imported (the page needs it for its plots)."""
    try:
        _matplotlib()
    except VitqError:
        return False
    return True


def _matplotlib():
    try:
        import matplotlib
        import matplotlib.ticker
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise VitqError(MATPLOTLIB_HINT) from None
    return matplotlib, Figure, FigureCanvasAgg


class Plotter:
    """Draws figures off-screen and returns them as ``<img>`` tags with base64 PNG data."""

    def __init__(self) -> None:
        self.mpl, self.Figure, self.Canvas = _matplotlib()

    def figure(self, width: float = 6.4, height: float = 3.4):
        return self.Figure(figsize=(width, height), dpi=100, layout="constrained")

    def img(self, fig, alt: str) -> str:
        buf = io.BytesIO()
        self.Canvas(fig).print_png(buf)
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'

    def colours(self, n: int) -> list:
        # distinct colours for up to 20 lines; a smooth ramp beyond (ViT-L has 26 blocks)
        name = "tab10" if n <= 10 else "tab20" if n <= 20 else "viridis"
        cmap = self.mpl.colormaps[name]
        return [cmap(i) if name != "viridis" else cmap(i / max(1, n - 1)) for i in range(n)]

    @staticmethod
    def scale(ax, values: list[float]) -> None:
        """Log scale where the values span more than a decade; symlog when some are exactly zero."""
        positive = [v for v in values if is_number(v) and v > 0]
        if not positive or max(positive) / min(positive) < 10:
            return
        if len(positive) == len(values):
            ax.set_yscale("log")
        elif min(values) >= 0:  # e.g. the rounding loss, zero during warm-up
            ax.set_yscale("symlog", linthresh=min(positive))

    def loss_curves(self, blocks: list[dict[str, Any]]) -> str:
        fig = self.figure(9.0, 3.6)
        axes = fig.subplots(1, 2)
        colours = self.colours(len(blocks))
        for ax, key, title in zip(axes, ("rec", "round"), ("reconstruction loss", "rounding loss")):
            values: list[float] = []
            for colour, b in zip(colours, blocks):
                hist = b.get("history") or {}
                its, ys = hist.get("iteration") or [], hist.get(key) or []
                if its and len(its) == len(ys):
                    ax.plot(its, ys, color=colour, label=b["block"], linewidth=1.2)
                    values += ys
            self.scale(ax, values)
            ax.set(title=title, xlabel="iteration")
            ax.xaxis.set_major_locator(self.mpl.ticker.MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize="x-small", ncol=1 + len(blocks) // 10)
        return self.img(fig, "per-block loss curves")

    def output_error(self, blocks: list[dict[str, Any]]) -> str:
        fig = self.figure(max(6.4, 0.45 * len(blocks) + 2), 3.4)
        ax = fig.subplots()
        xs = range(len(blocks))
        before = [as_float(b.get("output_mse_calibrated")) for b in blocks]
        after = [as_float(b.get("output_mse_fp_input")) for b in blocks]
        ax.bar([x - 0.2 for x in xs], before, width=0.4, label="before (calibrated)", color="#bbbbbb")
        ax.bar([x + 0.2 for x in xs], after, width=0.4, label="after reconstruction", color="#1f77b4")
        self.scale(ax, [v for v in before + after if v == v])
        ax.set_xticks(list(xs), [b["block"] for b in blocks], rotation=45 if len(blocks) > 6 else 0,
                      ha="right" if len(blocks) > 6 else "center", fontsize="small")
        ax.set(title="block output MSE (float input)", ylabel="MSE")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3, axis="y")
        return self.img(fig, "per-block output error before and after reconstruction")

    def stage_times(self, stages: dict[str, dict[str, Any]]) -> str:
        names = [n for n, s in stages.items() if is_number(s.get("seconds"))]
        fig = self.figure(6.4, 0.8 + 0.32 * max(1, len(names)))
        ax = fig.subplots()
        seconds = [float(stages[n]["seconds"]) for n in names]
        # sub-stages (quantize.calibration, ...) are parts of their parent's bar: lighter
        colours = ["#9ecae1" if "." in n else "#1f77b4" for n in names]
        ax.barh(range(len(names)), seconds, color=colours)
        ax.set_yticks(range(len(names)), names, fontsize="small")
        ax.invert_yaxis()
        for y, s in enumerate(seconds):
            ax.text(s, y, f" {s:.3g} s", va="center", fontsize="x-small")
        ax.set(title="time per stage", xlabel="seconds")
        ax.margins(x=0.15)
        return self.img(fig, "time per stage")

    def accuracy_vs_bits(self, reports: list[dict[str, Any]]) -> str:
        done = [r for r in reports if is_number(r.get("quant_top1")) and is_number(r.get("w_bits"))]
        bits = sorted({(r["w_bits"], r.get("a_bits")) for r in done}, key=lambda wa: (wa[0], wa[1] or 0))
        x_of = {wa: i for i, wa in enumerate(bits)}
        fig = self.figure(6.4, 3.6)
        ax = fig.subplots()
        recipes = sorted({str(r.get("recipe")) for r in done})
        for colour, recipe in zip(self.colours(len(recipes)), recipes):
            points: dict[int, list[float]] = {}
            for r in done:
                if str(r.get("recipe")) == recipe:
                    points.setdefault(x_of[(r["w_bits"], r.get("a_bits"))], []).append(r["quant_top1"])
            xs = sorted(points)
            # several runs at one point (seeds): the line goes through their mean, each run is a dot
            ax.plot(xs, [sum(points[x]) / len(points[x]) for x in xs], marker="o", color=colour, label=recipe)
            for x in xs:
                ax.scatter([x] * len(points[x]), points[x], color=colour, s=12)
        fps = {str(r.get("model")): r["fp_top1"] for r in reports if is_number(r.get("fp_top1"))}
        for (model, fp), style in zip(fps.items(), ("--", ":", "-.") * len(fps)):
            ax.axhline(fp, color="black", linestyle=style, linewidth=1,
                       label="FP32" if len(fps) == 1 else f"FP32 {model}")
        ax.set_xticks(range(len(bits)), [bits_label(w, a) for w, a in bits])
        ax.set(title="quantized top-1 vs bits", xlabel="weight / activation bits", ylabel="top-1 %")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        return self.img(fig, "accuracy vs bits per recipe")

