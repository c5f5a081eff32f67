"""The config of `mimkit analyze tokens|predictions`, as plain dataclasses without torch: the command checks a
mistake in a key or value before the analysis (mimkit.probes.semantics) loads."""
from __future__ import annotations

from dataclasses import dataclass, field

from mimkit.config import DEVICES, build_config, check_range, choices
from mimkit.sections import DATA_PRESETS, DataConfig, validate_data

from .config import INHERITED_DATA


@dataclass
class FigureConfig:
    gallery_tokens: int = 12  # the most frequent tokens shown in the gallery, one row each
    gallery_patches: int = 10  # patches per gallery row: a deterministic sample of those assigned to the token
    context: int = 1  # patches of context shown around each gallery patch
    map_images: int = 8  # sample images with their token maps overlaid
    heatmap_tokens: int = 64  # most frequent tokens in the class x token heat map


@dataclass
class AnalyzeConfig:
    tokenizers: str = ""  # comma-separated tokenizer files, NAME=PATH to name one (set by --tokenizer)
    checkpoint: str = ""  # predictions: a beit, beitv2 or clustermim pretraining checkpoint (set by --checkpoint)
    output_dir: str = ""  # set by --out; default runs/analyze_tokens_<data.name> or next to the checkpoint
    split: str = choices("train", "test", default="test")  # test: val/ or test/ for image folders
    batch_size: int = 256
    device: str = choices(*DEVICES, default="auto")
    seed: int = 0  # the patch subsample, the gallery patches and the prediction masks
    overwrite: bool = False  # replace an earlier analysis in output_dir
    metric_samples: int = 200_000  # NMI/AMI/V-measure on at most ~this many patches (exact counts use all)
    data: DataConfig = field(default_factory=DataConfig)
    figures: FigureConfig = field(default_factory=FigureConfig)


# The dataset presets' data.* keys (image size per dataset); the model keys do not apply here.
ANALYZE_DATA_PRESETS = {name: {k: v for k, v in p.items() if k.startswith("data.")} for name, p in DATA_PRESETS.items()}


def analyze_config(files: list[str] = (), overrides: list[str] = (), stored: dict | None = None) -> AnalyzeConfig:
    """defaults < dataset preset (image size), or the checkpoint's data settings when `stored` (a pretraining
    config) is given < files < overrides."""
    if stored is None:
        return build_config(AnalyzeConfig, files, overrides, presets=[("data.name", ANALYZE_DATA_PRESETS)])
    data = stored.get("data", {})
    inherited = {f"data.{k}": data[k] for k in INHERITED_DATA if k in data}
    # keyed by split only to apply the checkpoint's settings whichever split is analyzed
    return build_config(AnalyzeConfig, files, overrides, presets=[("split", {s: inherited for s in ("train", "test")})])


def split_limit(cfg: AnalyzeConfig) -> int:
    """The image limit of the analyzed split: data.limit for train, data.test_limit for test."""
    return cfg.data.limit if cfg.split == "train" else cfg.data.test_limit


def validate(cfg: AnalyzeConfig, sources: bool = True) -> None:
    """Every range and choice; `sources`: also where the data is (see `validate_data`)."""
    check_range("batch_size", cfg.batch_size, 1)
    check_range("metric_samples", cfg.metric_samples, 1)
    validate_data(cfg.data, sources)
    for k in ("gallery_tokens", "gallery_patches", "map_images", "heatmap_tokens"):
        check_range(f"figures.{k}", getattr(cfg.figures, k), 1)
    check_range("figures.context", cfg.figures.context, 0)
