"""dVAE (BEiT's tokenizer): shapes, file round trip, schedules and losses by hand, DALL-E import, a short run."""
import math

import pytest
import torch
import torch.nn.functional as F

from mimkit.tokenizers.base import Tokenizer
from mimkit.tokenizers.config import tokenizer_config
from mimkit.tokenizers.dvae import DVAE, DVAEConfig, DVAETraining, from_dalle, kl_uniform, psnr, temperature
from mimkit.tokenizers.train import train_tokenizer


def small_dvae(img_size=8, input_size=8, vocab=32):
    torch.manual_seed(0)
    return DVAE(img_size, 4, vocab, [0.5] * 3, [0.25] * 3, input_size=input_size, groups=2, hidden=16,
                blocks_per_group=1)


def test_encode_shapes_and_half_resolution_input():
    tok = small_dvae().eval()
    ids = tok.encode(torch.randn(3, 3, 8, 8))
    assert ids.shape == (3, 16) and ids.dtype == torch.long and 0 <= ids.min() and ids.max() < 32
    # BEiT's layout: the encoder's view at 16 px (patch 4 -> 4x4), the dVAE on its 8 px half-resolution copy
    half = small_dvae(img_size=16, input_size=8).eval()
    x = torch.randn(2, 3, 16, 16)
    ref = half.logits(F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True)).argmax(1).flatten(1)
    assert torch.equal(half.encode(x), ref)
    assert half.decode(F.one_hot(ref.view(2, 4, 4), 32).permute(0, 3, 1, 2).float()).shape == (2, 3, 8, 8)


def test_save_load_round_trip(tmp_path):
    tok = small_dvae().eval()
    tok.save(tmp_path / "dvae.pt")
    back = Tokenizer.load(tmp_path / "dvae.pt")
    x = torch.randn(2, 3, 8, 8)
    assert isinstance(back, DVAE) and torch.equal(back.encode(x), tok.encode(x))
    z = torch.softmax(torch.randn(2, 32, 4, 4), 1)
    assert torch.allclose(back.decode(z), tok.decode(z))


def test_temperature_kl_and_psnr_by_hand():
    assert temperature(0.0, 1.0, 1 / 16, 0.5) == pytest.approx(1.0)
    assert temperature(0.25, 1.0, 1 / 16, 0.5) == pytest.approx(1 / 16 + (1 - 1 / 16) * 0.5)
    assert temperature(0.9, 1.0, 1 / 16, 0.5) == pytest.approx(1 / 16)
    assert kl_uniform(torch.zeros(2, 8, 3, 3)).item() == pytest.approx(0.0, abs=1e-6)
    q = torch.tensor([0.7, 0.1, 0.1, 0.1])
    ref = (q * (q / 0.25).log()).sum().item()
    assert kl_uniform(q.log().view(1, 4, 1, 1)).item() == pytest.approx(ref, rel=1e-5)
    assert psnr(torch.tensor(0.01)).item() == pytest.approx(20.0)


def test_training_loss_is_recon_plus_warmed_up_kl():
    tok = small_dvae()
    c = DVAEConfig(tau_start=1.0, tau_end=0.1, tau_anneal=0.5, kl_weight=0.2, kl_warmup=0.4)
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(1)
    out = DVAETraining(tok, c).loss(x, progress=0.1)
    torch.manual_seed(1)  # the same Gumbel noise by hand
    logits = tok.logits(x)
    tau = temperature(0.1, 1.0, 0.1, 0.5)
    rec = tok.decode(F.gumbel_softmax(logits, tau=tau, dim=1))
    logq = F.log_softmax(logits, 1)
    kl = ((logq.exp() * logq).sum(1) + math.log(32)).mean()
    ref = F.mse_loss(rec, x) + 0.2 * (0.1 / 0.4) * kl
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert out["temperature"] == pytest.approx(tau) and out["kl_weight"] == pytest.approx(0.05)


