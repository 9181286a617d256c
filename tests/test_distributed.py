"""torch.distributed: two gloo processes compute what one process computes.

Each test spawns two CPU processes (gloo, one thread each) running the same call as the
single-process reference run in the test process, and compares what rank 0 saved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import vitq
from conftest import tiny_swin, tiny_vit
from vitq import distributed
from vitq.errors import VitqError
from vitq.evaluation import evaluate

CALIB = dict(w_bits=3, a_bits=3, calib_size=16, calibration={"eq_n": 16}, progress=False, device="cpu")
# odd batch sizes on purpose: the ranks get unequal slices (8 + 7, and a last capture batch of 8)
RECON = {"optim_size": 48, "iters": 25, "rank": 3, "batch_size": 15, "capture_batch_size": 20}


def _data(n: int = 48) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, 3, 32, 32)


def _model(family: str) -> torch.nn.Module:
    return tiny_swin() if family == "swin" else tiny_vit()


def _run(family: str, recipe: str, recon: dict, work_dir: str | None = None, extra: dict | None = None) -> dict:
    """The call every test makes, in one process or on each rank; what it returns is compared."""
    calibrated: dict = {}

    def keep_calibration(model: torch.nn.Module) -> None:
        calibrated.update({k: v.clone() for k, v in model.state_dict().items()})

    data = _data()
    result = vitq.quantize_with_summary(_model(family), data, recipe, **CALIB, reconstruction=recon,
                                        after_calibration=keep_calibration, work_dir=work_dir, **(extra or {}))
    with torch.no_grad():
        logits = result.model(data)
    blocks = result.reconstruction["blocks"] if result.reconstruction else []
    return {"calibrated": calibrated, "logits": logits, "final": {k: v.clone() for k, v in result.model.state_dict().items()},
            "history": {**{b["block"]: b["history"]["rec"] for b in blocks},
                        **{f"{b['block']}.global": b["history"]["global"] for b in blocks if "global" in b["history"]},
                        **({"refine": result.refinement["history"]["kl"]} if result.refinement else {})}}


def _worker(rank: int, world: int, store: str, out: str, scenario: dict) -> None:
    import datetime

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        if scenario.get("die_on_block") is not None and rank == 1:
            import vitq.reconstruction.engine as engine

            real, calls = engine.reconstruct_block, {"n": 0}

            def dies(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == scenario["die_on_block"]:
                    os._exit(3)  # a rank that dies without a word
                return real(*args, **kwargs)

            engine.reconstruct_block = dies
        gathered = {"rows": 0}
        real_gather = distributed.gather_rows

        def counting_gather(t, *args, **kwargs):
            gathered["rows"] += len(t)
            return real_gather(t, *args, **kwargs)

        distributed.gather_rows = counting_gather  # proves the work really was shared out
        try:
            result = _run(scenario["family"], scenario["recipe"], scenario["recon"], scenario.get("work_dir"),
                          scenario.get("extra"))
            result["error"] = None
            result["gathered_rows"] = gathered["rows"]
        except VitqError as exc:
            result = {"error": str(exc)}
        if scenario.get("evaluate"):
            from torch.utils.data import DataLoader, TensorDataset

            x = _data(37)
            labels = torch.arange(37) % 10
            result["eval"] = evaluate(tiny_vit(), DataLoader(TensorDataset(x, labels), batch_size=8),
                                                      progress=False)
        torch.save(result, f"{out}.{rank}")
    finally:
        distributed.shutdown()


def _spawn(tmp_path: Path, scenario: dict, world: int = 2, expect_failure: bool = False) -> list[dict]:
    """Run ``scenario`` on ``world`` gloo processes; what each rank saved (None for a rank that died).

    Plain processes rather than torch.multiprocessing.spawn, which kills the survivors as soon as one
    rank dies: here the survivors must get to say what happened.
    """
    store, out = tmp_path / f"store-{os.urandom(4).hex()}", tmp_path / f"result-{os.urandom(4).hex()}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, str(store), str(out), scenario)) for r in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
        if proc.is_alive():
            proc.kill()
    codes = [proc.exitcode for proc in procs]
    if not expect_failure:
        assert codes == [0] * world, f"ranks exited with {codes}"
    return [torch.load(f"{out}.{r}", weights_only=False) if Path(f"{out}.{r}").is_file() else None
            for r in range(world)]


def _assert_same(single: dict, ranks: list[dict]) -> None:
    for res in ranks:
        assert res["error"] is None, res["error"]
        assert res["gathered_rows"] > 0
        # calibration: every parameter one process picked (the candidate scores are computed alike)
        assert single["calibrated"].keys() == res["calibrated"].keys()
        for k, v in single["calibrated"].items():
            assert torch.allclose(v.float(), res["calibrated"][k].float(), rtol=1e-5, atol=1e-6), k
        assert single["history"].keys() == res["history"].keys()
        for block, curve in single["history"].items():
            one, two = torch.tensor(curve), torch.tensor(res["history"][block])
            if block == "refine":
                # The refinement's KL is read off the training-mode forward of each step's batch. Its
                # first reading (same parameters) agrees to float noise; later ones follow parameters
                # that agree only to an ulp (float reordering of the all-reduced gradients), and at
                # 3 bits an ulp can flip an activation's rounding in that forward: measured with a
                # reading at every step, up to 6.7e-5 relative while every learned tensor still agrees
                # to 7.5e-9. The learned state itself is held to 1e-5 below.
                assert torch.allclose(one[:1], two[:1], rtol=1e-5, atol=1e-6), block
                assert torch.allclose(one, two, rtol=2e-4, atol=1e-6), block
            else:
                assert torch.allclose(one, two, rtol=1e-5, atol=1e-6), block
        assert single["final"].keys() == res["final"].keys()
        for k, v in single["final"].items():
            assert torch.allclose(v.float(), res["final"][k].float(), rtol=1e-5, atol=1e-6), k
        assert (single["logits"] - res["logits"]).abs().max() <= 1e-5


# Swin at 10 iterations: at 25, one of its AdaRound decisions ends within float noise of the
# threshold and flips with the order of the gradient sum (1 weight of 144 x 48; every other
# parameter agrees to ~1e-7), which moves this tiny model's logits by 5%: a property of the hard
# rounding under any float reordering, not of the sharding.
# The third case: the global term and a refinement with QDrop inside the whole model. Hard rounding:
# with soft rounding the refinement's curve agrees only to ~4e-5 after 10 iterations (Adam on rounding
# variables whose gradients are near zero turns the gradient sum's float reordering into visible steps).
@pytest.mark.parametrize("family, recipe, iters, extra", [
    ("vit", "fimaq", 25, None), ("swin", "qdrop", 10, None),
    ("vit", "qdrop", 10, {"refine": {"iters": 10, "optim_size": 48, "batch_size": 15, "rounding": "hard", "log_every": 1,
                                     "drop_prob": 0.5}})])
def test_two_ranks_give_what_one_process_gives(family, recipe, iters, extra, tmp_path):
    torch.set_num_threads(1)
    recon = {**RECON, "iters": iters, **({"global_weight": 1.0, "global_every": 2} if extra else {})}
    single = _run(family, recipe, recon, extra=extra)
    ranks = _spawn(tmp_path, {"family": family, "recipe": recipe, "recon": recon, "evaluate": family == "vit",
                              "extra": extra})
    _assert_same(single, ranks)
    if extra:
        assert "refine" in single["history"] and "blocks.0.global" in single["history"]
    if family == "vit":
        # sharded evaluation (19 + 18 images): the counts are summed, so both ranks see all 37
        from torch.utils.data import DataLoader, TensorDataset

        x = _data(37)
        one = evaluate(tiny_vit(), DataLoader(TensorDataset(x, torch.arange(37) % 10), batch_size=8),
                                       progress=False)
        for res in ranks:
            assert res["eval"]["images"] == 37 and res["eval"]["top1"] == one["top1"] and res["eval"]["top5"] == one["top5"]


def test_a_dead_rank_stops_the_run_and_a_rerun_resumes_after_the_last_block(tmp_path):
    torch.set_num_threads(1)
    work = tmp_path / "run"
    scenario = {"family": "vit", "recipe": "fimaq", "recon": RECON, "work_dir": str(work), "die_on_block": 3}
    ranks = _spawn(tmp_path, scenario, expect_failure=True)
    assert ranks[1] is None  # rank 1 died in its third block
    assert ranks[0] is not None and "rank 0 of 2" in ranks[0]["error"] and "resume" in ranks[0]["error"]
    saved = json.loads((work / "reconstruction.json").read_text())
    assert [b["block"] for b in saved["blocks"]] == ["patch_embed", "blocks.0"] and saved["world_size"] == 2

    # another world size may not resume it
    with pytest.raises(VitqError, match="2 process"):
        _run("vit", "fimaq", RECON, str(work))

    resumed = _spawn(tmp_path, {**scenario, "die_on_block": None})
    single = _run("vit", "fimaq", RECON)
    _assert_same(single, resumed)


def test_sharded_draws_equal_one_draw_of_the_whole_batch():
    # the QDrop mask rule, checked without processes: a fake two-rank group
    x = torch.randn(6, 3, 5, 4).transpose(-2, -1)  # non-contiguous, batch outermost in memory
    torch.manual_seed(0)
    whole = torch.rand_like(x)
    saved = distributed._ACTIVE
    distributed._ACTIVE = distributed.Dist(None, 1, 2, torch.device("cpu"))
    try:
        torch.manual_seed(0)
        with distributed.sharded_draws(4, 6, 6):
            part = distributed.uniform_like(x[4:])
        assert torch.equal(part, whole[4:])
        windows = torch.randn(6 * 4, 7)  # Swin: 4 windows per image, image-major
        torch.manual_seed(0)
        whole = torch.rand_like(windows)
        torch.manual_seed(0)
        with distributed.sharded_draws(3, 6, 6):
            assert torch.equal(distributed.uniform_like(windows[12:]), whole[12:])
        # QDrop's 16-bit coins follow the same rule
        torch.manual_seed(0)
        whole = distributed.random_int16_like(x)
        torch.manual_seed(0)
        with distributed.sharded_draws(4, 6, 6):
            assert torch.equal(distributed.random_int16_like(x[4:]), whole[4:])
        torch.manual_seed(1)
        with distributed.sharded_draws(4, 6, 6):
            assert not torch.equal(distributed.random_int16_like(x[4:]), whole[4:])
    finally:
        distributed._ACTIVE = saved


def test_a_ranks_block_batch_is_its_rows_of_the_whole_batch_and_draws_the_same():
    # BlockContext.batch with a rank's rows gathers only those rows from the caches, but QDrop's
    # input mask is drawn for the whole batch: the rows equal the whole batch's, and the
    # generator ends where one process's ends
    from vitq.reconstruction import ReconConfig
    from vitq.reconstruction.extension import BlockContext

    x_fp, x_q, y = torch.randn(20, 5, 4), torch.randn(20, 5, 4), torch.randn(20, 5, 4)
    idx = torch.tensor([3, 17, 0, 8, 11, 5, 19])

    def ctx(seed: int) -> BlockContext:
        return BlockContext(None, "b", None, x_fp, x_q, y, ReconConfig(), torch.device("cpu"),
                            torch.Generator().manual_seed(seed))

    one = ctx(0)
    whole_x, whole_y = one.batch(idx)
    after_one = torch.rand(3, generator=one.gen)
    assert not torch.equal(whole_x, x_fp[idx]) and not torch.equal(whole_x, x_q[idx])  # a real mix
    for rows in (slice(0, 4), slice(4, 7)):
        part = ctx(0)
        xb, yb = part.batch(idx, rows)
        assert torch.equal(xb, whole_x[rows]) and torch.equal(yb, whole_y[rows])
        assert torch.equal(torch.rand(3, generator=part.gen), after_one)
    xb, _ = ctx(1).batch(idx, slice(4, 7))
    assert not torch.equal(xb, whole_x[4:7])


def test_shares_are_contiguous_and_cover_everything():
    d = distributed.Dist(None, 0, 3, torch.device("cpu"))
    spans = [d.span(10, r) for r in range(3)]
    assert spans == [(0, 4), (4, 7), (7, 10)]
    assert [d.span(2, r) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]


def test_unshardable_sizes_are_refused_with_one_line():
    from vitq.reconstruction import ReconConfig

    saved = distributed._ACTIVE
    distributed._ACTIVE = distributed.Dist(None, 0, 4, torch.device("cpu"))
    try:
        with pytest.raises(VitqError, match="calibration images"):
            distributed.check_shardable(3, None)
        with pytest.raises(VitqError, match="at least the 4 ranks"):
            distributed.check_shardable(64, ReconConfig(batch_size=2))
        with pytest.raises(VitqError, match="last batch of 2"):
            distributed.check_shardable(64, ReconConfig(optim_size=66, capture_batch_size=64))
        distributed.check_shardable(64, ReconConfig(optim_size=68, capture_batch_size=64))
    finally:
        distributed._ACTIVE = saved


def test_torchrun_cli_quantize_matches_one_process_and_rank_0_alone_writes(tiny_vit_dir, colour_tree, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["quantize", "--model", str(tiny_vit_dir), "--data", str(colour_tree), "--recipe", "fimaq", "--iters", "8",
            "--w-bits", "4", "--a-bits", "4", "--calib-size", "8", "--optim-size", "12", "--eq-n", "8", "--rank", "2",
            "--recon-batch-size", "6", "--device", "cpu", "--quiet"]
    one = subprocess.run([sys.executable, "-m", "vitq", *args, "--out", str(tmp_path / "one")], capture_output=True,
                         text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(29500 + os.getpid() % 1000), "-m", "vitq", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("quantized") == 1  # rank 0 alone prints its summary
    r1, r2 = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert r2["world_size"] == 2 and r1["world_size"] == 1
    assert r2["quant_top1"] == r1["quant_top1"] and r2["fp_top1"] == r1["fp_top1"]
    a, b = load_file(str(tmp_path / "one" / "model" / "model.safetensors")), \
        load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6) for k in a)
