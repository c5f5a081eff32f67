"""Tar shards in the WebDataset layout (`data.name=webdataset`): reading, streaming for pretraining, writing.

A shard is a tar file whose members are grouped into samples by key: `<key>.<ext>`, one sample's members next to
each other (`00000012.jpg`, `00000012.cls`). `data.urls` names the shards as webdataset does: local paths,
brace patterns (`train-{000000..000127}.tar`, `{a,b}`), `pipe:` shell commands that write a tar to stdout, several
joined by `::`.

Pretraining streams them (`ShardLoader`): every epoch the shards are shuffled alike on every rank (seeded by the
run's seed and the epoch) and dealt round-robin to the ranks, each rank's shards round-robin to its loader
workers, so each shard is read by one worker of one rank; a worker shuffles its samples through a buffer of
`data.shuffle_buffer`. Each sample is augmented and masked from generators seeded by (run seed, epoch, sample
index) exactly as the folder datasets' samples are (`MaskedImages.views`): a numeric key is the sample's index
(`mimkit data shard` writes the folder's index, so shards and their folder get the same crops and masks), any
other key is hashed. Every rank runs the same number of steps (DDP needs it): what the smallest possible deal of
shards holds, in batches; with shards of equal size nothing is dropped.

Read with the standard library's tarfile, not the webdataset package: its pipeline splits shards with its own
node and worker splitters, shuffles with generators it seeds from the worker, and cannot tell the sample counts
a rank needs to run as many steps as the others before the epoch starts; the samples' seeds must come from
their keys and the epoch inside the worker that augments them. Shards written here are plain webdataset shards.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import subprocess
import tarfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from .config import ConfigError

# webdataset's split of a member name: the key is everything up to the first dot of the file name
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_BRACES = re.compile(r"\{([^{}]*)\}")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "ppm", "tif", "tiff")
TORCHVISION_DECODES = ("jpg", "jpeg", "png", "webp", "gif")  # libjpeg-turbo, libpng, ...; the rest: Pillow


class ShardError(ConfigError):
    """A missing or unreadable shard or sample: the message names the shard (and the sample's key)."""


def expand_urls(urls: str) -> list[str]:
    """`data.urls` -> the shard urls in order: `::`-separated parts, each brace-expanded (`{000..012}` keeps the
    zero padding of its first bound, `{a,b}` lists)."""
    out = []
    for part in urls.split("::"):
        if part.strip():
            out += _expand(part.strip())
    return out


def _expand(s: str) -> list[str]:
    m = _BRACES.search(s)
    if m is None:
        return [s]
    body = m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    items = [str(i).zfill(len(r.group(1))) for i in range(int(r.group(1)), int(r.group(2)) + 1)] if r \
        else body.split(",")
    return [x for item in items for x in _expand(s[:m.start()] + item + s[m.end():])]


def local_path(url: str) -> str | None:
    """The file of a local url (a path or file:path), None for a pipe: command."""
    if url.startswith("pipe:"):
        return None
    return url[len("file:"):] if url.startswith("file:") else url


def existing(path: str) -> str:
    if not os.path.isfile(path):
        raise ShardError(f"shard {path} does not exist (data.urls, data.test_urls)")
    return path


@contextlib.contextmanager
def open_stream(url: str):
    """The shard as a tarfile read front to back (a pipe: command's stdout or a local file)."""
    path = local_path(url)
    if path is not None:
        with open(existing(path), "rb") as f:
            yield tarfile.open(fileobj=f, mode="r|*")
        return
    proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE)
    finished = False
    try:
        yield tarfile.open(fileobj=proc.stdout, mode="r|*")
        finished = True
    finally:
        proc.stdout.close()
        code = proc.wait()
    if finished and code:
        raise ShardError(f"shard command {url!r} exited with status {code} (data.urls)")


