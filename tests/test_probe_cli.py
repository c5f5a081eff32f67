"""`mimkit probe linear|knn|finetune` end to end on a tiny synthetic checkpoint: the run-directory contract,
metrics, the feature cache, data defaults from the checkpoint, and one-line errors."""
import json

import pytest
import torch

from mimkit.checkpoint import load
from mimkit.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from conftest import make_cfg  # the cfg_factory config, shared by this module's tests

    from mimkit.engine import resolve_output_dir, train
    cfg = make_cfg(tmp_path_factory.mktemp("pretrain"), "epochs=1", "data.synthetic_size=256")
    train(cfg)
    return resolve_output_dir(cfg) / "checkpoints" / "last.pt"


def probe(protocol, ckpt, out, *overrides):
    rc = main(["probe", protocol, "--checkpoint", str(ckpt), f"output_dir={out}", *overrides])
    assert rc == 0
    return json.loads((out / "metrics.json").read_text())


def check_run_dir(out):
    for f in ("config.yaml", "log.txt", "metrics.json"):
        assert (out / f).is_file(), f
    assert any((out / "tb").iterdir())


def test_knn_probe_cli(ckpt, tmp_path, capsys):
    out = tmp_path / "knn"
    m = probe("knn", ckpt, out)
    check_run_dir(out)
    assert m["protocol"] == "knn" and m["method"] == "mae" and m["dataset"] == "synthetic"  # data from the ckpt
    assert m["n_train"] == 256 and m["n_test"] == 64  # synthetic_size from the checkpoint
    for name in ("pretrained", "random_init"):  # synthetic preset: random-init baseline on
        assert {f"top{t}_k{k}" for t in (1, 5) for k in (10, 20, 100, 200)} <= set(m[name])
    assert m["top1"] == m["pretrained"]["top1_k20"] and 0 <= m["top1"] <= 100
    assert m["settings"]["knn.temperature"] == 0.07
    assert "knn probe: top-1" in capsys.readouterr().out
    # the default cache sits next to output_dir; a second probe reads it
    assert len(list((tmp_path / "feature_cache").glob("*.pt"))) == 2
    probe("knn", ckpt, out, "overwrite=true", "knn.k=10")
    assert "cache hit" in (out / "log.txt").read_text()


def test_linear_probe_cli_both_modes(ckpt, tmp_path):
    out = tmp_path / "lin"
    m = probe("linear", ckpt, out, "epochs=5")
    check_run_dir(out)
    head = load(out / "checkpoints" / "last.pt", "linear_probe")
    assert head["head"]["fc.weight"].shape == (4, 64)
    assert m["settings"]["linear.mode"] == "cached" and len(m["history"]) == 5
    assert 0 <= m["top5"] <= 100 and m["top1"] <= m["top5"]
    out2 = tmp_path / "lin_aug"
    m2 = probe("linear", ckpt, out2, "epochs=1", "linear.mode=augmented", "features.pool=mean", "features.layer=1")
    assert m2["n_train"] == 256 and m2["settings"]["features.layer"] == 1


def test_finetune_cli_keeps_best_checkpoint(ckpt, tmp_path):
    out = tmp_path / "ft"
    m = probe("finetune", ckpt, out, "epochs=2", "data.limit=128", "data.test_limit=32")
    check_run_dir(out)
    best = load(out / "checkpoints" / "best.pt", "finetune")
    assert best["top1"] == m["top1"] == max(h["top1"] for h in m["history"])
    assert m["n_train"] == 128 and m["n_test"] == 32
    from timm.models.vision_transformer import VisionTransformer
    model = VisionTransformer(**best["timm_kwargs"])
    model.load_state_dict(best["model"])  # a plain timm model
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 4)


def test_existing_output_needs_overwrite_for_another_config(ckpt, tmp_path, capsys):
    out = tmp_path / "k"
    args = ["probe", "knn", "--checkpoint", str(ckpt), f"output_dir={out}", "data.limit=64", "data.test_limit=32"]
    probe("knn", ckpt, out, *args[4:])
    assert main([*args, "knn.k=10"]) == 2  # another config: refused
    assert "knn.k" in capsys.readouterr().err and json.loads((out / "metrics.json").read_text())["k"] == 20
    assert main(args) == 0  # the same config (e.g. a requeued job) runs again from scratch
    assert main([*args, "knn.k=10", "overwrite=true"]) == 0
    assert json.loads((out / "metrics.json").read_text())["k"] == 10


