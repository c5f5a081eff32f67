"""Flaky storage (issue 24), each fault injected for real: a read that fails is retried `data.read_retries` times
with a short doubling wait; an image that stays unreadable (removed after the dataset was listed, a truncated
JPEG) is one `error:` line naming its path, or with data.skip_corrupt=true is replaced and counted per epoch; a
loader worker killed by SIGKILL (what the out-of-memory killer sends) is one line naming the cause and the fix."""
import json
import os
import signal

import pytest
import torch
from PIL import Image

from mimkit import data
from mimkit.cli import main
from mimkit.data import DataConfig, DataError, build_dataset, make_loader

from test_data import make_tree

TINY = ["data.name=imagefolder", "data.img_size=16", "model.arch=vit_mini", "model.depth=1", "model.embed_dim=32",
        "model.num_heads=2", "model.patch_size=4", "decoder.depth=1", "decoder.embed_dim=32", "decoder.num_heads=2",
        "mask.patch_px=8", "mask.min_block=2", "epochs=1", "batch_size=4", "probe.enabled=false"]


@pytest.fixture
def no_wait(monkeypatch):
    """Retries without their waits (the waits themselves are checked in test_a_failed_read_is_retried...)."""
    waits = []
    monkeypatch.setattr(data.time, "sleep", waits.append)
    return waits


def test_a_failed_read_is_retried_with_doubling_waits(tmp_path, monkeypatch, no_wait):
    """A file that is briefly unreadable (two failures, then it reads) gives its image after waits of 0.05 s and
    0.1 s; with data.read_retries=1 the same file is an error after one retry."""
    root = make_tree(tmp_path / "tree")
    real, calls = data.read_rgb, []

    def flaky(path):
        calls.append(path)
        if len(calls) <= 2:
            raise FileNotFoundError(2, "No such file or directory", path)
        return real(path)

    monkeypatch.setattr(data, "read_rgb", flaky)
    ds = build_dataset(DataConfig(name="imagefolder", root=str(root)), "train")
    img, _ = ds[0]
    assert img.shape == (3, 20, 20) and len(calls) == 3 and no_wait == [0.05, 0.1]
    calls.clear()
    no_wait.clear()
    ds = build_dataset(DataConfig(name="imagefolder", root=str(root), read_retries=1), "train")
    with pytest.raises(DataError, match=r"0.png \(2 attempts\)"):
        ds[0]
    assert len(calls) == 2 and no_wait == [0.05]


def remove_after_listing(monkeypatch, victim):
    """Delete `victim` right after the training set is listed (the loader then finds it gone)."""
    real = data.build_dataset

    def listed_then_removed(data_cfg, split, limit=0):
        ds = real(data_cfg, split, limit)
        if split == "train" and victim.exists():
            victim.unlink()
        return ds

    monkeypatch.setattr(data, "build_dataset", listed_then_removed)
    from mimkit import engine
    monkeypatch.setattr(engine, "build_dataset", listed_then_removed)


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_removed_after_listing_is_one_line_with_its_path(tmp_path, monkeypatch, capsys, no_wait, workers):
    """In the main process or in a loader worker (whose error torch re-raises with the worker's traceback in it):
    exit 2, one line naming the file and the attempts."""
    root = make_tree(tmp_path / "tree", n=4)
    victim = root / "train" / "b" / "2.png"
    remove_after_listing(monkeypatch, victim)
    code = main(["pretrain", *TINY, f"data.root={root}", f"data.num_workers={workers}", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: cannot read image"), err
    assert str(victim) in err[0] and "(4 attempts)" in err[0]


def test_skip_corrupt_replaces_a_truncated_jpeg_and_counts_it(tmp_path, no_wait):
    """data.skip_corrupt=true: the run finishes; the truncated JPEG is replaced by another image and counted in the
    epoch's record (metrics.json, log)."""
    root = make_tree(tmp_path / "tree", n=4)
    bad = root / "train" / "a" / "1.png"
    Image.open(bad).convert("RGB").save(bad.with_suffix(".jpg"), quality=95)
    bad.unlink()
    jpg = bad.with_suffix(".jpg")
    jpg.write_bytes(jpg.read_bytes()[:200])  # truncated: header only
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, f"data.root={root}", "data.num_workers=0", "data.skip_corrupt=true",
                 f"output_dir={out}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["replaced_images"] == 1  # 8 images, batch 4, drop_last: every image is drawn once
    assert "replaced_images 1" in (out / "log.txt").read_text()


class KillsItsWorker(torch.utils.data.Dataset):
    """A dataset whose loader worker is killed with SIGKILL (as the out-of-memory killer does) at item 3."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 3 and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(2), i


def test_a_killed_worker_is_one_line_naming_cause_and_fix():
    loader = make_loader(KillsItsWorker(), 2, DataConfig(num_workers=1))
    with pytest.raises(DataError) as e:
        list(loader)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "out-of-memory killer" in msg, msg
    assert "data.num_workers" in msg and "batch_size" in msg and "now 1 workers, batch_size 2" in msg


def test_a_killed_worker_during_pretraining_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    root = make_tree(tmp_path / "tree", n=4)
    real = data.CheckedImageFolder.__getitem__

    def killed_in_worker(self, i):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, i)

    monkeypatch.setattr(data.CheckedImageFolder, "__getitem__", killed_in_worker)
    code = main(["pretrain", *TINY, f"data.root={root}", "data.num_workers=1", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "out-of-memory killer" in err[0] and "data.num_workers" in err[0], err
