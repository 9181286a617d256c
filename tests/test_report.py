"""`vitq report`: one self-contained HTML page from real (tiny) run folders, read back with html.parser."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from conftest import write_colour_tree
from vitq.cli import main
from vitq.errors import VitqError
from vitq.reporting import plots_available, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_PREFIX = "data:image/png;base64,"


class Page(HTMLParser):
    """What the tests read off a page: tables by class (rows of cell texts), images, ids, notes."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[list[str]]]] = {}  # class -> tables -> body rows -> cells
        self.images: list[str] = []
        self.ids: set[str] = set()
        self.notes: list[str] = []
        self.links: list[str] = []
        self._rows: list[list[str]] | None = None
        self._cell: list[str] | None = None
        self._in_head = False
        self._note: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag in ("link", "script") or (tag != "img" and (a.get("src") or a.get("href"))):
            self.links.append(a.get("src") or a.get("href") or tag)
        if tag == "table":
            self._rows = []
            self.tables.setdefault(a.get("class", ""), []).append(self._rows)
        elif tag == "thead":
            self._in_head = True
        elif tag == "tbody":
            self._in_head = False
        elif tag == "tr" and self._rows is not None and not self._in_head:
            self._rows.append([])
        elif tag == "td" and self._rows is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "p" and "note" in a.get("class", ""):
            self._note = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._rows = None
        elif tag == "p" and self._note is not None:
            self.notes.append("".join(self._note))
            self._note = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._note is not None:
            self._note.append(data)

    def pngs(self) -> list[bytes]:
        assert all(src.startswith(PNG_PREFIX) for src in self.images), "every image is embedded"
        return [base64.b64decode(src[len(PNG_PREFIX):], validate=True) for src in self.images]


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(code: int, err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("vitq: error:"), err
    return lines[0]


TINY = ["--calib-size", "8", "--eq-n", "8", "--device", "cpu", "--quiet"]
RECON = ["--optim-size", "12", "--iters", "20", "--rank", "2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny model, a colour dataset, and three real runs: qdrop W4/A4, qdrop W3/A3, mse W4/A4."""
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    root = tmp_path_factory.mktemp("report")
    write_colour_tree(root / "colours" / "train")
    write_colour_tree(root / "colours" / "val")
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=3)
    torch.manual_seed(0)
    model_dir = root / "tiny_vit"
    model_dir.mkdir()
    save_file(VisionTransformer(**kwargs).state_dict(), str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_text(json.dumps({"arch_kwargs": kwargs, "mean": [0.5] * 3, "std": [0.5] * 3}))
    world = {"root": root, "model": model_dir, "data": root / "colours"}
    for name, recipe, bits, extra in (("w4a4", "qdrop", "4", RECON), ("w3a3", "qdrop", "3", RECON),
                                      ("mse", "mse", "4", [])):
        out = root / name
        assert main(["quantize", "--model", str(model_dir), "--data", str(root / "colours"), "--recipe", recipe,
                     "--w-bits", bits, "--a-bits", bits, *TINY, *extra, "--out", str(out)]) == 0
        world[name] = out
    return world


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def test_one_run_page_holds_its_numbers_blocks_and_plots(world, capsys):
    run = world["w4a4"]
    code, out, err = _run(["report", run], capsys)
    assert code == 0, err
    page_path = run / "report.html"
    assert out.strip() == str(page_path)  # the default place, printed alone
    page = Page(page_path.read_text(encoding="utf-8"))
    report = _report(run)

    (acc,) = page.tables["accuracy"]
    rows = {row[0]: row for row in acc}
    assert rows["FP32"][3] == f"{report['fp_top1']:.2f}" and rows["quantized"][3] == f"{report['quant_top1']:.2f}"
    assert rows["quantized"][4] == f"{report['quant_top5']:.2f}" and rows["quantized"][1:3] == ["4", "4"]

    (blocks,) = page.tables["blocks"]
    summaries = report["reconstruction_blocks"]
    assert [row[0] for row in blocks] == [b["block"] for b in summaries] == ["patch_embed", "blocks.0", "blocks.1",
                                                                            "head"]
    for row, b in zip(blocks, summaries):
        assert row[2] == f"{b['output_mse_calibrated']:.3e} → {b['output_mse_fp_input']:.3e}"

    config = {row[0]: row[1] for row in page.tables["config"][0]}
    assert config["recipe"] == "qdrop" and config["bits"] == "W4/A4" and config["seed"] == "0"
    assert "iters=20" in config["reconstruction"] and "torch" in config["versions"]

    # loss curves, output error before/after, time per stage; every one a real PNG
    pngs = page.pngs()
    assert len(pngs) == 3 and all(p.startswith(PNG_SIGNATURE) and len(p) > 1000 for p in pngs)
    assert "comparison" not in page.ids and not any("no reconstruction" in n for n in page.notes)
    assert not page.links, "self-contained: no external scripts, styles or images"
    # drawn through Figure + FigureCanvasAgg: pyplot's global state was never touched
    assert "matplotlib.pyplot" not in sys.modules


def test_runs_in_different_bits_are_compared_with_an_accuracy_vs_bits_plot(world, tmp_path):
    out = write_report([world["w4a4"], world["w3a3"]], tmp_path / "pages" / "both.html")
    assert out == tmp_path / "pages" / "both.html"
    assert [p.name for p in out.parent.iterdir()] == ["both.html"]  # atomic write: no temporary left over
    page = Page(out.read_text(encoding="utf-8"))
    assert "comparison" in page.ids and {"run-0", "run-1"} <= page.ids
    (comparison,) = page.tables["comparison"]
    for row, run, bits in zip(comparison, (world["w4a4"], world["w3a3"]), ("W4/A4", "W3/A3")):
        report = _report(run)
        assert row[0] == run.name and row[2] == "qdrop" and row[3] == bits
        assert row[6] == f"{report['fp_top1']:.2f}" and row[8] == f"{report['quant_top1']:.2f}"
    assert len(page.tables["accuracy"]) == 2 and len(page.tables["blocks"]) == 2
    pngs = page.pngs()  # accuracy vs bits + 3 per run
    assert len(pngs) == 7 and all(p.startswith(PNG_SIGNATURE) for p in pngs)


def test_runs_in_the_same_bits_get_no_bits_plot_and_a_folder_out_gets_report_html(world, tmp_path):
    out = write_report([world["w4a4"], world["mse"]], tmp_path)
    assert out == tmp_path / "report.html"
    page = Page(out.read_text(encoding="utf-8"))
    assert len(page.tables["comparison"][0]) == 2 and any("share their bits" in n for n in page.notes)
    assert len(page.pngs()) == 3 + 1  # the qdrop run's three, the mse run's stage times


def test_calibration_only_run_says_it_has_no_reconstruction(world, tmp_path):
    page = Page(write_report([world["mse"]], tmp_path / "mse.html").read_text(encoding="utf-8"))
    assert any("has no reconstruction stage" in n for n in page.notes)
    assert "blocks" not in page.tables
    report = _report(world["mse"])
    rows = {row[0]: row for row in page.tables["accuracy"][0]}
    assert rows["quantized"][3] == f"{report['quant_top1']:.2f}"
    assert len(page.pngs()) == 1  # what it has: time per stage


def _damage(world, tmp_path, text: str) -> Path:
    run = tmp_path / "damaged"
    run.mkdir()
    (run / "report.json").write_text(text)
    return run


@pytest.mark.parametrize("make, needle", [
    (lambda world, tmp: tmp, "is not a vitq run (it has no report.json)"),
    (lambda world, tmp: tmp / "nowhere", "is not a folder"),
    (lambda world, tmp: _damage(world, tmp, (world["w4a4"] / "report.json").read_text()[:200]), "not valid JSON"),
    (lambda world, tmp: _damage(world, tmp, "[1, 2]"), "not a JSON object"),
    (lambda world, tmp: _damage(world, tmp, '{"reconstruction_blocks": {"block": 1}}'), "reconstruction_blocks"),
    (lambda world, tmp: _damage(world, tmp, '{"quant_top1": "high"}'), "quant_top1 is not a number"),
])
def test_bad_input_is_one_line(make, needle, world, tmp_path, capsys):
    code, _, err = _run(["report", make(world, tmp_path), "--out", tmp_path / "x.html"], capsys)
    assert needle in _one_line_error(code, err)
    assert not (tmp_path / "x.html").exists()


def test_several_runs_need_out(world, capsys):
    code, _, err = _run(["report", world["w4a4"], world["w3a3"]], capsys)
    assert "--out" in _one_line_error(code, err)


def test_missing_matplotlib_is_one_line_that_says_how_to_install(world, tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.ticker", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    assert not plots_available()
    code, _, err = _run(["report", world["w4a4"], "--out", tmp_path / "x.html"], capsys)
    assert "pip install matplotlib" in _one_line_error(code, err)
    with pytest.raises(VitqError, match=r"pip install matplotlib \(or vitq\[report\]\)"):
        write_report([world["w4a4"]], tmp_path / "y.html")


def test_demo_ends_with_its_html_report(world, tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = _run(["demo", "--model", world["model"], "--data", world["data"], "--iters", "2",
                              "--optim-size", "12", "--calib-size", "8", "--out", out, "--quiet", "--device", "cpu"],
                             capsys)
    assert code == 0, err
    assert f"HTML report: {out / 'report.html'}" in stdout
    report = _report(out)
    page = Page((out / "report.html").read_text(encoding="utf-8"))
    rows = {row[0]: row for row in page.tables["accuracy"][0]}
    assert rows["calibrated (no reconstruction)"][3] == f"{report['calibrated_top1']:.2f}"
    assert len(page.tables["blocks"][0]) == len(report["reconstruction_blocks"]) and len(page.pngs()) == 3


def test_importing_vitq_does_not_import_matplotlib():
    code = "import sys, vitq; assert 'matplotlib' not in sys.modules, 'matplotlib imported by import vitq'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

