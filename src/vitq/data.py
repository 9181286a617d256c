"""Datasets: the shipped CIFAR-10 proving ground and class-per-folder image trees.

The CIFAR-10 archives ship inside the package as JPEG tarballs. They are read
without an extraction step, checked against their sha256, decoded once and
cached as uint8 arrays under ``$VITQ_CACHE`` (default ``~/.cache/vitq``).

Both archives list their images class by class, so every subset taken here
(``--limit``, a calibration sample) is a fixed random sample over all classes,
never the first N.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision
from PIL import Image, UnidentifiedImageError

from .errors import VitqError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
CIFAR10_SHA256 = {
    "train": "52d2fd9049f98f8d748a1586464af4262e2c66a0fc2136d9d328b382515ae6cc",
    "test": "9cb4e2bae05e06300fbed1bd23e84db3be4127d3b3c6e339f0668c94dc1e58d1",
}
CIFAR10_COUNTS = {"train": 50_000, "test": 10_000}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Names users may give for the evaluation / calibration splits of a folder tree.
EVAL_SPLITS = ("val", "test", "validation")
CALIB_SPLITS = ("train",)


def cache_dir() -> Path:
    """Where decoded datasets are cached (``$VITQ_CACHE`` or ``~/.cache/vitq``)."""
    return Path(os.environ.get("VITQ_CACHE", Path.home() / ".cache" / "vitq"))


def cifar10_archive(split: str) -> Path:
    """Path of the shipped CIFAR-10 tarball for ``split`` ('train' or 'test')."""
    if split not in CIFAR10_SHA256:
        raise VitqError(f"unknown CIFAR-10 split {split!r}: use 'train' or 'test'")
    return Path(str(resources.files("vitq") / "assets" / "cifar10" / f"{split}.tar.gz"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write a file through a temporary sibling and rename it into place.

    A killed process therefore never leaves a half-written file under ``path``. The file gets the
    mode an ordinary ``open`` would give it (0666 less the umask; mkstemp alone makes it 0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def decode_cifar10_archive(archive: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode every JPEG of a CIFAR-10 tarball into (N, 32, 32, 3) uint8 and labels."""
    images, labels = [], []
    with tarfile.open(archive, "r:gz") as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile()), key=lambda m: m.name)
        for member in members:
            parts = Path(member.name).parts
            if len(parts) != 3 or parts[0] != split or parts[1] not in CIFAR10_CLASSES:
                continue
            raw = tf.extractfile(member).read()
            try:
                img = Image.open(io.BytesIO(raw)).convert("RGB")
            except (UnidentifiedImageError, OSError) as exc:
                raise VitqError(f"corrupt image {member.name} in {archive}: {exc}") from None
            images.append(np.asarray(img, dtype=np.uint8))
            labels.append(CIFAR10_CLASSES.index(parts[1]))
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_cifar10(split: str, archive: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return the decoded CIFAR-10 ``split`` as (images uint8 NHWC, labels int64).

    The archive's sha256 is checked on every call (a few tens of milliseconds);
    the decoded arrays are cached under :func:`cache_dir`, keyed by that hash.
    """
    archive = Path(archive) if archive is not None else cifar10_archive(split)
    if not archive.is_file():
        raise VitqError(f"CIFAR-10 archive {archive} is missing: reinstall vitq (pip install -e .)")
    digest = sha256_of(archive)
    if digest != CIFAR10_SHA256[split]:
        raise VitqError(
            f"CIFAR-10 archive {archive} has sha256 {digest[:16]}..., expected "
            f"{CIFAR10_SHA256[split][:16]}...: the file is corrupt, reinstall vitq"
        )
    cached = cache_dir() / f"cifar10-{split}-{digest[:16]}.npz"
    if cached.is_file():
        try:
            with np.load(cached) as npz:
                images, labels = npz["images"], npz["labels"]
            if len(images) == CIFAR10_COUNTS[split] == len(labels):
                return images, labels
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt below
    images, labels = decode_cifar10_archive(archive, split)
    if len(images) != CIFAR10_COUNTS[split]:
        raise VitqError(f"CIFAR-10 {split} archive holds {len(images)} images, expected {CIFAR10_COUNTS[split]}")
    try:
        atomic_write_bytes(cached, lambda fh: np.savez(fh, images=images, labels=labels))
    except OSError:
        pass  # a read-only cache only costs the decode next time
    return images, labels


def fixed_subset(n_total: int, n: int | None, seed: int = 0) -> np.ndarray:
    """A fixed random sample of ``n`` indices out of ``n_total`` (sorted), or all of them.

    Sorted so a subset keeps the dataset's order; random so that class-sorted
    datasets give every class its share.
    """
    if n is None or n >= n_total:
        if n is not None and n > n_total:
            raise VitqError(f"asked for {n} images but the data holds only {n_total}: lower --limit/--calib-size")
        return np.arange(n_total)
    if n <= 0:
        raise VitqError(f"asked for {n} images: the count must be positive")
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n_total)[:n])


class ArrayImageDataset(torch.utils.data.Dataset):
    """Images held as a uint8 NHWC array, transformed as PIL images (timm transforms)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None = None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i])
        x = self.transform(img) if self.transform is not None else img
        return x, int(self.labels[i])


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _load_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise VitqError(f"cannot read image {path}: {exc.__class__.__name__}; remove or replace the file") from None