def group_members(members: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, dict]]:
    """(member name, payload) in tar order -> (key, {ext: payload}) per sample (consecutive members with a key)."""
    key, sample = None, {}
    for name, payload in members:
        m = _MEMBER.match(name)
        if m is None or os.path.basename(name).startswith((".", "_")):
            continue
        if m.group(1) != key and sample:
            yield key, sample
            sample = {}
        key = m.group(1)
        sample[m.group(2).lower()] = payload
    if sample:
        yield key, sample


def read_samples(url: str) -> Iterator[tuple[str, dict]]:
    """(key, {ext: bytes}) of every sample of a shard, in order."""
    try:
        with open_stream(url) as tar:
            members = ((m.name, tar.extractfile(m).read()) for m in tar if m.isfile())
            yield from group_members(members)
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"cannot read shard {url}: {e}") from None


def count_samples(url: str) -> int:
    """The number of samples of a shard (local files: from the headers, seeking past the data)."""
    path = local_path(url)
    if path is None:
        return sum(1 for _ in read_samples(url))
    try:
        with tarfile.open(existing(path)) as tar:
            return sum(1 for _ in group_members((m.name, None) for m in tar if m.isfile()))
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"cannot read shard {path}: {e}") from None


def sample_index(key: str) -> int:
    """The index that seeds a sample's augmentation and mask: a numeric key's number, else a hash of the key."""
    name = key.rsplit("/", 1)[-1]
    return int(name) if name.isdigit() else int.from_bytes(hashlib.blake2b(key.encode(), digest_size=7).digest(), "big")


def decode_rgb(data: bytes, ext: str) -> torch.Tensor:
    """Encoded image bytes -> uint8 [3, H, W], the pixels `mimkit.data.read_rgb` gives for the same file."""
    if ext in TORCHVISION_DECODES:
        from torchvision.io import ImageReadMode, decode_image
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor
    return pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))


