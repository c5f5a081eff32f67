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
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8
    assert pretrain_transform(cfg)(img).shape == (3, 32, 32)


def smooth_image(h: int, w: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: random colours at a coarse grid, upsampled bicubically, plus a little noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    return Image.fromarray(np.clip(np.asarray(coarse) + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("name,mode", [("a.jpg", "RGB"), ("b.JPEG", "L"), ("c.png", "RGB"), ("d.png", "RGBA"),
                                       ("e.bmp", "RGB"), ("f.webp", "RGB")])
def test_read_rgb_is_pillows_rgb_pixels(tmp_path, name, mode):
    from mimkit.data import read_rgb
    path = tmp_path / name
    smooth_image(30, 40).convert(mode).save(path, quality=90) if name.lower().endswith(("jpg", "jpeg")) else \
        smooth_image(30, 40).convert(mode).save(path)
    ref = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
    got = read_rgb(str(path))
    assert got.dtype == torch.uint8 and got.shape == (3, 30, 40)
    assert torch.equal(got, ref)


def test_pretrain_transform_matches_maes_pipeline_on_uint8_images():
    """The official MAE pipeline (torchvision v1 transforms on a PIL image) seeded alike: the same crops and flips,
    pixels within 2 levels of 255 (resampling rounds in a different order), the mean difference far below one."""
    import torchvision.transforms as T1
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    mae = T1.Compose([T1.RandomResizedCrop(24, scale=(0.2, 1.0), interpolation=3), T1.RandomHorizontalFlip(),
                      T1.ToTensor(), T1.Normalize(mean, std)])
    ours = pretrain_transform(DataConfig(name="imagefolder", root="x", img_size=24))
    levels = torch.tensor(std).view(3, 1, 1) * 255
    refs, diffs, others = [], [], []
    for seed in range(30):
        img = smooth_image(45, 60, seed)
        torch.manual_seed(seed)
        refs.append(mae(img))
        torch.manual_seed(seed)
        got = ours(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
        assert got.dtype == torch.float32 and got.shape == refs[-1].shape
        diffs.append((got - refs[-1]) * levels)
        others.append((ours(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)) - refs[-1]) * levels)
    d = torch.stack(diffs).abs()
    assert d.max() <= 2.01 and d.mean() < 0.2, (d.max(), d.mean())
    # the bound means something: the next draw (another crop and flip) is many levels away
    assert torch.stack(others).abs().mean() > 10


def test_pretrain_transform_on_float_images_is_torchvisions_v2_compose():
    """In-memory (float) images: bit for bit the torchvision v2 pipeline the golden values were recorded with."""
    import torchvision.transforms.v2 as T
    cfg = DataConfig(name="digits", img_size=8, crop_scale=(0.3, 1.0))
    mean, std = ((0.3052,) * 3, (0.3815,) * 3)
    v2 = T.Compose([T.ToImage(), T.RandomResizedCrop(8, scale=(0.3, 1.0), interpolation=T.InterpolationMode.BICUBIC,
                                                     antialias=True), T.RandomHorizontalFlip(),
                    T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])
    ours = pretrain_transform(cfg)
    base = build_dataset(cfg, "train")
    for i in range(20):
        torch.manual_seed(i)
        ref = v2(base[i][0])
        torch.manual_seed(i)
        assert torch.equal(ours(base[i][0]), ref.as_subclass(torch.Tensor)), i


def test_crop_params_are_torchvisions_get_params():
    """The same draws and the same crops as torchvision's RandomResizedCrop.get_params, the fallback included
    (extreme aspect ratios with a scale range no crop fits in 10 tries), and the generator left in the same state."""
    from torchvision.transforms import RandomResizedCrop

    from mimkit.data import crop_params
    fallbacks = 0
    for seed, (h, w, scale) in enumerate([(375, 500, (0.2, 1.0)), (500, 375, (0.08, 1.0)), (8, 8, (0.6, 1.0)),
                                          (32, 32, (0.2, 1.0)), (10, 300, (0.9, 1.0)), (300, 10, (0.9, 1.0)),
                                          (50, 60, (1.0, 1.0))] * 30):
        torch.manual_seed(seed)
        ref = RandomResizedCrop.get_params(torch.empty(3, h, w), scale, (3 / 4, 4 / 3))
        after_ref = torch.rand(1)
        torch.manual_seed(seed)
        assert crop_params(h, w, scale) == ref, (h, w, scale, seed)
        assert torch.rand(1) == after_ref
        fallbacks += ref in ((0, (w - int(round(h * 4 / 3))) // 2, h, int(round(h * 4 / 3))),
                             ((h - int(round(w * 4 / 3))) // 2, 0, int(round(w * 4 / 3)), w))
    assert fallbacks >= 30  # the 10 x 300 and 300 x 10 images: the fallback path was compared too


def test_masked_images_draw_the_transform_from_the_samples_seed_and_leave_the_global_generator():
    """A PretrainTransform gets its own generator seeded with the sample's seed: the same images as seeding the
    global generator (what every other transform gets), and the global stream does not move."""
    from mimkit.data import sample_seed
    cfg = DataConfig(name="synthetic", img_size=16, synthetic_size=64, crop_scale=(0.2, 1.0))
    base, tf = build_dataset(cfg, "train"), pretrain_transform(cfg)
    ds = MaskedImages(base, tf, RandomMask(4, 0.5), seed=7)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    for i in range(20):
        img = ds[(2, i)][0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(7, 2, i))
            assert torch.equal(img, tf(base[i][0])), i
    assert torch.equal(torch.rand(3), expected_next)
