"""Datasets, transforms and loaders.

Every dataset yields (image, label) with images as uint8 tensors [3, H, W] (folders, decoded through
torchvision.io) or float tensors in [0, 1] (in memory); transforms bring them to normalized tensors. Pretraining
samples are drawn through `EpochSampler`, which hands the dataset (epoch, index) keys so each sample's augmentation and mask come from a generator seeded by
(run seed, epoch, index): a run is reproducible whatever the world size or the number of loader workers.
"""
from __future__ import annotations

import functools
import math
import os
import pickle
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.io import ImageReadMode, decode_image

from .config import ConfigError
from .images import uint8_normalizer
from .sections import (CIFAR10_STATS, DATA_PRESETS, DATASETS, DIGITS_STATS, FOLDERS,  # noqa: F401  (re-exported)
                       IMAGENET_STATS, DataConfig, validate_data)


class DataError(RuntimeError):
    """Unreadable or missing data: the message names the path. One raised in a loader worker reaches the main
    process re-created by torch with the worker's traceback in its message: only its own line is kept."""

    def __init__(self, message: str = ""):
        lines = str(message).strip().splitlines()
        if len(lines) > 1 and lines[0].startswith("Caught DataError"):
            message = lines[-1].split("DataError: ", 1)[-1]
        super().__init__(message)


def message_line(e: Exception) -> str:
    """An exception's message on one line (decoders' and torch's messages span several)."""
    return " ".join(str(e).split())


# ---------------------------------------------------------------------------------------------
# Base datasets


class TensorImages(Dataset):
    """In-memory images [n, C, H, W], float in [0, 1] or uint8, with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]):
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def digits(split: str) -> TensorImages:
    """scikit-learn's bundled 8x8 handwritten digits as 3-channel images; a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx = np.arange(len(d.target))
    train_idx, test_idx = train_test_split(idx, test_size=0.2, stratify=d.target, random_state=0)
    sel = np.sort(train_idx if split == "train" else test_idx)
    x = torch.tensor(d.images[sel] / 16.0, dtype=torch.float32).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return TensorImages(x, torch.tensor(d.target[sel]), [str(c) for c in range(10)])


