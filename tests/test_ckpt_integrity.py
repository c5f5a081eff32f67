"""Checkpoint integrity (mimkit.checkpoint): every file carries the mimkit version, a format number and a sha256 of
its content, verified on load; a flipped byte, a truncated file, a full disk, a format from another version and a
pickle that would run code each end with one `error:` line naming the file (exit 2) and leave the previous good
checkpoint in place; resume=auto falls back to last.prev.pt with one warning; files without the fields (format
1, written before them) still load and resume."""
import errno
import io
import os
import pathlib

import pytest
import torch

from mimkit import checkpoint
from mimkit.checkpoint import CheckpointError, load
from mimkit.cli import main

BASE = ["pretrain", "data.name=synthetic", "data.synthetic_size=32", "batch_size=16", "ckpt.every=1",
        "deterministic=true", "model.drop_path=0.1", "probe.enabled=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 3-epoch run (ref) and the same run stopped after its second epoch (two: last.pt holds
    epoch 2, last.prev.pt epoch 1)."""
    from mimkit import engine
    root = tmp_path_factory.mktemp("runs")
    assert main([*BASE, "epochs=3", f"output_dir={root / 'ref'}"]) == 0
    real = engine.save_checkpoint

    def save_then_stop(path, model, optimizer, epoch, *a, **k):
        real(path, model, optimizer, epoch, *a, **k)
        if epoch == 1:
            raise KeyboardInterrupt
    with pytest.MonkeyPatch.context() as m:
        m.setattr(engine, "save_checkpoint", save_then_stop)
        assert main([*BASE, "epochs=3", f"output_dir={root / 'two'}"]) == 130
    return root


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def flip_a_weight_byte(path: pathlib.Path) -> None:
    """Flip one byte inside a weight tensor's stored bytes: torch.load still reads the file, only the checksum
    can tell."""
    weight = load(path)["model"]["encoder.patch_embed.proj.weight"]
    data = bytearray(path.read_bytes())
    at = bytes(data).find(weight.numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)


def same_weights(a: pathlib.Path, b: pathlib.Path) -> None:
    x, y = load(a), load(b)
    assert x["step"] == y["step"] and all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"])


def test_a_flipped_byte_or_a_truncated_file_is_one_error_line_naming_it(runs, tmp_path, capsys):
    good = runs / "two" / "checkpoints" / "last.pt"
    ckpt = load(good)
    assert ckpt["format"] == checkpoint.FORMAT and ckpt["mimkit_version"] and len(ckpt["sha256"]) == 64
    flipped, cut = tmp_path / "flipped.pt", tmp_path / "cut.pt"
    flipped.write_bytes(good.read_bytes())
    flip_a_weight_byte(flipped)
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for damaged, why in ((flipped, "does not match its checksum"), (cut, "not a readable mimkit checkpoint")):
        capsys.readouterr()
        assert main([*BASE, "epochs=3", f"resume={damaged}", f"output_dir={tmp_path / damaged.stem}"]) == 2
        line = error_line(capsys)
        assert str(damaged) in line and why in line
        assert not (tmp_path / damaged.stem).exists()  # nothing written


def test_resume_auto_falls_back_to_the_previous_checkpoint_with_one_warning(runs, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "checkpoints/last.pt", "checkpoints/last.prev.pt"):
        (run / name).write_bytes((runs / "two" / name).read_bytes())
    assert load(run / "checkpoints" / "last.prev.pt")["epoch"] == 0
    flip_a_weight_byte(run / "checkpoints" / "last.pt")
    capsys.readouterr()
    assert main([*BASE, "epochs=3", f"output_dir={run}"]) == 0
    out = capsys.readouterr()
    warnings = [line for line in (out.out + out.err).splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "last.pt is damaged" in warnings[0] and "last.prev.pt" in warnings[0]
    same_weights(runs / "ref" / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")  # epochs 2 and 3 redone


def test_disk_full_names_the_directory_and_the_bytes_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                                      capsys):
    real_write, real_open, saves = checkpoint.atomic_write, os.fdopen, []

    class Full(io.FileIO):  # the disk fills up 1000 bytes into the file
        def write(self, b):
            if self.tell() + len(b) > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(b)

    def atomic_write(path, write):  # the second checkpoint's temp file is on a full disk
        saves.extend([path] if str(path).endswith(".pt") else [])
        if len(saves) != 2 or not str(path).endswith(".pt"):
            return real_write(path, write)
        with monkeypatch.context() as m:
            m.setattr(checkpoint.os, "fdopen", lambda fd, mode: Full(fd, mode) if mode == "wb" else real_open(fd, mode))
            return real_write(path, write)

    monkeypatch.setattr(checkpoint, "atomic_write", atomic_write)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main([*BASE, "epochs=2", f"output_dir={run}"]) == 2
    monkeypatch.undo()
    line = error_line(capsys)
    size = (run / "checkpoints" / "last.pt").stat().st_size
    needed = int(line.split(" needs ")[1].split()[0])
    assert line.startswith(f"error: no space left in {run / 'checkpoints'}: writing last.pt needs ")
    assert size < needed < size * 1.05  # the second checkpoint is the first plus one epoch's record
    assert load(run / "checkpoints" / "last.pt")["epoch"] == 0  # the previous checkpoint, intact
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]  # no temp file left


def test_format_drift_is_one_line_and_old_files_still_resume(runs, tmp_path, capsys):
    ckpt = load(runs / "two" / "checkpoints" / "last.pt")
    newer = tmp_path / "newer.pt"
    torch.save({**ckpt, "format": 99, "mimkit_version": "9.1.0"}, newer)
    with pytest.raises(CheckpointError, match=r"format 99 \(written by mimkit 9.1.0\); this mimkit .* reads "
                                              r"formats 1, 2: load it with mimkit 9.1.0 or newer"):
        load(newer)
    capsys.readouterr()
    assert main(["probe", "knn", "--checkpoint", str(newer), f"output_dir={tmp_path / 'p'}"]) == 2
    assert str(newer) in error_line(capsys)
    # a file of format 1 (no version, format or checksum: written before them) resumes
    old = tmp_path / "old.pt"
    torch.save({k: v for k, v in ckpt.items() if k not in ("format", "mimkit_version", "sha256")}, old)
    assert main([*BASE, "epochs=3", f"resume={old}", f"output_dir={tmp_path / 'cont'}"]) == 0
    same_weights(runs / "ref" / "checkpoints" / "last.pt", tmp_path / "cont" / "checkpoints" / "last.pt")


class Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_pickled_code_in_a_checkpoint_tokenizer_or_feature_cache_is_refused_unrun(runs, tmp_path, capsys):
    from mimkit.tokenizers import Tokenizer
    marker = tmp_path / "pwned"
    evil_ckpt, evil_tok = tmp_path / "evil.pt", tmp_path / "evil_tokenizer.pt"
    torch.save({"mimkit": "pretrain", "config": {}, "x": Payload(marker)}, evil_ckpt)
    torch.save({"mimkit": "tokenizer", "kind": "kmeans", "state": Payload(marker)}, evil_tok)
    capsys.readouterr()
    assert main(["probe", "knn", "--checkpoint", str(evil_ckpt), f"output_dir={tmp_path / 'p'}"]) == 2
    assert "weights_only=True" in error_line(capsys) and not marker.exists()
    with pytest.raises(CheckpointError, match="weights_only=True"):
        Tokenizer.load(evil_tok)
    assert not marker.exists()
    # the feature cache: a poisoned cache file is a miss, recomputed, never unpickled with code
    probe = ["probe", "knn", "--checkpoint", str(runs / "two" / "checkpoints" / "last.pt"), "data.limit=32",
             "data.test_limit=32", f"features.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'knn'}"]
    assert main(probe) == 0
    cached = sorted((tmp_path / "cache").glob("*.pt"))
    assert cached
    for path in cached:
        torch.save({"key": Payload(marker)}, path)
    capsys.readouterr()
    assert main(probe) == 0
    assert "ignoring unreadable cache file" in capsys.readouterr().out and not marker.exists()
