"""Probe building blocks against their reference definitions: MAE's LARS, MAE/BEiT layer-wise lr decay, DINO's
weighted k-NN (brute force), the linear probe on separable features, and the feature cache."""
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mimkit.encoders import load_encoder
from mimkit.probes import features as feats_mod
from mimkit.probes.config import probe_config
from mimkit.probes.features import split_features
from mimkit.probes.finetune import finetune_model, layer_decay_groups
from mimkit.probes.knn import knn_accuracy, knn_scores
from mimkit.probes.linear import lars, linear_head, run_linear
from mimkit.vit import ViT


def mae_lars_step(params, grads, bufs, lr, wd=0.0, momentum=0.9, trust=0.001):
    """facebookresearch/mae util/lars.py (from MoCo v3): adapt and decay only parameters with ndim > 1."""
    for p, dp, i in zip(params, grads, range(len(params))):
        if p.ndim > 1:
            dp = dp + wd * p
            pn, un = p.norm(), dp.norm()
            q = trust * pn / un if (pn > 0 and un > 0) else torch.tensor(1.0)
            dp = dp * q
        bufs[i] = dp.clone() if bufs[i] is None else bufs[i] * momentum + dp
        p -= lr * bufs[i]


def test_lars_matches_mae_reference():
    torch.manual_seed(0)
    head = linear_head(16, 5)
    ref = [p.detach().clone() for p in head.parameters()]
    opt = lars(head, lr=3.0)
    bufs = [None] * len(ref)
    x, y = torch.randn(32, 16), torch.randint(0, 5, (32,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(head(x), y).backward()
        grads = [p.grad.detach().clone() for p in head.parameters()]
        opt.step()
        mae_lars_step(ref, grads, bufs, lr=3.0)
        for p, r in zip(head.parameters(), ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)
    # the weight's step is trust-scaled even at weight decay 0 (timm's default would not adapt)
    groups = {g["always_adapt"]: g for g in opt.param_groups}
    assert [p.ndim for p in groups[True]["params"]] == [2] and groups[False]["weight_decay"] == 0.0


def test_linear_head_is_mae_probe_head():
    head = linear_head(64, 10)
    assert not head.bn.affine and head.bn.eps == 1e-6
    assert abs(head.fc.weight.std().item() - 0.01) < 0.002  # timm's trunc_normal_(std=0.01), as MAE
    assert torch.all(head.fc.bias == 0)


def test_layer_decay_scales_per_layer():
    depth, decay = 3, 0.75
    model = finetune_model(ViT(img_size=8, patch_size=2, embed_dim=32, depth=depth, num_heads=2), 10, 0.1)
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=decay)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    seen_ids = set()
    for name, p in model.named_parameters():
        if name.startswith(("patch_embed", "cls_token", "pos_embed")):
            layer_id = 0
        elif name.startswith("blocks."):
            layer_id = int(name.split(".")[1]) + 1
        else:
            assert name.startswith(("fc_norm", "head")), name
            layer_id = depth + 1
        seen_ids.add(layer_id)
        assert scale[id(p)] == pytest.approx(decay ** (depth + 1 - layer_id)), name
        no_decay = p.ndim <= 1 or name in ("pos_embed", "cls_token")
        assert wd[id(p)] == (0.0 if no_decay else 0.05), name
    assert seen_ids == set(range(depth + 2))
    # MAE's fine-tune model: mean pooling + fc_norm, no final norm, head init std 2e-5
    assert model.global_pool == "avg" and isinstance(model.norm, torch.nn.Identity)
    assert model.head.weight.std().item() < 1e-4


def brute_force_knn(train, train_labels, test, k, T, C):
    """DINO's weighted vote, one test sample at a time: cosine similarities, k largest, sum exp(sim / T)."""
    scores = torch.zeros(len(test), C, dtype=torch.float64)
    for i, q in enumerate(test.double()):
        sims = [float(q @ t / (q.norm() * t.norm())) for t in train.double()]
        for j in sorted(range(len(sims)), key=lambda j: -sims[j])[:k]:
            scores[i, train_labels[j]] += math.exp(sims[j] / T)
    return scores


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_knn_equals_brute_force(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    C = 4
    train, test = torch.randn(120, 8, generator=g), torch.randn(30, 8, generator=g)
    labels = torch.randint(0, C, (120,), generator=g)
    got = knn_scores(train, labels, test, ks=(5, 20, 200), T=0.07, num_classes=C, backend=backend)
    for k in (5, 20):
        ref = brute_force_knn(train, labels, test, k, 0.07, C)
        torch.testing.assert_close(got[k].double(), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[200].double(), brute_force_knn(train, labels, test, 120, 0.07, C),
                               rtol=1e-4, atol=1e-6)  # k above the training set size: every neighbour votes
    test_labels = torch.randint(0, C, (30,), generator=g)
    acc = knn_accuracy(train, labels, test, test_labels, ks=(5,), T=0.07, backend=backend)
    ref = brute_force_knn(train, labels, test, 5, 0.07, C)
    assert acc["top1_k5"] == pytest.approx(100.0 * (ref.argmax(1) == test_labels).double().mean().item())
    top4 = ref.topk(4, dim=1).indices  # C = 4 classes: top-5 is every class
    assert acc["top5_k5"] == pytest.approx(100.0 * (top4 == test_labels[:, None]).any(1).double().mean().item())


class NullWriter:
    def add_scalar(self, *args):
        pass


def test_linear_probe_on_separable_features_reaches_100(tmp_path):
    g = torch.Generator().manual_seed(0)
    C, D = 5, 32
    centers = 4 * torch.randn(C, D, generator=g)

    def sample(n):
        y = torch.arange(n) % C
        return centers[y] + torch.randn(n, D, generator=g), y

    data = {"train": sample(500), "test": sample(200)}
    cfg = probe_config("linear", overrides=["data.name=synthetic", "checkpoint=x.pt", "epochs=10"])
    assert cfg.linear.mode == "cached"
    saved = {}
    run = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), writer=NullWriter(), log=lambda m: None,
                          num_classes=C, features=lambda split, encoder=None: data[split], save=saved.__setitem__)
    m = run_linear(run)
    assert m["top1"] >= 99.0, m["history"][-3:]
    assert m["history"][-1]["loss"] < 0.5 * m["history"][0]["loss"]
    assert saved["last.pt"]["mimkit"] == "linear_probe" and "fc.weight" in saved["last.pt"]["head"]


