"""benchmarks/train_reference.py's training loop: a run killed mid-way resumes from its last finished epoch
and ends where an uninterrupted run ends, bit for bit (the reference models are trained across sittings)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_reference.py"


@pytest.fixture(scope="module")
def train_reference():
    spec = importlib.util.spec_from_file_location("train_reference_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module._AUTOCAST_BF16 = False  # float32: the comparison below is exact
    yield module
    del sys.modules[spec.name]


class Killed(Exception):
    pass


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


def _train(tr, work: Path, kill_at_step: int | None = None) -> tuple[nn.Module, list]:
    x = torch.rand(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (48,), generator=torch.Generator().manual_seed(2))
    model = _tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    calls = [0]

    def loss_fn(m, xb, yb):
        calls[0] += 1
        if kill_at_step is not None and calls[0] == kill_at_step:
            raise Killed
        return F.cross_entropy(m(tr.normalise(xb, (0.5,) * 3, (0.25,) * 3)), yb)

    log: list = []
    tr.run_epochs("t", model, opt, 3, 16, 1e-2, 1, loss_fn, x, y, x, y, (0.5,) * 3, (0.25,) * 3,
                  work / "ckpt.pt", 0, log)
    return model, log


def test_killed_training_resumes_to_the_uninterrupted_result(train_reference, tmp_path):
    whole, whole_log = _train(train_reference, tmp_path / "whole")
    with pytest.raises(Killed):  # killed in the second epoch's second step (3 steps per epoch)
        _train(train_reference, tmp_path / "resumed", kill_at_step=5)
    saved = torch.load(tmp_path / "resumed" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert saved["epoch"] == 1
    resumed, resumed_log = _train(train_reference, tmp_path / "resumed")
    assert [r["train_loss"] for r in resumed_log] == [r["train_loss"] for r in whole_log]
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    # and training moved the weights (the comparison is not between two untouched models)
    assert not torch.equal(_tiny_model()[2].weight, whole[2].weight)
