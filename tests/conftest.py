import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR10 = SHARED_DATA / "cifar10"
needs_cifar10 = pytest.mark.skipif(not (CIFAR10 / "train").is_dir(),
                                   reason=f"CIFAR-10 folders not found at {CIFAR10}")


def make_cfg(tmp_path, *overrides: str):
    """A pretraining config on the synthetic dataset (tiny ViT), output under tmp_path."""
    from mimkit.methods import pretrain_config
    return pretrain_config([], ["data.name=synthetic", f"output_dir={tmp_path / 'run'}", *overrides])


def die_after_first_checkpoint(monkeypatch) -> None:
    """Make pretraining stop (KeyboardInterrupt) right after it writes its first epoch's checkpoint; undo with
    monkeypatch.undo()."""
    from mimkit import engine
    real_save = engine.save_checkpoint

    def save_then_die(path, model, optimizer, epoch, *a, **k):
        real_save(path, model, optimizer, epoch, *a, **k)
        if epoch == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_checkpoint", save_then_die)


@pytest.fixture
def cfg_factory(tmp_path):
    return lambda *o: make_cfg(tmp_path, *o)


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    """A random-init MAE encoder of the digits preset (8 px, patch 2, depth 4) as a mimkit checkpoint (the teacher
    of the tokenizer tests)."""
    import torch

    from mimkit import checkpoint
    from mimkit.config import to_dict
    from mimkit.methods import MAE, pretrain_config
    path = tmp_path_factory.mktemp("teacher") / "mae.pt"
    cfg = pretrain_config([], ["data.name=digits"])
    torch.manual_seed(0)
    checkpoint.save({"mimkit": "pretrain", "model": MAE(cfg).state_dict(), "config": to_dict(cfg)}, path)
    return path
