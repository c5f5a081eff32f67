"""FSQ and LFQ quantizers against their definitions (hand values, the inverse of the bound, a brute-force entropy
over every code) and the two layouts they train in."""
import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mimkit.config import ConfigError
from mimkit.tokenizers.base import Tokenizer
from mimkit.tokenizers.config import tokenizer_config, validate
from mimkit.tokenizers.fsq import EPS, FSQ_LEVELS, FSQTokenizer, FSQuantizer
from mimkit.tokenizers.lfq import LFQTokenizer, LFQuantizer, lfq_entropies, sign_codes

STATS = ([0.5] * 3, [0.25] * 3)


def inverse_bound(levels, digits):
    """A z whose bound is exactly the integer level digit - L // 2 (solving tanh(z + shift) * half_l - offset)."""
    L = torch.tensor(levels, dtype=torch.float64)
    half_l, offset = (L - 1) * (1 + EPS) / 2, (L % 2 == 0).double() * 0.5
    value = digits.double() - torch.div(L, 2, rounding_mode="floor")
    return (torch.atanh((value + offset) / half_l) - torch.atanh(offset / half_l)).float()


def test_fsq_hand_values():
    q5, q4 = FSQuantizer([5]), FSQuantizer([4])
    # L = 5: bound(0.3) = tanh(0.3) * 2 * (1 + eps) = 0.5832 -> level 1 -> code 1 / 2, digit 1 + 2 = id 3
    assert q5.bound(torch.tensor([[0.3]])).item() == pytest.approx(math.tanh(0.3) * 2 * 1.001, abs=1e-6)
    q, ids, loss, _ = q5(torch.tensor([[0.3]]))
    assert q.item() == 0.5 and ids.item() == 3 and loss.item() == 0
    # L = 4 (even): the atanh shift puts z = 0 exactly on level 0 -> code 0, digit 2
    assert q4.bound(torch.tensor([[0.0]])).abs().item() < 1e-6 and q4.indices(torch.tensor([[0.0]])).item() == 2
    # mixed radix, first dimension least significant: levels [8, 5], digits (3, 2) -> 3 + 8 * 2
    q85 = FSQuantizer([8, 5])
    assert q85.indices(inverse_bound([8, 5], torch.tensor([[3, 2]]))).item() == 19


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [7, 5, 5, 5, 5], [2, 3, 4]])
def test_fsq_every_index_maps_to_its_code_and_back(levels):
    q = FSQuantizer(levels)
    ids = torch.arange(q.vocab_size)
    digits = torch.stack([(ids // int(b)) % L for b, L in zip(q.basis, levels)], 1)
    z = inverse_bound(levels, digits)
    assert torch.equal(q.indices(z), ids)  # bound -> round -> digits -> id, for every code
    codes = q.codes(ids)
    assert torch.allclose(q(z)[0], codes, atol=1e-6)  # forward gives the code of the id
    assert len({tuple(c.tolist()) for c in codes}) == q.vocab_size and codes.abs().max() <= 1
    zr = torch.randn(500, len(levels)) * 3
    assert torch.allclose(q(zr)[0], q.codes(q.indices(zr)), atol=1e-6)


def test_fsq_bound_stays_in_range_and_reaches_both_ends():
    levels = [8, 5, 4, 3]
    q = FSQuantizer(levels)
    z = torch.cat([torch.randn(2000, 4) * 5, torch.full((1, 4), 1e4), torch.full((1, 4), -1e4)])
    digits = q.digits(z)
    assert (digits >= 0).all() and (digits < torch.tensor(levels)).all()
    assert digits[-2].tolist() == [L - 1 for L in levels] and digits[-1].tolist() == [0] * 4


def test_fsq_rounding_is_straight_through():
    q = FSQuantizer([8, 5])
    z = torch.randn(6, 2, requires_grad=True)
    w = torch.randn(6, 2)
    (q(z)[0] * w).sum().backward()
    # d/dz of bound(z) / (L // 2), the rounding contributing identity
    shift = torch.atanh(torch.tensor([0.5 / (3.5 * 1.001), 0.0]))
    half_l = torch.tensor([3.5, 2.0]) * 1.001
    expect = w * half_l * (1 - torch.tanh(z.detach() + shift) ** 2) / torch.tensor([4.0, 2.0])
    assert torch.allclose(z.grad, expect, atol=1e-6)


def test_fsq_level_sets_and_derived_vocabulary():
    sizes = {bits: math.prod(levels) for bits, levels in FSQ_LEVELS.items()}
    assert sizes == {8: 240, 10: 1000, 12: 4375, 14: 15360, 16: 64000}  # the paper's Table 1
    assert all(0.9 < sizes[b] / 2 ** b < 1.1 for b in (8, 12, 14, 16))
    assert tokenizer_config([], ["kind=fsq"]).vocab_size == 1000
    assert tokenizer_config([], ["kind=fsq", "fsq.levels=[8,6,5]"]).vocab_size == 240
    assert tokenizer_config([], ["kind=lfq", "lfq.dim=10"]).vocab_size == 1024
    with pytest.raises(ConfigError, match=r"vocab_size=512 conflicts with fsq.levels=\[8, 5, 5, 5\] \(1000 codes\)"):
        tokenizer_config([], ["kind=fsq", "vocab_size=512"])
    with pytest.raises(ConfigError, match="fsq.levels"):
        validate(tokenizer_config([], ["kind=fsq", "fsq.levels=[8,1]", "teacher.name=timm:x"]))


def test_lfq_bits_round_trip_and_hand_values():
    q = LFQuantizer(3)
    z = torch.tensor([[0.5, -0.2, 0.1]])
    out, ids, _, _ = q(z)
    assert ids.item() == 0b101 and out.tolist() == [[1.0, -1.0, 1.0]]
    ids = torch.arange(2 ** 6)
    q6 = LFQuantizer(6)
    codes = q6.codes(ids)
    assert torch.equal(q6.indices(codes), ids) and torch.equal(codes, sign_codes(6))
    assert set(codes.unique().tolist()) == {-1.0, 1.0}


def brute_force(z, tau):
    """p over all 2^d sign codes, one by one in float64; returns the joint probabilities [M, 2^d] and codes."""
    d = z.shape[1]
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)), dtype=torch.float64)
    logits = torch.stack([(2 * z.double() * c).sum(1) / tau for c in codes], 1)
    return torch.softmax(logits, 1), codes


