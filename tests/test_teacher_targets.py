"""Continuous teacher targets (eva, maskdistill, milan): losses and feature normalization by hand, the teacher's
block tokens, the methods' losses against a hand computation, the teacher outside the model, short runs."""
import functools
import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mimkit import checkpoint
from mimkit.cli import main
from mimkit.config import ConfigError, to_dict
from mimkit.losses import cosine, smooth_l1
from mimkit.methods import build_method, pretrain_config
from mimkit.targets.teacher import normalize
from mimkit.teachers import load_teacher


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A mimkit checkpoint on the synthetic preset (random weights: only the function matters here)."""
    path = tmp_path_factory.mktemp("teacher") / "t.pt"
    cfg = pretrain_config([], ["data.name=synthetic", "model.depth=3"])
    torch.manual_seed(0)
    checkpoint.save({"mimkit": "pretrain", "model": build_method(cfg).state_dict(), "config": to_dict(cfg)}, path)
    return path


def cfg_for(method, teacher_ckpt, tmp_path, *overrides):
    return pretrain_config([], ["data.name=synthetic", f"method={method}", f"output_dir={tmp_path / method}",
                                f"target.teacher.name=mimkit:{teacher_ckpt}", *overrides])


def test_cosine_loss_by_hand():
    pred = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]])
    target = torch.tensor([[[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    # cosines 1 and -1 on the masked patches: losses 0 and 2, mean 1; the visible patch does not count
    assert cosine(pred, target, mask)["loss"].item() == pytest.approx(1.0)
    assert cosine(pred[mask], target, mask)["loss"].item() == pytest.approx(1.0)  # head at masked positions only


def test_smooth_l1_loss_by_hand():
    pred = torch.tensor([[[0.0, 0.0], [5.0, 5.0]]])
    target = torch.tensor([[[0.5, 3.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, False]])
    # |d| = 0.5 -> 0.5 * 0.5^2 = 0.125; |d| = 3 -> 3 - 0.5 = 2.5; mean over the patch's 2 values
    assert smooth_l1(pred, target, mask)["loss"].item() == pytest.approx((0.125 + 2.5) / 2)


def test_feature_normalization_by_hand():
    x = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]])
    mean, var = 3.0, ((4 + 1 + 0 + 9) / 4)  # LayerNorm: the population variance
    assert torch.allclose(normalize(x, "layernorm"), (x - mean) / (var + 1e-6) ** 0.5)
    assert torch.allclose(normalize(x, "l2"), x / x.norm())
    assert torch.equal(normalize(x, "none"), x)


def test_teacher_block_tokens_are_the_blocks_raw_outputs(teacher_ckpt):
    teacher = load_teacher(f"mimkit:{teacher_ckpt}")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        final, layers = teacher.model(x, return_layers=(0, 2))
        assert torch.equal(teacher.tokens(x), final[:, 1:])
        assert torch.equal(teacher.block_tokens(x, 1), layers[0][:, 1:])
        assert torch.equal(teacher.block_tokens(x, -1), layers[1][:, 1:])  # the last of 3 blocks, before the norm
    with pytest.raises(ConfigError, match="out of range"):
        teacher.block_tokens(x, 4)


def test_eva_loss_is_one_minus_cosine_at_masked_positions(teacher_ckpt, tmp_path):
    model = build_method(cfg_for("eva", teacher_ckpt, tmp_path)).eval()
    imgs, mask = torch.randn(3, 3, 16, 16), torch.rand(3, 16).argsort(1) < 6
    with torch.no_grad():
        out = model(imgs, mask)
        pred = F.linear(model.encoder(imgs, mask, mode="token")[:, 1:][mask], model.head.weight, model.head.bias)
        target = model.target.teacher(imgs, ((0.5,) * 3, (0.25,) * 3), 4)[mask]
    assert out["loss"].item() == pytest.approx((1 - F.cosine_similarity(pred, target, dim=-1)).mean().item(), rel=1e-5)
    assert not any(k.startswith(("teacher", "target")) for k in model.state_dict())
    teacher_params = {p.data_ptr() for p in model.target.teacher.parameters()}
    assert teacher_params and not teacher_params & {p.data_ptr() for p in model.parameters()}  # not in the optimizer
    assert model.head.out_features == model.encoder.embed_dim  # the mimkit teacher's features: same width


def test_maskdistill_target_is_the_last_blocks_tokens_layer_normalized(teacher_ckpt, tmp_path):
    cfg = cfg_for("maskdistill", teacher_ckpt, tmp_path)
    assert (cfg.target.teacher.layer, cfg.target.teacher.norm, cfg.loss) == (-1, "layernorm", "smooth_l1")
    model = build_method(cfg).eval()
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        raw = model.target.teacher.model(imgs, return_layers=(-1,))[1][0][:, 1:]  # same stats and size: no resize
        want = F.layer_norm(raw, raw.shape[-1:], eps=1e-6)
        assert torch.allclose(model.target(imgs), want, atol=1e-5)


def test_milan_drops_masked_patches_and_decodes_teacher_features(teacher_ckpt, tmp_path):
    model = build_method(cfg_for("milan", teacher_ckpt, tmp_path))
    assert model.predictor.encoder_mode == "drop" and model.decoder.pred.out_features == model.target.out_dim


@pytest.mark.parametrize("method", ["eva", "maskdistill", "milan"])
def test_short_run_loss_falls_and_probes_read_the_checkpoint(teacher_ckpt, tmp_path, method):
    out = tmp_path / method
    assert main(["pretrain", "data.name=synthetic", f"method={method}", "epochs=4", "data.synthetic_size=256",
                 f"target.teacher.name=mimkit:{teacher_ckpt}", "optim.blr=2e-3", "optim.lr_batch_ref=256",
                 "optim.warmup_epochs=1", f"output_dir={out}"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["final_loss"] < 0.95 * m["first_loss"], m["loss_history"]
    assert (out / "reconstructions.png").exists()  # the cosine panel
    assert main(["probe", "knn", "--checkpoint", str(out / "checkpoints" / "last.pt"),
                 f"output_dir={tmp_path / 'knn'}"]) == 0
    assert main(["export", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--out", str(tmp_path / "vit.pt")]) == 0


def test_teacher_target_mistakes_are_one_line(tmp_path, capsys):
    assert main(["pretrain", "data.name=synthetic", "method=eva", f"output_dir={tmp_path / 'x'}"]) == 2
    assert "target.teacher.name" in capsys.readouterr().err
    assert main(["pretrain", "data.name=synthetic", "method=eva", "target.teacher.norm=batch",
                 f"output_dir={tmp_path / 'x'}"]) == 2
    assert "layernorm" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["eva", "maskdistill", "milan"])
@pytest.mark.parametrize("preset", ["digits", "vit_tiny_cifar10", "vit_base_imagenet"])
def test_shipped_configs_name_a_teacher(method, preset):
    from conftest import REPO
    from mimkit.methods import validate
    cfg = pretrain_config([str(REPO / "configs" / "pretrain" / f"{method}_{preset}.yaml")], ["data.root=/x"])
    validate(cfg)
    assert cfg.method == method and cfg.target.kind == "teacher" and cfg.target.teacher.name
    if preset == "digits":  # the default job's encoder
        assert cfg.target.teacher.name == "mimkit:runs/mae_digits/checkpoints/last.pt"


def test_teacher_features_meet_the_encoder_grid_by_area_interpolation():
    from mimkit.teachers import to_grid
    feats = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid, value = raster index
    down = to_grid(feats, 2)  # each 2x2 block's mean
    assert down.view(2, 2).tolist() == [[(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4], [(8 + 9 + 12 + 13) / 4,
                                                                                      (10 + 11 + 14 + 15) / 4]]
    up = to_grid(feats, 8)  # each teacher feature over the 2x2 encoder patches it covers
    assert torch.equal(up.view(8, 8), feats.view(4, 4).repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert to_grid(feats, 4) is feats
    with pytest.raises(ConfigError, match="one must divide the other"):
        to_grid(feats, 3)


TEACHERS = ["vit_base_patch16_clip_224.openai", "vit_large_patch14_clip_224.openai",
            "eva02_base_patch16_clip_224.merged2b", "vit_base_patch16_siglip_224.webli", "vit_small_patch16_224.dino",
            "vit_base_patch16_224.dino", "vit_small_patch14_dinov2.lvd142m"]


@pytest.mark.parametrize("name", TEACHERS)
def test_readme_teacher_architectures_load_from_a_local_file(name, tmp_path):
    """Each architecture of README's teacher table, built from timm with random weights (one block: the loader's
    handling of prefix tokens, positions and normalization does not depend on depth), saved, loaded back as a
    teacher and run on the encoder's grid. Nothing is downloaded."""
    from mimkit.teachers import Teacher, _load_timm_state, read_state_dict
    spec = {"source": "timm", "name": name, "kwargs": {"depth": 1}}
    torch.manual_seed(0)
    source = Teacher(spec)
    torch.save(source.model.state_dict(), tmp_path / "w.pth")
    teacher = Teacher(spec)
    _load_timm_state(teacher.model, read_state_dict(str(tmp_path / "w.pth")), str(tmp_path / "w.pth"))
    imgs = torch.randn(1, 3, 32, 32)
    grid = teacher.input_size // teacher.model.patch_embed.patch_size[0]  # its native grid: 14, 16 or 37
    feats = teacher(imgs, ((0.5,) * 3, (0.25,) * 3), grid)
    assert feats.shape == (1, grid * grid, teacher.feature_dim())
    assert torch.equal(feats, source(imgs, ((0.5,) * 3, (0.25,) * 3), grid))