class FolderImageDataset(torchvision.datasets.ImageFolder):
    """A class-per-folder tree (``ROOT/<class>/<image>``, classes sorted by name): torchvision's
    ``ImageFolder`` whose user mistakes (no images, an unreadable file) are one-line
    :class:`VitqError` s naming the folder or the file."""

    def __init__(self, root: Path, transform: Callable | None = None):
        root = Path(root)
        try:
            super().__init__(str(root), transform=transform, loader=_load_rgb, is_valid_file=_is_image,
                             allow_empty=True)
        except FileNotFoundError:  # no class folder at all
            self.samples = []
        if not self.samples:
            raise VitqError(f"no images found under {root}: expected {root}/<class>/<image>.jpg")
        self.labels = np.asarray(self.targets, dtype=np.int64)


@dataclass
class DataSpec:
    """Where the evaluation and calibration images of a ``--data`` argument live."""

    name: str
    kind: str  # "cifar10" or "folder"
    eval_root: Path | None = None
    calib_root: Path | None = None


def resolve_data(data: str | os.PathLike) -> DataSpec:
    """Interpret a ``--data`` argument: ``cifar10`` or a folder tree.

    A folder may be ImageNet-style (``val/`` and ``train/`` class folders) or a
    single class-per-folder tree used for both (calibration then still needs
    a separate ``--calib-data`` to stay off the evaluation images).
    """
    if str(data) == "cifar10":
        return DataSpec(name="cifar10", kind="cifar10")
    root = Path(data).expanduser()
    if not root.exists():
        raise VitqError(f"data path {root} does not exist: pass 'cifar10' or an image folder (ROOT/val/<class>/*.JPEG)")
    if not root.is_dir():
        raise VitqError(f"data path {root} is not a folder: pass a class-per-folder tree or 'cifar10'")
    eval_root = next((root / s for s in EVAL_SPLITS if (root / s).is_dir()), None)
    calib_root = next((root / s for s in CALIB_SPLITS if (root / s).is_dir()), None)
    if eval_root is None and calib_root is None:
        eval_root = root
    if eval_root is None:
        raise VitqError(f"{root} has train/ but no val/ folder to evaluate on: add {root}/val/<class>/...")
    if not any(p.is_dir() for p in eval_root.iterdir()):
        raise VitqError(f"data folder {eval_root} is empty or has no class folders: expected {eval_root}/<class>/<image>")
    return DataSpec(name=str(root), kind="folder", eval_root=eval_root, calib_root=calib_root)


def build_dataset(spec: DataSpec, split: str, transform: Callable | None) -> torch.utils.data.Dataset:
    """The ``split`` ('eval' or 'calib') of a resolved data spec with ``transform`` applied."""
    if split not in ("eval", "calib"):  # 'test' / 'train' would otherwise read the calibration images
        raise ValueError(f"split must be 'eval' or 'calib', got {split!r}")
    if spec.kind == "cifar10":
        images, labels = load_cifar10("test" if split == "eval" else "train")
        return ArrayImageDataset(images, labels, transform)
    root = spec.eval_root if split == "eval" else spec.calib_root
    if root is None:
        raise VitqError(
            f"{spec.name} has no train/ folder for calibration images: add {spec.name}/train/<class>/... "
            "or pass --calib-data FOLDER (calibration never uses the evaluation images)"
        )
    return FolderImageDataset(root, transform)


def subset(dataset: torch.utils.data.Dataset, n: int | None, seed: int = 0) -> torch.utils.data.Dataset:
    """A fixed random subset of ``n`` items (all of them when ``n`` is None)."""
    idx = fixed_subset(len(dataset), n, seed)
    if len(idx) == len(dataset):
        return dataset
    return torch.utils.data.Subset(dataset, idx.tolist())


def make_loader(
    dataset: torch.utils.data.Dataset, batch_size: int, workers: int = 0, shuffle: bool = False
) -> torch.utils.data.DataLoader:
    """A DataLoader with vitq's conventions (ordered, no dropped tail)."""
    if batch_size <= 0:
        raise VitqError(f"--batch-size must be positive, got {batch_size}")
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       drop_last=False)
