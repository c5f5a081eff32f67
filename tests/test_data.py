import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data import DataConfig
from mimkit.data import (DataError, EpochSampler, MaskedImages, build_dataset, eval_transform, limited_indices,
                         pretrain_transform)
from mimkit.masking import RandomMask

from conftest import CIFAR10, needs_cifar10


def test_digits_split_is_fixed_and_stratified():
    tr, te = build_dataset(DataConfig(name="digits"), "train"), build_dataset(DataConfig(name="digits"), "test")
    assert len(tr) + len(te) == 1797 and len(te) == 360
    x, y = tr[0]
    assert x.shape == (3, 8, 8) and 0 <= x.min() and x.max() <= 1
    counts = np.bincount(te.labels.numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    assert torch.equal(build_dataset(DataConfig(name="digits"), "test").images, te.images)
    assert len(build_dataset(DataConfig(name="digits"), "train", limit=100)) == 100


def test_synthetic():
    ds = build_dataset(DataConfig(name="synthetic", img_size=16, synthetic_size=64), "train")
    assert len(ds) == 64 and ds[0][0].shape == (3, 16, 16)


def make_tree(root, n=3, classes=("a", "b"), size=20):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_imagefolder_tree(tmp_path):
    root = make_tree(tmp_path / "data")
    cfg = DataConfig(name="imagefolder", root=str(root), img_size=16)
    tr, va = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert len(tr) == 6 and len(va) == 6 and tr.classes == ["a", "b"]
    x = pretrain_transform(cfg)(tr[0][0])
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert eval_transform(cfg)(va[0][0]).shape == (3, 16, 16)


def test_limit_spreads_over_a_class_sorted_folder(tmp_path):
    """data.limit takes images evenly spread over the split: an image folder is sorted by class, and its first
    N images would be one class (CIFAR-10: data.limit=5000 was airplanes only)."""
    root = make_tree(tmp_path / "data", n=4, classes=("a", "b", "c"))
    cfg = DataConfig(name="imagefolder", root=str(root), img_size=16)
    ds = build_dataset(cfg, "train", limit=3)
    assert len(ds) == 3 and ds.classes == ["a", "b", "c"]
    assert sorted(label for _, label in ds) == [0, 1, 2]
    assert list(ds.indices) == [0, 4, 8]
    assert limited_indices(10, 0) == limited_indices(10, 10) == list(range(10))
    idx = limited_indices(50000, 10000)
    assert len(set(idx)) == 10000 and idx == sorted(idx) and idx[-1] < 50000


def test_imagefolder_errors_name_the_path(tmp_path):
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="nope"):
        build_dataset(cfg, "train")
    root = make_tree(tmp_path / "d")
    (root / "train" / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        build_dataset(DataConfig(name="imagefolder", root=str(root)), "train")


def test_corrupt_image_reported_or_skipped(tmp_path):
    root = make_tree(tmp_path / "d")
    bad = root / "train" / "a" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    cfg = DataConfig(name="imagefolder", root=str(root), img_size=8)
    base = build_dataset(cfg, "train")
    with pytest.raises(DataError, match="1.png"):
        base[1]
    ds = MaskedImages(base, pretrain_transform(cfg), RandomMask(2, 0.5), seed=0, skip_corrupt=True)
    with pytest.warns(UserWarning, match="1.png"):
        img, mask, label, replaced = ds[(0, 1)]
    assert replaced == 1 and img.shape == (3, 8, 8)


def test_samples_are_seeded_by_seed_epoch_index():
    cfg = DataConfig(name="digits", img_size=8, crop_scale=(0.3, 1.0))
    base = build_dataset(cfg, "train")
    ds = MaskedImages(base, pretrain_transform(cfg), RandomMask(4, 0.75), seed=3)
    a, b = ds[(1, 5)], ds[(1, 5)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = ds[(2, 5)]
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


def test_epoch_sampler_partitions_across_ranks():
    one = [i for _, i in EpochSampler(20, 1, 0, seed=1)]
    r0 = [i for _, i in EpochSampler(20, 2, 0, seed=1)]
    r1 = [i for _, i in EpochSampler(20, 2, 1, seed=1)]
    assert sorted(r0 + r1) == sorted(one) == list(range(20))
    assert r0 == one[0::2] and r1 == one[1::2]  # one process with batch 2b sees what two see with b


@needs_cifar10
def test_cifar10_folder():
    cfg = DataConfig(name="cifar10", root=str(CIFAR10), img_size=32)
    tr, te = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert len(tr) == 50000 and len(te) == 10000 and len(tr.classes) == 10
    img, label = tr[0]
    assert img.size == (32, 32) and pretrain_transform(cfg)(img).shape == (3, 32, 32)