def entropy(p):
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_lfq_entropies_equal_brute_force(tau):
    torch.manual_seed(0)
    z = torch.randn(50, 6) * 0.3
    p, codes = brute_force(z, tau)
    sample, batch = lfq_entropies(z, tau, groups=1)
    assert sample.item() == pytest.approx(entropy(p).mean().item(), rel=1e-4)
    assert batch.item() == pytest.approx(entropy(p.mean(0)).item(), rel=1e-4)
    # two groups of 3 bits: the per-sample term stays exact; the batch term is the sum of the groups' marginals
    s2, b2 = lfq_entropies(z, tau, groups=2)
    assert s2.item() == pytest.approx(sample.item(), rel=1e-4)
    first = (codes[:, :3] > 0).long() @ torch.tensor([4, 2, 1])  # which first-group code each joint code has
    second = (codes[:, 3:] > 0).long() @ torch.tensor([4, 2, 1])
    marginals = [torch.zeros(50, 8, dtype=torch.float64).index_add_(1, g, p) for g in (first, second)]
    assert b2.item() == pytest.approx(sum(entropy(m.mean(0)) for m in marginals).item(), rel=1e-4)
    assert b2.item() >= batch.item() - 1e-5  # subadditivity: an upper bound of the joint batch entropy


def test_lfq_gradients_stay_finite_when_code_probabilities_underflow():
    z = (torch.randn(64, 8) * 50).requires_grad_(True)  # tau 0.01: most codes get probability exactly 0
    _, _, loss, _ = LFQuantizer(8, entropy_groups=1)(z)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_scale_sensitive_layouts_start_with_standardized_latents():
    torch.manual_seed(0)
    layout = {"objective": "pixels", "input_size": 8, "groups": 2, "hidden": 16, "blocks_per_group": 1}
    tok = FSQTokenizer(8, 4, 240, *STATS, layout=layout, quantizer={"levels": [8, 6, 5]})
    x = torch.randn(64, 3, 8, 8)
    assert tok.latents(x).std() < 0.3 and not bool(tok.standardized)  # small init: nearly one code
    tok.standardize(x)
    z = tok.latents(x).flatten(0, 1)
    assert torch.allclose(z.mean(0), torch.zeros(3), atol=1e-4) and torch.allclose(z.std(0), torch.ones(3), atol=1e-4)
    assert bool(tok.standardized) and tok.encode(x).unique().numel() > 30


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_lfq_at_18_bits_never_builds_the_full_codebook():
    q = LFQuantizer(18)  # entropy_groups=0: two groups of 9 bits
    z = torch.randn(256, 18, requires_grad=True)
    with LargestTensor() as seen:
        out, ids, loss, stats = q(z)
        loss.backward()
    assert seen.numel <= 256 * 2 ** 9 < 256 * 2 ** 18  # the brute-force form would hold 256 x 2^18 values
    assert torch.isfinite(loss) and ids.max() < 2 ** 18 and torch.equal(q.codes(ids), out.detach())


