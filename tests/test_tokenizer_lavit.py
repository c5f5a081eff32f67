"""LaVIT's dynamic tokenizer (kind `lavit`): the selector's straight-through Gumbel sample against
F.gumbel_softmax's definition, the keep-ratio loss on synthetic features, the merger's attention policies
against brute force, -1 ids exactly at dropped patches, the file round trip, a short digits run, BEiT on its
ids with each `target.tokens.dropped` mode and `mask.prefer_kept`, `mimkit analyze tokens` and `tokenizer info`."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mimkit import engine
from mimkit.cli import main
from mimkit.losses import cross_entropy
from mimkit.masking import prefer_kept
from mimkit.tokenizers.base import Tokenizer
from mimkit.tokenizers.lavit import LaVIT, Merger, merger_weights, policy_softmax, ratio_loss

SMALL = ["lavit.embed_dim=32", "lavit.depth=1", "lavit.num_heads=2", "lavit.decoder_embed_dim=32",
         "lavit.decoder_num_heads=2"]


def tiny(teacher_dim=8, **kw) -> LaVIT:
    torch.manual_seed(0)
    args = dict(embed_dim=16, depth=2, num_heads=2, decoder_embed_dim=16, decoder_num_heads=2, code_dim=8)
    return LaVIT(8, 4, 16, [0.5] * 3, [0.25] * 3, teacher_dim=teacher_dim, **{**args, **kw})


def test_training_keep_mask_is_gumbel_softmax_straight_through():
    tok = tiny().train()
    logp = F.log_softmax(torch.randn(3, 16, 2), -1).requires_grad_(True)
    w = torch.randn(3, 16)
    torch.manual_seed(1)
    keep = tok.decide(logp)
    (keep * w).sum().backward()
    # the definition: y = softmax((logp + g) / tau), g Gumbel noise drawn as F.gumbel_softmax draws it; forward
    # one-hot of the argmax, backward through y
    torch.manual_seed(1)
    g = -torch.empty_like(logp).exponential_().log()
    ref = logp.detach().clone().requires_grad_(True)
    y = ((ref + g) / 1.0).softmax(-1)
    assert torch.equal(keep, (y.argmax(-1) == 0).float())
    (y[..., 0] * w).sum().backward()
    assert torch.allclose(logp.grad, ref.grad, atol=1e-6) and logp.grad.abs().sum() > 0


def test_inference_keeps_the_expected_count_of_most_likely_patches():
    tok = tiny().eval()
    p = torch.tensor([[0.9, 0.2, 0.6, 0.1, 0.7, 0.05] + [0.0] * 10, [0.01] * 16])
    keep = tok.decide(torch.stack([p, 1 - p], -1).clamp_min(1e-12).log())
    # row 0: sum 2.55 -> 3 patches, the three most likely; row 1: sum 0.16 -> at least one
    assert keep[0].nonzero().flatten().tolist() == [0, 2, 4]
    assert keep[1].sum() == 1


def test_ratio_loss_definition_and_it_drives_the_keep_ratio_to_its_target():
    keep = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 0]])
    # DynamicViT's form: each image's share held at the target; the batch form: only the batch's share, so these
    # two images (1 and 3 tokens) already meet a 0.5 target, and 0.4 costs (0.5 - 0.4)^2
    assert ratio_loss(keep, 0.5, "image").item() == pytest.approx(((0.25 - 0.5) ** 2 + (0.75 - 0.5) ** 2) / 2)
    assert ratio_loss(keep, 0.5, "batch").item() == 0.0
    assert ratio_loss(keep, 0.4, "batch").item() == pytest.approx(0.1 ** 2)
    assert ratio_loss(keep, 0.4).item() == ratio_loss(keep, 0.4, "batch").item()  # the default
    feats = torch.randn(32, 16, 8, generator=torch.Generator().manual_seed(0))
    for target, scope in ((0.2, "image"), (0.8, "image"), (0.2, "batch"), (0.8, "batch")):
        tok = tiny().train()
        opt = torch.optim.Adam([*tok.proj.parameters(), *tok.selector.parameters()], lr=2e-2)
        for _ in range(40):
            loss = ratio_loss(tok.decide(tok.selector(tok.proj(feats))), target, scope)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            sampled = tok.decide(tok.selector(tok.proj(feats))).mean().item()
            kept = tok.eval().decide(tok.selector(tok.proj(feats))).mean().item()
        assert abs(sampled - target) < 0.08 and abs(kept - target) < 0.08, (target, scope, sampled, kept)


def test_batch_scope_lets_the_count_follow_the_content_and_image_scope_does_not():
    """A stand-in for the reconstruction pressure: dropping an informative patch costs 1, other patches are
    free. Images carry 2 to 14 informative patches of 16 (mean 8, the target share 0.5). Trained through the real
    selector and its Gumbel sample, the batch form keeps about each image's informative count; DynamicViT's
    per-image form pulls the images towards 8."""
    g = torch.Generator().manual_seed(0)
    n_info = torch.arange(2, 15, 2).repeat(5)  # [35]
    info = (torch.rand(35, 16, generator=g).argsort(1) < n_info[:, None]).float()
    feats = torch.randn(35, 16, 8, generator=g) * 0.1 + info[..., None]  # informative patches read differently
    counts = {}
    for scope in ("batch", "image"):
        tok = tiny().train()
        opt = torch.optim.Adam([*tok.proj.parameters(), *tok.selector.parameters()], lr=2e-2)
        for _ in range(150):
            keep = tok.decide(tok.selector(tok.proj(feats)))
            loss = ((1 - keep) * info).sum(1).mean() / 16 + 2.0 * ratio_loss(keep, 0.5, scope)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            counts[scope] = tok.eval().decide(tok.selector(tok.proj(feats))).sum(1)
    spread = {s: np.corrcoef(c.numpy(), n_info.numpy())[0, 1] for s, c in counts.items()}
    assert spread["batch"] > 0.9 and (counts["batch"] - n_info).abs().float().mean() < 1.5, counts["batch"]
    # per image, the images with few informative patches are pulled up to the target's 8 (dropping more of a
    # busy image would cost more than its ratio term)
    assert (counts["image"][n_info < 8] >= 7).all() and counts["image"].std() < counts["batch"].std(), counts


def test_policy_softmax_is_the_masked_softmax_and_empty_rows_are_zero():
    scores = torch.randn(2, 3, 5, 5)
    allowed = torch.rand(2, 1, 5, 5) > 0.4
    allowed[0, 0, 1] = False  # a query with nothing to read
    ref = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    assert torch.allclose(policy_softmax(scores, allowed.float()), ref, atol=1e-6)
    assert (policy_softmax(scores, allowed.float())[0, :, 1] == 0).all()


def test_merger_policies_match_their_definitions():
    keep = torch.tensor([[1.0, 0, 1, 0, 0, 1]])
    causal, cross = merger_weights(keep)
    for i in range(6):
        for j in range(6):
            assert causal[0, 0, i, j] == float(j <= i and (keep[0, j] == 1 or i == j))
            assert cross[0, 0, i, j] == float(keep[0, j] == 0)


def test_cross_attention_reads_only_the_dropped_patches():
    torch.manual_seed(0)
    merger = Merger(16, 2, 2, 4.0).eval()
    x = torch.randn(2, 9, 16)
    keep = (torch.rand(2, 9) > 0.5).float()
    keep[:, 0], keep[:, 1] = 1, 0
    _, cross_w = merger_weights(keep)
    blk = merger.blocks[0]
    origin = merger.ln_vision(x)
    out, attn = blk.cross(blk.norm1(x), origin, cross_w)
    assert (attn[keep[:, None, None, :].expand_as(attn) == 1] == 0).all()  # no weight on a kept key
    changed = origin.clone()
    changed[keep == 1] += torch.randn_like(changed[keep == 1])  # kept patches' features: no effect
    assert torch.equal(blk.cross(blk.norm1(x), changed, cross_w)[0], out)
    changed = origin.clone()
    changed[:, 1] += 1.0  # a dropped patch's features: every query reads them
    assert not torch.allclose(blk.cross(blk.norm1(x), changed, cross_w)[0], out)


def test_ids_are_minus_one_exactly_at_dropped_patches_and_merged_ids_follow_the_readers():
    tok = tiny().eval()
    feats = torch.randn(5, 16, 8, generator=torch.Generator().manual_seed(2))
    tok.features = lambda images: feats
    images = torch.zeros(5, 3, 8, 8)
    t = tok.tokens(images)
    keep = t["keep"] > 0.5
    ids, merged = tok.dynamic(images)
    assert ((ids == -1) == ~keep).all() and keep.any(1).all() and (~keep).any()
    z = t["z"]
    nearest = (z @ tok.quantizer.codebook.T).argmax(-1)
    assert torch.equal(ids[keep], nearest[keep]) and torch.equal(tok.encode(images), ids)
    for b in range(5):  # brute force: each dropped patch takes the id of the kept query that read it most
        for j in range(16):
            if keep[b, j]:
                assert merged[b, j] == ids[b, j]
            else:
                readers = [(t["reads"][b, i, j].item(), i) for i in range(16) if keep[b, i]]
                assert merged[b, j] == ids[b, max(readers)[1]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_teacher):
    """`mimkit tokenizer train` of configs/tokenizer/lavit_digits.yaml, briefly: (metrics, tokenizer file)."""
    out = tmp_path_factory.mktemp("lavit")
    assert main(["tokenizer", "train", "--config", "configs/tokenizer/lavit_digits.yaml",
                 f"teacher.name=mimkit:{digits_teacher}", f"output_dir={out}", "epochs=3", "batch_size=32",
                 "data.limit=192", "data.test_limit=100", "vis_every=3", *SMALL]) == 0
    return json.loads((out / "metrics.json").read_text()), out / "tokenizer.pt"


def test_digits_training_loss_falls_and_the_file_round_trips(trained, tmp_path, capsys):
    m, path = trained
    assert m["final_loss"] < 0.7 * m["first_loss"], m["loss_history"]
    assert 0 < m["heldout_tokens_per_image"] < 16 and m["heldout_codes_used"] > 1
    raw = torch.load(path, weights_only=True)  # plain values and tensors only, the teacher's weights inside
    assert raw["kind"] == "lavit" and raw["config"]["teacher"]["source"] == "mimkit"
    tok = Tokenizer.load(path)
    x = torch.randn(6, 3, 8, 8)
    ids = tok.encode(x)
    assert ids.shape == (6, 16) and ids.min() >= -1 and ((ids >= 0).sum(1) >= 1).all()
    tok.save(tmp_path / "again.pt")
    assert torch.equal(Tokenizer.load(tmp_path / "again.pt").encode(x), ids)
    capsys.readouterr()
    assert main(["tokenizer", "info", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    spread = info["tokens_per_image"]
    assert spread["mean"] == pytest.approx(m["heldout_tokens_per_image"]) and spread["std"] >= 0
    assert spread["of"] == 16


def test_prefer_kept_moves_the_mask_onto_kept_patches_and_keeps_its_count():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(200, 16, generator=g) < 0.4
    keep = torch.rand(200, 16, generator=g) < 0.5
    out = prefer_kept(mask, keep, torch.Generator().manual_seed(1))
    assert torch.equal(out.sum(1), mask.sum(1))
    best = torch.minimum(mask.sum(1), keep.sum(1))  # as many masked kept patches as there can be
    assert torch.equal((out & keep).sum(1), best)
    assert (mask & keep & ~out).sum() == 0  # masked kept patches stay masked
    inside = mask & keep
    assert torch.equal(prefer_kept(inside, keep), inside)


def test_keep_metrics_match_a_hand_computation():
    from mimkit.probes.semantics import image_complexity, keep_metrics
    m = keep_metrics(np.array([0.25, 0.5, 0.75, 1.0]), np.array([0, 1, 0, 1]), np.array([1.0, 2.0, 3.0, 5.0]), 3)
    assert m["keep_ratio"] == 0.625 and m["keep_ratio_per_class"][:2] == [0.5, 0.75]
    assert math.isnan(m["keep_ratio_per_class"][2]) and m["keep_complexity_spearman"] == pytest.approx(1.0)
    r, c = np.array([0.25, 0.5, 0.75, 1.0]) - 0.625, np.array([1.0, 2.0, 3.0, 5.0]) - 2.75
    assert m["keep_complexity_pearson"] == pytest.approx((r * c).sum() / np.sqrt((r * r).sum() * (c * c).sum()))
    ramp = torch.arange(4.0).view(1, 1, 1, 4).expand(2, 3, 4, 4) / 4  # grey ramp: |grad| = 0.25 everywhere
    assert torch.allclose(image_complexity(ramp), torch.full((2,), 0.25))
    assert image_complexity(torch.full((1, 3, 4, 4), 0.3)).item() == 0


def test_cross_entropy_leaves_out_minus_one_ids():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 6, 5), torch.tensor([[0, -1, 2, 3, -1, 4], [1, 1, -1, 0, 2, 3]])
    mask = torch.tensor([[1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    valid = mask & (ids >= 0)
    ref = F.cross_entropy(logits[valid], ids[valid])
    assert torch.allclose(cross_entropy(logits, ids, mask)["loss"], ref)
    assert torch.allclose(cross_entropy(logits[mask], ids, mask)["loss"], ref)  # masked_linear's [M, V]


@pytest.mark.parametrize("extra", [["target.tokens.dropped=ignore"], ["target.tokens.dropped=merged"],
                                   ["target.tokens.dropped=ignore", "mask.prefer_kept=true"]],
                         ids=["ignore", "merged", "prefer_kept"])
def test_beit_trains_on_lavit_ids(trained, tmp_path, extra):
    from mimkit.methods import build_method, pretrain_config
    cfg = pretrain_config([], ["method=beit", "data.name=digits", f"target.tokens.tokenizer={trained[1]}",
                               f"output_dir={tmp_path / 'beit'}", "epochs=1", "data.limit=64", "batch_size=32",
                               "optim.warmup_epochs=0", *extra])
    m = engine.train(cfg)
    assert all(torch.isfinite(torch.tensor(m["loss_history"]))), m["loss_history"]
    model = build_method(cfg)
    imgs, mask = torch.randn(4, 3, 8, 8), torch.zeros(4, 16, dtype=torch.bool)
    mask[:, :6] = True
    ids, keep = model.target.ids_and_keep(imgs)
    assert torch.equal(ids >= 0, keep) if cfg.target.tokens.dropped == "ignore" else (ids >= 0).all()
    target, used = model.target_and_mask(imgs, mask)
    assert torch.equal(used.sum(1), mask.sum(1))
    if cfg.mask.prefer_kept:
        assert torch.equal((used & keep).sum(1), torch.minimum(mask.sum(1), keep.sum(1)))


def test_analyze_tokens_reads_a_lavit_tokenizer(trained, tmp_path):
    out = tmp_path / "an"
    assert main(["analyze", "tokens", "--tokenizer", f"lavit={trained[1]}", "data.name=digits", "data.test_limit=120",
                 "batch_size=64", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())["tokenizers"]["lavit"]
    assert 0 < m["keep_ratio"] <= 1 and m["tokens_per_image"] == pytest.approx(16 * m["keep_ratio"])
    assert m["patches"] == round(120 * m["tokens_per_image"])  # counts over kept patches only
    rho = m["keep_complexity_spearman"]  # NaN when every image keeps as many patches
    assert len(m["keep_ratio_per_class"]) == 10 and (math.isnan(rho) or -1 <= rho <= 1)
    assert any(p.endswith("tokens_per_image.png") for p in m["figures"])