def test_dalle_encoder_import(tmp_path):
    """A state dict in DALL-E's naming (`.w`/`.b`) loads into the same architecture; inputs are mapped from
    [0, 1] with map_pixels as DALL-E expects."""
    src = small_dvae(img_size=8, input_size=8).encoder
    dalle = {k.replace(".weight", ".w").replace(".bias", ".b"): v for k, v in src.state_dict().items()}
    assert "blocks.group_1.block_1.res_path.conv_1.w" in dalle and "blocks.output.conv.w" in dalle
    torch.save(dalle, tmp_path / "dalle_encoder.pt")
    tok = from_dalle(str(tmp_path / "dalle_encoder.pt"), img_size=8, grid=4)
    assert (tok.vocab_size, tok.hidden, tok.groups, tok.blocks_per_group) == (32, 16, 2, 1)
    x01 = torch.rand(2, 3, 8, 8)
    assert torch.equal(tok.encode(x01), src(0.8 * x01 + 0.1).argmax(1).flatten(1))
    tok.save(tmp_path / "tok.pt")
    assert Tokenizer.load(tmp_path / "tok.pt").decoder is None


@pytest.fixture
def one_thread():
    """The dVAE's convolutions on 8x8 digits are tiny: more OpenMP threads only add synchronization, so this
    test runs on one and restores the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_short_training_on_digits_loss_falls_and_codes_are_used(tmp_path, one_thread):
    m = train_tokenizer(tokenizer_config(["configs/tokenizer/dvae_digits.yaml"],
                                         [f"output_dir={tmp_path / 'dvae'}", "epochs=8", "batch_size=32",
                                          "data.limit=512", "data.test_limit=200", "vis_every=8", "dvae.hidden=32"]))
    assert m["final_loss"] < 0.8 * m["first_loss"], m["loss_history"]
    assert m["heldout_usage"] >= 0.1, m  # floor: >= 10% of the 256 codes on held-out digits after 128 steps
    assert (tmp_path / "dvae" / "checkpoints" / "last.pt").exists() and m["heldout_psnr"] > 8


def test_resume_continues_and_changed_config_is_refused(tmp_path):
    from mimkit.config import ConfigError
    args = [f"output_dir={tmp_path / 'r'}", "batch_size=32", "data.limit=64", "data.test_limit=32", "dvae.hidden=16",
            "vis_every=1"]
    first = train_tokenizer(tokenizer_config(["configs/tokenizer/dvae_digits.yaml"], [*args, "epochs=1"]))
    more = train_tokenizer(tokenizer_config(["configs/tokenizer/dvae_digits.yaml"], [*args, "epochs=2"]))
    assert len(more["loss_history"]) == 2 and more["loss_history"][0] == first["loss_history"][0]
    with pytest.raises(ConfigError, match="different config.*vocab_size"):
        train_tokenizer(tokenizer_config(["configs/tokenizer/dvae_digits.yaml"], [*args, "vocab_size=128"]))


def test_nonfinite_loss_stops_naming_step_and_last_good_checkpoint(tmp_path, monkeypatch):
    from mimkit.loop import NonFiniteLossError
    real, calls = DVAETraining.loss, {"n": 0}

    def poisoned(self, imgs, progress):
        out = real(self, imgs, progress)
        calls["n"] += 1
        if calls["n"] == 3:  # 64 images / batch 32: 2 steps per epoch, so this is epoch 2
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(DVAETraining, "loss", poisoned)
    cfg = tokenizer_config(["configs/tokenizer/dvae_digits.yaml"],
                           [f"output_dir={tmp_path / 'nan'}", "epochs=3", "batch_size=32", "data.limit=64",
                            "data.test_limit=32", "dvae.hidden=16", "ckpt.every=1", "vis_every=10"])
    with pytest.raises(NonFiniteLossError, match=r"step 2 .*last good checkpoint: .*last.pt \(epoch 1\)"):
        train_tokenizer(cfg)
    ckpt = torch.load(tmp_path / "nan" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_precision_bf16_trains_under_bf16_autocast(tmp_path, monkeypatch):
    real, seen = DVAETraining.loss, set()

    def spy(self, imgs, progress):
        seen.add(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(self, imgs, progress)

    monkeypatch.setattr(DVAETraining, "loss", spy)
    args = [f"output_dir={tmp_path / 'r'}", "batch_size=32", "data.limit=64", "data.test_limit=32", "dvae.hidden=16",
            "epochs=1", "precision=bf16"]
    m = train_tokenizer(tokenizer_config(["configs/tokenizer/dvae_digits.yaml"], args))
    assert seen == {True} and all(math.isfinite(v) for v in m["loss_history"])
