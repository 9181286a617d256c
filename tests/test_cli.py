"""The CLI end to end, in-process (``vitq.cli.main``) and once as a real subprocess."""

import json
import subprocess
import sys

import pytest

from vitq.cli import main
from vitq.models import reference_asset_dir

HAS_REFERENCE = (reference_asset_dir() / "model.safetensors").is_file()


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_model_folder_on_image_folder(tiny_vit_dir, colour_tree, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = _run(["eval", "--model", str(tiny_vit_dir), "--data", str(colour_tree),
                            "--device", "cpu", "--out", str(out), "--quiet"], capsys)
    assert code == 0, stdout
    report = json.loads((out / "report.json").read_text())
    for key in ("top1", "top5", "images", "seconds", "versions"):
        assert key in report
    assert report["images"] == 12
    assert {"vitq", "torch", "timm"} <= set(report["versions"])


@pytest.mark.skipif(not HAS_REFERENCE, reason="reference weights not built")
def test_eval_reference_with_limit(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = _run(["eval", "--model", "cifar10_vit", "--data", "cifar10", "--limit", "300",
                            "--device", "cpu", "--out", str(out), "--quiet"], capsys)
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 300
    # a trained model on a class-balanced random sample: far above the 10% of chance
    assert report["top1"] > 60.0


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--model", "no_such_model_xyz", "--data", "cifar10"], "unknown model"),
    (["eval", "--model", "cifar10_vit", "--data", "/no/such/folder"], "does not exist"),
    (["eval", "--model", "vit_tiny_patch16_224", "--data", "cifar10", "--checkpoint", "/no/file.pth"],
     "does not exist"),
    (["eval", "--model", "cifar10_vit", "--data", "cifar10", "--limit", "20000"], "holds only 10000"),
    (["eval", "--model", "cifar10_vit", "--data", "cifar10", "--device", "tpu"], "device"),
])
def test_bad_input_gives_one_line_error(argv, needle, capsys):
    if "cifar10_vit" in argv and not HAS_REFERENCE and needle in ("holds only 10000",):
        pytest.skip("reference weights not built")
    code, _, err = _run(argv + ["--quiet"], capsys)
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("vitq: error:"), err
    assert needle in lines[0]


def test_empty_data_folder_error(tmp_path, tiny_vit_dir, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _run(["eval", "--model", str(tiny_vit_dir), "--data", str(tmp_path / "empty"), "--quiet"], capsys)
    assert code == 2 and "empty" in err and "Traceback" not in err


def test_corrupt_image_error_names_file(colour_tree, tiny_vit_dir, capsys):
    (colour_tree / "val" / "green" / "broken.jpg").write_bytes(b"\x00garbage")
    code, _, err = _run(["eval", "--model", str(tiny_vit_dir), "--data", str(colour_tree), "--quiet"], capsys)
    assert code == 2 and "broken.jpg" in err


def test_console_script_runs_as_subprocess(tiny_vit_dir, colour_tree, tmp_path):
    out = tmp_path / "sub"
    proc = subprocess.run([sys.executable, "-m", "vitq.cli", "eval", "--model", str(tiny_vit_dir), "--data",
                           str(colour_tree), "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "top-1" in proc.stdout and (out / "report.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "vitq.cli", "eval", "--model", "nope_model", "--data", "cifar10"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
