import json
import math

import pytest
import torch

from conftest import die_after_first_checkpoint
from mimkit import engine
from mimkit.checkpoint import load
from mimkit.config import ConfigError
from mimkit.engine import train
from mimkit.loop import NonFiniteLossError, lr_at


def test_lr_schedule_warmup_then_cosine(cfg_factory):
    cfg = cfg_factory("epochs=10", "optim.warmup_epochs=2", "optim.min_lr=0.1")
    assert lr_at(0, cfg, 1.0) == 0.0
    assert lr_at(1, cfg, 1.0) == pytest.approx(0.5)
    assert lr_at(2, cfg, 1.0) == pytest.approx(1.0)
    assert lr_at(6, cfg, 1.0) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(10, cfg, 1.0) == pytest.approx(0.1)


def test_short_run_loss_falls_and_writes_run_dir(cfg_factory):
    cfg = cfg_factory("epochs=6")
    m = train(cfg)
    out = engine.resolve_output_dir(cfg)
    assert m["final_loss"] < 0.7 * m["first_loss"], m["loss_history"]
    for f in ("config.yaml", "log.txt", "metrics.json", "checkpoints/last.pt", "reconstructions.png"):
        assert (out / f).exists(), f
    assert any((out / "tb").iterdir())
    ckpt = load(out / "checkpoints" / "last.pt")
    assert set(ckpt) >= {"model", "optimizer", "epoch", "step", "config", "rng"}
    assert ckpt["epoch"] == 5 and json.loads((out / "metrics.json").read_text())["epochs"] == 6


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_resume_is_bitwise_exact(cfg_factory, tmp_path, monkeypatch, precision):
    common = ("epochs=3", "model.drop_path=0.1", f"precision={precision}")
    full = train(cfg_factory(*common, f"output_dir={tmp_path / 'a'}"))
    die_after_first_checkpoint(monkeypatch)
    cfg_b = cfg_factory(*common, f"output_dir={tmp_path / 'b'}")
    with pytest.raises(KeyboardInterrupt):
        train(cfg_b)
    monkeypatch.undo()
    resumed = train(cfg_factory(*common, f"output_dir={tmp_path / 'b'}"))
    a = load(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    b = load(tmp_path / "b" / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full["loss_history"] == resumed["loss_history"]


def test_nonfinite_loss_stops_with_step_and_keeps_checkpoint(cfg_factory, tmp_path, monkeypatch):
    from mimkit.methods import MAE
    real = MAE.forward
    calls = {"n": 0}

    def poisoned(self, imgs, mask):
        out = real(self, imgs, mask)
        calls["n"] += 1
        if calls["n"] == 20:  # synthetic preset: 16 steps/epoch, so this is epoch 2
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MAE, "forward", poisoned)
    cfg = cfg_factory("epochs=3")
    with pytest.raises(NonFiniteLossError, match=r"step 19 .*last good checkpoint: .*last.pt \(epoch 1\)"):
        train(cfg)
    ckpt = load(engine.resolve_output_dir(cfg) / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_skip_nonfinite_allows_bounded_bad_steps(cfg_factory, monkeypatch):
    from mimkit.methods import MAE
    real = MAE.forward
    calls = {"n": 0}

    def poisoned(self, imgs, mask):
        out = real(self, imgs, mask)
        calls["n"] += 1
        if calls["n"] in (3, 5):
            out["loss"] = out["loss"] * float("inf")
        return out

    monkeypatch.setattr(MAE, "forward", poisoned)
    m = train(cfg_factory("epochs=1", "optim.skip_nonfinite=2"))
    assert math.isfinite(m["final_loss"])


def test_existing_run_dir_is_never_overwritten_silently(cfg_factory):
    train(cfg_factory("epochs=1"))
    with pytest.raises(ConfigError, match="optim.blr"):
        train(cfg_factory("epochs=1", "optim.blr=0.5"))
    with pytest.raises(ConfigError, match="resume=auto"):
        train(cfg_factory("epochs=1", "resume=none"))
    m = train(cfg_factory("epochs=1", "optim.blr=0.5", "overwrite=true"))
    assert m["epochs"] == 1


def test_precision_bf16_trains_in_bf16_with_plain_attention_on_cpu(cfg_factory, monkeypatch):
    """precision=bf16 runs the forward under bf16 autocast and switches timm's attention to its plain path on
    CPU (the fused kernel's bf16 backward is slow there); the loss still falls. fp32 (auto on CPU) keeps both."""
    from mimkit import dist
    from mimkit.methods import MAE
    cpu = torch.device("cpu")
    assert not dist.uses_bf16(cpu) and dist.uses_bf16(cpu, "bf16") and not dist.uses_bf16(torch.device("cuda"), "fp32")
    assert dist.uses_bf16(torch.device("cuda"))
    seen = {}
    forward = MAE.forward

    def spy(self, imgs, mask):
        seen["autocast"] = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        seen["fused"] = {m.fused_attn for m in self.modules() if hasattr(m, "fused_attn")}
        return forward(self, imgs, mask)

    monkeypatch.setattr(MAE, "forward", spy)
    m = train(cfg_factory("epochs=6", "precision=bf16"))
    assert seen == {"autocast": True, "fused": {False}}
    assert m["final_loss"] < 0.7 * m["first_loss"], m["loss_history"]
    train(cfg_factory("epochs=1", "overwrite=true"))
    assert seen == {"autocast": False, "fused": {True}}
    with pytest.raises(ConfigError, match="precision.*auto, fp32, bf16"):
        cfg_factory("precision=fp16")


def test_plain_and_fused_attention_compute_the_same():
    """The switch `place_model` makes changes the kernel, not the function."""
    from mimkit.vit import ViT, use_fused_attention
    torch.manual_seed(0)
    vit = ViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4).eval()
    x = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    use_fused_attention(vit, True)
    fused = vit(x, mask)
    use_fused_attention(vit, False)
    assert torch.allclose(vit(x, mask), fused, atol=1e-5)
