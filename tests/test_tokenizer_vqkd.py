"""VQ-KD (BEiT v2's tokenizer): the quantizer against hand computations, shapes, round trip, a short run."""
import math

import pytest
import torch
import torch.nn.functional as F

from mimkit import checkpoint
from mimkit.config import to_dict
from mimkit.tokenizers.base import Tokenizer
from mimkit.tokenizers.config import tokenizer_config
from mimkit.tokenizers.train import check_restart_window, train_tokenizer
from mimkit.tokenizers.vqkd import VQKD, NormEMAQuantizer, codes_used, cosine_loss


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def quantizer(decay=0.9, beta=0.5, restart=0.0):
    q = NormEMAQuantizer(3, 2, decay=decay, beta=beta, restart=restart)
    q.codebook.copy_(unit([1, 0], [0, 1], [-1, 0]))
    q.initialized.fill_(True)
    return q


def test_straight_through_gradient_and_commitment_by_hand():
    q = quantizer().eval()  # eval: no EMA update, same forward
    z = unit([0.9, 0.2], [0.1, 1.0], [0.8, -0.3]).requires_grad_(True)
    w = torch.randn(3, 2)
    out, ids, commit = q(z)
    assert ids.tolist() == [0, 1, 0]
    codes = q.codebook[ids]
    assert torch.allclose(out, codes)  # forward: the codes
    assert commit.item() == pytest.approx(0.5 * ((z - codes) ** 2).mean().item(), rel=1e-6)
    ((out * w).sum() + commit).backward()
    # backward: identity through the quantizer + d/dz of beta * mean((z - sg(q))^2)
    assert torch.allclose(z.grad, w + 0.5 * 2 * (z.detach() - codes) / z.numel(), atol=1e-6)


def test_ema_update_by_hand():
    q = quantizer(decay=0.9).train()
    q.usage.copy_(torch.tensor([2.0, 1.0, 1.0]))
    old = q.codebook.clone()
    z = unit([1, 1], [1, 0.2], [0.2, 1])  # codes 0, 0, 1; code 2 unused
    _, ids, _ = q(z)
    assert ids.tolist() == [0, 0, 1]
    mean0 = F.normalize(z[:2].mean(0), dim=0)
    expect0 = F.normalize(0.9 * old[0] + 0.1 * mean0, dim=0)
    expect1 = F.normalize(0.9 * old[1] + 0.1 * z[2], dim=0)
    assert torch.allclose(q.codebook[0], expect0, atol=1e-6)
    assert torch.allclose(q.codebook[1], expect1, atol=1e-6)
    assert torch.allclose(q.codebook[2], old[2])  # unused codes stay
    assert torch.allclose(q.usage, torch.tensor([0.9 * 2 + 0.1 * 2, 0.9 * 1 + 0.1 * 1, 0.9 * 1]))


def test_dead_codes_restart_on_batch_vectors():
    q = quantizer(decay=0.9, restart=0.5).train()
    q.usage.copy_(torch.tensor([5.0, 5.0, 0.01]))
    z = unit([1, 0.1], [0.1, 1], [0.8, 0.6], [1, -0.2])  # codes 0, 1, 0, 0
    q(z)
    assert any(torch.allclose(q.codebook[2], v, atol=1e-6) for v in z)  # code 2 now sits on a batch vector
    usage = [0.9 * 5 + 0.1 * 3, 0.9 * 5 + 0.1 * 1, 0.9 * 0.01]  # EMA, then the dead code gets the mean usage
    assert q.usage.tolist() == pytest.approx([usage[0], usage[1], sum(usage) / 3])


