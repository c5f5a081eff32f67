"""I-JEPA's lr warmup from `start_lr` and cosine weight-decay schedule as general optim keys
(`optim.warmup_start_lr`, `optim.weight_decay_end`), against the official schedulers, and the defaults that leave
every other method's schedule bitwise as it was."""
import math

import pytest
import torch
from torch import nn

from mimkit.config import ConfigError
from mimkit.loop import Loop, build_optimizer, effective_lr, lr_at, set_schedule, train_one_epoch, weight_decay_at
from mimkit.methods import METHODS, pretrain_config, validate


class WarmupCosineSchedule:
    """facebookresearch/ijepa src/utils/schedulers.py, verbatim but for the optimizer (the value is returned)."""

    def __init__(self, warmup_steps, start_lr, ref_lr, T_max, final_lr=0.):
        self.start_lr, self.ref_lr, self.final_lr = start_lr, ref_lr, final_lr
        self.warmup_steps, self.T_max, self._step = warmup_steps, T_max - warmup_steps, 0.

    def step(self):
        self._step += 1
        if self._step < self.warmup_steps:
            progress = float(self._step) / float(max(1, self.warmup_steps))
            return self.start_lr + progress * (self.ref_lr - self.start_lr)
        progress = float(self._step - self.warmup_steps) / float(max(1, self.T_max))
        new_lr = self.final_lr + (self.ref_lr - self.final_lr) * 0.5 * (1. + math.cos(math.pi * progress))
        return max(self.final_lr, new_lr)


class CosineWDSchedule:
    """facebookresearch/ijepa src/utils/schedulers.py, verbatim but for the optimizer (the value is returned)."""

    def __init__(self, ref_wd, T_max, final_wd=0.):
        self.ref_wd, self.final_wd, self.T_max, self._step = ref_wd, final_wd, T_max, 0.

    def step(self):
        self._step += 1
        progress = self._step / self.T_max
        new_wd = self.final_wd + (self.ref_wd - self.final_wd) * 0.5 * (1. + math.cos(math.pi * progress))
        return max(self.final_wd, new_wd) if self.final_wd <= self.ref_wd else min(self.final_wd, new_wd)


IPE, EPOCHS, WARMUP = 7, 10, 3  # iterations per epoch, epochs, warmup epochs


def ijepa_cfg(*extra):
    return pretrain_config([], ["method=ijepa", "data.name=synthetic", f"epochs={EPOCHS}",
                                f"optim.warmup_epochs={WARMUP}", *extra])


def test_recipe_is_the_official_vith14_schedule():
    o = pretrain_config([], ["method=ijepa", "data.name=imagefolder"]).optim  # in1k_vith14_ep300.yaml
    assert (o.blr, o.lr_batch_ref, o.warmup_start_lr, o.min_lr, o.warmup_epochs) == (1e-3, 2048, 2e-4, 1e-6, 40)
    assert (o.weight_decay, o.weight_decay_end) == (0.04, 0.4)


def test_lr_and_weight_decay_follow_the_official_schedulers():
    """Official step s (taken before its iteration) = mimkit at fractional epoch s / IPE, over the whole run."""
    cfg = ijepa_cfg()
    base = effective_lr(cfg)
    lr_sched = WarmupCosineSchedule(WARMUP * IPE, 2e-4, base, EPOCHS * IPE, final_lr=1e-6)
    wd_sched = CosineWDSchedule(0.04, EPOCHS * IPE, final_wd=0.4)
    lrs, wds = [], []
    for s in range(1, EPOCHS * IPE + 1):
        lrs.append((lr_at(s / IPE, cfg, base), lr_sched.step()))
        wds.append((weight_decay_at(s / IPE, cfg), wd_sched.step()))
    for ours, official in lrs + wds:
        assert ours == pytest.approx(official, rel=1e-12, abs=1e-18)
    assert lrs[0][0] == pytest.approx(2e-4 + (base - 2e-4) / (WARMUP * IPE))  # one step above start_lr
    assert wds[-1][0] == pytest.approx(0.4) and wds[EPOCHS * IPE // 2 - 1][0] == pytest.approx(0.22)
    assert weight_decay_at(0, cfg) == pytest.approx(0.04)


def model_and_optimizer(cfg):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    return model, build_optimizer(model, cfg, torch.device("cpu"))


def test_schedule_sets_only_the_decayed_groups():
    cfg = ijepa_cfg()
    _, opt = model_and_optimizer(cfg)
    lr = set_schedule(opt, 5.0, cfg, effective_lr(cfg))
    assert lr == lr_at(5.0, cfg, effective_lr(cfg))
    decay = sorted((g["weight_decay"], len(g["params"])) for g in opt.param_groups)
    assert decay == [(0.0, 4), (weight_decay_at(5.0, cfg), 2)]  # biases and the norm stay at 0
    assert decay[1][0] == pytest.approx(0.04 + (0.4 - 0.04) * 0.5 * (1 - math.cos(math.pi * 5.0 / EPOCHS)))
    assert all(g["lr"] == lr for g in opt.param_groups)


def test_the_loop_steps_both_schedules():
    cfg = ijepa_cfg("epochs=2", "optim.warmup_epochs=1")
    model, opt = model_and_optimizer(cfg)
    loop = Loop(cfg, model, opt, torch.device("cpu"), steps_per_epoch=4, log=lambda m: None)
    batches = [(torch.randn(3, 4),) for _ in range(4)]
    train_one_epoch(loop, batches, 1, lambda b: {"loss": model(b[0]).square().mean()})
    decayed = [g for g in opt.param_groups if g["weight_decay"] > 0]
    assert len(decayed) == 1 and decayed[0]["weight_decay"] == weight_decay_at(1 + 3 / 4, cfg)
    assert loop.lr == lr_at(1 + 3 / 4, cfg, effective_lr(cfg))


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"ijepa"}))
def test_other_methods_schedules_are_bitwise_unchanged(method):
    """Defaults: no start lr, no weight-decay schedule; the warmup is MAE's expression to the last bit."""
    cfg = pretrain_config([], [f"method={method}", "data.name=synthetic", "epochs=20", "optim.warmup_epochs=5"])
    assert cfg.optim.warmup_start_lr == 0.0 and cfg.optim.weight_decay_end < 0
    base = effective_lr(cfg)
    for epoch in [i / 7 for i in range(35)]:  # the warmup: epochs 0 to 5
        assert lr_at(epoch, cfg, base) == base * epoch / 5  # the former warmup, bitwise
        assert weight_decay_at(epoch, cfg) is None and weight_decay_at(epoch + 5, cfg) is None
    _, opt = model_and_optimizer(cfg)
    before = [g["weight_decay"] for g in opt.param_groups]
    set_schedule(opt, 3.0, cfg, base)
    assert [g["weight_decay"] for g in opt.param_groups] == before


@pytest.mark.parametrize("overrides, key", [
    (["optim.warmup_start_lr=-1e-4"], "optim.warmup_start_lr"),
    (["optim.weight_decay=0", "optim.weight_decay_end=0.4"], "optim.weight_decay_end"),
])
def test_bad_schedule_values(overrides, key):
    with pytest.raises(ConfigError, match=key):
        validate(ijepa_cfg(*overrides))
