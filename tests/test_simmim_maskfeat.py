"""SimMIM and MaskFeat: losses against their reference formulas, recipes, configs, short runs."""
from pathlib import Path

import pytest
import torch

from mimkit import engine
from mimkit.methods import pretrain_config
from mimkit.config import ConfigError
from mimkit.methods import validate
from mimkit.engine import train
from mimkit.hog import HOG
from mimkit.masking import BlockMask, GridMask, build_mask_generator
from mimkit.methods import MaskFeat
from mimkit.methods import SimMIM
from mimkit.images import unpatchify

REPO = Path(__file__).resolve().parent.parent


def masks(gen, n):
    return torch.stack([gen(torch.Generator().manual_seed(i)) for i in range(n)])


def test_simmim_l1_matches_official_formula(cfg_factory):
    """microsoft/SimMIM: mask upsampled to pixels, loss = sum(|x - x_rec| * mask) / mask.sum() / in_chans."""
    cfg = cfg_factory("method=simmim")
    model = SimMIM(cfg).eval()
    imgs = torch.randn(3, 3, 16, 16)
    mask = masks(GridMask(4, 0.6, 2), 3)
    out = model(imgs, mask)
    x_rec = unpatchify(out["pred"].float(), 4)
    m = mask.view(3, 1, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3).float()
    ref = ((imgs - x_rec).abs() * m).sum() / m.sum() / 3
    assert m.sum() == 3 * 12 * 16  # 3 of 4 units (ceil(0.6 * 4)) of 2x2 patches of 4x4 pixels
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)


def test_token_mode_hides_masked_pixels(cfg_factory):
    """Mask-token encoder: the predictions cannot depend on the masked pixels, but do on visible ones."""
    for method, cls in (("simmim", SimMIM), ("maskfeat", MaskFeat)):
        model = cls(cfg_factory(f"method={method}")).eval()
        imgs = torch.randn(2, 3, 16, 16)
        mask = torch.zeros(2, 16, dtype=torch.bool)
        mask[:, :6] = True  # patches (0, 0..3) and (1, 0..1)
        pred = model.predict(imgs, mask)
        changed = imgs.clone()
        changed[:, :, 0:4, :] += 3.0  # first patch row: all masked
        assert torch.allclose(model.predict(changed, mask), pred, atol=1e-5)
        changed[:, :, 12:16, :] += 3.0  # last patch row: visible
        assert not torch.allclose(model.predict(changed, mask), pred, atol=1e-3)


def test_maskfeat_mse_on_masked_hog_by_hand(cfg_factory):
    cfg = cfg_factory("method=maskfeat")
    model = MaskFeat(cfg).eval()
    assert model.head.out_features == 108  # 2x2 cells x 9 bins x 3 channels
    imgs = torch.randn(2, 3, 16, 16)
    mask = masks(BlockMask(4, 0.4, 2), 2)
    out = model(imgs, mask)
    hist = HOG(9, 2, "sobel")(imgs)  # patch 4 -> 2x2 cells of 2 px
    total, count = 0.0, 0
    for b in range(2):
        for n in range(16):
            if not mask[b, n]:
                continue
            r, c = divmod(n, 4)
            target = hist[b, :, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(-1)  # (channel, bin, cell row, col)
            total += ((out["pred"][b, n] - target) ** 2).mean().item()
            count += 1
    assert count == 2 * 6
    assert out["loss"].item() == pytest.approx(total / count, rel=1e-5)


def test_maskfeat_config_checks(cfg_factory):
    with pytest.raises(ConfigError, match="target.hog.cells_per_patch"):
        MaskFeat(cfg_factory("method=maskfeat", "target.hog.cells_per_patch=3"))
    model = MaskFeat(cfg_factory("method=maskfeat", "target.hog.cells_per_patch=1", "target.hog.gradient=central",
                                 "target.hog.gaussian=true"))
    assert model.head.out_features == 27 and model.target.hog.cell == 4 and model.target.hog.window == 4
    assert not any(k.startswith("hog.") for k in model.state_dict())


def test_recipes_are_applied():
    cfg = pretrain_config([], ["method=simmim", "data.name=imagefolder", "data.root=/x"])
    assert (cfg.mask.kind, cfg.mask.ratio, cfg.mask.patch_px) == ("grid", 0.6, 32)
    assert (cfg.optim.blr, cfg.optim.lr_batch_ref, tuple(cfg.optim.betas)) == (1e-4, 512, (0.9, 0.999))
    assert (cfg.optim.warmup_epochs, cfg.optim.clip_grad, tuple(cfg.data.crop_scale)) == (10, 5.0, (0.67, 1.0))
    cfg = pretrain_config([], ["method=maskfeat", "data.name=imagefolder", "data.root=/x"])
    assert (cfg.mask.kind, cfg.mask.ratio, cfg.mask.min_block) == ("block", 0.4, 16)
    assert (cfg.optim.blr, cfg.optim.lr_batch_ref, tuple(cfg.optim.betas)) == (2e-4, 256, (0.9, 0.999))
    assert (cfg.optim.warmup_epochs, cfg.optim.clip_grad, tuple(cfg.data.crop_scale)) == (30, 0.02, (0.5, 1.0))


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "configs" / "pretrain").glob("*.yaml")
                                        if p.name.startswith(("simmim", "maskfeat"))))
def test_shipped_configs_build(path):
    cfg = pretrain_config([str(REPO / "configs" / "pretrain" / path)], ["data.root=/x"])
    assert cfg.method == path.split("_")[0]
    validate(cfg)
    grid = cfg.data.img_size // cfg.model.patch_size
    gen = build_mask_generator(cfg.mask, grid, cfg.model.patch_size)
    m = gen(torch.Generator().manual_seed(0))
    assert m.shape == (grid * grid,) and 0 < m.float().mean() < 1


@pytest.mark.parametrize("method", ["simmim", "maskfeat"])
def test_short_run_loss_falls(cfg_factory, method):
    cfg = cfg_factory(f"method={method}", "epochs=3", "data.synthetic_size=192", "batch_size=32", "optim.blr=4e-3")
    m = train(cfg)
    assert m["final_loss"] < 0.8 * m["first_loss"], m["loss_history"]
    out = engine.resolve_output_dir(cfg)
    assert (out / "reconstructions.png").exists() and (out / "checkpoints" / "last.pt").exists()


def test_panels(cfg_factory):
    imgs = torch.randn(4, 3, 16, 16)
    for method, cls, rows in (("simmim", SimMIM, 3), ("maskfeat", MaskFeat, 4)):
        cfg = cfg_factory(f"method={method}")
        model = cls(cfg).eval()
        mask = masks(build_mask_generator(cfg.mask, 4, 4), 4)
        panel = model.visualize(imgs, mask)
        assert 0 <= panel.min() and panel.max() <= 1
        assert panel.shape == (3, rows * 66 + 2, 4 * 66 + 2)  # rows of 4 tiles of 64 px (+2 px padding)
    model = SimMIM(cfg_factory("method=simmim")).eval()
    rec = model.target.reconstruct(imgs, mask, model.predict(imgs, mask))
    visible = ~mask.view(4, 1, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3).expand(-1, 3, -1, -1)
    assert torch.equal(rec[visible], imgs[visible])  # visible pixels pasted back
