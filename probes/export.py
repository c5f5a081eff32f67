"""Export an encoder to timm's VisionTransformer. mimkit's ViT already uses timm's names and blocks; the export
drops `mask_token` and writes the fixed sin-cos `pos_embed` buffer (zero CLS slot) as timm's learnable one."""
from __future__ import annotations

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
