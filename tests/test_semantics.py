"""Token semantics (`mimkit analyze tokens|predictions`): the metrics against their definitions, on constructed
tokenizers with known answers, the streaming sample, the figures and both commands end to end."""
import json
import math

import numpy as np
import pytest
import torch

from mimkit.cli import main
from mimkit.data import TensorImages, dataset_stats, denormalize
from mimkit.probes import semantics as sem
from mimkit.tokenizers.base import Tokenizer, codebook_stats
from mimkit.tokenizers.kmeans import KMeansTokenizer

C, GRID, SIZE = 4, 4, 8  # classes, token grid, image side
STATS = dataset_stats("synthetic")  # the tokenizers below share the data's statistics: no renormalization


def labeled_images(n=400, seed=0) -> TensorImages:
    """Images whose channel 0 holds the class (c / C everywhere) and channel 1 uniform noise, as the
    normalized tensors the analysis streams."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % C
    x = torch.zeros(n, 3, SIZE, SIZE)
    x[:, 0] = (labels.float() / C)[:, None, None]
    x[:, 1] = torch.rand(n, SIZE, SIZE, generator=g)
    return TensorImages(x, labels, [f"c{i}" for i in range(C)])


def patch_means(images: torch.Tensor, channel: int) -> torch.Tensor:
    cell = SIZE // GRID
    return torch.nn.functional.avg_pool2d(images[:, channel:channel + 1], cell).flatten(1)  # [B, GRID * GRID]


class ClassTokens(Tokenizer):
    """Reads the class from channel 0: id = class * 4 + position % 4, so no token is shared by two classes."""

    def __init__(self):
        super().__init__(SIZE, GRID, C * 4, *STATS)

    def _encode(self, images):
        cls = (patch_means(images, 0) * C).round().long()
        return cls * 4 + torch.arange(GRID * GRID) % 4


class BlindTokens(Tokenizer):
    """Quantizes the noise channel into 8 ids: the token distribution is the same for every class."""

    def __init__(self):
        super().__init__(SIZE, GRID, 8, *STATS)

    def _encode(self, images):
        return (patch_means(images, 1) * 8).long().clamp(0, 7)


def stream(tokenizers, dataset, **overrides):
    cfg = sem.analyze_config([], ["data.name=synthetic", *[f"{k}={v}" for k, v in overrides.items()]])
    return cfg, *sem.stream_tokens(tokenizers, dataset, "synthetic", C, cfg, torch.device("cpu"))


def test_tcas_matches_a_hand_computation():
    counts = np.array([[2, 2, 0], [0, 1, 3]])
    # M = [[1/2, 1/2, 0], [0, 1/4, 3/4]]; M M^T = [[1/2, 1/8], [1/8, 5/8]]; TCAS = (1/8 + 1/8) / (1/2 + 5/8)
    assert sem.tcas(counts) == pytest.approx(0.25 / 1.125)
    # a class without patches is left out; scaling a class's counts changes nothing (rows are shares)
    assert sem.tcas(np.vstack([counts * [[3], [7]], [[0, 0, 0]]])) == pytest.approx(0.25 / 1.125)
    # the definition, one class pair at a time
    three = np.array([[5, 1, 0, 2], [0, 3, 3, 0], [1, 1, 1, 1]])
    m = three / three.sum(1, keepdims=True)
    off = sum(m[a] @ m[b] for a in range(3) for b in range(3) if a != b)
    assert sem.tcas(three) == pytest.approx(off / sum(m[a] @ m[a] for a in range(3)))
    assert sem.tcas(np.eye(3, 5)) == 0.0
    assert sem.tcas(np.ones((3, 5))) == pytest.approx(2.0)  # blind: C - 1


def test_count_metrics_match_their_definitions():
    from scipy.stats import entropy
    counts = np.array([[5, 1, 0, 2, 0], [0, 3, 3, 0, 0], [1, 1, 1, 1, 0]])
    h_mean, h_weighted = sem.token_class_entropy(counts)
    used = counts.sum(0) > 0
    per_token = [entropy(counts[:, s]) for s in np.flatnonzero(used)]
    assert h_mean == pytest.approx(np.mean(per_token))
    assert h_weighted == pytest.approx(np.dot(per_token, counts.sum(0)[used]) / counts.sum())
    assert sem.purity(counts) == pytest.approx((5 + 3 + 3 + 2) / counts.sum())
    ids = torch.from_numpy(np.repeat(np.arange(5), counts.sum(0)))
    ref = codebook_stats(ids, 5)  # the tokenizers' own statistic, from ids
    summary = sem.summarize_counts(counts)
    assert (summary["usage"], summary["perplexity"]) == pytest.approx((0.8, math.exp(entropy(counts.sum(0)))))
    assert (summary["usage"], summary["perplexity"]) == pytest.approx((ref["usage"], ref["perplexity"]))


def test_tokens_that_never_cross_classes_score_tcas_0_and_purity_1():
    _, stats, _, _ = stream({"class": ClassTokens()}, labeled_images(200), batch_size=64)
    m = stats["class"].metrics()
    assert m["tcas"] == 0.0 and m["purity"] == 1.0
    assert m["homogeneity"] == pytest.approx(1.0) and m["class_entropy_weighted"] == pytest.approx(0.0)
    assert m["usage"] == 1.0 and m["patches"] == 200 * GRID * GRID and m["classes"] == C


def test_a_tokenizer_blind_to_class_scores_tcas_near_c_minus_1_and_nmi_near_0():
    _, stats, _, _ = stream({"blind": BlindTokens()}, labeled_images(800), batch_size=128)
    m = stats["blind"].metrics()
    assert m["tcas"] == pytest.approx(C - 1, rel=0.02) and m["tcas_norm"] == pytest.approx(1.0, rel=0.02)
    assert m["nmi"] < 0.01 and abs(m["ami"]) < 0.01
    assert m["purity"] < 0.3 and m["class_entropy_weighted"] == pytest.approx(math.log(C), rel=0.02)


def test_sample_and_gallery_do_not_depend_on_the_batch_size():
    data = labeled_images(300)
    runs = [stream({"blind": BlindTokens()}, data, batch_size=b, metric_samples=500)[1]["blind"] for b in (7, 300)]
    a, b = runs
    assert np.array_equal(a.counts, b.counts)
    assert np.array_equal(np.concatenate(a.sample_ids), np.concatenate(b.sample_ids))
    assert 350 < len(np.concatenate(a.sample_ids)) < 650  # ~metric_samples of the 4800 patches
    assert np.array_equal(a.best_ref, b.best_ref)
    # the gallery holds, per token, the K patches of lowest priority among all patches with that token
    ids = np.concatenate([BlindTokens().encode(data.images[i:i + 50]).numpy().ravel() for i in range(0, 300, 50)])
    priority = sem.patch_priority(np.arange(len(ids)), 0)
    for s in range(8):
        refs = np.flatnonzero(ids == s)
        kept = a.best_ref[s][a.best_ref[s] >= 0]  # -1: a rare token with fewer patches than gallery slots
        assert list(kept) == list(refs[np.argsort(priority[refs])][:a.best_ref.shape[1]])


def assert_image(path, min_side=150):
    from PIL import Image
    img = np.asarray(Image.open(path).convert("RGB")).astype(np.float64)
    assert min(img.shape[:2]) >= min_side, path
    assert img.std() > 10 and len(np.unique(img.reshape(-1, 3), axis=0)) > 20, f"{path} looks blank"


def test_figures_are_written_and_are_not_blank(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    data = labeled_images(120)
    tok = ClassTokens()
    cfg, stats, imgs, ids = stream({"class": tok}, data, batch_size=64)
    writer = SummaryWriter(str(tmp_path / "tb"))
    paths = sem.tokenizer_figures("class", tok, stats["class"], data, data.classes, imgs, ids["class"], cfg, tmp_path,
                                  writer)
    writer.close()
    assert sorted(p.split("/")[-1] for p in paths) == ["class_token_heatmap.png", "code_usage.png", "gallery.png",
                                                       "token_maps.png"]
    for p in paths:
        assert_image(p)
    assert any((tmp_path / "tb").iterdir())
    # gallery crops: the patch sits in the middle of its context, cut from the right image
    refs = stats["class"].best_ref[:2, :3]
    crops = sem.gallery_crops(data, refs, tok, "synthetic", context=1)
    assert crops.shape == (2, 3, 3, 6, 6)
    i, pos = divmod(int(refs[1, 2]), GRID * GRID)
    r, c = divmod(pos, GRID)
    img = denormalize(data.images[i:i + 1], "synthetic")[0]
    assert torch.allclose(crops[1, 2, :, 2:4, 2:4], img[:, 2 * r:2 * r + 2, 2 * c:2 * c + 2])


def kmeans_file(path, k, seed):
    tok = KMeansTokenizer(16, 4, k, [0.5] * 3, [0.25] * 3, dim=48)
    tok.centroids.copy_(torch.randn(k, 48, generator=torch.Generator().manual_seed(seed)))
    tok.save(path)
    return str(path)


def test_analyze_tokens_cli_end_to_end(tmp_path, capsys):
    a, b = kmeans_file(tmp_path / "a.pt", 8, 0), kmeans_file(tmp_path / "b.pt", 32, 1)
    out = tmp_path / "analysis"
    assert main(["analyze", "tokens", "--tokenizer", f"small={a}", "data.name=synthetic", "--out", str(out),
                 "--tokenizer", b, "data.test_limit=64", "figures.gallery_tokens=4"]) == 0
    for name in ("config.yaml", "metrics.json", "log.txt", "table.md"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    m = json.loads((out / "metrics.json").read_text())
    assert m["images"] == 64 and [r["tokenizer"] for r in m["table"]] == sorted(["small", "b"],
                                                                                key=lambda n: m["tokenizers"][n]["tcas"])
    assert [r["tcas"] for r in m["table"]] == sorted(r["tcas"] for r in m["table"])
    for r in m["tokenizers"].values():
        assert 0 <= r["tcas"] <= C - 1 + 1e-9 and r["patches"] == 64 * 16 and len(r["figures"]) == 4
        assert r["metric_samples"] == 64 * 16  # below metric_samples: every patch
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 4 and all(line.count("|") == len(sem.TABLE_COLUMNS) + 1 for line in table)
    assert "tokenizers: small=" in (out / "config.yaml").read_text()
    assert "lowest TCAS" in capsys.readouterr().out
    # an existing analysis is not replaced silently
    assert main(["analyze", "tokens", "--tokenizer", a, "data.name=synthetic", "--out", str(out)]) == 2
    assert "overwrite=true" in capsys.readouterr().err


def test_a_bad_tokenizer_path_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a tokenizer")
    for path in (tmp_path / "missing.pt", bad):
        assert main(["analyze", "tokens", "--tokenizer", str(path), "data.name=synthetic",
                     "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and str(path) in err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Random-init clustermim and beit models on synthetic data with a k-means target, saved as checkpoints."""
    from mimkit import checkpoint
    from mimkit.methods import pretrain_config
    from mimkit.config import to_dict
    from mimkit.methods import build_method
    root = tmp_path_factory.mktemp("pred")
    tok = kmeans_file(root / "tok.pt", 8, 0)
    out = {}
    for method in ("clustermim", "beit"):
        cfg = pretrain_config([], ["data.name=synthetic", f"method={method}", f"target.tokens.tokenizer={tok}",
                                   f"output_dir={root / method}"])
        torch.manual_seed(0)
        model = build_method(cfg).eval()
        path = root / method / "checkpoints" / "last.pt"
        checkpoint.save({"mimkit": "pretrain", "model": model.state_dict(), "config": to_dict(cfg), "epoch": 0}, path)
        out[method] = (model, cfg, str(path))
    return tok, out


