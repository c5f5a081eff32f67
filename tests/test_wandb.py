"""The Weights & Biases logger (`log.wandb=true`) gets what TensorBoard gets: the same scalar tags at the same steps
with the same values, and the same panels. Run offline into the test's folder; skipped without wandb (the
`[wandb]` extra), except the error that names the extra."""
import json
import struct

import pytest

from mimkit import writers
from mimkit.cli import main

RUN = ["pretrain", "data.name=synthetic", "data.synthetic_size=32", "batch_size=16", "epochs=2", "vis_every=1",
       "--quiet"]


def wandb_records(path):
    """The records of a W&B run file (.wandb): a 7-byte header, then LevelDB's log format (32 KiB blocks of chunks
    with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, buf, block = path.read_bytes(), 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_history(run_dir):
    """{scalar tag: [(step, value)]} and {panel tag: [(step, width, height, file)]} of the one run under run_dir,
    each tag at the step of its `<group>/step` metric."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    scalars, images = {}, {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        panels = {key.rpartition("/")[0] for key in row if key.endswith("/_type")}  # fields <tag>/path, ...
        for tag in panels:
            images.setdefault(tag, []).append((row[tag.rpartition("/")[0] + "/step"], row[f"{tag}/width"],
                                               row[f"{tag}/height"], path.parent / "files" / row[f"{tag}/path"]))
        for key, value in row.items():
            if not (key.startswith("_") or key.endswith("/step") or key.rpartition("/")[0] in panels):
                scalars.setdefault(key, []).append((row[key.rpartition("/")[0] + "/step"], value))
    return scalars, images


def tensorboard_history(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    images = {tag: [(e.step, e.width, e.height) for e in acc.Images(tag)] for tag in acc.Tags()["images"]}
    return scalars, images


def test_wandb_logs_what_tensorboard_logs(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_CONFIG_DIR": tmp_path / "config", "WANDB_CACHE_DIR": tmp_path / "cache",
                       "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(var, str(value))
    out = tmp_path / "run"
    assert main([*RUN, "log.wandb=true", f"output_dir={out}"]) == 0
    tb_scalars, tb_images = tensorboard_history(out)
    wb_scalars, wb_images = wandb_history(out)
    assert {"train/loss", "train/lr", "epoch/loss"} <= set(tb_scalars) and tb_images
    assert set(wb_scalars) == set(tb_scalars)
    for tag, points in tb_scalars.items():  # TensorBoard keeps float32
        assert [s for s, _ in wb_scalars[tag]] == [s for s, _ in points], tag
        assert [v for _, v in wb_scalars[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    assert set(wb_images) == set(tb_images)
    for tag, panels in tb_images.items():
        assert [p[:3] for p in wb_images[tag]] == panels and all(p[3].is_file() for p in wb_images[tag])


def test_wandb_missing_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    find_spec = writers.importlib.util.find_spec
    monkeypatch.setattr(writers.importlib.util, "find_spec", lambda name, *a: None if name == "wandb"
                        else find_spec(name, *a))
    assert main([*RUN, "log.wandb=true", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: log.wandb=true needs the wandb package: pip install 'mimkit[wandb]' (or log.wandb=false)"]
    assert not (tmp_path / "run").exists()  # stopped before the run directory
