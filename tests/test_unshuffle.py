"""MAE's index paths (visible patches gathered for the encoder, tokens put back in their grid slots for the
decoder) against the boolean-mask definitions they replace, values and gradients."""
import pytest
import torch

from mimkit.heads import MAEDecoder
from mimkit.masking import RandomMask
from mimkit.vit import ViT, visible_first


def masks(batch: int, grid: int, ratio: float, seed: int = 0) -> torch.Tensor:
    gen = RandomMask(grid, ratio)
    return torch.stack([gen(torch.Generator().manual_seed(seed + i)) for i in range(batch)])


def test_visible_first_orders_visible_then_masked_in_grid_order():
    mask = torch.tensor([[True, False, True, False, False], [False, True, True, True, False]])
    assert visible_first(mask).tolist() == [[1, 3, 4, 0, 2], [0, 4, 1, 2, 3]]


@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_encoder_drop_mode_equals_boolean_selection(ratio):
    torch.manual_seed(0)
    enc = ViT(img_size=8, patch_size=2, embed_dim=32, depth=1, num_heads=4)
    x = torch.randn(3, 3, 8, 8)
    mask = masks(3, 4, ratio)
    tokens = enc.patch_embed(x) + enc.pos_embed[:, 1:]
    ref = tokens[~mask].reshape(3, -1, 32)  # row-major: each sample's visible patches in grid order
    out = enc.embed(x, mask, mode="drop")
    assert torch.equal(out[:, 1:], ref)
    g = torch.randn_like(ref)
    grad = torch.autograd.grad((out[:, 1:] * g).sum(), enc.patch_embed.proj.weight)[0]
    ref_grad = torch.autograd.grad((ref * g).sum(), enc.patch_embed.proj.weight)[0]
    assert torch.allclose(grad, ref_grad, atol=1e-5)


def test_encoder_drop_mode_rejects_unequal_counts():
    enc = ViT(img_size=8, patch_size=2, embed_dim=32, depth=1, num_heads=4)
    mask = masks(2, 4, 0.75)
    mask[1, (~mask[1]).nonzero()[0]] = True  # one more masked patch in sample 1
    with pytest.raises(ValueError, match="same number of masked patches"):
        enc(torch.randn(2, 3, 8, 8), mask, mode="drop")


def test_decoder_puts_tokens_back_in_their_grid_slots():
    torch.manual_seed(0)
    dec = MAEDecoder(grid=4, embed_dim=32, out_dim=12, dim=16, depth=1, num_heads=4)
    mask = masks(3, 4, 0.75, seed=5)
    latent = torch.randn(3, 1 + 4, 32, requires_grad=True)
    seen = {}
    dec.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    dec(latent, mask)
    x = dec.embed(latent)
    patches = dec.mask_token.expand(3, 16, -1).clone()
    patches[~mask] = x[:, 1:].reshape(-1, 16)  # the definition: visible tokens in grid order, mask tokens elsewhere
    ref = torch.cat([x[:, :1], patches], dim=1) + dec.pos_embed
    assert torch.equal(seen["x"], ref)
    g = torch.randn_like(ref)
    params = [latent, dec.mask_token]
    grads = torch.autograd.grad((seen["x"] * g).sum(), params)
    ref_grads = torch.autograd.grad((ref * g).sum(), params)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, ref_grads))
