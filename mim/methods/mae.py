"""MAE (He et al. 2022; facebookresearch/mae): the encoder sees only the visible 25% of patches, a light
transformer decoder fills in mask tokens and predicts every masked patch's pixels, standardized per patch
(norm_pix_loss); MSE on masked patches. The optimizer defaults (mimkit.config.OptimConfig) and the mask ratio
(mimkit.masking.MaskConfig) are MAE's ViT-B recipe: lr 1.5e-4 per 256 images, AdamW (0.9, 0.95), wd 0.05,
40 warmup epochs, crops 0.2-1, mask 0.75."""
from mimkit.parts import RECIPES

from .base import Method, register_method


@register_method("mae")
class MAE(Method):
    recipe = RECIPES["mae"]
