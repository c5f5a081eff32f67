"""Export an encoder to timm's VisionTransformer. mimkit's ViT already uses timm's names and blocks; the export
drops `mask_token` and writes the fixed sin-cos `pos_embed` buffer (zero CLS slot) as timm's learnable one."""
from __future__ import annotations

from pathlib import Path

import torch
from timm.layers import LayerScale
from timm.models.vision_transformer import VisionTransformer

from mimkit.vit import ViT

TIMM_ARCHS = {(192, 12, 3): "vit_tiny", (384, 12, 6): "vit_small", (768, 12, 12): "vit_base",
              (1024, 24, 16): "vit_large"}


def timm_kwargs(encoder: ViT, **overrides) -> dict:
    """VisionTransformer(**kwargs) of the same shape as `encoder` (no head unless overridden)."""
    block = encoder.blocks[0]
    kwargs = dict(img_size=encoder.img_size, patch_size=encoder.patch_size, in_chans=encoder.in_chans,
                  embed_dim=encoder.embed_dim, depth=encoder.depth, num_heads=encoder.num_heads,
                  mlp_ratio=block.mlp.fc1.out_features / encoder.embed_dim, qkv_bias=True,
                  init_values=1.0 if isinstance(block.ls1, LayerScale) else None,  # the value is loaded anyway
                  num_classes=0, global_pool="token")
    return {**kwargs, **overrides}


def export_state_dict(encoder: ViT) -> dict[str, torch.Tensor]:
    """The encoder's weights under timm's names (everything but the MIM mask token)."""
    return {k: v.detach().clone() for k, v in encoder.state_dict().items() if k != "mask_token"}


def to_timm(encoder: ViT) -> VisionTransformer:
    """A timm VisionTransformer giving the same features (forward_features) as `encoder`."""
    model = VisionTransformer(**timm_kwargs(encoder))
    model.load_state_dict(export_state_dict(encoder))
    return model.eval()


def timm_recipe(encoder: ViT, path: str) -> str:
    """Python lines that build the timm model and load an exported file."""
    kw = timm_kwargs(encoder)
    name = TIMM_ARCHS.get((kw["embed_dim"], kw["depth"], kw["num_heads"]))
    if name and kw["mlp_ratio"] == 4.0 and kw["init_values"] is None:
        build = (f"timm.create_model('{name}_patch16_224', img_size={kw['img_size']}, "
                 f"patch_size={kw['patch_size']}, num_classes=0)")
    else:
        args = ", ".join(f"{k}={v!r}" for k, v in kw.items() if k not in ("qkv_bias", "global_pool"))
        build = f"timm.models.VisionTransformer({args})"
    return f"model = {build}\nmodel.load_state_dict(torch.load('{path}', weights_only=True))"


def timm_arch_args(encoder: ViT) -> tuple[str, dict]:
    """(timm architecture, create_model kwargs) building `encoder`'s shape, every shape value pinned."""
    kw = timm_kwargs(encoder)
    # the named ViT of its width (its pretrained config); depth and every other shape value are pinned anyway
    name = next((n for (dim, _, heads), n in TIMM_ARCHS.items() if (dim, heads) == (kw["embed_dim"], kw["num_heads"])),
                "vit_base")
    args = {k: v for k, v in kw.items() if k != "qkv_bias"}
    return f"{name}_patch16_224", args


def timm_model(encoder: ViT, mean, std) -> tuple[str, dict, torch.nn.Module]:
    """(architecture, kwargs, timm model holding the encoder's weights, its pretrained config's mean/std and input
    size those of the data the encoder was trained on)."""
    import timm
    arch, args = timm_arch_args(encoder)
    model = timm.create_model(arch, pretrained=False, **args)
    model.load_state_dict(export_state_dict(encoder))
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(mean), "std": tuple(std), "tag": "mimkit",
                            "input_size": (3, encoder.img_size, encoder.img_size), "num_classes": 0}
    return arch, args, model.eval()


def write_hf(encoder: ViT, mean, std, out: str | Path) -> str:
    """A folder timm reads (`timm.create_model("local-dir:OUT", pretrained=True)`, or the architecture with
    pretrained=True and pretrained_cfg_overlay=dict(file=OUT/model.safetensors)) and huggingface_hub.upload_folder
    publishes as is:
    model.safetensors and config.json (architecture, model_args, pretrained_cfg with mean/std, num_classes=0)."""
    from timm.models._hub import save_for_hf
    arch, args, model = timm_model(encoder, mean, std)
    Path(out).mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(out), model_args=args, safe_serialization=True,
                data_config={"mean": tuple(mean), "std": tuple(std)})
    return arch


def python_line(arch: str, args: dict, file: str) -> str:
    """The timm call that loads an exported file with pretrained=True."""
    kw = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return f"timm.create_model({arch!r}, pretrained=True, pretrained_cfg_overlay=dict(file={file!r}), {kw})"
