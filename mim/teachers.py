"""Frozen feature extractors ("teachers"): the networks whose patch features VQ-KD regresses, k-means clusters
and the `teacher` target (mimkit.targets.teacher) hands to a method. They sit below both the tokenizers and the
targets, which both use them.

Named by one string, never downloaded:
- `timm:<model name>` with a local weights file (a state dict as .pth/.pt/.bin or .safetensors);
- `openclip:<model name>` (e.g. openclip:ViT-B-16) with a local weights file, when open_clip is installed;
- `mimkit:<checkpoint.pt>`: the encoder of a mimkit pretraining checkpoint (its own weights).

A teacher takes images normalized with any stats, converts them to its own normalization and input size, and
returns patch features [B, grid * grid, D] resampled to the requested token grid. `spec` holds plain values
that rebuild the architecture without weights, so a k-means tokenizer on teacher features stores the teacher
inside its own file.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .checkpoint import CheckpointError
from .config import ConfigError, known_fields, to_dict
from .data import dataset_stats
from .encoders import load_encoder
from .images import renormalize, resize
from .parts import SOURCES, TeacherConfig  # noqa: F401  (TeacherConfig re-exported)
from .vit import ModelConfig, build_encoder
from .weights import timm_state


class Teacher(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        self.spec = dict(spec)
        source = spec["source"]
        if source == "timm":
            self.model, self.input_size, self.mean, self.std = _timm_model(spec)
        elif source == "openclip":
            self.model, self.input_size, self.mean, self.std = _openclip_visual(spec)
        elif source == "mimkit":
            self.model, self.input_size, self.mean, self.std = _mimkit_encoder(spec)
        else:
            raise ConfigError(f"teacher source {source!r} is not valid; choose one of: {', '.join(SOURCES)}")
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # always frozen: dropout/drop-path off even inside a training tokenizer

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch features [B, n, D] of images already at input_size in the teacher's normalization."""
        source = self.spec["source"]
        if source == "timm":
            out = self.model.forward_features(x)
            if out.dim() == 4:  # CNN feature map [B, C, h, w]
                return out.flatten(2).transpose(1, 2)
            return out[:, getattr(self.model, "num_prefix_tokens", 1):]
        if source == "openclip":
            trunk = getattr(self.model, "trunk", None)
            if trunk is not None:  # open_clip's timm towers (EVA02-CLIP, SigLIP) return no tokens: the trunk's,
                # after its final norm, through the per-token part of its head (EVA02: the projection to 512)
                x = trunk.forward_features(x)[:, getattr(trunk, "num_prefix_tokens", 1):]
                return self.model.head(trunk.head(getattr(trunk, "fc_norm", nn.Identity())(x)))
            _, tokens = self.model(x)  # output_tokens=True: tokens after ln_post, before the projection
            proj = getattr(self.model, "proj", None)
            return tokens @ proj if proj is not None else tokens  # BEiT v2: CLIP tokens projected (512-d)
        return self.model(x)[:, 1:]

    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order (timm ViTs, OpenCLIP's visual tower, mimkit encoders)."""
        if self.spec["source"] == "openclip" and hasattr(self.model, "transformer"):
            return self.model.transformer.resblocks
        if self.spec["source"] == "openclip":
            return self.model.trunk.blocks
        blocks = getattr(self.model, "blocks", None)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise ConfigError(f"teacher {self.spec.get('name', 'mimkit')} has no transformer blocks to take a layer "
                              f"from; use layer 0 (its output features)")
        return blocks

    def block_index(self, layer: int) -> int:
        """The 0-based index of block `layer` (1-based; -1 = the last); out of range is a ConfigError."""
        n = len(self.blocks())
        if not (1 <= layer <= n or layer == -1):
            raise ConfigError(f"teacher.layer={layer} is out of range: the teacher has {n} blocks (1..{n}, -1 = the "
                              f"last, 0 = its output features)")
        return layer - 1 if layer > 0 else n - 1

    def block_tokens(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Patch tokens [B, n, D] of block `layer` (1-based; -1 = the last) before any final norm."""
        return self.hooked_tokens(x, [layer])[0]

    def hooked_tokens(self, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """Patch tokens [B, n, D] of each block in `layers` (1-based; -1 = the last) before any final norm, read
        with forward hooks during one ordinary forward of images already at input_size (prefix tokens dropped;
        differentiable in x when gradients are on: the weights stay frozen)."""
        seen: dict[int, torch.Tensor] = {}
        blocks = self.blocks()
        handles = [blocks[self.block_index(layer)].register_forward_hook(
            lambda m, i, out, layer=layer: seen.__setitem__(layer, out)) for layer in layers]
        try:
            self.tokens(x)
        finally:
            for h in handles:
                h.remove()
        native = getattr(self.model, "transformer", None)  # OpenCLIP's own ViT (not a timm trunk)
        transposed = native is not None and not getattr(native, "batch_first", True)
        timm_model = self.model if self.spec["source"] == "timm" else getattr(self.model, "trunk", None)
        prefix = getattr(timm_model, "num_prefix_tokens", 1)
        # older open_clip runs its blocks on [L, B, D]
        return [(seen[layer].transpose(0, 1) if transposed else seen[layer])[:, prefix:] for layer in layers]

    def prepare(self, images: torch.Tensor, stats: tuple) -> torch.Tensor:
        """images normalized with stats=(mean, std) -> the teacher's normalization and input size."""
        return resize(renormalize(images, stats, (self.mean, self.std)), self.input_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The patch features [B, n, D] of spec["layer"] (0: the output features) of images already at
        input_size in the teacher's normalization."""
        layer = self.spec.get("layer", 0)
        return self.tokens(x) if layer == 0 else self.block_tokens(x, layer)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, stats: tuple, grid: int) -> torch.Tensor:
        """images normalized with stats=(mean, std) -> features [B, grid * grid, D] (float32) of the teacher's
        layer."""
        feats = self.features(self.prepare(images, stats)).float()
        return to_grid(feats, grid, self.spec.get("name", "mimkit"))

    @torch.no_grad()
    def feature_dim(self) -> int:
        """D of the patch features, probed with one blank image on the teacher's own device."""
        first = next(self.model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        return self.features(torch.zeros(1, 3, self.input_size, self.input_size, device=device)).shape[-1]


def to_grid(feats: torch.Tensor, grid: int, name: str = "") -> torch.Tensor:
    """Patch features [B, g * g, D] on the teacher's g x g grid -> [B, grid * grid, D] on the encoder's, by area
    interpolation of the feature map: each encoder patch gets the mean of the teacher features it covers (g a
    multiple of grid), or the one teacher feature that covers it (grid a multiple of g). Grids where neither
    divides the other would mix patches unevenly and are refused."""
    B, n, D = feats.shape
    g = int(round(n ** 0.5))
    if g == grid:
        return feats
    if g % grid and grid % g:
        raise ConfigError(f"teacher {name} gives a {g}x{g} grid of patch features and the encoder has {grid}x{grid} "
                          f"patches; one must divide the other: set teacher.img_size (or the data's img_size / "
                          f"patch size) so that they do")
    fmap = F.interpolate(feats.transpose(1, 2).reshape(B, D, g, g), size=(grid, grid), mode="area")
    return fmap.flatten(2).transpose(1, 2)


def _timm_model(spec: dict):
    import timm
    from timm.data import resolve_model_data_config
    kwargs = dict(spec.get("kwargs") or {})
    try:
        model = timm.create_model(spec["name"], pretrained=False, **kwargs)
    except RuntimeError as e:  # unknown model name
        raise ConfigError(f"teacher timm:{spec['name']}: {e}") from None
    data = resolve_model_data_config(model)
    size = kwargs.get("img_size") or data["input_size"][-1]
    return model, int(size), list(data["mean"]), list(data["std"])


def _openclip_visual(spec: dict):
    try:
        import open_clip
    except ImportError:
        raise ConfigError("teacher openclip:... needs the open_clip package (pip install open_clip_torch)") from None
    visual = open_clip.create_model(spec["name"]).visual  # architecture only; load_teacher loads the weights
    visual.output_tokens = True
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    # the normalization of the model's released weights (open_clip's table of pretrained tags, read without a
    # download: SigLIP's is (0.5, 0.5, 0.5)); create_model without a tag gives every model OpenAI CLIP's
    tags = open_clip.list_pretrained_tags_by_model(spec["name"])
    released = open_clip.get_pretrained_cfg(spec["name"], tags[0]) if tags else {}
    mean = released.get("mean") or getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = released.get("std") or getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return visual, int(size), list(mean), list(std)


def _mimkit_encoder(spec: dict):
    model = build_encoder(known_fields(ModelConfig, spec["model"]), spec["img_size"])
    return model, int(spec["img_size"]), list(spec["mean"]), list(spec["std"])


def read_path(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"teacher.weights {path!r}: no such file (teachers are never downloaded)")
    return p


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a local file: safetensors, or a torch file read with weights_only=True (a bare state
    dict, or one under "state_dict" / "model")."""
    p = read_path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(p))
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read teacher weights {path} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return state


def load_teacher(name: str, weights: str = "", img_size: int = 0, layer: int = 0) -> Teacher:
    """`timm:<name>`, `openclip:<name>` or `mimkit:<checkpoint>` with its local weights, frozen, giving the
    features of `layer` (the values of a TeacherConfig). The layer is part of the teacher's spec, so a tokenizer
    file that holds the teacher encodes with the same layer."""
    teacher = _load(name, weights, img_size)
    teacher.spec["layer"] = layer
    if layer:
        teacher.block_index(layer)  # out of range: one error now, not at the first step
    return teacher


def _load(name: str, weights: str, img_size: int) -> Teacher:
    source, sep, rest = name.partition(":")
    if not sep or source not in SOURCES or not rest:
        raise ConfigError(f"teacher.name={name!r} is not valid; use timm:<model> (with teacher.weights), "
                          f"openclip:<model> (with teacher.weights) or mimkit:<pretrain checkpoint>")
    if source == "mimkit":
        encoder, cfg, _ = load_encoder(rest)
        mean, std = dataset_stats(cfg.data.name)
        teacher = Teacher({"source": "mimkit", "model": to_dict(cfg.model), "img_size": cfg.data.img_size,
                           "mean": list(mean), "std": list(std)})
        teacher.model.load_state_dict(encoder.state_dict())
        return teacher.eval()
    if not weights:
        raise ConfigError(f"teacher {name} needs teacher.weights: a local weights file (nothing is downloaded)")
    if source == "openclip":
        teacher = Teacher({"source": "openclip", "name": rest})
        state = read_state_dict(weights)  # ours, not open_clip's loader: weights_only, no download fallback
        if any(k.startswith("visual.") for k in state):  # a whole CLIP (image and text towers): keep the image one
            state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        try:
            teacher.model.load_state_dict(state)
        except RuntimeError as e:  # its first line only names the class; the second names the keys
            detail = (str(e).splitlines()[1:2] or [str(e)])[0].strip()[:200]
            raise CheckpointError(f"teacher weights {weights} do not fit openclip:{rest} ({detail})") from None
        return teacher.eval()
    state, kwargs = timm_state(weights)  # an official format converted, or a mimkit export's shape
    teacher = Teacher({"source": "timm", "name": rest, "kwargs": {**kwargs, **({"img_size": img_size} if img_size
                                                                              else {})}})
    _load_timm_state(teacher.model, state, weights)
    return teacher.eval()


def _load_timm_state(model: nn.Module, state: dict, path: str) -> None:
    pos = getattr(model, "pos_embed", None)
    if isinstance(pos, torch.Tensor) and "pos_embed" in state and state["pos_embed"].shape != pos.shape:
        from timm.layers import resample_abs_pos_embed  # a teacher run at another input size
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(model.patch_embed.grid_size),
                                                    num_prefix_tokens=prefix)
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(classifier)]
    if missing:
        raise CheckpointError(f"teacher weights {path} do not fit the model: missing {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}")


class ProbeEncoder(nn.Module):
    """A timm or OpenCLIP model (a `Teacher`, the same loader) seen as a probe's encoder: images normalized with
    `stats` -> tokens [B, 1 + n, D] whose first slot is the model's own pooled feature (timm: `forward_head(...,
    pre_logits=True)`, e.g. the normed CLS token of a MAE ViT, the mean of I-JEPA's; OpenCLIP: the projected
    image embedding) and whose other slots are its patch features (`Teacher.tokens`). `features.pool=cls` thus
    probes what the model itself pools, `mean` the mean of its patch features."""

    def __init__(self, teacher: Teacher, stats: tuple):
        super().__init__()
        self.teacher, self.stats = teacher, stats
        self.depth = len(teacher.blocks())

    def train(self, mode: bool = True) -> "ProbeEncoder":
        return super().train(False)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1 + n, D]: the pooled feature, then the patch features, of images at the model's input size and
        normalization, from one forward."""
        model = self.teacher.model
        if self.teacher.spec["source"] == "openclip":
            pooled = pooled_feature(model, "openclip", x)
            tokens = self.teacher.tokens(x)
        else:
            feats = model.forward_features(x)
            pooled = model.forward_head(feats, pre_logits=True)
            tokens = (feats.flatten(2).transpose(1, 2) if feats.dim() == 4  # CNN feature map [B, C, h, w]
                      else feats[:, getattr(model, "num_prefix_tokens", 1):])
        return torch.cat([pooled.unsqueeze(1), tokens], dim=1)

    def forward(self, x: torch.Tensor, return_layers: tuple[int, ...] = ()) -> torch.Tensor | tuple:
        """Tokens [B, 1 + n, D]; with `return_layers` (0-based blocks) also those blocks' raw tokens, the block's
        first token (CLS; the patch mean for a model without one) in the first slot."""
        x = self.teacher.prepare(x, self.stats)
        if not return_layers:
            return self.tokens(x)
        seen = {}
        blocks = self.teacher.blocks()
        handles = [blocks[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
                   for i in return_layers]
        try:
            tokens = self.tokens(x)
        finally:
            for h in handles:
                h.remove()
        return tokens, [self.first_and_patches(seen[i]) for i in return_layers]

    def first_and_patches(self, out: torch.Tensor) -> torch.Tensor:
        """A block's raw output -> [B, 1 + n, D]: its first token (or the patch mean), then its patch tokens."""
        model, source = self.teacher.model, self.teacher.spec["source"]
        native = getattr(model, "transformer", None) if source == "openclip" else None
        if native is not None and not getattr(native, "batch_first", True):
            out = out.transpose(0, 1)  # older open_clip runs its blocks on [L, B, D]
        timm_model = model if source == "timm" else getattr(model, "trunk", None)
        prefix = getattr(timm_model, "num_prefix_tokens", 1)
        first = out[:, :1] if prefix else out.mean(dim=1, keepdim=True)
        return torch.cat([first, out[:, prefix:]], dim=1)

    def random_init(self) -> "ProbeEncoder":
        """The same architecture with fresh weights (the random-init baseline)."""
        return ProbeEncoder(Teacher(self.teacher.spec), self.stats)


def load_probe_encoder(name: str, weights: str, stats: tuple) -> ProbeEncoder:
    """`timm:<model>` or `openclip:<model>` with its local weights as a probe's encoder of images normalized with
    stats=(mean, std) (they are renormalized and resized to the model's own)."""
    if name.partition(":")[0] not in ("timm", "openclip"):
        raise ConfigError(f"checkpoint {name!r}: a model spec is timm:<model> or openclip:<model> (with --weights)")
    return ProbeEncoder(load_teacher(name, weights), stats)


def pooled_feature(model: nn.Module, source: str, x: torch.Tensor) -> torch.Tensor:
    """The feature [B, D] a timm or OpenCLIP model pools itself from images at its input size and normalization
    (ProbeEncoder's first slot): timm's `forward_head(..., pre_logits=True)`, OpenCLIP's image embedding."""
    if source == "openclip":
        out = model(x)
        return out[0] if isinstance(out, tuple) else out
    return model.forward_head(model.forward_features(x), pre_logits=True)


def trainable_copy(teacher: Teacher, drop_path: float = 0.0) -> tuple[nn.Module, dict]:
    """(a copy of the teacher's model that trains: gradients on, timm's classifier removed and its drop path set,
    the spec that rebuilds it). OpenCLIP's towers have no drop path: `drop_path` applies to timm models."""
    spec = {k: v for k, v in teacher.spec.items() if k != "layer"}
    if spec["source"] == "timm":
        spec["kwargs"] = {**(spec.get("kwargs") or {}), "num_classes": 0, "drop_path_rate": drop_path}
    fresh = Teacher(spec)
    if spec["source"] == "timm":
        _load_timm_state(fresh.model, dict(teacher.model.state_dict()), spec["name"])
    else:
        fresh.model.load_state_dict(teacher.model.state_dict())
    return fresh.model.requires_grad_(True), spec


def load_finetuned(path: str) -> Teacher:
    """The fine-tuned model of a `mimkit probe finetune` output (checkpoints/best.pt or last.pt), rebuilt from the
    spec it records and loaded with its weights (its classifier is kept, and unused by probes)."""
    ckpt = checkpoint.load(path, "finetune")
    record = ckpt.get("encoder")
    if not isinstance(record, dict) or not isinstance(record.get("spec"), dict):
        raise CheckpointError(f"{path} is a fine-tuning checkpoint without the spec of its model (written by an "
                              f"older mimkit): fine-tune again to probe it")
    teacher = Teacher(record["spec"])
    prefix = record.get("prefix", "")
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    try:
        teacher.model.load_state_dict(state)
    except RuntimeError as e:
        detail = (str(e).splitlines()[1:2] or [str(e)])[0].strip()[:200]
        raise CheckpointError(f"{path}: its weights do not fit the model it records ({detail})") from None
    return teacher.eval()