@pytest.mark.parametrize("method", ["clustermim", "beit"])
def test_predicted_token_logits_agree_with_the_methods_own_accuracy(pretrained, method):
    model, cfg, _ = pretrained[1][method]
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(6, 3, 16, 16, generator=g)
    mask = torch.rand(6, 16, generator=g).argsort(1) < 8  # the same count per image (clustermim drops them)
    with torch.no_grad():
        logits = model.masked_logits(imgs, mask)
        ref = model(imgs, mask)["acc"]
        target = model.target(imgs)[mask]
    assert logits.shape == (6 * 8, 8)
    assert (logits.argmax(-1) == target).float().mean().item() == pytest.approx(ref.item())


def test_analyze_predictions_cli_end_to_end(pretrained, tmp_path, capsys):
    from mimkit import checkpoint
    from mimkit.methods import pretrain_config
    from mimkit.config import to_dict
    from mimkit.methods import build_method
    from mimkit.data import EpochSampler, MaskedImages, build_dataset, eval_transform
    from mimkit.masking import build_mask_generator
    tok, models = pretrained
    model, cfg, path = models["clustermim"]
    out = tmp_path / "pred"
    assert main(["analyze", "predictions", "--checkpoint", path, "--tokenizer", tok, "data.test_limit=40", "batch_size=16",
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (out / "config.yaml").is_file() and (out / "log.txt").is_file() and any((out / "tb").iterdir())
    assert_image(m["figures"][0], min_side=100)
    # the same masked patches through the method's own forward give the same accuracy
    data = MaskedImages(build_dataset(cfg.data, "test", 40), eval_transform(cfg.data),
                        build_mask_generator(cfg.mask, 4, cfg.model.patch_size), 0)
    imgs, masks, labels, _ = zip(*(data[k] for k in EpochSampler(len(data), shuffle=False)))
    with torch.no_grad():
        ref = model(torch.stack(imgs), torch.stack(masks))["acc"].item()
    assert m["accuracy"] == pytest.approx(ref) and m["masked_patches"] == int(torch.stack(masks).sum())
    per_class = np.array([m["per_class_accuracy"][c] for c in data.base.classes])
    weights = np.bincount(np.array(labels), weights=torch.stack(masks).sum(1).numpy())
    assert m["accuracy"] == pytest.approx(float((per_class * weights).sum() / weights.sum()))
    assert 0 <= m["majority_baseline"] <= 1 and m["top5_accuracy"] >= m["accuracy"]
    assert "masked-patch token accuracy" in capsys.readouterr().out
    # a tokenizer with another vocabulary than the head's: one line naming the mismatch
    other = kmeans_file(tmp_path / "k32.pt", 32, 0)
    assert main(["analyze", "predictions", "--checkpoint", path, "--tokenizer", other, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vocabulary 32" in err
    # a method whose targets are not tokens
    mae = pretrain_config([], ["data.name=synthetic", "method=mae"])
    checkpoint.save({"mimkit": "pretrain", "model": build_method(mae).state_dict(), "config": to_dict(mae)},
                    tmp_path / "mae.pt")
    assert main(["analyze", "predictions", "--checkpoint", str(tmp_path / "mae.pt"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "target.kind=tokens" in err and not (tmp_path / "m").exists()
