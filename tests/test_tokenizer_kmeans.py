"""The tokenizer interface, its registry, the file format, teachers and the FAISS k-means tokenizer."""
import json

import numpy as np
import pytest
import torch

from mimkit import checkpoint
from mimkit.config import ConfigError, to_dict
from mimkit.data import dataset_stats
from mimkit.images import patchify, renormalize
from mimkit.targets import TARGETS, TargetContext
from mimkit.teachers import load_teacher
from mimkit.tokenizers import TOKENIZERS
from mimkit.tokenizers.base import Tokenizer, codebook_stats
from mimkit.tokenizers.config import config_class, tokenizer_config
from mimkit.tokenizers.kmeans import KMeansTokenizer, assign, fit_kmeans, inertia
from mimkit.tokenizers.train import train_tokenizer


def blobs(n=6000, d=12, k=24, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 2.0
    x = centers[rng.integers(0, k, n)] + rng.normal(size=(n, d))
    return x.astype(np.float32), rng


def test_faiss_fit_matches_sklearn_lloyd_from_the_same_init():
    from sklearn.cluster import KMeans
    from sklearn.metrics import pairwise_distances_argmin
    x, rng = blobs()
    k = 32
    init = x[rng.choice(len(x), k, replace=False)]
    ours = fit_kmeans(x, k, niter=50, init=init, max_points_per_centroid=len(x))  # no subsampling
    ref = KMeans(k, init=init, n_init=1, algorithm="lloyd", max_iter=300, tol=0).fit(x)
    ours_inertia = inertia(torch.from_numpy(x), torch.from_numpy(ours))
    assert ours_inertia == pytest.approx(ref.inertia_, rel=0.01)
    # assignment = scikit-learn's nearest centre, for our centres and for scikit-learn's
    for centers in (ours, ref.cluster_centers_.astype(np.float32)):
        ids = assign(torch.from_numpy(x), torch.from_numpy(centers), spherical=False).numpy()
        assert (ids == pairwise_distances_argmin(x, centers)).all()
    assert (assign(torch.from_numpy(x), torch.from_numpy(ref.cluster_centers_).float(), False).numpy()
            == ref.labels_).mean() > 0.999


def test_spherical_fit_and_assign_use_the_inner_product():
    from sklearn.metrics import pairwise_distances_argmin
    x, rng = blobs(n=3000, d=16)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = fit_kmeans(x, 16, niter=20, spherical=True, seed=1)
    assert np.allclose(np.linalg.norm(c, axis=1), 1, atol=1e-4)  # spherical k-means keeps unit centres
    ids = assign(torch.from_numpy(x), torch.from_numpy(c), spherical=True).numpy()
    assert (ids == pairwise_distances_argmin(x, c, metric="cosine")).all()
    # the metric is the inner product (FAISS IndexFlatIP), not Euclidean: they differ on centres of unequal norm
    scaled = c * rng.uniform(0.2, 3.0, size=(len(c), 1)).astype(np.float32)
    ip_ids = assign(torch.from_numpy(x), torch.from_numpy(scaled), spherical=True).numpy()
    assert (ip_ids == (x @ scaled.T).argmax(1)).all()
    assert (ip_ids != assign(torch.from_numpy(x), torch.from_numpy(scaled), spherical=False).numpy()).any()


def pixel_tokenizer(k=8, norm_pix=False, seed=0):
    tok = KMeansTokenizer(16, 4, k, [0.5] * 3, [0.25] * 3, dim=48, norm_pix=norm_pix)
    tok.centroids.copy_(torch.randn(k, 48, generator=torch.Generator().manual_seed(seed)))
    return tok


@pytest.mark.parametrize("norm_pix", [False, True])
def test_pixel_tokenizer_encodes_nearest_centre_per_patch(norm_pix):
    tok = pixel_tokenizer(norm_pix=norm_pix)
    imgs = torch.randn(3, 3, 16, 16)
    ids = tok.encode(imgs)
    assert ids.shape == (3, 16) and ids.dtype == torch.long and 0 <= ids.min() and ids.max() < 8
    patches = patchify(imgs, 4)
    if norm_pix:
        patches = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6) ** 0.5
    ref = torch.cdist(patches, tok.centroids.expand(3, -1, -1)).argmin(-1)
    assert torch.equal(ids, ref)
    # images of another size are resized to the tokenizer's img_size first
    assert tok.encode(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def test_save_load_round_trip_is_weights_only(tmp_path):
    tok = pixel_tokenizer()
    path = tmp_path / "tok.pt"
    tok.save(path)
    raw = torch.load(path, weights_only=True)
    assert raw["mimkit"] == "tokenizer" and raw["kind"] == "kmeans" and raw["config"]["grid"] == 4
    back = Tokenizer.load(path)
    assert isinstance(back, KMeansTokenizer) and back.vocab_size == 8 and back.grid == 4
    imgs = torch.randn(2, 3, 16, 16)
    assert torch.equal(back.encode(imgs), tok.encode(imgs))
    checkpoint.save({"mimkit": "pretrain"}, tmp_path / "other.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a mimkit tokenizer"):
        Tokenizer.load(tmp_path / "other.pt")


def test_codebook_stats_by_hand():
    s = codebook_stats(torch.tensor([0, 0, 1, 1]), 4)
    assert s["usage"] == 0.5 and s["codes_used"] == 2 and s["perplexity"] == pytest.approx(2.0)
    assert codebook_stats(torch.arange(8), 8)["perplexity"] == pytest.approx(8.0)


def tokens_target(path, img_size=16, vocab_size=0):
    """The `tokens` target of a method with a 4 px patch on digits (whose stats differ from the tokenizer's)."""
    cls = TARGETS["tokens"]
    ctx = TargetContext(img_size, 4, "digits", "clustermim")
    return cls(cls.Config(tokenizer=str(path), vocab_size=vocab_size), ctx)


def test_tokens_target_renormalizes_and_stays_out_of_training(tmp_path):
    tok = pixel_tokenizer()
    tok.save(tmp_path / "tok.pt")
    target = tokens_target(tmp_path / "tok.pt")
    x = torch.randn(2, 3, 16, 16)  # normalized with the method's data stats (digits), not the tokenizer's
    (m,), (s,) = (set(v) for v in dataset_stats("digits"))
    assert torch.equal(target(x), tok.encode((x * s + m - 0.5) / 0.25))
    x01 = torch.rand(2, 3, 16, 16)
    assert torch.allclose(renormalize(x01, ([0.0] * 3, [1.0] * 3), ([0.5] * 3, [0.25] * 3)), (x01 - 0.5) / 0.25)
    assert not any(p.requires_grad for p in target.tokenizer.parameters()) and not target.tokenizer.training


def mimkit_checkpoint(cfg_factory, path):
    """A mimkit pretraining checkpoint (random-init MAE on the synthetic preset) to serve as a teacher."""
    from mimkit.methods import MAE
    cfg = cfg_factory()
    torch.manual_seed(0)
    checkpoint.save({"mimkit": "pretrain", "model": MAE(cfg).state_dict(), "config": to_dict(cfg)}, path)
    return cfg


def test_mimkit_teacher_features_and_teacher_kmeans_round_trip(cfg_factory, tmp_path):
    cfg = mimkit_checkpoint(cfg_factory, tmp_path / "mae.pt")
    teacher = load_teacher(f"mimkit:{tmp_path / 'mae.pt'}")
    imgs = torch.randn(2, 3, 16, 16)
    stats = (teacher.mean, teacher.std)
    feats = teacher(imgs, stats, grid=4)
    from mimkit.methods import MAE
    ref = MAE(cfg)
    ref.load_state_dict(checkpoint.load(tmp_path / "mae.pt")["model"])
    assert torch.allclose(feats, ref.encoder.eval()(imgs)[:, 1:], atol=1e-5)
    assert teacher(imgs, stats, grid=2).shape == (2, 4, 64)  # resampled to a coarser token grid
    tok = KMeansTokenizer(16, 4, 8, teacher.mean, teacher.std, dim=64)
    tok.teacher = teacher
    tok.centroids.copy_(torch.nn.functional.normalize(torch.randn(8, 64), dim=-1))
    assert torch.allclose(tok.features(imgs).norm(dim=-1), torch.ones(2, 16), atol=1e-5)
    tok.save(tmp_path / "tok.pt")
    back = Tokenizer.load(tmp_path / "tok.pt")  # self-contained: the teacher's weights are in the file
    assert back.spherical and torch.equal(back.encode(imgs), tok.encode(imgs))


def test_timm_teacher_from_a_local_weights_file(tmp_path):
    import timm
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    teacher = load_teacher("timm:vit_tiny_patch16_224", str(tmp_path / "vit.pth"), img_size=32)
    x = torch.randn(2, 3, 32, 32)
    stats = (teacher.mean, teacher.std)
    assert torch.allclose(teacher(x, stats, grid=2), model.forward_features(x)[:, 1:], atol=1e-5)
    with pytest.raises(ConfigError, match="teacher.weights"):
        load_teacher("timm:vit_tiny_patch16_224")
    with pytest.raises(ConfigError, match="not valid"):
        load_teacher("dino:vit")


def test_openclip_teacher_from_a_local_weights_file(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    # a tiny CLIP registered from a config file: the path of a real one (openclip:ViT-B-16), without its size
    tiny = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
            "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "mimkit-test-clip.json").write_text(json.dumps(tiny))
    open_clip.add_model_config(tmp_path / "cfg")
    torch.manual_seed(1)
    clip = open_clip.create_model("mimkit-test-clip").eval()
    torch.save(clip.state_dict(), tmp_path / "clip.pt")  # the whole CLIP: the teacher keeps its image tower
    torch.manual_seed(2)  # the teacher is built with other random weights: equal outputs mean the file was loaded
    teacher = load_teacher("openclip:mimkit-test-clip", str(tmp_path / "clip.pt"))
    x = torch.randn(2, 3, 32, 32)
    clip.visual.output_tokens = True
    with torch.no_grad():
        expected = clip.visual(x)[1] @ clip.visual.proj  # patch tokens projected into CLIP's joint space
    assert expected.shape == (2, 16, 24)
    assert torch.allclose(teacher(x, (teacher.mean, teacher.std), grid=4), expected, atol=1e-5)
    torch.save({"pos_embed": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(checkpoint.CheckpointError, match="other.pt"):
        load_teacher("openclip:mimkit-test-clip", str(tmp_path / "other.pt"))


def test_cli_trains_kmeans_on_digits_with_usage_floor(tmp_path):
    from mimkit.cli import main
    out = tmp_path / "km"
    assert main(["tokenizer", "train", "kind=kmeans", "data.name=digits", "vocab_size=64",
                 f"output_dir={out}", "kmeans.max_samples=20000"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for f in ("config.yaml", "log.txt", "tokenizer.pt"):
        assert (out / f).exists(), f
    assert any((out / "tb").iterdir())
    assert m["heldout_usage"] >= 0.9 and m["heldout_perplexity"] > 20, m  # floor: 90% of 64 codes held out
    tok = Tokenizer.load(out / "tokenizer.pt")
    assert (tok.grid, tok.vocab_size, tok.dim) == (4, 64, 12)
    # an existing run is never overwritten silently
    assert main(["tokenizer", "train", "kind=kmeans", "data.name=digits", f"output_dir={out}"]) == 2


def test_method_checks_grid_and_vocab_before_training(cfg_factory, tmp_path):
    from mimkit.methods import build_method
    tok = pixel_tokenizer()
    tok.save(tmp_path / "tok.pt")
    cfg = cfg_factory("method=clustermim", f"target.tokens.tokenizer={tmp_path / 'tok.pt'}")
    assert build_method(cfg).target.out_dim == 8
    assert tokens_target(tmp_path / "tok.pt").out_dim == 8
    with pytest.raises(ConfigError, match="token grid"):
        tokens_target(tmp_path / "tok.pt", img_size=32)
    with pytest.raises(ConfigError, match="target.tokens.vocab_size"):
        tokens_target(tmp_path / "tok.pt", vocab_size=16)
    with pytest.raises(ConfigError, match="target.tokens.tokenizer is required"):
        tokens_target("")
    with pytest.raises(ConfigError, match="no such file"):
        tokens_target(tmp_path / "missing.pt")


def test_tokenizer_config_errors(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint not found"):  # before anything is written
        train_tokenizer(tokenizer_config([], ["kind=vqkd", "data.name=digits", "teacher.name=mimkit:missing.pt",
                                              f"output_dir={out}"]))
    assert not out.exists()
    with pytest.raises(ConfigError, match="kind"):
        tokenizer_config([], ["kind=vqvae"])
    with pytest.raises(ConfigError, match="teacher.name"):
        train_tokenizer(tokenizer_config([], ["kind=kmeans", "kmeans.features=teacher", "data.name=digits"]))
    with pytest.raises(ConfigError, match="dvae.input_size"):
        train_tokenizer(tokenizer_config([], ["kind=dvae", "data.name=digits", "dvae.input_size=8"]))
    with pytest.raises(ConfigError, match="did you mean ckpt.every"):  # the keys every command shares
        tokenizer_config([], ["ckpt_every=5"])
    with pytest.raises(ConfigError, match="did you mean data.test_limit"):
        tokenizer_config([], ["eval_limit=5"])


def test_registry_assembles_the_config_from_the_kinds():
    assert {"kmeans", "dvae", "vqkd"} <= set(TOKENIZERS)
    cfg = config_class()()
    assert cfg.kind == "kmeans"  # a run that names no kind fits k-means
    for kind, cls in TOKENIZERS.items():
        assert cls.kind == kind and isinstance(getattr(cfg, kind), cls.Config)
        derived = cls.derived_vocab(tokenizer_config([], [f"kind={kind}"]))  # fsq, lfq: fixed by their settings
        expect = derived[0] if derived else cls.recipe["vocab_size"]
        assert tokenizer_config([], [f"kind={kind}"]).vocab_size == expect


def test_unknown_kind_is_one_clear_error(tmp_path, capsys):
    from mimkit.cli import main
    assert main(["tokenizer", "train", "kind=nope", f"output_dir={tmp_path / 'never'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nope" in err[0], err
    assert all(kind in err[0] for kind in TOKENIZERS), err
    assert not (tmp_path / "never").exists()
    # a file whose stored kind no registered class has
    checkpoint.save({"mimkit": "tokenizer", "kind": "nope", "config": {}, "state": {}}, tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match="nope.*choose one of: .*kmeans"):
        Tokenizer.load(tmp_path / "nope.pt")
    assert main(["tokenizer", "info", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and all(kind in err[0] for kind in TOKENIZERS), err