def readme_teacher_rows() -> list[dict]:
    """The rows of README's teacher table, by column name."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text().split("\n## Teachers\n", 1)[1]
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = [line for line in itertools.takewhile(lambda line: line.startswith("|"), lines[start:])]
    head = [c.strip() for c in table[0].strip("|").split("|")]
    rows = []
    for line in table[2:]:
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        if len(cells) == len(head):
            rows.append(dict(zip(head, cells)))
    return rows


OPENCLIP_ROWS = [r for r in readme_teacher_rows() if r["open_clip name"] not in ("", "—")]
CLIP_STATS = ((0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758))


def table_stats(cell: str) -> tuple:
    """The normalization column: "CLIP ..." or "(m, m, m), (s, s, s)"."""
    if cell.startswith("CLIP"):
        return CLIP_STATS
    mean, std = cell.split("), (")
    return tuple(tuple(float(v) for v in part.strip("() ").split(",")) for part in (mean, std))


@pytest.mark.parametrize("row", OPENCLIP_ROWS, ids=[r["open_clip name"] for r in OPENCLIP_ROWS])
def test_readme_openclip_architectures_match_the_table(row, tmp_path, monkeypatch):
    """Each open_clip architecture of README's teacher table, built by open_clip from its own config with random
    weights (the text and image towers cut to one block: width, patch, input size and projection stay), saved as a
    whole CLIP, loaded back as `openclip:` teacher: its input size, token grid, feature width and normalization are
    the table's. Nothing is downloaded (open_clip's table of released weights is local)."""
    open_clip = pytest.importorskip("open_clip")
    name = row["open_clip name"]
    cfg = json.loads(json.dumps(open_clip.get_model_config(name)))
    cfg["text_cfg"]["layers"] = 1
    if "layers" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["layers"] = 1
    else:  # a timm trunk (EVA02, SigLIP): one block too
        import timm
        monkeypatch.setattr(timm, "create_model", functools.partial(timm.create_model, depth=1))
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, name, cfg)  # under its own name, for this test only
    torch.manual_seed(0)
    torch.save(open_clip.create_model(name).state_dict(), tmp_path / "clip.pt")
    teacher = load_teacher(f"openclip:{name}", str(tmp_path / "clip.pt"))
    patch, size = int(row["patch"]), int(row["input"])
    assert teacher.input_size == size
    grid = size // patch
    x = torch.randn(2, 3, size, size)
    feats = teacher.features(x)
    assert feats.shape == (2, grid * grid, int(row["features (timm / open_clip)"].split("/")[-1]))
    assert feats[0].std() > 0 and not torch.allclose(feats[0], feats[1])  # per image, per patch
    assert teacher.block_tokens(x, -1).shape[:2] == (2, grid * grid)  # teacher.layer: the same grid
    mean, std = table_stats(row["normalization"])
    assert teacher.mean == pytest.approx(mean, abs=1e-4) and teacher.std == pytest.approx(std, abs=1e-4)


def test_eva_resume_is_bitwise_exact(teacher_ckpt, tmp_path, monkeypatch):
    from conftest import die_after_first_checkpoint
    common = ["data.name=synthetic", "method=eva", "epochs=3", "data.synthetic_size=64",
              f"target.teacher.name=mimkit:{teacher_ckpt}", "optim.lr_batch_ref=256"]
    assert main(["pretrain", *common, f"output_dir={tmp_path / 'a'}"]) == 0
    die_after_first_checkpoint(monkeypatch)
    assert main(["pretrain", *common, f"output_dir={tmp_path / 'b'}"]) == 130
    monkeypatch.undo()
    assert main(["pretrain", *common, f"output_dir={tmp_path / 'b'}"]) == 0
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True)["model"] for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_layer_is_one_key_for_every_command(teacher_ckpt, tmp_path, capsys):
    """teacher.layer in `mimkit tokenizer train`: a k-means tokenizer on block 1's tokens keeps the layer in its
    file and encodes with it; an out-of-range layer is one error line before anything is written."""
    from mimkit.tokenizers import Tokenizer
    out = tmp_path / "km"
    assert main(["tokenizer", "train", "kind=kmeans", "data.name=synthetic", "vocab_size=8", "kmeans.features=teacher",
                 f"teacher.name=mimkit:{teacher_ckpt}", "teacher.layer=1", "kmeans.max_samples=2048",
                 f"output_dir={out}"]) == 0
    tok = Tokenizer.load(out / "tokenizer.pt")
    assert tok.teacher.spec["layer"] == 1
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        block1 = tok.teacher.model(imgs, return_layers=(0,))[1][0][:, 1:]  # same stats and size as the data
        assert torch.allclose(tok.features(imgs), F.normalize(block1, dim=-1), atol=1e-6)
    capsys.readouterr()
    assert main(["tokenizer", "train", "kind=vqkd", "data.name=synthetic", f"teacher.name=mimkit:{teacher_ckpt}",
                 "teacher.layer=9", f"output_dir={tmp_path / 'vq'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher.layer=9" in err[0] and not (tmp_path / "vq").exists()