def test_linear_probe_stops_on_a_nonfinite_loss():
    from mimkit.loop import NonFiniteLossError
    x, y = torch.randn(64, 8), torch.arange(64) % 4
    x[5, 0] = float("nan")  # one poisoned feature vector
    cfg = probe_config("linear", overrides=["data.name=synthetic", "checkpoint=x.pt", "epochs=2", "batch_size=16"])
    run = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), writer=NullWriter(), log=lambda m: None,
                          num_classes=4, features=lambda split, encoder=None: (x, y), save=lambda *a: None)
    with pytest.raises(NonFiniteLossError, match=r"step \d+ \(epoch 1, iteration \d+\); lower optim.blr"):
        run_linear(run)


@pytest.fixture
def ckpt(cfg_factory, tmp_path):
    """A pretraining checkpoint as the engine writes it (untrained: only the format matters here)."""
    from mimkit.engine import save_checkpoint
    from mimkit.loop import build_optimizer
    from mimkit.methods import build_method
    cfg = cfg_factory()
    model = build_method(cfg)
    path = tmp_path / "last.pt"
    save_checkpoint(path, model, build_optimizer(model, cfg, torch.device("cpu")), 0, 0, cfg, [])
    return path


def test_feature_cache_hit_and_miss(ckpt, tmp_path, monkeypatch):
    encoder, pcfg, _ = load_encoder(ckpt)
    calls = []
    real = feats_mod.extract
    monkeypatch.setattr(feats_mod, "extract", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = tmp_path / "cache"
    get = lambda **kw: split_features(encoder, pcfg.data, "test", torch.device("cpu"), cache_dir=cache,  # noqa: E731
                                      ckpt_id=feats_mod.checkpoint_id(ckpt), log=lambda m: None, **kw)
    x1, y1 = get()
    assert len(calls) == 1 and len(list(cache.glob("*.pt"))) == 1  # miss: computed and stored
    x2, y2 = get()
    assert len(calls) == 1 and torch.equal(x1, x2) and torch.equal(y1, y2)  # hit
    get(pool="mean")
    get(layer=1)
    assert len(calls) == 3 and len(list(cache.glob("*.pt"))) == 3  # another representation: miss
    st = os.stat(ckpt)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a rewritten checkpoint: miss
    get()
    assert len(calls) == 4
    for f in cache.glob("*.pt"):
        f.write_bytes(b"garbage")
    x3, _ = get()  # a damaged file is a miss, recomputed
    assert len(calls) == 5 and torch.equal(x1, x3)


def test_layer_features_are_block_outputs(ckpt):
    encoder, pcfg, _ = load_encoder(ckpt)
    x = torch.randn(3, 3, pcfg.data.img_size, pcfg.data.img_size)
    encoder.eval()
    with torch.no_grad():
        tokens = encoder.embed(x)
        tokens = encoder.blocks[0](tokens)
        assert torch.allclose(feats_mod.encode(encoder, x, "mean", 0), tokens[:, 1:].mean(1), atol=1e-6)
        assert torch.allclose(feats_mod.encode(encoder, x, "cls"), encoder(x)[:, 0])


def test_closing_knn_probe_reports_both_encoders(cfg_factory):
    """What `mimkit pretrain` runs at the end (from the CLI layer): both encoders, on data.limit / data.test_limit."""
    from mimkit.methods import build_method
    from mimkit.probes.knn import closing_probe
    cfg = cfg_factory("data.limit=64", "data.test_limit=32")
    assert closing_probe(build_method(cfg), cfg, torch.device("cpu")) == {}  # probe.enabled=false (synthetic preset)
    cfg.probe.enabled = True
    out = closing_probe(build_method(cfg), cfg, torch.device("cpu"), log=lambda m: None)["knn"]
    for name in ("pretrained", "random_init"):
        assert {f"top1_k{k}" for k in (10, 20, 100, 200)} <= set(out[name])
    assert out["gain_points"] == pytest.approx(out["pretrained"]["top1_k20"] - out["random_init"]["top1_k20"])


def test_finetune_train_transform_is_timm_randaugment_pipeline():
    from PIL import Image
    from timm.data import auto_augment

    from mimkit.probes.finetune import train_transform
    black = auto_augment.NAME_TO_OP["PosterizeIncreasing"](Image.new("RGB", (8, 8), (200, 100, 50)), 0)
    assert black.getextrema() == ((0, 0),) * 3  # 0 bits kept: what Pillow < 13 returned (13 raises)
    cfg = probe_config("finetune", overrides=["data.name=synthetic", "checkpoint=x.pt", "data.img_size=16",
                                              "finetune.auto_augment=rand-m9-mstd0.5-inc1", "finetune.reprob=0.25"])
    tf = train_transform(cfg)
    names = [type(t).__name__ for t in tf.transforms[1].transforms]
    assert names[:3] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment"]
    assert "RandomErasing" in names
    torch.manual_seed(0)
    for _ in range(20):  # tensor images (in-memory datasets) go through PIL
        assert tf(torch.rand(3, 16, 16)).shape == (3, 16, 16)
