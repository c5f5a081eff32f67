"""WebDataset-layout shards (mimkit.shards, `mimkit data shard`, data.name=webdataset): the layout read and written,
the same seeded crops and masks as the folder they came from, every sample once per epoch across ranks x workers,
equal steps on every rank, the epoch boundary reproduced, and uint8 images normalized after the copy bit for bit."""
import io
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.data import DataConfig, MaskedImages, build_dataset, dataset_stats, pretrain_transform
from mimkit.images import normalize_uint8
from mimkit.masking import RandomMask
from mimkit.shards import (ShardIndex, ShardStream, brace_pattern, buffer_shuffle, deal, expand_urls, rebatch,
                           shard_loader, write_shards)


def png(value: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def numbered_shards(root, sizes):
    """Shards holding samples 0, 1, ... (label = index), shard k with sizes[k] samples."""
    paths, start = [], 0
    for k, n in enumerate(sizes):
        samples = ((f"{i:08d}", {"png": png(i % 256), "cls": str(i).encode()}) for i in range(start, start + n))
        paths += write_shards(samples, root, f"s{k:02d}", n)
        start += n
    return [str(p) for p in paths]


def label_views(img, epoch, index):
    return img, torch.tensor([index])


def test_expand_urls_as_webdataset():
    assert expand_urls("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_urls("{x,y}/s-{8..10}.tar") == ["x/s-8.tar", "x/s-9.tar", "x/s-10.tar", "y/s-8.tar", "y/s-9.tar",
                                                  "y/s-10.tar"]
    assert expand_urls("pipe:cat a-{0..1}.tar :: b.tar") == ["pipe:cat a-0.tar", "pipe:cat a-1.tar", "b.tar"]


def test_written_shards_are_webdataset_layout_and_read_back(tmp_path):
    paths = write_shards(((f"{i:08d}", {"png": png(i), "cls": b"%d" % (i % 3)}) for i in range(5)), tmp_path, "train", 2)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert brace_pattern(paths) == str(tmp_path / "train-{000000..000002}.tar")
    with tarfile.open(paths[0]) as tar:
        assert tar.getnames() == ["00000000.png", "00000000.cls", "00000001.png", "00000001.cls"]
    ds = ShardIndex(expand_urls(brace_pattern(paths)))
    assert len(ds) == 5 and ds.classes == ["0", "1", "2"]
    img, label = ds[4]
    assert img.dtype == torch.uint8 and img.shape == (3, 12, 12) and int(img[0, 0, 0]) == 4 and label == 1
    piped = ShardIndex([f"pipe:cat {p}" for p in paths])  # streamed through a command, held in memory
    assert all(torch.equal(piped[i][0], ds[i][0]) and piped[i][1] == ds[i][1] for i in range(5))


@pytest.fixture(scope="module")
def folder_and_shards(tmp_path_factory):
    """An image folder (JPEG and PNG, train/ and val/) and its shards written by `mimkit data shard`."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(5):
                ext = "jpg" if i % 2 else "png"
                Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(root / split / c / f"{i}.{ext}")
    out = tmp_path_factory.mktemp("shards")
    assert main(["data", "shard", str(root), str(out), "--shard-size", "3"]) == 0
    return root, out


def test_shard_command_keeps_images_labels_and_order(folder_and_shards):
    root, out = folder_and_shards
    folder = DataConfig(name="imagefolder", root=str(root), img_size=16)
    shards = DataConfig(name="webdataset", urls=str(out / "train-{000000..000003}.tar"),
                        test_urls=str(out / "test-{000000..000003}.tar"), img_size=16)
    for split in ("train", "test"):
        a, b = build_dataset(folder, split), build_dataset(shards, split)
        assert len(a) == len(b) == 10 and len(b.classes) == 2
        for i in range(10):
            assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]


def test_stream_augments_and_masks_as_the_folder(folder_and_shards):
    """Each streamed sample gets the crop, flip and mask its folder twin gets at the same epoch (the key is the
    folder's index), in a shuffled order."""
    root, out = folder_and_shards
    cfg = DataConfig(name="imagefolder", root=str(root), img_size=16)
    folder = MaskedImages(build_dataset(cfg, "train"), pretrain_transform(cfg), RandomMask(4, 0.5), seed=5)
    views = MaskedImages(None, pretrain_transform(cfg), RandomMask(4, 0.5), seed=5).views
    loader = shard_loader(str(out / "train-{000000..000003}.tar"), views, 2, 1, 0, 0, seed=5, shuffle_buffer=4)
    loader.set_epoch(3)
    assert len(loader) == 5
    order = []
    for imgs, masks, labels, replaced in loader:
        for img, mask, label in zip(imgs, masks, labels):
            i = next(i for i in range(10) if i not in order and torch.equal(folder[(3, i)][1], mask)
                     and torch.equal(folder[(3, i)][0], img))
            assert folder[(3, i)][2] == label
            order.append(i)
    assert sorted(order) == list(range(10)) and order != list(range(10))


def epoch_labels(paths, world, workers, epoch, batch=4, buffer=3):
    """Per rank: the labels of its batches, ranks simulated in this process, each with `workers` processes."""
    out = []
    for rank in range(world):
        loader = shard_loader("::".join(paths), label_views, batch, world, rank, workers, seed=1, shuffle_buffer=buffer)
        loader.set_epoch(epoch)
        out.append([b[2].tolist() for b in loader])
    return out


def test_every_sample_once_per_epoch_with_two_ranks_and_two_workers(tmp_path):
    paths = numbered_shards(tmp_path, [6] * 8)
    for epoch in (0, 1):
        ranks = epoch_labels(paths, world=2, workers=2, epoch=epoch)
        assert [len(r) for r in ranks] == [6, 6]  # the same steps on both ranks
        seen = [x for r in ranks for b in r for x in b]
        assert sorted(seen) == list(range(48))
    assert epoch_labels(paths, 2, 2, 0) != epoch_labels(paths, 2, 2, 1)  # shards and buffer reshuffled per epoch


def test_worker_split_and_unequal_shards():
    """Shards dealt by epoch, to ranks then workers: no shard twice; each rank runs the steps of the smallest
    share any deal can give it."""
    dealt = deal(7, 2, seed=0, epoch=4)
    assert sorted(dealt[0] + dealt[1]) == list(range(7)) and abs(len(dealt[0]) - len(dealt[1])) == 1
    stream = ShardStream([f"s{k}" for k in range(7)], label_views, 2, 2, 1, 2, 0, 0)
    stream.epoch = 4
    assert sorted(stream.worker_shards(0) + stream.worker_shards(1)) == sorted(f"s{k}" for k in dealt[1])


def test_unequal_shards_give_equal_steps(tmp_path):
    paths = numbered_shards(tmp_path, [5, 3, 7, 4, 6])
    for epoch in range(3):
        ranks = epoch_labels(paths, world=2, workers=1, epoch=epoch, batch=2)
        # the fewest samples a rank can be dealt: 2 of the 5 shards, the smallest, 3 + 4 = 7: 3 batches of 2
        assert [len(r) for r in ranks] == [3, 3]
        seen = Counter(x for r in ranks for b in r for x in b)
        assert max(seen.values()) == 1 and len(seen) == 12


def test_epoch_is_reproduced_from_its_boundary(tmp_path):
    """A loader set to epoch 1 afresh (a run resumed there) gives what one that went through epoch 0 gives."""
    paths = numbered_shards(tmp_path, [4] * 4)
    fresh = shard_loader("::".join(paths), label_views, 4, 1, 0, 0, seed=2, shuffle_buffer=5)
    fresh.set_epoch(1)
    going = shard_loader("::".join(paths), label_views, 4, 1, 0, 0, seed=2, shuffle_buffer=5)
    going.set_epoch(0)
    list(going)
    going.set_epoch(1)
    state = torch.random.get_rng_state()
    assert [b[2].tolist() for b in fresh] == [b[2].tolist() for b in going]
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator is left alone


def test_buffer_shuffle_and_rebatch():
    g = torch.Generator().manual_seed(0)
    assert list(buffer_shuffle(range(5), 0, g)) == list(range(5))
    out = list(buffer_shuffle(range(50), 8, g))
    assert sorted(out) == list(range(50)) and out != list(range(50))
    chunks = [[torch.arange(a, b)] for a, b in ((0, 3), (3, 4), (4, 8), (8, 9))]
    assert [b[0].tolist() for b in rebatch(chunks, 3, 3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(Exception, match="2 batches of 4"):
        list(rebatch(chunks, 4, 3))


def test_uint8_normalized_on_the_device_is_bitwise_the_workers_float(folder_and_shards):
    root, _ = folder_and_shards
    cfg = DataConfig(name="imagefolder", root=str(root), img_size=16)
    base = build_dataset(cfg, "train")
    floats = MaskedImages(base, pretrain_transform(cfg), RandomMask(4, 0.5), seed=0)
    uint8 = MaskedImages(base, pretrain_transform(cfg, normalize=False), RandomMask(4, 0.5), seed=0)
    batch = torch.stack([uint8[(0, i)][0] for i in range(10)])
    assert batch.dtype == torch.uint8
    want = torch.stack([floats[(0, i)][0] for i in range(10)])
    assert torch.equal(normalize_uint8(batch, *dataset_stats("imagefolder")), want)


def tiny(tmp_path, *extra):
    return ["data.name=webdataset", f"data.urls={tmp_path / 'sh' / 'train-{000000..000001}.tar'}", "data.img_size=16",
            "model.arch=vit_mini", "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=4",
            "decoder.depth=1", "decoder.embed_dim=32", "decoder.num_heads=2", "batch_size=16", "data.num_workers=0",
            "optim.warmup_epochs=1", "probe.enabled=false", "epochs=2", "ckpt.every=1", "model.drop_path=0.1", *extra]


def test_pretraining_on_shards_resumes_at_the_epoch_boundary(tmp_path, monkeypatch, capsys):
    """`mimkit data shard synthetic` then pretraining on the shards (panels from the first training shard): a run
    stopped after its first epoch and resumed ends bitwise where an uninterrupted one does."""
    from mimkit import engine
    from mimkit.checkpoint import load
    from mimkit.engine import train
    from mimkit.methods import pretrain_config
    assert main(["data", "shard", "synthetic", str(tmp_path / "sh"), "--shard-size", "32"]) == 0
    assert "data.urls=" in capsys.readouterr().out
    full = train(pretrain_config([], tiny(tmp_path, f"output_dir={tmp_path / 'a'}")))
    real = engine.run_epoch

    def first_epoch_then_stop(run, epoch):
        record = real(run, epoch)
        if epoch == 0:
            raise KeyboardInterrupt
        return record

    monkeypatch.setattr(engine, "run_epoch", first_epoch_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(pretrain_config([], tiny(tmp_path, f"output_dir={tmp_path / 'b'}")))
    monkeypatch.undo()
    resumed = train(pretrain_config([], tiny(tmp_path, f"output_dir={tmp_path / 'b'}")))
    a, b = (load(tmp_path / r / "checkpoints" / "last.pt")["model"] for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a) and full["loss_history"] == resumed["loss_history"]


def test_bad_shard_inputs_are_one_line(tmp_path, capsys):
    cases = [(["data.name=webdataset"], "data.urls is required"),
             (["data.name=webdataset", f"data.urls={tmp_path}/none-{{0..1}}.tar"], "none-0.tar does not exist"),
             (tiny(tmp_path, "data.limit=10", f"data.urls={tmp_path}/x.tar"), "data.limit")]
    (tmp_path / "x.tar").write_bytes(b"")
    for args, message in cases:
        assert main(["pretrain", *args, f"output_dir={tmp_path / 'o'}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error:") and message in err, err
    assert main(["data", "shard", "digits", str(tmp_path / "s"), "--shard-size", "0"]) == 2
    assert "--shard-size" in capsys.readouterr().err


def test_webdataset_reads_our_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    paths = numbered_shards(tmp_path, [3, 2])
    got = [(s["__key__"], int(s["cls"])) for s in wds.WebDataset(paths, shardshuffle=False)]
    assert got == [(f"{i:08d}", i) for i in range(5)]


def test_probes_inherit_the_shards_of_the_checkpoint():
    from mimkit.probes.config import probe_config
    stored = {"data": {"name": "webdataset", "urls": "/s/train-{0..3}.tar", "test_urls": "/s/test-0.tar", "limit": 0}}
    cfg = probe_config("knn", stored=stored)
    assert (cfg.data.name, cfg.data.urls, cfg.data.test_urls) == ("webdataset", "/s/train-{0..3}.tar", "/s/test-0.tar")
