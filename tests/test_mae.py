import pytest
import torch

from mimkit.masking import RandomMask
from mimkit.losses import masked_mean
from mimkit.methods import MAE
from mimkit.images import patchify, pixel_target, unpatchify
from mimkit.vit import ViT


@pytest.mark.parametrize("grid, ratio", [(4, 0.75), (4, 0.5), (14, 0.75), (8, 0.6)])
def test_random_mask_exact_count(grid, ratio):
    gen = RandomMask(grid, ratio)
    g = torch.Generator().manual_seed(0)
    masks = torch.stack([gen(g) for _ in range(200)])
    n = grid * grid
    assert (masks.sum(1) == n - int(n * (1 - ratio))).all()
    # every position is masked about `ratio` of the time (uniform over positions)
    freq = masks.float().mean(0)
    assert (freq - ratio).abs().max() < 0.15
    assert torch.equal(gen(torch.Generator().manual_seed(7)), gen(torch.Generator().manual_seed(7)))


def test_patchify_layout_and_round_trip():
    x = torch.randn(2, 3, 8, 8)
    p = patchify(x, 2)
    assert p.shape == (2, 16, 12)
    # patch (row 1, col 2) holds pixels [2:4, 4:6], ordered (row, col, channel)
    assert torch.equal(p[0, 1 * 4 + 2], x[0, :, 2:4, 4:6].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(p, 2), x)


def test_norm_pix_target_by_hand():
    x = torch.randn(1, 3, 4, 4)
    t = pixel_target(x, 2, norm_pix=True)
    patch = x[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1)
    ref = (patch - patch.mean()) / (patch.var(unbiased=True) + 1e-6).sqrt()
    assert torch.allclose(t[0, 1], ref, atol=1e-6)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_matches_formula(cfg_factory, norm_pix):
    cfg = cfg_factory(f"target.pixels.norm_pix={norm_pix}")
    model = MAE(cfg).eval()
    imgs = torch.randn(3, 3, 16, 16)
    gen = RandomMask(4, 0.75)
    mask = torch.stack([gen(torch.Generator().manual_seed(i)) for i in range(3)])
    out = model(imgs, mask)
    pred = out["pred"]
    # by hand: per-patch MSE against (optionally standardized) patch pixels, averaged over masked patches only
    total, count = 0.0, 0
    for b in range(3):
        for n in range(16):
            r, c = divmod(n, 4)
            patch = imgs[b, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].permute(1, 2, 0).reshape(-1)
            if norm_pix:
                patch = (patch - patch.mean()) / (patch.var() + 1e-6) ** 0.5
            if mask[b, n]:
                total += ((pred[b, n] - patch) ** 2).mean().item()
                count += 1
    assert count == 36
    assert out["loss"].item() == pytest.approx(total / count, rel=1e-5)


def test_masked_mean_ignores_visible():
    loss = torch.tensor([[1.0, 100.0], [3.0, 100.0]])
    mask = torch.tensor([[True, False], [True, False]])
    assert masked_mean(loss, mask).item() == 2.0


def test_encoder_drop_mode_sees_only_visible_patches():
    enc = ViT(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=4).eval()
    x = torch.randn(2, 3, 8, 8)
    mask = torch.stack([RandomMask(4, 0.75)(torch.Generator().manual_seed(i)) for i in range(2)])
    out = enc(x, mask, mode="drop")
    assert out.shape == (2, 1 + 4, 32)
    # changing a masked patch's pixels must not change the output; changing a visible one must
    r, c = divmod(int(mask[0].nonzero()[0]), 4)
    x2 = x.clone()
    x2[0, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2] += 5
    assert torch.allclose(enc(x2, mask, mode="drop"), out, atol=1e-6)
    r, c = divmod(int((~mask[0]).nonzero()[0]), 4)
    x2[0, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2] += 5
    assert not torch.allclose(enc(x2, mask, mode="drop")[0], out[0], atol=1e-4)


def test_encoder_token_mode_and_layers():
    enc = ViT(img_size=8, patch_size=2, embed_dim=32, depth=3, num_heads=4).eval()
    x = torch.randn(2, 3, 8, 8)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :5] = True
    out, layers = enc(x, mask, mode="token", return_layers=(0, -1))
    assert out.shape == (2, 17, 32) and len(layers) == 2 and layers[1].shape == (2, 17, 32)
    x2 = x.clone()
    x2[:, :, 0:2, 0:2] += 5  # patch 0 is masked: replaced by the mask token
    assert torch.allclose(enc(x2, mask, mode="token"), out, atol=1e-6)
