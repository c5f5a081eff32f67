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


@pytest.fixture
def cfg_factory(tmp_path):
    return lambda *o: make_cfg(tmp_path, *o)