def test_lfq_loss_is_commitment_plus_entropy_penalty_with_straight_through():
    torch.manual_seed(0)
    q = LFQuantizer(4, tau=0.5, entropy_weight=0.1, sample_weight=1.0, batch_weight=0.5, commitment=0.25)
    z = torch.randn(20, 4, requires_grad=True)
    out, _, loss, stats = q(z)
    p, _ = brute_force(z.detach(), 0.5)
    commit = ((z.detach() - torch.where(z.detach() > 0, 1.0, -1.0)) ** 2).mean()
    expect = 0.25 * commit + 0.1 * (entropy(p).mean() - 0.5 * entropy(p.mean(0)))
    assert loss.item() == pytest.approx(expect.item(), rel=1e-4)
    w = torch.randn(20, 4)
    (out * w).sum().backward()
    assert torch.equal(z.grad, w)  # identity through the sign


@pytest.mark.parametrize("cls,args", [(FSQTokenizer, {"levels": [4, 3, 3]}), (LFQTokenizer, {"dim": 5})])
@pytest.mark.parametrize("objective", ["teacher", "pixels"])
def test_layouts_shapes_and_weights_only_round_trip(tmp_path, cls, args, objective):
    torch.manual_seed(0)
    q = cls.make_quantizer(**args)
    layout = ({"objective": "teacher", "teacher_dim": 8, "embed_dim": 32, "depth": 1, "num_heads": 4,
               "decoder_depth": 1, "decoder_embed_dim": 32, "decoder_num_heads": 4} if objective == "teacher" else
              {"objective": "pixels", "input_size": 8, "groups": 2, "hidden": 16, "blocks_per_group": 1})
    tok = cls(16, 4, q.vocab_size, *STATS, layout=layout, quantizer=args)
    x = torch.randn(3, 3, 16, 16)
    out, ids, loss, _ = tok(tok.view(x))
    assert out.shape == ((3, 16, 8) if objective == "teacher" else (3, 3, 8, 8)) and ids.shape == (3, 16)
    enc = tok.encode(x)
    assert torch.equal(enc, ids) and enc.dtype == torch.long and 0 <= enc.min() and enc.max() < q.vocab_size
    tok.save(tmp_path / "t.pt")
    back = Tokenizer.load(tmp_path / "t.pt")  # weights_only=True
    assert isinstance(back, cls) and torch.equal(back.encode(x), enc)


def test_teacher_objective_needs_a_teacher_and_pixels_objective_checks_the_grid():
    with pytest.raises(ConfigError, match="teacher.name.*fsq.objective=pixels"):
        validate(tokenizer_config([], ["kind=fsq", "data.name=digits"]))
    with pytest.raises(ConfigError, match="lfq.input_size=112 with lfq.groups=4"):
        validate(tokenizer_config([], ["kind=lfq", "data.name=digits", "lfq.objective=pixels"]))
    with pytest.raises(ConfigError, match="lfq.entropy_groups=1 leaves groups of 20 bits"):
        validate(tokenizer_config([], ["kind=lfq", "lfq.dim=20", "lfq.entropy_groups=1", "teacher.name=timm:x"]))


def test_a_teacher_grid_that_does_not_fit_is_an_error_before_the_run_starts(tmp_path):
    import timm

    from mimkit.tokenizers.train import train_tokenizer
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48)  # a 3x3 grid
    torch.save(model.state_dict(), tmp_path / "t.pth")
    small = ["fsq.depth=1", "fsq.embed_dim=32", "fsq.num_heads=4", "fsq.decoder_embed_dim=32", "fsq.decoder_num_heads=4"]
    with pytest.raises(ConfigError, match="one must divide the other"):  # digits: a 4x4 grid
        train_tokenizer(tokenizer_config([], ["kind=fsq", "data.name=digits", "teacher.name=timm:vit_tiny_patch16_224",
                                              f"teacher.weights={tmp_path / 't.pth'}", "teacher.img_size=48",
                                              f"output_dir={tmp_path / 'out'}", *small]))
    assert not (tmp_path / "out").exists()
