"""torchvision's CIFAR-10 layout (issue 22): `data.name=cifar10` reads the official pickled batches under data.root
(cifar-10-batches-py), found without a setting, with the pixels and labels of the same images as PNG folders.
The files here are tiny batches written in the official format (dicts with b'data', b'labels', b'batch_label',
b'filenames'; rows of 1024 red, 1024 green, 1024 blue values); nothing is downloaded."""
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.data import CIFAR10_CLASSES, DataConfig, DataError, build_dataset, eval_transform

PER_BATCH = 10  # images per batch file (one of each class): 5 train batches and a test batch


def write_batches(root, seed=0):
    """root/cifar-10-batches-py as torchvision's downloader leaves it; returns {split: (images [n, 32, 32, 3] HWC,
    labels)} for checking."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = {"train": ([], []), "test": ([], [])}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        hwc = rng.integers(0, 256, (PER_BATCH, 32, 32, 3), dtype=np.uint8)
        labels = [int(y) for y in rng.permutation(10)]
        rows = hwc.transpose(0, 3, 1, 2).reshape(PER_BATCH, 3072)  # R plane, G plane, B plane
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": rows,
                 b"filenames": [f"img_{i}.png".encode() for i in range(PER_BATCH)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        split = "test" if name == "test_batch" else "train"
        out[split][0].append(hwc)
        out[split][1].extend(labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072,
                     b"num_cases_per_batch": PER_BATCH}, f, protocol=2)
    return {k: (np.concatenate(v[0]), v[1]) for k, v in out.items()}


def write_folders(root, truth):
    """The same images as PNG class folders (train/ and test/), the other layout mimkit reads."""
    for split, (hwc, labels) in truth.items():
        for i, (img, y) in enumerate(zip(hwc, labels)):
            d = root / split / CIFAR10_CLASSES[y]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:05d}.png")


def test_batches_are_read_with_their_pixels_and_labels(tmp_path):
    truth = write_batches(tmp_path)
    for split, n in (("train", 5 * PER_BATCH), ("test", PER_BATCH)):
        ds = build_dataset(DataConfig(name="cifar10", root=str(tmp_path), img_size=32), split)
        assert len(ds) == n and ds.classes == CIFAR10_CLASSES
        for i in (0, n - 1):
            img, label = ds[i]
            assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
            assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(truth[split][0][i]))  # HWC from the planes
            assert label == truth[split][1][i]


def test_root_may_name_the_batches_folder_itself(tmp_path):
    write_batches(tmp_path)
    ds = build_dataset(DataConfig(name="cifar10", root=str(tmp_path / "cifar-10-batches-py")), "test")
    assert len(ds) == PER_BATCH


def test_both_layouts_give_the_same_tensors(tmp_path):
    """The batches and a folder of the same images as PNGs: the same eval tensors for each image and label (the
    folder is sorted by class, so images are matched by their pixels)."""
    truth = write_batches(tmp_path / "batches")
    write_folders(tmp_path / "folders", truth)
    cfg = DataConfig(name="cifar10", img_size=32)
    pickled = build_dataset(DataConfig(**{**vars(cfg), "root": str(tmp_path / "batches")}), "test")
    folder = build_dataset(DataConfig(**{**vars(cfg), "root": str(tmp_path / "folders")}), "test")
    assert folder.classes == pickled.classes  # sorted folder names are the official label order
    by_pixels = {folder[i][0].numpy().tobytes(): folder[i] for i in range(len(folder))}
    tf = eval_transform(cfg)
    for i in range(len(pickled)):
        img, label = pickled[i]
        twin, twin_label = by_pixels[img.numpy().tobytes()]
        assert label == twin_label and torch.equal(tf(img), tf(twin))


def test_python2_style_str_keys_and_torchvision_keys_both_read(tmp_path):
    """Keys as torchvision's reader sees them ('data', loaded with latin1) read too."""
    write_batches(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as f:
        batch = pickle.load(f)
    with open(path, "wb") as f:
        pickle.dump({k.decode(): v for k, v in batch.items()}, f, protocol=2)
    ds = build_dataset(DataConfig(name="cifar10", root=str(tmp_path)), "test")
    assert [ds[i][1] for i in range(len(ds))] == batch[b"labels"]


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_batch_that_would_run_code_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_batches(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DataError, match="test_batch.*system, which is not part of the CIFAR-10 format"):
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path)), "test")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("damage", ["truncated", "missing", "not a dict", "wrong size"])
def test_a_damaged_batch_is_one_error_naming_the_file(tmp_path, damage):
    write_batches(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    elif damage == "missing":
        path.unlink()
    else:
        with open(path, "wb") as f:
            pickle.dump([1, 2] if damage == "not a dict" else {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
                        f, protocol=2)
    with pytest.raises(DataError, match="data_batch_3") as e:
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path)), "train")
    assert len(str(e.value).splitlines()) == 1


def test_neither_layout_names_both_and_the_download_key(tmp_path):
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="cifar-10-batches-py.*train/.*data.download=true"):
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path)), "train")


def test_download_is_asked_only_when_no_layout_is_there(tmp_path, monkeypatch):
    """data.download=true hands data.root to torchvision's downloader (replaced here: tests never download) when
    data.root holds neither layout, then reads what it unpacked; with the batches already there it is not called."""
    from mimkit import data
    calls = []
    monkeypatch.setattr(data, "download_cifar10", lambda root: calls.append(root) or write_batches(tmp_path))
    cfg = DataConfig(name="cifar10", root=str(tmp_path), download=True)
    assert len(build_dataset(cfg, "test")) == PER_BATCH and calls == [str(tmp_path)]
    assert len(build_dataset(cfg, "train")) == 5 * PER_BATCH and len(calls) == 1


def test_pretrain_and_probe_read_the_batches(tmp_path, capsys):
    """`mimkit pretrain data.name=cifar10 data.root=<batches>` and its k-NN probe run on the layout."""
    write_batches(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["pretrain", "data.name=cifar10", f"data.root={tmp_path / 'data'}", "epochs=1", "batch_size=8",
            "model.arch=vit_mini", "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "decoder.depth=1",
            "decoder.embed_dim=32", "decoder.num_heads=2", "data.img_size=16", "data.num_workers=0",
            "probe.enabled=false", f"output_dir={out}"]
    assert main(argv) == 0
    assert main(["probe", "knn", "--checkpoint", str(out / "checkpoints" / "last.pt"), "knn.k=5"]) == 0
    assert "knn probe: top-1" in capsys.readouterr().out


def test_download_uses_torchvisions_downloader(monkeypatch, tmp_path):
    """download_cifar10 calls torchvision.datasets.CIFAR10(root, download=True) (replaced: nothing is fetched);
    its failure is one DataError naming data.root."""
    import torchvision.datasets
    seen = []

    class FakeCIFAR10:
        def __init__(self, root, train=True, download=False):
            seen.append((root, download))
            raise RuntimeError("network unreachable\n(details)")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    from mimkit.data import download_cifar10
    with pytest.raises(DataError, match="cannot download CIFAR-10 into data.root") as e:
        download_cifar10(str(tmp_path))
    assert seen == [(str(tmp_path), True)] and len(str(e.value).splitlines()) == 1
    assert "torchvision" in sys.modules