def synthetic(split: str, size: int = 512, img_size: int = 16, num_classes: int = 4, seed: int = 0) -> TensorImages:
    """Tests only: oriented sinusoidal stripes whose orientation is the class, random phase, colour and noise.
    Structured enough that a masked patch is predictable from its neighbours."""
    g = torch.Generator().manual_seed(seed + (0 if split == "train" else 1))
    n = size if split == "train" else max(size // 4, num_classes)
    labels = torch.arange(n) % num_classes
    theta = labels.float() * torch.pi / num_classes
    yy, xx = torch.meshgrid(torch.arange(img_size).float(), torch.arange(img_size).float(), indexing="ij")
    phase = torch.rand(n, generator=g) * 2 * torch.pi
    wave = torch.sin((xx * torch.cos(theta)[:, None, None] + yy * torch.sin(theta)[:, None, None]) * 0.8
                     + phase[:, None, None])
    colour = 0.3 + 0.7 * torch.rand(n, 3, 1, 1, generator=g)
    x = 0.5 + 0.4 * wave.unsqueeze(1) * colour + 0.05 * torch.randn(n, 3, img_size, img_size, generator=g)
    return TensorImages(x.clamp(0, 1), labels, [f"class{c}" for c in range(num_classes)])


# decoded by torchvision.io (libjpeg-turbo, libpng, libwebp, giflib); other formats go through Pillow
TORCHVISION_DECODES = (".jpg", ".jpeg", ".png", ".webp", ".gif")


def read_rgb(path: str) -> torch.Tensor:
    """An image file as a uint8 tensor [3, H, W], pixel for pixel what Pillow's `open(path).convert("RGB")`
    holds (torchvision's default loader). JPEGs decode faster through torchvision.io than through Pillow
    (benchmarks/README.md, loader)."""
    with open(path, "rb") as f:
        if path.lower().endswith(TORCHVISION_DECODES):  # Python's read: half the time of torchvision.io.read_file
            return decode_image(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return TF.pil_to_tensor(Image.open(f).convert("RGB"))


RETRY_WAIT = 0.05  # seconds before the first retry of a failed read; doubled at each further one


class CheckedImageFolder(ImageFolder):
    """ImageFolder of uint8 tensors whose read errors name the file (torchvision's name only the decoder). A read
    that fails is tried again up to `retries` times after a short, doubling wait (a file on a network filesystem
    may be missing or unreadable for a moment) before it is an error."""
    retries: int = 3

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        for attempt in range(self.retries + 1):
            try:
                return read_rgb(path), label
            except Exception as e:  # the decoders raise several types for truncated or non-image files
                if attempt == self.retries:
                    tries = f" ({attempt + 1} attempts)" if attempt else ""
                    raise DataError(f"cannot read image {path}{tries}: {message_line(e)}") from None
                time.sleep(RETRY_WAIT * 2 ** attempt)


def image_folder(root: str, split: str, retries: int = 3) -> CheckedImageFolder:
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"data.root {root!r} does not exist; point it at a folder with train/ and val/ or test/")
    if split == "train":
        folder = base / "train"
    else:
        folder = next((base / s for s in ("val", "test") if (base / s).is_dir()), base / "val")
    if not folder.is_dir():
        raise DataError(f"missing split folder {folder} (expected {root}/train/<class>/*.jpg and val/ or test/)")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise DataError(f"{folder} has no class folders; expected {folder}/<class>/<image files>")
    for c in classes:
        if not any(f.lower().endswith(IMG_EXTENSIONS) for f in os.listdir(folder / c)):
            raise DataError(f"class folder {folder / c} has no images ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
    ds = CheckedImageFolder(str(folder))
    ds.retries = retries
    return ds


# ---------------------------------------------------------------------------------------------
# CIFAR-10 as torchvision keeps it: the official pickled batches

CIFAR10_BATCHES = "cifar-10-batches-py"
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
# the official label order, which is also the sorted class folders' order: labels agree between the layouts
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class BatchUnpickler(pickle.Unpickler):
    """Pickle is CIFAR-10's own format: dicts of lists, bytes and numpy arrays (bytes written by Python 3 at
    protocol 2 come through `_codecs.encode`). A file naming any other global (code a pickle would run) is refused
    before anything is built."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of the CIFAR-10 format")
        return super().find_class(module, name)


def cifar10_batches(root: str) -> Path | None:
    """The folder of torchvision's CIFAR-10 batches: data.root/cifar-10-batches-py or data.root itself."""
    for folder in (Path(root) / CIFAR10_BATCHES, Path(root)):
        if (folder / "data_batch_1").is_file():
            return folder
    return None


def read_cifar10_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """(uint8 images [n, 3, 32, 32], labels) of one batch file; its keys as Python 2 wrote them (b'data',
    b'labels') or as torchvision reads them ('data', 'labels')."""
    try:
        with open(path, "rb") as f:
            batch = BatchUnpickler(f, encoding="latin1").load()  # latin1: Python 2's str arrays, as torchvision
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        labels = [int(y) for y in batch["labels"]]
        if not all(0 <= y < len(CIFAR10_CLASSES) for y in labels):
            raise ValueError("labels outside 0-9")
        # each row: 1024 red, then 1024 green, then 1024 blue values, row-major
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(len(labels), 3, 32, 32)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {type(e).__name__}: {message_line(e)}") from None
    return images, labels


def cifar10_pickled(folder: Path, split: str) -> TensorImages:
    """A split of torchvision's CIFAR-10 layout, held in memory as uint8 images [3, 32, 32]: the pixels a folder
    of the same images as PNGs decodes to."""
    parts = [read_cifar10_batch(folder / name) for name in CIFAR10_FILES[split]]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    return TensorImages(images, torch.tensor([y for p in parts for y in p[1]]), list(CIFAR10_CLASSES))


def download_cifar10(root: str) -> None:
    """torchvision's downloader: the official archive (its MD5 checked), unpacked into root/cifar-10-batches-py."""
    from torchvision.datasets import CIFAR10
    try:
        CIFAR10(root, train=True, download=True)
    except (OSError, RuntimeError) as e:  # no network, a proxy, a full disk, a bad checksum
        raise DataError(f"cannot download CIFAR-10 into data.root {root!r}: {message_line(e)}") from None


def cifar10(data_cfg, split: str) -> Dataset:
    """CIFAR-10 in either layout under data.root: torchvision's batches (fetched first with data.download=true
    when data.root holds neither), else train/ and test/ image folders."""
    root = data_cfg.root
    if cifar10_batches(root) is None and data_cfg.download and not (Path(root) / "train").is_dir():
        download_cifar10(root)
    folder = cifar10_batches(root)
    if folder is not None:
        return cifar10_pickled(folder, split)
    if Path(root).is_dir() and not (Path(root) / "train").is_dir():
        raise DataError(f"data.root {root!r} holds neither torchvision's {CIFAR10_BATCHES}/ nor train/ and test/ "
                        f"image folders; data.download=true fetches the former into it")
    return image_folder(root, split, data_cfg.read_retries)


def build_dataset(data_cfg, split: str, limit: int = 0) -> Dataset:
    """The base dataset of `data.name` for split 'train' or 'test' (val/ or test/ for folders)."""
    name = data_cfg.name
    if name == "digits":
        ds = digits(split)
    elif name == "synthetic":
        ds = synthetic(split, data_cfg.synthetic_size, data_cfg.img_size)
    elif name == "cifar10":
        ds = cifar10(data_cfg, split)
    elif name in FOLDERS:
        ds = image_folder(data_cfg.root, split, data_cfg.read_retries)
    elif name == "webdataset":
        from .shards import ShardIndex, expand_urls
        urls = data_cfg.urls if split == "train" else data_cfg.test_urls
        if not urls:
            raise ConfigError(f"data.{'urls' if split == 'train' else 'test_urls'} is required for the {split} split "
                              f"of data.name=webdataset, e.g. data.test_urls=/data/shards/test-{{000000..000003}}.tar")
        ds = ShardIndex(expand_urls(urls))
    else:
        raise ConfigError(f"data.name={name!r} is not valid; choose one of: {', '.join(DATASETS)}")
    if limit and limit < len(ds):
        # N images spread evenly over the split, not its first N: image folders are sorted by class, so the
        # first 10,000 of CIFAR-10's train/ are airplanes and automobiles only
        classes = ds.classes
        ds = torch.utils.data.Subset(ds, limited_indices(len(ds), limit))
        ds.classes = classes
    return ds


def limited_indices(n: int, limit: int) -> list[int]:
    """`limit` of n indices, evenly spaced and increasing (floor(i * n / limit)); all n when limit is 0 or >= n."""
    if not limit or limit >= n:
        return list(range(n))
    return [i * n // limit for i in range(limit)]


def dataset_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return DATASETS[name][0] if name in DATASETS else IMAGENET_STATS


# ---------------------------------------------------------------------------------------------
# Transforms


@functools.lru_cache
def _log_ratio(ratio: tuple[float, float]) -> tuple[float, float]:
    return tuple(torch.log(torch.tensor(ratio)).tolist())  # float32 logs, as torchvision computes them


def crop_params(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3),
                generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop: torchvision's RandomResizedCrop.get_params (v1 and v2) step for step,
    the same draws (from `generator`, else the global generator as torchvision) and the same result, without its
    per-call set-up (the ratio's logs are computed once)."""
    log_ratio = _log_ratio(tuple(ratio))
    area = height * width
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return i, j, h, w
    lo, hi = min(ratio), max(ratio)  # fallback: the centre at the image's ratio, clamped to [lo, hi]
    w, h = (width, int(round(width / lo))) if width / height < lo else \
        (int(round(height * hi)), height) if width / height > hi else (width, height)
    return (height - h) // 2, (width - w) // 2, h, w


class PretrainTransform:
    """RandomResizedCrop (bicubic, antialiased, aspect ratio 3/4-4/3), horizontal flip, normalize: MAE's pipeline.

    The crop and the flip draw exactly what torchvision's RandomResizedCrop and RandomHorizontalFlip draw (v1 and
    v2), from the generator given (else the global one), so a sample seeded alike gets the same crop as in MAE's
    code. uint8 images (folders) are cropped and resized as uint8 (torch's vectorized antialiased kernel, within
    2 levels of Pillow's), then made planar float in one copy and normalized in place; float images (in memory)
    take torchvision's float ops, as before. With `normalize=False` uint8 images stay uint8 (a quarter of the
    bytes through the loader workers): the engine normalizes them on the device after the copy
    (`mimkit.images.normalize_uint8`, the same bits)."""

    def __init__(self, size: int, scale: tuple[float, float], hflip: bool, mean, std, normalize: bool = True):
        self.size, self.scale, self.hflip, self.normalize = size, tuple(scale), hflip, normalize
        self.mean, self.std = list(mean), list(std)
        self.shift, self.factor = uint8_normalizer(mean, std)

    def __call__(self, img: torch.Tensor | Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """img [C, H, W] (uint8 or float in [0, 1]) or a PIL image -> normalized float32 [C, size, size] (uint8
        [C, size, size] for uint8 input without `normalize`)."""
        if isinstance(img, Image.Image):
            img = TF.pil_to_tensor(img.convert("RGB"))
        img = img.as_subclass(torch.Tensor)
        i, j, h, w = crop_params(img.shape[-2], img.shape[-1], self.scale, generator=generator)
        if img.dtype == torch.uint8:
            # The crop copied pixel-interleaved (channels_last, as the decoder lays out its pixels): torch's uint8
            # antialiased kernels are fastest on it, with the same output as on planar pixels.
            crop = img[None, :, i:i + h, j:j + w].contiguous(memory_format=torch.channels_last)
            img = torch.nn.functional.interpolate(crop, size=(self.size, self.size), mode="bicubic",
                                                  align_corners=False, antialias=True)[0]
        else:
            img = TF.resized_crop(img, i, j, h, w, [self.size, self.size],
                                  interpolation=T.InterpolationMode.BICUBIC, antialias=True)
        if self.hflip and torch.rand(1, generator=generator) < 0.5:
            img = img.flip(-1)  # what torchvision's horizontal_flip does to a tensor
        if img.dtype == torch.uint8 and not self.normalize:
            return img
        if img.dtype == torch.uint8:  # planar float in one pass over the channels_last pixels, normalized in place
            return torch.empty(img.shape).copy_(img).sub_(self.shift).mul_(self.factor)
        return TF.normalize(img, self.mean, self.std)


def pretrain_transform(data_cfg, normalize: bool = True) -> PretrainTransform:
    mean, std = dataset_stats(data_cfg.name)
    return PretrainTransform(data_cfg.img_size, data_cfg.crop_scale, data_cfg.hflip, mean, std, normalize)


def eval_transform(data_cfg) -> T.Compose:
    """Resize + center crop (ImageNet's 0.875 ratio at 64 px and up; a plain resize for small images)."""
    mean, std = dataset_stats(data_cfg.name)
    size = data_cfg.img_size
    resize = int(size / 0.875) if size >= 64 else size
    return T.Compose([T.ToImage(), T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.CenterCrop(size), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


def denormalize(x: torch.Tensor, name: str) -> torch.Tensor:
    mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) for v in dataset_stats(name))
    return (x * std + mean).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# Seeded per-sample pretraining data


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2 ** 63 - 1)


class EpochSampler(Sampler):
    """DistributedSampler that yields (epoch, index) keys; works unchanged with one process."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False):
        self.inner = DistributedSampler(range(n), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                                        drop_last=drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, i) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class MaskedImages(Dataset):
    """(image, mask, label, replaced) per (epoch, index) key; augmentation and mask seeded per sample.

    `replaced` is 1 when the image was unreadable and `skip_corrupt` substituted the next readable one."""

    def __init__(self, base: Dataset, transform, mask_gen, seed: int, skip_corrupt: bool = False):
        self.base, self.transform, self.mask_gen = base, transform, mask_gen
        self.seed, self.skip_corrupt = seed, skip_corrupt

    def __len__(self) -> int:
        return len(self.base)

    def _load(self, index: int):
        for attempt in range(len(self.base)):
            try:
                img, label = self.base[(index + attempt) % len(self.base)]
                return img, label, int(attempt > 0)
            except DataError as e:
                if not self.skip_corrupt:
                    raise
                warnings.warn(f"{e}; replaced by another sample (data.skip_corrupt=true)")
        raise DataError("no readable image in the dataset")

    def __getitem__(self, key):
        epoch, index = key
        img, label, replaced = self._load(index)
        img, mask = self.views(img, epoch, index)
        return img, mask, label, replaced

    def views(self, img, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(augmented image, mask) of sample `index` at `epoch` (also the shards' samples: mimkit.shards)."""
        s = sample_seed(self.seed, epoch, index)
        # A PretrainTransform takes a generator seeded alike: the same draws as from the global generator, without
        # saving and restoring its state.
        if isinstance(self.transform, PretrainTransform):
            img = self.transform(img, torch.Generator().manual_seed(s))
        else:
            with torch.random.fork_rng(devices=[]):  # torchvision transforms draw from the global generator
                torch.default_generator.manual_seed(s)  # CPU only: torch.manual_seed also seeds CUDA, 30x slower
                img = self.transform(img)
        return img, self.mask_gen(torch.Generator().manual_seed(s ^ 0x5DEECE66D))


class Transformed(Dataset):
    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, label = self.base[i]
        return self.transform(img), label


def num_workers(data_cfg) -> int:
    if data_cfg.num_workers >= 0:
        return data_cfg.num_workers
    return 0 if DATASETS[data_cfg.name][1] else min(8, os.cpu_count() or 1)


def loader_died(e: BaseException, workers: int | None = None, batch_size: int | None = None) -> DataError | None:
    """The one error line for a loader worker that died (the out-of-memory killer's SIGKILL, most often): its cause
    and the fix; None for any other error."""
    msg = str(e)
    if not (isinstance(e, RuntimeError) and "DataLoader worker" in msg
            and ("killed by signal" in msg or "exited unexpectedly" in msg)):
        return None
    now = f" (now {workers} workers, batch_size {batch_size})" if workers is not None else ""
    return DataError(f"a data loader worker died ({message_line(e)}), most often killed by the out-of-memory killer; "
                     f"use fewer workers (data.num_workers) or a smaller batch_size{now}, or give the job more memory")


class Loader(DataLoader):
    """DataLoader whose dead worker is one DataError naming the cause and the fix, not torch's traceback."""

    def __iter__(self) -> Iterator:
        # torch's iterator is made here, not at the first batch: its draw from the global generator (the workers'
        # base seed) happens inside iter(loader), where mimkit.loop.quiet_iter undoes it on a resumed run
        return self._checked(super().__iter__())

    def _checked(self, batches: Iterator) -> Iterator:
        try:
            yield from batches
        except RuntimeError as e:
            died = loader_died(e, self.num_workers, self.batch_size)
            if died is None:
                raise
            raise died from None


def make_loader(dataset: Dataset, batch_size: int, data_cfg, sampler=None, shuffle: bool = False,
                drop_last: bool = False, pin_memory: bool = False) -> Loader:
    workers = num_workers(data_cfg)
    return Loader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle if sampler is None else False,
                  num_workers=workers, pin_memory=pin_memory, drop_last=drop_last, persistent_workers=workers > 0)