def image_and_label(key: str, sample: dict, url: str) -> tuple[torch.Tensor, int]:
    """A sample's image (its first image member) and label (`.cls`, -1 without one)."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ShardError(f"sample {key} of shard {url} has no image ({', '.join(IMAGE_EXTS)}); members: "
                         f"{', '.join(sample)}")
    try:
        img = decode_rgb(sample[ext], ext)
    except Exception as e:  # the decoders raise several types for truncated or non-image data
        raise ShardError(f"cannot read image {key}.{ext} of shard {url}: {e}") from None
    return img, int(sample["cls"]) if "cls" in sample else -1


class ShardIndex(Dataset):
    """Random access to shards' samples in shard order: (uint8 image [3, H, W], label), for the probes, panels
    and tests. Local shards are indexed by member offsets (nothing is kept in memory but the labels); `pipe:`
    shards are read whole into memory (give local files for large splits)."""

    def __init__(self, urls: list[str]):
        self.items: list[tuple[str, str, Any]] = []  # (url, key, {ext: (offset, size)} or {ext: bytes})
        for url in urls:
            path = local_path(url)
            samples = read_samples(url) if path is None else self._offsets(path)
            self.items += [(url, key, sample) for key, sample in samples]
        labels = [int(self._bytes(i, "cls")) for i in range(len(self.items)) if "cls" in self.items[i][2]]
        self.classes = [str(c) for c in range(max(labels, default=-1) + 1)]

    @staticmethod
    def _offsets(path: str) -> Iterator[tuple[str, dict]]:
        try:
            with tarfile.open(existing(path)) as tar:
                yield from group_members((m.name, (m.offset_data, m.size)) for m in tar if m.isfile())
        except (tarfile.TarError, OSError) as e:
            raise ShardError(f"cannot read shard {path}: {e}") from None

    def _bytes(self, i: int, ext: str) -> bytes:
        url, _, sample = self.items[i]
        if isinstance(sample[ext], bytes):
            return sample[ext]
        offset, size = sample[ext]
        with open(local_path(url), "rb") as f:
            f.seek(offset)
            return f.read(size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        url, key, sample = self.items[i]
        return image_and_label(key, {e: self._bytes(i, e) for e in sample}, url)


# ---------------------------------------------------------------------------------------------
# Streaming for pretraining


def deal(num_shards: int, parts: int, seed: int, epoch: int) -> list[list[int]]:
    """Shard ids per part (rank): a permutation seeded by (seed, epoch), the same on every rank, dealt
    round-robin."""
    order = torch.randperm(num_shards, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return [order[p::parts] for p in range(parts)]


def buffer_shuffle(items: Iterable, size: int, generator: torch.Generator) -> Iterator:
    """Items in a random order drawn through a buffer of `size` (webdataset's `shuffle`): each new item takes the
    place of a random one, which is emitted; the rest are emitted in a random order at the end."""
    if size < 2:  # nothing to shuffle: shard order
        yield from items
        return
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(torch.randint(len(buf), (1,), generator=generator))
        buf[j], item = item, buf[j]
        yield item
    for j in torch.randperm(len(buf), generator=generator).tolist():
        yield buf[j]


class ShardStream(IterableDataset):
    """One rank's samples of one epoch, as collated chunks of up to `chunk` (images, masks, labels, replaced),
    each worker reading its share of the rank's shards. `views(img, epoch, index) -> (image, mask)` augments and
    masks a sample (`mimkit.data.MaskedImages.views`); set `epoch` before iterating."""

    def __init__(self, urls: list[str], views, chunk: int, world: int, rank: int, workers: int, seed: int,
                 shuffle_buffer: int, skip_corrupt: bool = False):
        self.urls, self.views, self.chunk = urls, views, chunk
        self.world, self.rank, self.workers, self.seed = world, rank, max(workers, 1), seed
        self.shuffle_buffer, self.skip_corrupt, self.epoch = shuffle_buffer, skip_corrupt, 0

    def worker_shards(self, worker: int) -> list[str]:
        mine = deal(len(self.urls), self.world, self.seed, self.epoch)[self.rank]
        return [self.urls[s] for s in mine[worker::self.workers]]

    def samples(self, worker: int) -> Iterator[tuple]:
        """(image, mask, label, replaced) of this worker's shards, buffer-shuffled, augmented as seeded."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 4099 + self.rank * 257 + worker)
        raw = ((url, key, s) for url in self.worker_shards(worker) for key, s in read_samples(url))
        last = None
        for url, key, sample in buffer_shuffle(raw, self.shuffle_buffer, g):
            try:
                img, label = image_and_label(key, sample, url)
                replaced, last = 0, (img, label)
            except ShardError as e:
                if not self.skip_corrupt or last is None:
                    raise
                warnings.warn(f"{e}; replaced by the worker's previous sample (data.skip_corrupt=true)")
                (img, label), replaced = last, 1
            img, mask = self.views(img, self.epoch, sample_index(key))
            yield img, mask, label, replaced

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        chunk = []
        for sample in self.samples(0 if info is None else info.id):
            chunk.append(sample)
            if len(chunk) == self.chunk:
                yield default_collate(chunk)
                chunk = []
        if chunk:
            yield default_collate(chunk)


def rebatch(chunks: Iterable, batch_size: int, steps: int) -> Iterator[list[torch.Tensor]]:
    """Chunks of any size -> `steps` batches of exactly batch_size (full chunks pass through uncopied)."""
    parts, have, done = [], 0, 0
    if steps == 0:
        return
    for chunk in chunks:
        parts.append(list(chunk))
        have += len(chunk[0])
        while have >= batch_size:
            if len(parts) == 1 and have == batch_size:
                batch, parts = parts[0], []
            else:
                joined = [torch.cat(x) for x in zip(*parts)]
                batch, parts = [x[:batch_size] for x in joined], [[x[batch_size:] for x in joined]]
            have -= batch_size
            parts = parts if have else []
            done += 1
            yield batch
            if done == steps:  # the rest of the rank's samples: as drop_last drops them
                return
    if done < steps:
        raise ShardError(f"the shards held {done} batches of {batch_size} this epoch, {steps} were counted; "
                         f"did they change during the run?")


class ShardLoader:
    """The pretraining loader over shards, in the engine's terms: `set_epoch`, `len()` (steps per epoch, the same
    on every rank), iteration over batches (images, masks, labels, replaced). A DataLoader is made per epoch, so
    its workers start with the epoch's deal."""

    def __init__(self, stream: ShardStream, counts: list[int], batch_size: int, num_workers: int,
                 pin_memory: bool = False):
        self.stream, self.counts, self.batch_size = stream, counts, batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        # the fewest samples any rank can be dealt: its share of shards, the smallest ones
        self.per_rank = sum(sorted(counts)[:len(counts) // stream.world])
        self.steps = self.per_rank // batch_size

    def set_epoch(self, epoch: int) -> None:
        self.stream.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        # its own generator: a DataLoader draws its workers' base seed from the global one otherwise, which would
        # shift the model's random draws (drop path) by one per epoch; the samples are seeded by their keys
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            generator=torch.Generator().manual_seed(self.stream.seed))
        return rebatch(loader, self.batch_size, self.steps)


def shard_loader(urls: str, views, batch_size: int, world: int, rank: int, workers: int, seed: int,
                 shuffle_buffer: int, skip_corrupt: bool = False, limit: int = 0,
                 pin_memory: bool = False) -> ShardLoader:
    """The pretraining loader of `data.urls`; its sample counts are read once here (local shards: headers only)."""
    if limit:
        raise ConfigError(f"data.limit={limit} does not apply to streamed shards (data.name=webdataset): name fewer "
                          f"shards in data.urls")
    shard_urls = expand_urls(urls)
    if len(shard_urls) < world:
        raise ConfigError(f"data.urls names {len(shard_urls)} shard(s) for {world} processes: every process needs "
                          f"at least one (write smaller shards: mimkit data shard --shard-size)")
    counts = [count_samples(u) for u in shard_urls]
    stream = ShardStream(shard_urls, views, batch_size, world, rank, workers, seed, shuffle_buffer, skip_corrupt)
    return ShardLoader(stream, counts, batch_size, workers, pin_memory)


# ---------------------------------------------------------------------------------------------
# Writing


def write_shards(samples: Iterable[tuple[str, dict]], out: Path, prefix: str, shard_size: int) -> list[Path]:
    """(key, {ext: bytes}) -> out/<prefix>-000000.tar, ... with shard_size samples each (members in key order,
    owner and times zeroed: the same samples give the same bytes). Each file is written under a temporary name,
    then renamed."""
    out.mkdir(parents=True, exist_ok=True)
    paths, tar, n = [], None, 0
    try:
        for key, sample in samples:
            if n % shard_size == 0:
                if tar is not None:
                    tar.close()
                    os.replace(paths[-1].with_suffix(".tmp"), paths[-1])
                paths.append(out / f"{prefix}-{len(paths):06d}.tar")
                tar = tarfile.open(paths[-1].with_suffix(".tmp"), "w", format=tarfile.USTAR_FORMAT)
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode = len(data), 0o444
                tar.addfile(info, io.BytesIO(data))
            n += 1
    finally:
        if tar is not None:
            tar.close()
            os.replace(paths[-1].with_suffix(".tmp"), paths[-1])
    return paths


def brace_pattern(paths: list[Path]) -> str:
    """The `data.urls` value naming the shards write_shards wrote."""
    if len(paths) == 1:
        return str(paths[0])
    prefix = paths[0].name.rsplit("-", 1)[0]
    return str(paths[0].parent / f"{prefix}-{{{0:06d}..{len(paths) - 1:06d}}}.tar")
