import shutil
from pathlib import Path

import numpy as np
import pytest

from vitq.data import (CIFAR10_CLASSES, FolderImageDataset, atomic_write_bytes, cifar10_archive, fixed_subset, load_cifar10,
                       resolve_data, build_dataset)
from vitq.errors import VitqError


def test_cifar10_test_split_shapes_and_class_counts():
    images, labels = load_cifar10("test")
    assert images.shape == (10_000, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (10_000,)
    assert np.bincount(labels, minlength=10).tolist() == [1000] * 10
    assert 20 < images.mean() < 235  # decoded pixels, not zeros


def test_cifar10_train_split_counts():
    images, labels = load_cifar10("train")
    assert images.shape == (50_000, 32, 32, 3)
    assert np.bincount(labels, minlength=10).tolist() == [5000] * 10


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("VITQ_CACHE", str(tmp_path / "cache"))
    first = load_cifar10("test")
    cached = list((tmp_path / "cache").glob("cifar10-test-*.npz"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    second = load_cifar10("test")
    assert cached[0].stat().st_mtime_ns == stamp  # read, not rewritten
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])


def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("VITQ_CACHE", str(tmp_path))
    load_cifar10("test")
    cached = next(tmp_path.glob("cifar10-test-*.npz"))
    cached.write_bytes(b"not an npz")
    images, _ = load_cifar10("test")
    assert images.shape[0] == 10_000


def test_sha256_mismatch_is_detected(tmp_path):
    bad = tmp_path / "test.tar.gz"
    shutil.copy(cifar10_archive("test"), bad)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(VitqError, match="sha256"):
        load_cifar10("test", archive=bad)


def test_fixed_subset_is_random_over_classes_and_repeatable():
    _, labels = load_cifar10("test")
    idx = fixed_subset(len(labels), 200, seed=0)
    assert np.array_equal(idx, fixed_subset(len(labels), 200, seed=0))
    assert not np.array_equal(idx, fixed_subset(len(labels), 200, seed=1))
    assert len(set(labels[idx].tolist())) == 10  # the first 200 would be one class only
    assert idx.tolist() != list(range(200))


def test_subset_larger_than_data_is_an_error():
    with pytest.raises(VitqError, match="holds only 10"):
        fixed_subset(10, 11)


def test_folder_dataset_reads_classes_in_sorted_order(colour_tree):
    ds = FolderImageDataset(colour_tree / "val")
    assert ds.classes == ["blue", "green", "red"]
    assert len(ds) == 12 and np.bincount(ds.labels).tolist() == [4, 4, 4]
    img, label = ds[0]
    assert img.size == (32, 32) and label == 0


def test_resolve_data_errors(tmp_path):
    with pytest.raises(VitqError, match="does not exist"):
        resolve_data(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitqError, match="empty"):
        resolve_data(tmp_path / "empty")
    (tmp_path / "no_images" / "cls").mkdir(parents=True)
    spec = resolve_data(tmp_path / "no_images")
    with pytest.raises(VitqError, match="no images found"):
        build_dataset(spec, "eval", None)


def test_calibration_split_never_falls_back_to_eval_images(colour_tree):
    shutil.rmtree(colour_tree / "train")
    spec = resolve_data(colour_tree)
    with pytest.raises(VitqError, match="no train/ folder"):
        build_dataset(spec, "calib", None)


def test_unknown_split_is_refused_not_read_as_calibration_images():
    # 'test' once silently meant the CIFAR-10 training images (every split but 'eval' did)
    with pytest.raises(ValueError, match="'eval' or 'calib'"):
        build_dataset(resolve_data("cifar10"), "test", None)


def test_unreadable_image_names_the_file(colour_tree):
    broken = colour_tree / "val" / "red" / "zzz_broken.png"
    broken.write_bytes(b"this is not a png")
    ds = FolderImageDataset(colour_tree / "val")
    idx = [i for i, (p, _) in enumerate(ds.samples) if Path(p) == broken][0]
    with pytest.raises(VitqError, match="zzz_broken.png"):
        ds[idx]


def test_class_names_constant():
    assert CIFAR10_CLASSES[0] == "airplane" and len(CIFAR10_CLASSES) == 10


def test_atomic_writes_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "f.bin", lambda fh: fh.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644
