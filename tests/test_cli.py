"""The CLI end to end, in-process (``vitq.cli.main``) and once as a real subprocess."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from vitq.cli import main
from vitq.errors import VitqError
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
    # the hardware too: the same command gives other numbers on CPUs with other kernels
    from vitq.report import CPU_FEATURES

    machine = report["machine"]
    assert machine["cpu"] and machine["cpu_count"] >= 1 and set(machine["cpu_features"]) <= set(CPU_FEATURES)
    if os.path.exists("/proc/cpuinfo") and " avx2" in open("/proc/cpuinfo").read():
        assert "avx2" in machine["cpu_features"]


@pytest.mark.parametrize("name", ["cifar10_vit", "cifar10_swin"])
def test_eval_reference_with_limit(name, tmp_path, capsys):
    if not (reference_asset_dir(name) / "model.safetensors").is_file():
        pytest.skip(f"{name} weights not built")
    out = tmp_path / "run"
    code, stdout, _ = _run(["eval", "--model", name, "--data", "cifar10", "--limit", "300",
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


# ----------------------------------------------------------------------------- quantize / demo as subprocesses
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count in every process: identical numbers


def _vitq(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "vitq.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


TINY_RECON = ["--w-bits", "4", "--a-bits", "4", "--calib-size", "8", "--optim-size", "12", "--eq-n", "8",
              "--rank", "2", "--device", "cpu", "--quiet"]


def test_quantize_subprocess_applies_the_override_flags(tiny_vit_dir, colour_tree, tmp_path):
    out = tmp_path / "q"
    proc = _vitq("quantize", "--model", tiny_vit_dir, "--data", colour_tree, "--recipe", "fimaq+dfq",
                 "--dfq-granularity", "head", "--iters", "3", "--alpha", "0.25", "--search-tokens", "all",
                 "--search-samples", "4", "--fine-grid", "4", "--fine-grid-span", "2", "--bias-correction", "--out", out,
                 *TINY_RECON)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    cfg = report["config"]
    assert cfg["calibration"]["fine_grid"] == 4 and cfg["calibration"]["fine_grid_span"] == 2
    assert cfg["calibration"]["bias_correction"] is True
    assert "blocks.0.mlp.fc2.bias_correction" in _tensors(out / "model")
    assert cfg["softmax_quantizer"] == "dfq" and cfg["softmax_options"] == {"granularity": "head"}
    assert cfg["reconstruction"]["iters"] == 3 and cfg["reconstruction"]["alpha"] == 0.25
    assert cfg["reconstruction"]["rank"] == 2 and cfg["calibration"]["eq_n"] == 8 and cfg["calib_size"] == 8
    assert cfg["calibration"]["max_search_tokens"] is None and cfg["calibration"]["max_search_samples"] == 4
    assert [b["block"] for b in report["reconstruction_blocks"]] == ["patch_embed", "blocks.0", "blocks.1", "head"]
    assert {"fp_top1", "quant_top1"} <= set(report) and report["stages"]["quantize"]["peak_mem_mb"] > 0
    # per-head DFQ: one interval per head of the tiny ViT (3 heads)
    assert _tensors(out / "model")["blocks.0.attn.matmul2.a_quantizer.b1"].numel() == 3
    # --no-dfq takes the recipe back to the uniform post-softmax quantizer
    out2 = tmp_path / "q2"
    # (and the global term and the refinement stage take their flags)
    proc = _vitq("quantize", "--model", tiny_vit_dir, "--data", colour_tree, "--recipe", "fimaq+dfq", "--no-dfq",
                 "--iters", "2", "--global-weight", "0.5", "--global-every", "2", "--refine-iters", "3",
                 "--refine-rounding", "soft", "--refine-drop-prob", "0.5", "--out", out2, *TINY_RECON)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out2 / "report.json").read_text())
    assert report["config"]["softmax_quantizer"] == "uniform"
    assert report["config"]["reconstruction"]["global_weight"] == 0.5
    assert report["config"]["reconstruction"]["global_every"] == 2
    assert report["config"]["refine"]["iters"] == 3 and report["config"]["refine"]["rounding"] == "soft"
    assert report["refinement"]["history"]["iteration"] == [0, 2] and "quantize.refinement" in report["stages"]


@pytest.mark.parametrize("argv, needle", [
    (["--recipe", "fimaq+lrc", "--dfq-granularity", "head"], "--dfq-granularity"),
    (["--recipe", "fimaq", "--lrc-mode", "side"], "no aiq stage"),
    (["--recipe", "mse", "--iters", "5"], "no reconstruction stage"),
    (["--recipe", "mse", "--refine-drop-prob", "2"], "refine drop_prob"),
    (["--recipe", "qdrop", "--global-weight", "-1"], "global_weight"),
    (["--recipe", "fimaq", "--w-bits", "9"], "between 2 and 8"),
    (["--recipe", "nope"], "unknown recipe"),
])
def test_quantize_bad_flags_give_one_line(argv, needle, tiny_vit_dir, colour_tree, capsys):
    code, _, err = _run(["quantize", "--model", str(tiny_vit_dir), "--data", str(colour_tree), *argv, "--quiet"],
                        capsys)
    lines = [l for l in err.strip().splitlines() if l]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err


def test_demo_subprocess_on_a_tiny_model(tiny_vit_dir, colour_tree, tmp_path):
    out = tmp_path / "demo"
    proc = _vitq("demo", "--model", tiny_vit_dir, "--data", colour_tree, "--iters", "2", "--optim-size", "12",
                 "--calib-size", "8", "--out", out, "--quiet", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["quant"]["images"] == 12 and report["config"]["reconstruction"]["iters"] == 2
    assert {"fp_top1", "calibrated_top1", "quant_top1"} <= set(report)
    assert "+ FIMA-Q reconstruction" in proc.stdout and (out / "model" / "model.safetensors").is_file()


def test_kill_9_mid_block_then_the_same_command_resumes_to_the_uninterrupted_result(tiny_vit_dir, colour_tree,
                                                                                   tmp_path):
    args = ["quantize", "--model", tiny_vit_dir, "--data", colour_tree, "--recipe", "fimaq", "--iters", "150",
            "--skip-fp-eval", *TINY_RECON]
    full = tmp_path / "full"
    assert _vitq(*args, "--out", full).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "vitq.cli", *map(str, args), "--out", str(killed)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = killed / "reconstruction.json"
    deadline = time.time() + 240
    while not progress.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    done = json.loads(progress.read_text())["blocks"]
    assert 1 <= len(done) < 4, "the run must die after its first block and before its last"
    resumed = _vitq(*args, "--out", killed)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _tensors(full / "model"), _tensors(killed / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the same folder with another model (same architecture, perturbed weights) is refused
    other = tmp_path / "other_model"
    shutil.copytree(tiny_vit_dir, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(other / "model.safetensors"))
    weights["blocks.0.mlp.fc1.weight"] += 0.01
    save_file(weights, str(other / "model.safetensors"))
    args_other = [a if a != tiny_vit_dir else other for a in args]
    refused = _vitq(*args_other, "--out", killed)
    lines = [l for l in refused.stderr.strip().splitlines() if l]
    assert refused.returncode == 2 and len(lines) == 1 and "another model" in lines[0], refused.stderr


def test_quantize_prints_and_records_a_cost_estimate_before_a_long_run(tiny_vit_dir, colour_tree, tmp_path,
                                                                        capsys, monkeypatch):
    import vitq.cli.commands

    monkeypatch.setattr(vitq.cli.commands, "ESTIMATE_FROM_ITERS", 2)  # the tiny run counts as long
    out = tmp_path / "q"
    code, stdout, _ = _run(["quantize", "--model", str(tiny_vit_dir), "--data", str(colour_tree), "--recipe",
                            "qdrop", "--iters", "2", "--out", str(out), "--quiet", "--device", "cpu",
                            *map(str, TINY_RECON)], capsys)
    assert code == 0, stdout
    assert "reconstruction: about" in stdout and "4 blocks x 2 iterations" in stdout
    assert json.loads((out / "report.json").read_text())["estimated_reconstruction_s"] > 0


def test_the_compile_switch_reaches_every_stage_the_recipe_has():
    from vitq.cli import build_parser, recipe_from_args

    def recipe(*flags):
        return recipe_from_args(build_parser().parse_args(["quantize", "--model", "m", "--data", "d", *flags]))

    mse = recipe("--recipe", "mse", "--compile", "on")  # calibration only: no reconstruction stage is added
    assert mse.calibration.compile_kernels == "on" and mse.reconstruction is None and mse.refine is None
    refine = recipe("--recipe", "fimaq+refine", "--compile", "off")
    assert (refine.calibration.compile_kernels, refine.reconstruction.compile_kernels,
            refine.refine.compile_kernels) == ("off", "off", "off")
    default = recipe("--recipe", "fimaq")
    assert default.calibration.compile_kernels == default.reconstruction.compile_kernels == "auto"


def test_bias_correction_is_the_mse_recipes_default_and_a_switch_both_ways():
    from vitq.cli import build_parser, recipe_from_args

    def recipe(*flags):
        return recipe_from_args(build_parser().parse_args(["quantize", "--model", "m", "--data", "d", *flags]))

    assert recipe("--recipe", "mse").calibration.bias_correction is True
    assert recipe("--recipe", "mse", "--no-bias-correction").calibration.bias_correction is False
    assert recipe("--recipe", "fimaq").calibration.bias_correction is False
    assert recipe("--recipe", "fimaq", "--bias-correction").calibration.bias_correction is True


def test_snapshot_images_flag_reaches_the_reconstruction_and_bad_values_are_one_line():
    from vitq.cli import build_parser, recipe_from_args

    def recipe(*flags):
        return recipe_from_args(build_parser().parse_args(["quantize", "--model", "m", "--data", "d", *flags]))

    assert recipe("--recipe", "fimaq-diag+rot+log", "--snapshot-images", "128").reconstruction.snapshot_images == 128
    assert recipe("--recipe", "fimaq").reconstruction.snapshot_images is None
    # the Swin's best W3A3 setting (benchmarks/beyond.md, group swindplr) as the README gives it
    swin = recipe("--recipe", "fimaq+rot+log", "--iters", "1000", "--snapshot-images", "128", "--refine-iters", "200",
                  "--refine-learn-biases")
    assert (swin.reconstruction.loss, swin.reconstruction.iters, swin.rotation) == ("fimaq_dplr", 1000, "hadamard")
    assert swin.refine is not None and swin.refine.iters == 200 and swin.refine.learn_biases
    assert swin.refine.rounding == "hard"
    assert recipe("--recipe", "fimaq", "--first-block-iters", "900").reconstruction.first_block_iters == 900
    assert recipe("--recipe", "fimaq").reconstruction.first_block_iters is None
    with pytest.raises(VitqError, match="snapshot_images must be between 1 and optim_size"):
        recipe("--recipe", "fimaq", "--optim-size", "64", "--snapshot-images", "128")
