"""One self-contained HTML page for one or more run folders: tables and plots, nothing external.

    vitq report runs/a runs/b --out compare.html
    vitq.write_report(["runs/a", "runs/b"], "compare.html")

A run folder is what ``vitq quantize --out DIR`` or ``vitq demo --out DIR`` leaves: ``DIR/report.json``
(see :mod:`vitq.cli`). The plots are PNGs embedded as base64 ``data:`` URIs, so the page opens
anywhere without a server or network; they need matplotlib (``pip install vitq[report]``).
"""

from .page import render_html, write_report
from .plots import plots_available
from .runs import load_run

__all__ = ["load_run", "plots_available", "render_html", "write_report"]