@pytest.mark.parametrize("content", [b"garbage", None, "head"])
def test_bad_checkpoint_exits_2_with_one_line(ckpt, tmp_path, capsys, content):
    bad = tmp_path / "bad.pt"
    if content == "head":  # a mimkit file of another kind
        torch.save({"mimkit": "linear_probe", "head": {}}, bad)
    elif content is not None:
        bad.write_bytes(content)
    assert main(["probe", "linear", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(bad) in err


def test_config_mistakes_exit_2(ckpt, tmp_path, capsys):
    assert main(["probe", "knn", "--checkpoint", str(ckpt), "knn.kk=3"]) == 2
    assert "knn.k" in capsys.readouterr().err
    assert main(["probe", "knn", "--checkpoint", str(ckpt), "features.layer=9"]) == 2
    assert "features.layer" in capsys.readouterr().err
    assert main(["probe", "knn"]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_probe_config_files_parse():
    from mimkit.cli import REPO_CONFIGS
    from mimkit.probes.config import probe_config
    files = sorted((REPO_CONFIGS / "probe").glob("*.yaml"))
    assert len(files) == 9
    for f in files:
        protocol = f.stem.split("_")[0]
        cfg = probe_config(protocol, [str(f)], ["checkpoint=x.pt"])
        assert cfg.protocol == protocol and cfg.data.name in ("digits", "cifar10", "imagefolder")
    ft = probe_config("finetune", [str(REPO_CONFIGS / "probe" / "finetune_imagenet.yaml")], ["checkpoint=x.pt"])
    assert (ft.finetune.layer_decay, ft.batch_size * ft.accum_iter, ft.optim.blr) == (0.65, 1024, 5e-4)


def test_finetune_precision_bf16_reaches_the_model_and_its_loop(ckpt, tmp_path, monkeypatch):
    """precision=bf16: the fine-tuned ViT trains under bf16 autocast with timm's plain attention (on CPU)."""
    from mimkit.probes import finetune
    seen = []
    real = finetune.place_model

    def spy(model, device, precision="auto"):
        model = real(model, device, precision)
        model.register_forward_pre_hook(lambda m, a: seen.append(
            (torch.is_autocast_enabled("cpu"), {x.fused_attn for x in m.modules() if hasattr(x, "fused_attn")})))
        return model

    monkeypatch.setattr(finetune, "place_model", spy)
    probe("finetune", ckpt, tmp_path / "ft", "epochs=1", "data.limit=64", "data.test_limit=32", "precision=bf16")
    assert seen and set(a for a, _ in seen) == {True} and all(f == {False} for _, f in seen)


def test_baselines_pixels_and_random_init(ckpt, tmp_path, capsys):
    """k-NN on the raw pixels equals the k-NN of the flattened eval-transform images computed here; the linear
    probe trains the same head on a random-init encoder and on the pixels, each reported beside the probe."""
    from mimkit.data import Transformed, build_dataset, eval_transform
    from mimkit.probes.knn import knn_accuracy
    from mimkit.probes.run import build_probe_config
    m = probe("knn", ckpt, tmp_path / "knn", "knn.pixels=true")
    cfg, _ = build_probe_config("knn", str(ckpt), [], [])
    flat = {}
    for split in ("train", "test"):
        ds = Transformed(build_dataset(cfg.data, split, cfg.data.limit if split == "train" else cfg.data.test_limit),
                         eval_transform(cfg.data))
        flat[split] = (torch.stack([x.flatten() for x, _ in ds]), torch.tensor([int(y) for _, y in ds]))
    want = knn_accuracy(*flat["train"], *flat["test"], T=0.07)
    assert m["pixels"]["top1_k20"] == pytest.approx(want["top1_k20"])
    assert m["pixels"] != m["pretrained"]
    m = probe("linear", ckpt, tmp_path / "lin", "epochs=3", "linear.random_init=true", "linear.pixels=true")
    assert 0 <= m["random_init"]["top1"] <= 100 and 0 <= m["pixels"]["top1"] <= 100
    assert "random init" in capsys.readouterr().out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(tmp_path / "lin" / "tb")).Reload().Tags()["scalars"]
    assert {"test/top1", "random_init/test/top1", "pixels/test/top1"} <= set(tags)  # beside the probe's own
    assert main(["probe", "linear", "--checkpoint", str(ckpt), f"output_dir={tmp_path / 'bad'}", "linear.pixels=true",
                 "features.layer=1"]) == 2
    assert "features.layer must be 0" in capsys.readouterr().err
