"""The ImageNet-style pretraining loader at 224 px: images/s per CPU core of mimkit's pipeline (`MaskedImages` over
an imagefolder: decode, RandomResizedCrop(0.2-1), flip, to tensor, normalize, plus the mask) against the official
MAE pipeline (torchvision's ImageFolder: Pillow decode, then v1 transforms on the PIL image) and mimkit's previous
one (Pillow decode, then torchvision v2 transforms), mimkit's without the mask (MAE draws it on the GPU), mimkit's
as the engine runs it (uint8 out of the workers, normalized on the device after the copy: `normalize=False`), and
that from tar shards of the same files (`data.name=webdataset`, streamed through the shuffle buffer), on the same
generated JPEGs (500 x 375 and 375 x 500, quality 90, in a temp folder), in interleaved rounds on one thread. Per core = images per CPU second of this
process (one thread): less sensitive than wall time to other processes on a shared machine; wall-time ratios are
recorded too. Closeness: the same samples seeded alike through both pipelines, the difference in 8-bit levels.
Optionally (`workers`) the images/s of each pipeline's DataLoader with that many worker processes."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mimkit.images import normalize_uint8

from .common import speedup, write_result

SIZE = 224
CROP_SCALE = (0.2, 1.0)
GOAL = 2.0  # mimkit over MAE, images per CPU second
TOLERANCE_LEVELS = {"mean": 0.1, "max": 2.0}  # |mimkit - MAE| in 8-bit levels, the same seeds


def make_jpegs(root: Path, n: int, seed: int = 0, quality: int = 90) -> Path:
    """n JPEGs at ImageNet's typical size (every 4th portrait) in root/train/<one of 10 classes>/: windows of a few
    large photo-like canvases (colour fields at three scales plus noise), so that no two files are the same."""
    rng = np.random.default_rng(seed)
    canvases = []
    for _ in range(4):
        canvas = np.zeros((1200, 1500, 3), np.float32)
        for cells, amplitude in ((6, 90), (24, 50), (96, 30)):
            coarse = rng.uniform(-amplitude, amplitude, (cells * 4 // 5, cells, 3)).astype(np.float32)
            canvas += np.stack([np.asarray(Image.fromarray(coarse[..., c]).resize((1500, 1200), Image.BICUBIC))
                                for c in range(3)], -1)
        canvases.append(np.clip(canvas + rng.normal(0, 4, canvas.shape) + 128, 0, 255).astype(np.uint8))
    for i in range(n):
        w, h = (375, 500) if i % 4 == 3 else (500, 375)
        c = canvases[i % len(canvases)]
        y, x = rng.integers(0, c.shape[0] - h), rng.integers(0, c.shape[1] - w)
        folder = root / "train" / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(c[y:y + h, x:x + w]).save(folder / f"{i:05d}.jpg", quality=quality)
    return root


def pipelines(root: Path) -> dict:
    """name -> dataset whose [i] is sample i's image tensor through that pipeline (the shards': the stream's next)."""
    import torchvision.transforms as T1
    import torchvision.transforms.v2 as T
    from torchvision.datasets import ImageFolder

    from mimkit.data import IMAGENET_STATS, DataConfig, MaskedImages, build_dataset, pretrain_transform
    from mimkit.masking import RandomMask
    mean, std = IMAGENET_STATS
    mae = ImageFolder(str(root / "train"), T1.Compose([
        T1.RandomResizedCrop(SIZE, scale=CROP_SCALE, interpolation=3), T1.RandomHorizontalFlip(), T1.ToTensor(),
        T1.Normalize(mean, std)]))  # facebookresearch/mae main_pretrain.py
    before = ImageFolder(str(root / "train"), T.Compose([
        T.ToImage(), T.RandomResizedCrop(SIZE, scale=CROP_SCALE, interpolation=T.InterpolationMode.BICUBIC,
                                         antialias=True),
        T.RandomHorizontalFlip(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]))
    cfg = DataConfig(name="imagefolder", root=str(root), img_size=SIZE, crop_scale=CROP_SCALE)
    base = build_dataset(cfg, "train")
    ours = MaskedImages(base, pretrain_transform(cfg), RandomMask(SIZE // 16, 0.75), seed=0)
    # the same without the mask, which MAE draws on the GPU inside the model
    unmasked = MaskedImages(base, pretrain_transform(cfg), lambda g: torch.zeros(0, dtype=torch.bool), seed=0)
    uint8 = MaskedImages(base, pretrain_transform(cfg, normalize=False), RandomMask(SIZE // 16, 0.75), seed=0)
    return {"mae": _Items(mae, lambda i: i), "mimkit": _Items(ours, lambda i: (0, i)),
            "mimkit_before": _Items(before, lambda i: i), "mimkit_without_mask": _Items(unmasked, lambda i: (0, i)),
            "mimkit_uint8": _Items(uint8, lambda i: (0, i)), "mimkit_uint8_shards": _Stream(shards(root, uint8))}


def shards(root: Path, views):
    """The training folder as tar shards of 250 (`mimkit data shard`), streamed as the engine streams them."""
    from mimkit.data_cli import encoded_samples
    from mimkit.shards import ShardStream, write_shards
    paths = write_shards(encoded_samples(views.base), root / "shards", "train", 250)
    return ShardStream([str(p) for p in paths], views.views, 1, 1, 0, 1, seed=0, shuffle_buffer=1000)


class _Stream:
    """[i] is the stream's next image (restarted at its end)."""

    def __init__(self, stream):
        self.stream, self.it = stream, iter(())

    def __len__(self) -> int:
        return len(self.stream.urls)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = next(self.it, None)
        if item is None:
            self.it = self.stream.samples(0)
            item = next(self.it)
        return item[0]


class _Items:
    """Sample i's image of a dataset indexed by i (torchvision) or by (epoch, i) keys (mimkit)."""

    def __init__(self, ds, key):
        self.ds, self.key = ds, key

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.ds[self.key(i)][0]


def closeness(items: dict, n: int) -> dict:
    """|mimkit - MAE| in 8-bit levels over n samples, each seeded alike in both (MaskedImages seeds its own)."""
    from mimkit.data import IMAGENET_STATS, sample_seed
    levels = torch.tensor(IMAGENET_STATS[1]).view(3, 1, 1) * 255
    diffs = []
    same = True
    for i in range(n):
        torch.manual_seed(sample_seed(0, 0, i))
        ref = items["mae"][i]
        # both are 8-bit pixels normalized: the difference is a whole number of levels, up to float rounding
        diffs.append(((items["mimkit"][i] - ref) * levels).abs().round().flatten())
        same &= torch.equal(normalize_uint8(items["mimkit_uint8"][i], *IMAGENET_STATS), items["mimkit"][i])
    d = torch.cat(diffs)
    return {"samples": n, "mean_levels": d.mean().item(), "p999_levels": d.quantile(0.999).item() if d.numel() < 2 ** 24
            else None, "max_levels": d.max().item(), "tolerance_levels": TOLERANCE_LEVELS,
            "uint8_normalized_after_the_copy_bitwise_equal": same,
            "within_tolerance": d.mean().item() <= TOLERANCE_LEVELS["mean"] and d.max().item() <= TOLERANCE_LEVELS["max"]}


def per_core(items: dict, rounds: int) -> dict:
    """Interleaved rounds on one thread, each pipeline over the same chunk of images per round: images per CPU
    second and per wall second, and mimkit's ratios to MAE's within each round."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    n = len(items["mae"])
    chunk = max(1, n // rounds)
    n_uint8 = normalize_cost(chunk)
    times = {name: {"times_s": [], "cpu_s": []} for name in items}
    try:
        for name, ds in items.items():  # warm up (imports, first allocations)
            ds[0]
        for r in range(rounds):
            for name, ds in items.items():
                t, c = time.perf_counter(), time.process_time()
                for i in range(r * chunk, (r + 1) * chunk):
                    ds[i % n]
                times[name]["times_s"].append(time.perf_counter() - t)
                times[name]["cpu_s"].append(time.process_time() - c)
    finally:
        torch.set_num_threads(threads)
    return {"images_per_round": chunk, "rounds": rounds,
            "images_per_s": {k: chunk / statistics.median(v["cpu_s"]) for k, v in times.items()},
            "images_per_wall_s": {k: chunk / statistics.median(v["times_s"]) for k, v in times.items()},
            "speedup": speedup(times, "mimkit", "mae", "cpu_s"), "speedup_wall": speedup(times, "mimkit", "mae"),
            "speedup_vs_before": speedup(times, "mimkit", "mimkit_before", "cpu_s"),
            "speedup_without_mask": speedup(times, "mimkit_without_mask", "mae", "cpu_s"),
            "speedup_uint8": speedup(times, "mimkit_uint8", "mae", "cpu_s"),
            "shards_vs_folder": speedup(times, "mimkit_uint8_shards", "mimkit_uint8", "cpu_s"),
            "normalize_on_cpu_ms_per_image": n_uint8, "goal": GOAL}


def normalize_cost(n: int, batch: int = 64) -> float:
    """CPU ms per image of `normalize_uint8` on batches of 224-px images: what a run without a GPU pays in the
    training process for normalizing after the copy (on a GPU it is one elementwise kernel)."""
    from mimkit.data import IMAGENET_STATS
    x = torch.randint(0, 256, (batch, 3, SIZE, SIZE), dtype=torch.uint8)
    c = time.process_time()
    for _ in range(max(1, n // batch)):
        normalize_uint8(x, *IMAGENET_STATS)
    return 1000 * (time.process_time() - c) / (max(1, n // batch) * batch)


def with_workers(items: dict, workers: int, batch: int = 64, batches: int = 8) -> dict:
    """images/s of each pipeline's DataLoader with `workers` processes, after its first batch."""
    from torch.utils.data import DataLoader
    out = {}
    batch = min(batch, len(items["mae"]) // (batches + 1)) or 1  # a few images (the dry run): smaller batches
    for name in ("mae", "mimkit"):
        loader = DataLoader(items[name], batch_size=batch, num_workers=workers, shuffle=True, drop_last=True)
        it = iter(loader)
        next(it)
        t = time.perf_counter()
        done = 0
        for _ in range(min(batches, len(loader) - 1)):
            next(it)
            done += batch
        out[f"{name}, {workers} workers"] = done / (time.perf_counter() - t)
        del it
    return {"workers": workers, "batch": batch, "images_per_s": out}


def measure(tmp: Path, n: int, repeats: int = 3, workers: int = 0, close_n: int = 50) -> dict:
    """Generate n JPEGs under tmp and measure: per core (rounds = max(repeats, 2) + 1), closeness, workers."""
    t = time.perf_counter()
    make_jpegs(tmp, n)
    items = pipelines(tmp)
    result = {"images": n, "image_sizes": "500x375 and 375x500 (every 4th)", "jpeg_quality": 90,
              "generate_s": time.perf_counter() - t, "closeness": closeness(items, min(close_n, n)),
              "per_core": per_core(items, max(repeats, 2) + 1)}
    if workers:
        result["workers"] = with_workers(items, workers)
    return result


def gpu_decode(root: Path, device: str, batch: int = 64, repeats: int = 3) -> dict:
    """torchvision.io.decode_jpeg on `device` over every JPEG under root, in batches: images/s."""
    from torchvision.io import decode_jpeg, read_file
    data = [read_file(str(p)) for p in sorted(root.rglob("*.jpg"))]
    batches = [data[i:i + batch] for i in range(0, len(data), batch)]

    def decode_all():
        for b in batches:
            decode_jpeg(b, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
    decode_all()
    t = time.perf_counter()
    for _ in range(repeats):
        decode_all()
    return {"device": device, "batch": batch, "images": len(data),
            "images_per_s": repeats * len(data) / (time.perf_counter() - t)}


def run(repeats: int = 3, preset: str = "cpu") -> dict:
    n = 2000 if preset == "cpu" else 24
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp), n, repeats=repeats * 2 if preset == "cpu" else 1,
                         close_n=100 if preset == "cpu" else 8)
    pc, cl = result["per_core"], result["closeness"]
    print(f"per core (images per CPU second, one thread, {pc['rounds']} interleaved rounds of {pc['images_per_round']}):")
    for name, v in pc["images_per_s"].items():
        print(f"  {name:>14} {v:7.1f} img/s  (wall {pc['images_per_wall_s'][name]:.1f})")
    s = pc["speedup"]
    print(f"mimkit / MAE: {s['median']:.2f}x [{s['min']:.2f}-{s['max']:.2f}] per CPU second (goal >= {GOAL}x), "
          f"wall {pc['speedup_wall']['median']:.2f}x; mimkit / mimkit before: {pc['speedup_vs_before']['median']:.2f}x; "
          f"without the mask / MAE: {pc['speedup_without_mask']['median']:.2f}x")
    print(f"uint8 out of the workers (normalized on the device) / MAE: {pc['speedup_uint8']['median']:.2f}x "
          f"[{pc['speedup_uint8']['min']:.2f}-{pc['speedup_uint8']['max']:.2f}]; shards / folder (both uint8): "
          f"{pc['shards_vs_folder']['median']:.2f}x; normalizing on the CPU instead: "
          f"{pc['normalize_on_cpu_ms_per_image']:.3f} ms per image")
    print(f"closeness to MAE (same seeds, {cl['samples']} samples): mean {cl['mean_levels']:.3f}, max "
          f"{cl['max_levels']:.1f} levels of 255 (tolerance mean <= {TOLERANCE_LEVELS['mean']}, max <= "
          f"{TOLERANCE_LEVELS['max']})")
    result.update(preset=preset, repeats=repeats)
    print(f"written to {write_result('loader', result)}")
    return result

