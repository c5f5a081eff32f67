"""SimMIM (Xie et al. 2022; microsoft/SimMIM): every patch enters the encoder, masked ones as a learned mask
token; one linear map per token predicts the patch's p*p*3 normalized pixels; L1 loss on the masked pixels;
masks of 32-px units."""
from mimkit.parts import RECIPES

from .base import Method, register_method


@register_method("simmim")
class SimMIM(Method):
    recipe = RECIPES["simmim"]
