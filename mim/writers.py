"""Where a pretraining run's scalars and panels go besides log.txt: TensorBoard (<output_dir>/tb) always, and
Weights & Biases with `log.wandb=true` (the `[wandb]` extra), with the same tags: `train/*` per optimizer step,
`epoch/*` per epoch and the method's panel every `vis_every` epochs. Both are imported when a run opens its
writer, so the config (`LogConfig`, `check_log`) stays importable without torch or wandb."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, to_dict


@dataclass
class LogConfig:
    """The `log` section."""
    wandb: bool = False  # also log to Weights & Biases (WANDB_MODE=offline: a local run under <output_dir>/wandb)
    wandb_project: str = "mimkit"


def check_log(log: LogConfig) -> None:
    """log.wandb=true needs wandb installed: one error line naming the extra, before the run starts."""
    if log.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb=true needs the wandb package: pip install 'mimkit[wandb]' (or log.wandb=false)")


class WandbWriter:
    """TensorBoard's add_scalar / add_image / close on a W&B run. Each tag keeps TensorBoard's step: a tag
    `<group>/<name>` is plotted against the metric `<group>/step` (optimizer steps for train/*, epochs for
    epoch/* and the panels), since W&B's own step has to grow with every call."""

    def __init__(self, cfg, out: Path):
        import wandb
        self.wandb, self.groups = wandb, set()
        self.run = wandb.init(project=cfg.log.wandb_project, name=out.name, dir=str(out), config=to_dict(cfg))

    def _log(self, tag: str, value, step: int) -> None:
        group = tag.rpartition("/")[0] or tag
        if group not in self.groups:
            self.groups.add(group)
            self.run.define_metric(f"{group}/step")
            self.run.define_metric(f"{group}/*", step_metric=f"{group}/step")
        self.run.log({tag: value, f"{group}/step": step})

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._log(tag, float(value), step)

    def add_image(self, tag: str, image, step: int) -> None:
        """image: [3, H, W] in [0, 1], as TensorBoard's add_image takes it."""
        pixels = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
        self._log(tag, self.wandb.Image(pixels), step)

    def close(self) -> None:
        self.run.finish()


class Writers:
    """Every writer of a run behind TensorBoard's interface (add_scalar, add_image, close)."""

    def __init__(self, *writers):
        self.writers = writers

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for w in self.writers:
            w.add_scalar(tag, value, step)

    def add_image(self, tag: str, image, step: int) -> None:
        for w in self.writers:
            w.add_image(tag, image, step)

    def close(self) -> None:
        for w in self.writers:
            w.close()


def open_writers(cfg, out: Path) -> Writers:
    """TensorBoard under <out>/tb, and W&B with cfg.log.wandb."""
    from torch.utils.tensorboard import SummaryWriter
    tb = SummaryWriter(str(out / "tb"))
    return Writers(tb, WandbWriter(cfg, out)) if cfg.log.wandb else Writers(tb)