def test_an_unused_code_restarts_after_the_window_the_warning_computes():
    """A code unused from the start falls below restart x the mean usage after ln(restart) / ln(decay) steps
    (6.6 at 0.5 and 0.9: restarted in step 7, not 6); check_restart_window warns when that window exceeds half
    the run and suggests a decay that fits."""
    q = quantizer(decay=0.9, restart=0.5).train()
    q.usage.fill_(2 / 3)  # what the first batch's init leaves: its size over the codebook size
    z = unit([1, 0.1], [0.1, 1])  # codes 0 and 1 every step, code 2 never
    for step in range(1, 8):
        q(z)
        moved = not torch.allclose(q.codebook[2], unit([-1, 0])[0])
        assert moved == (step == 7), step
    assert math.log(0.5) / math.log(0.9) == pytest.approx(6.58, abs=0.01)

    cfg = tokenizer_config([], ["kind=lavit", "lavit.restart=0.5", "lavit.decay=0.99"])
    lines = []
    check_restart_window(cfg, 78, lines.append)  # 69 unused steps of 78
    assert lines == ["warning: lavit.decay=0.99 restarts a code only after 69 unused steps, more than half of this "
                     "run's 78: a collapsing codebook will not recover; for a run this short set lavit.decay=0.91"]
    for decay, steps in (("0.91", 78), ("0.99", 140)):
        lines.clear()
        check_restart_window(tokenizer_config([], ["kind=lavit", "lavit.restart=0.5", f"lavit.decay={decay}"]), steps,
                             lines.append)
        assert lines == []
    check_restart_window(tokenizer_config([], ["kind=kmeans"]), 1, lines.append)  # no EMA codebook: nothing to say
    assert lines == []


def test_first_batch_initializes_the_codebook():
    q = NormEMAQuantizer(4, 3, decay=0.99).train()
    z = F.normalize(torch.randn(10, 3), dim=-1)
    q(z)
    assert bool(q.initialized)
    assert torch.allclose(q.codebook.norm(dim=-1), torch.ones(4), atol=1e-5)


def small_vqkd(teacher_dim=8):
    torch.manual_seed(0)
    return VQKD(16, 4, 32, [0.5] * 3, [0.25] * 3, teacher_dim=teacher_dim, embed_dim=32, depth=2, num_heads=4,
                code_dim=8, decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=4)


def test_encode_shapes_forward_and_round_trip(tmp_path):
    tok = small_vqkd()
    tok.train()
    rec, ids, commit = tok(torch.randn(4, 3, 16, 16))  # first training batch: k-means init + EMA step
    assert rec.shape == (4, 16, 8) and ids.shape == (4, 16) and commit.dim() == 0
    tok.eval()
    x = torch.randn(3, 3, 16, 16)
    enc = tok.encode(x)
    assert enc.shape == (3, 16) and enc.dtype == torch.long and 0 <= enc.min() and enc.max() < 32
    z = tok.codes(x)
    assert torch.allclose(z.norm(dim=-1), torch.ones(3, 16), atol=1e-5)
    assert torch.equal(enc, (z @ tok.quantizer.codebook.T).argmax(-1))  # nearest code by cosine
    tok.save(tmp_path / "vqkd.pt")
    back = Tokenizer.load(tmp_path / "vqkd.pt")
    assert isinstance(back, VQKD) and torch.equal(back.encode(x), enc)
    assert cosine_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])).item() == pytest.approx(1.0)
    assert codes_used(torch.tensor([[1, 1, 3], [3, 0, 1]]), 8).item() == 3  # the batch's distinct ids


def test_short_training_with_mimkit_teacher_loss_falls_and_codes_are_used(cfg_factory, tmp_path):
    from mimkit.methods import MAE
    cfg = cfg_factory("data.name=digits")
    torch.manual_seed(0)
    checkpoint.save({"mimkit": "pretrain", "model": MAE(cfg).state_dict(), "config": to_dict(cfg)}, tmp_path / "t.pt")
    m = train_tokenizer(tokenizer_config(["configs/tokenizer/vqkd_digits.yaml"], [
        f"teacher.name=mimkit:{tmp_path / 't.pt'}", f"output_dir={tmp_path / 'vqkd'}", "epochs=6", "batch_size=32",
        "data.limit=512", "data.test_limit=200", "vqkd.depth=2", "vqkd.embed_dim=64", "vqkd.decoder_embed_dim=64",
        "vis_every=6"]))
    assert m["final_loss"] < 0.5 * m["first_loss"], m["loss_history"]
    assert m["heldout_usage"] >= 0.3, m  # floor: 30% of the 256 codes used on held-out digits after 96 steps
