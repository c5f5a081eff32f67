"""BEiT (dVAE ids) and BEiT v2 (VQ-KD ids + auxiliary head): CE on masked positions, by hand; short runs."""
import pytest
import torch
import torch.nn.functional as F

from mimkit import engine
from mimkit.config import ConfigError
from mimkit.masking import build_mask_generator
from mimkit.methods import build_method
from mimkit.tokenizers.dvae import DVAE
from mimkit.tokenizers.vqkd import VQKD

SYN_STATS = ([0.5] * 3, [0.25] * 3)  # the synthetic dataset's normalization


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """Random-init tokenizers for the synthetic preset (16 px, patch 4: a 4x4 grid). Their ids are a fixed
    function of the image, which is all the method needs; the dVAE reads the 8 px half-resolution copy."""
    out = tmp_path_factory.mktemp("tok")
    torch.manual_seed(0)
    DVAE(16, 4, 64, *SYN_STATS, input_size=8, groups=2, hidden=16, blocks_per_group=1).save(out / "dvae.pt")
    vq = VQKD(16, 4, 64, *SYN_STATS, teacher_dim=8, embed_dim=32, depth=1, num_heads=4, code_dim=8,
              decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=4)
    vq.quantizer.codebook.copy_(F.normalize(vq.codes(torch.randn(8, 3, 16, 16)).flatten(0, 1)[:64], dim=-1))
    vq.save(out / "vqkd.pt")
    return {"beit": out / "dvae.pt", "beitv2": out / "vqkd.pt"}


def linear(head, x):
    """The head's linear map on any tokens (the head itself takes the encoder's tokens and the mask)."""
    return F.linear(x, head.weight, head.bias)


def batch(cfg, n=3):
    gen = build_mask_generator(cfg.mask, 4, cfg.model.patch_size)
    mask = torch.stack([gen(torch.Generator().manual_seed(i)) for i in range(n)])
    return torch.randn(n, 3, 16, 16), mask


def test_beit_recipe_and_block_mask(cfg_factory, tokenizer_files):
    cfg = cfg_factory("method=beit", f"target.tokens.tokenizer={tokenizer_files['beit']}")
    assert (cfg.mask.kind, cfg.mask.ratio, cfg.model.layer_scale, cfg.optim.clip_grad) == ("block", 0.4, 0.1, 3.0)
    assert tuple(cfg.optim.betas) == (0.9, 0.98)
    _, mask = batch(cfg)
    assert (mask.sum(1) == round(0.4 * 16)).all()


def test_beit_loss_is_ce_over_vocabulary_on_masked_positions(cfg_factory, tokenizer_files):
    model = build_method(cfg_factory("method=beit", f"target.tokens.tokenizer={tokenizer_files['beit']}")).eval()
    imgs, mask = batch(model.cfg)
    out = model(imgs, mask)
    # reference: dVAE ids of the half-resolution copy; the head over the vocabulary on masked tokens only
    dvae = model.target.tokenizer
    ids = dvae.logits(F.interpolate(imgs, size=(8, 8), mode="bilinear", antialias=True)).argmax(1).flatten(1)
    logits = linear(model.head, model.encoder(imgs, mask, mode="token")[:, 1:])
    assert logits.shape == (3, 16, 64)
    assert out["loss"].item() == pytest.approx(F.cross_entropy(logits[mask], ids[mask]).item(), rel=1e-5)
    assert out["acc"].item() == pytest.approx((logits[mask].argmax(-1) == ids[mask]).float().mean().item())
    assert not any(k.startswith("tokenizer") for k in model.state_dict())


def test_beitv2_loss_is_main_plus_auxiliary_ce(cfg_factory, tokenizer_files):
    cfg = cfg_factory("method=beitv2", f"target.tokens.tokenizer={tokenizer_files['beitv2']}", "model.depth=4")
    model = build_method(cfg).eval()
    assert model.aux_layer == 2 and len(model.aux_blocks) == 2
    imgs, mask = batch(cfg)
    out = model(imgs, mask)
    vq = model.target.tokenizer
    ids = (vq.codes(imgs) @ vq.quantizer.codebook.T).argmax(-1)
    # by hand: run the blocks, keep block 2's output (1-based) and the last block's raw CLS
    enc = model.encoder
    x = enc.embed(imgs, mask, mode="token")
    for i, blk in enumerate(enc.blocks):
        x = blk(x)
        if i == 1:
            middle = x
    main = F.cross_entropy(linear(model.head, enc.norm(x)[:, 1:][mask]), ids[mask])
    y = torch.cat([x[:, :1], middle[:, 1:]], dim=1)
    for blk in model.aux_blocks:
        y = blk(y)
    aux = F.cross_entropy(linear(model.head, enc.norm(y)[:, 1:][mask]), ids[mask])
    assert out["main_loss"].item() == pytest.approx(main.item(), rel=1e-5)
    assert out["aux_loss"].item() == pytest.approx(aux.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((main + aux).item(), rel=1e-5)
    with pytest.raises(ConfigError, match="beitv2.aux_layer"):
        build_method(cfg_factory("method=beitv2", f"target.tokens.tokenizer={tokenizer_files['beitv2']}",
                                 "model.depth=2", "beitv2.aux_layer=3"))


@pytest.mark.parametrize("method", ["beit", "beitv2"])
def test_short_run_loss_falls(cfg_factory, tokenizer_files, method):
    # lr 3.75e-4: the recipe's 1.5e-3 per 2048 images would barely move in 64 steps of 32 images
    m = engine.train(cfg_factory(f"method={method}", f"target.tokens.tokenizer={tokenizer_files[method]}", "epochs=4",
                                 "optim.blr=3e-3", "optim.lr_batch_ref=256"))
    assert m["final_loss"] < 0.9 * m["first_loss"], m["loss_history"]
    assert m["final_acc"] > 1 / 64  # above chance over the 64 ids


def test_score_panel_tints_masked_patches_by_correctness():
    from mimkit.targets.panels import score_panel
    imgs = torch.full((1, 3, 4, 4), 0.5)  # synthetic stats (0.5, 0.25): pixels of value 0.625
    mask = torch.tensor([[True, True, False, False]])
    hits = torch.tensor([[True, False, True, False]])
    panel = score_panel(imgs, mask, hits, 2, "synthetic")
    scale = 64 // 4  # image_grid blows 4 px images up to 64 px, 2 px padding
    third = panel[:, 2 + 2 * (64 + 2):, 2:2 + 64]  # third row: the tinted image
    green, red, plain = third[:, 0, 0], third[:, 0, 2 * scale], third[:, 2 * scale, 0]
    assert torch.allclose(green, 0.5 * 0.625 + 0.5 * torch.tensor([0.1, 0.9, 0.1]))
    assert torch.allclose(red, 0.5 * 0.625 + 0.5 * torch.tensor([0.9, 0.1, 0.1]))
    assert torch.allclose(plain, torch.full((3,), 0.625))
