"""ClusterMIM: MAE encoder/decoder with K-way output, CE on masked patches against k-means ids."""
import pytest
import torch
import torch.nn.functional as F

from mimkit import engine
from mimkit.config import ConfigError
from mimkit.loop import build_optimizer
from mimkit.masking import RandomMask
from mimkit.methods import build_method
from mimkit.images import patchify
from mimkit.tokenizers.config import tokenizer_config
from mimkit.tokenizers.train import train_tokenizer


@pytest.fixture(scope="module")
def kmeans_file(tmp_path_factory):
    """A k-means tokenizer (K=16 on raw patch pixels) fitted on the synthetic training set, grid 4x4."""
    out = tmp_path_factory.mktemp("kmeans")
    m = train_tokenizer(tokenizer_config([], ["kind=kmeans", "data.name=synthetic", "vocab_size=16",
                                              f"output_dir={out}", "kmeans.max_samples=4096"]))
    assert m["heldout_usage"] > 0.8
    return out / "tokenizer.pt"


def masks(n, grid=4, ratio=0.75):
    gen = RandomMask(grid, ratio)
    return torch.stack([gen(torch.Generator().manual_seed(i)) for i in range(n)])


def test_loss_is_ce_against_nearest_centre_on_masked_patches(cfg_factory, kmeans_file):
    model = build_method(cfg_factory("method=clustermim", f"target.tokens.tokenizer={kmeans_file}")).eval()
    imgs, mask = torch.randn(3, 3, 16, 16), masks(3)
    out = model(imgs, mask)
    # reference: the id of each patch is its nearest centre in the tokenizer's normalization (synthetic stats
    # are the tokenizer's own here), CE averaged over masked patches only
    centres = model.target.tokenizer.centroids
    ids = torch.cdist(patchify(imgs, 4), centres.expand(3, -1, -1)).argmin(-1)
    logits = out["pred"]
    assert logits.shape == (3, 16, 16)
    ref = F.cross_entropy(logits[mask], ids[mask])
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert out["acc"].item() == pytest.approx((logits[mask].argmax(-1) == ids[mask]).float().mean().item())


def test_tokenizer_stays_out_of_optimizer_and_checkpoint(cfg_factory, kmeans_file):
    cfg = cfg_factory("method=clustermim", f"target.tokens.tokenizer={kmeans_file}")
    model = build_method(cfg)
    assert not any("centroids" in k or "tokenizer" in k for k in model.state_dict())
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters())
    model.train()
    assert not model.target.tokenizer.training


def test_grid_mismatch_stops_before_training(cfg_factory, kmeans_file):
    cfg = cfg_factory("method=clustermim", f"target.tokens.tokenizer={kmeans_file}", "model.patch_size=2")
    with pytest.raises(ConfigError, match="4x4 token grid but the encoder has 8x8"):
        engine.train(cfg)


def test_short_run_loss_falls(cfg_factory, kmeans_file):
    m = engine.train(cfg_factory("method=clustermim", f"target.tokens.tokenizer={kmeans_file}", "epochs=4"))
    assert m["final_loss"] < 0.85 * m["first_loss"], m["loss_history"]
    assert m["final_acc"] > 1 / 16  # above chance on masked patches
