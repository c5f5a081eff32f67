"""ClusterMIM (Du, Wang, Wang, ICLR 2024; PKU-ML/ClusterMIM): MAE whose decoder predicts, for every masked
patch, the id of its nearest k-means center (K logits per patch), trained with cross-entropy.

The centers come from a tokenizer file (`target.tokenizer`, made by `mimkit tokenizer train` with
configs/tokenizer/kmeans_*.yaml) fitted on raw patch pixels or on a frozen teacher's patch features. Targets
are computed from the same augmented view the encoder sees, by the frozen tokenizer."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mimkit.tokenizers.base import load_for_method, token_accuracy

from .beit import hits_panel
from .methods import MAE, masked_mean, register


@register("clustermim")
class ClusterMIM(MAE):
    recipe = {**MAE.recipe, "target.norm_pix": False}

    def out_dim(self, cfg) -> int:
        # MAE.__init__ sizes its decoder's output from here: K logits per patch
        self.tokenizer = load_for_method(cfg, self.encoder.grid)
        return self.tokenizer.vocab_size

    def forward(self, imgs, mask):
        target = self.tokenizer(imgs)  # [B, N] ids, frozen and without gradients
        logits = self.predict(imgs, mask).float()
        loss = masked_mean(F.cross_entropy(logits.transpose(1, 2), target, reduction="none"), mask)
        return {"loss": loss, "acc": token_accuracy(logits[mask], target[mask]), "pred": logits}

    def masked_token_logits(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits over the K centers at the masked positions [M, K]."""
        return self.predict(imgs, mask)[mask]

    panel_name = "original_masked_hits"

    @torch.no_grad()
    def visualize(self, imgs, mask, data_name):
        hits = self.predict(imgs, mask).argmax(-1) == self.tokenizer(imgs)
        return hits_panel(imgs, mask, hits, self.patch_size, data_name)
