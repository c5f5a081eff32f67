"""ClusterMIM (Du, Wang, Wang, ICLR 2024; PKU-ML/ClusterMIM): MAE whose decoder predicts, for every masked
patch, the id of its nearest k-means center (K logits per patch), trained with cross-entropy.

The centers come from a tokenizer file (`target.tokens.tokenizer`, made by `mimkit tokenizer train` with
configs/tokenizer/kmeans_*.yaml) fitted on raw patch pixels or on a frozen teacher's patch features."""
from mimkit.parts import RECIPES

from .base import Method, register_method


@register_method("clustermim")
class ClusterMIM(Method):
    recipe = RECIPES["clustermim"]
