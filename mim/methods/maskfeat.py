"""MaskFeat (Wei et al. 2022; SlowFast, mmpretrain): mask-token encoder, block-wise masks, a linear head per
token that predicts the patch's HOG (per channel, 2x2 cells x 9 bins x 3 channels = 108 values), MSE on masked
patches."""
from mimkit.parts import RECIPES

from .base import Method, register_method


@register_method("maskfeat")
class MaskFeat(Method):
    recipe = RECIPES["maskfeat"]
