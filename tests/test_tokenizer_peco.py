"""PeCo's perceptual codebook (the perceptual term against its definition, a frozen teacher) and short CLI runs of
the three quantizer kinds (fsq, lfq, peco): loss falls, held-out usage above a floor, BEiT trains on the ids,
`mimkit analyze tokens` reads them, mismatches are one-line errors."""
import json

import pytest
import torch
import torch.nn.functional as F

from mimkit import engine
from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.teachers import load_teacher
from mimkit.tokenizers.base import Tokenizer
from mimkit.tokenizers.config import tokenizer_config
from mimkit.tokenizers.peco import PeCo, perceptual_loss, spread_layers
from mimkit.tokenizers.train import train_tokenizer


def test_spread_layers():
    assert spread_layers(12) == [3, 6, 9, 12]  # PeCo's blocks of a ViT-B
    assert spread_layers(4) == [1, 2, 3, 4] and spread_layers(2) == [1, 2]


def test_perceptual_term_is_zero_for_identical_images_and_grows_with_distortion(digits_teacher):
    teacher = load_teacher(f"mimkit:{digits_teacher}")
    stats = (teacher.mean, teacher.std)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    assert perceptual_loss(teacher, x, x.clone(), stats, [2, 4]).item() == 0
    noise = torch.randn_like(x)
    dist = [perceptual_loss(teacher, x, x + s * noise, stats, [2, 4]).item() for s in (0.1, 0.3, 1.0)]
    assert 0 < dist[0] < dist[1] < dist[2]
    # the definition: each layer's mean squared token distance, summed over layers
    rec = x + 0.3 * noise
    a = teacher.hooked_tokens(teacher.prepare(x, stats), [2, 4])
    b = [teacher.block_tokens(teacher.prepare(rec, stats), layer) for layer in (2, 4)]
    assert dist[1] == pytest.approx(sum(F.mse_loss(u, v).item() for u, v in zip(b, a)), rel=1e-5)


def test_gradients_reach_the_reconstruction_and_the_teacher_stays_frozen(digits_teacher):
    teacher = load_teacher(f"mimkit:{digits_teacher}")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    rec = (x + torch.randn_like(x)).requires_grad_(True)
    perceptual_loss(teacher, x, rec, (teacher.mean, teacher.std), [1, 4]).backward()
    assert rec.grad is not None and rec.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items()) and not teacher.training


def test_peco_encodes_with_its_spherical_codebook_and_round_trips(tmp_path):
    torch.manual_seed(0)
    layout = {"objective": "pixels", "input_size": 8, "groups": 2, "hidden": 16, "blocks_per_group": 1}
    tok = PeCo(16, 4, 32, [0.5] * 3, [0.25] * 3, layout=layout,
               quantizer={"vocab_size": 32, "dim": 8, "decay": 0.99, "beta": 0.25, "restart": 0.1}).eval()
    x = torch.randn(3, 3, 16, 16)
    z = F.normalize(tok.latents(tok.view(x)), dim=-1)
    ids = tok.encode(x)
    assert torch.equal(ids, (z @ tok.quantizer.vq.codebook.T).argmax(-1))  # nearest code by cosine
    tok.save(tmp_path / "peco.pt")
    back = Tokenizer.load(tmp_path / "peco.pt")
    assert isinstance(back, PeCo) and torch.equal(back.encode(x), ids)


def test_peco_config_errors(digits_teacher):
    with pytest.raises(ConfigError, match="kind=peco needs teacher.name"):
        train_tokenizer(tokenizer_config(["configs/tokenizer/peco_digits.yaml"], ["teacher.name="]))
    with pytest.raises(ConfigError, match="teacher.layer=9 is out of range: the teacher has 4 blocks"):
        train_tokenizer(tokenizer_config(["configs/tokenizer/peco_digits.yaml"], [
            f"teacher.name=mimkit:{digits_teacher}", "peco.layers=[2,9]", "output_dir=/nonexistent/x"]))


# kind, extra overrides (one run per layout), held-out usage floor: the share of the vocabulary used on 200
# held-out digits after 96 steps (6 epochs of 512 images)
RUNS = {
    "fsq": (["fsq.objective=pixels", "fsq.hidden=32", "optim.blr=8e-3"], 0.3),
    "lfq": (["lfq.depth=2", "lfq.embed_dim=64", "lfq.decoder_embed_dim=64"], 0.3),
    "peco": (["peco.hidden=32"], 0.3),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_teacher):
    """Each kind trained briefly through `mimkit tokenizer train` on digits; {kind: (metrics, tokenizer file)}."""
    out = {}
    for kind, (extra, _) in RUNS.items():
        run = tmp_path_factory.mktemp(kind)
        m = train_tokenizer(tokenizer_config([f"configs/tokenizer/{kind}_digits.yaml"], [
            f"teacher.name=mimkit:{digits_teacher}", f"output_dir={run}", "epochs=6", "batch_size=32",
            "data.limit=512", "data.test_limit=200", "vis_every=6", *extra]))
        out[kind] = (m, run / "tokenizer.pt")
    return out


@pytest.mark.parametrize("kind", list(RUNS))
def test_short_digits_training_loss_falls_and_codes_are_used(trained, kind):
    m, path = trained[kind]
    assert m["final_loss"] < 0.9 * m["first_loss"], m["loss_history"]
    assert m["heldout_usage"] >= RUNS[kind][1], m
    assert Tokenizer.load(path).kind == kind


def test_beit_trains_on_fsq_ids(trained, tmp_path):
    from mimkit.methods import pretrain_config
    cfg = pretrain_config([], ["method=beit", "data.name=digits", f"target.tokens.tokenizer={trained['fsq'][1]}",
                               f"output_dir={tmp_path / 'beit'}", "epochs=3", "data.limit=512", "batch_size=64",
                               "optim.blr=3e-3", "optim.lr_batch_ref=256", "optim.warmup_epochs=0"])
    m = engine.train(cfg)
    assert m["final_loss"] < 0.9 * m["first_loss"], m["loss_history"]


def test_analyze_tokens_reads_the_new_kinds(trained, tmp_path):
    out = tmp_path / "analysis"
    args = [a for kind in RUNS for a in ("--tokenizer", f"{kind}={trained[kind][1]}")]
    assert main(["analyze", "tokens", *args, "data.name=digits", "data.test_limit=100", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["tokenizers"]) == set(RUNS)


def test_grid_and_vocabulary_mismatch_are_one_line_errors(trained, tmp_path, capsys):
    path = trained["lfq"][1]  # 4x4 grid on 8 px digits, 256 codes
    for extra, words in ((["model.patch_size=4"], "token grid"), (["target.tokens.vocab_size=100"], "vocab_size")):
        assert main(["pretrain", "method=beit", "data.name=digits", f"target.tokens.tokenizer={path}",
                     f"output_dir={tmp_path / 'x'}", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err
