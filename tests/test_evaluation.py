import torch
import pytest

from vitq.data import FolderImageDataset, make_loader
from vitq.errors import VitqError
from vitq.evaluation import evaluate
import torchvision.transforms as T


class ChannelArgmax(torch.nn.Module):
    """Predicts the brightest channel; with classes (blue, green, red) that is index 2 - channel."""

    def forward(self, x):
        means = x.mean(dim=(2, 3))  # (B, 3) in RGB order
        return means.flip(1) * 10  # logits ordered (blue, green, red)


class Constant(torch.nn.Module):
    def __init__(self, cls: int, n: int = 3):
        super().__init__()
        self.cls, self.n = cls, n

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.n)
        out[:, self.cls] = 1.0
        out[:, (self.cls + 1) % self.n] = 0.5  # second guess
        return out


def _loader(colour_tree):
    return make_loader(FolderImageDataset(colour_tree / "val", T.ToTensor()), batch_size=5)


def test_perfect_model_scores_100(colour_tree):
    res = evaluate(ChannelArgmax(), _loader(colour_tree), progress=False)
    assert res["top1"] == 100.0 and res["images"] == 12


def test_constant_model_scores_its_class_share(colour_tree):
    res = evaluate(Constant(0), _loader(colour_tree), progress=False)
    assert res["top1"] == pytest.approx(100 / 3, abs=1e-3)
    # top-5 over 3 classes covers everything
    assert res["top5"] == 100.0


def test_nan_logits_are_reported(colour_tree):
    class NaNModel(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 3), float("nan"))

    with pytest.raises(VitqError, match="NaN"):
        evaluate(NaNModel(), _loader(colour_tree), progress=False)
