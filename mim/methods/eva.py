"""Continuous teacher targets, the continuous twin of BEiT v2: the encoder regresses a frozen teacher's patch
features at the masked positions instead of their token ids (`target.kind=teacher`, `target.teacher.*`).

- `eva` (EVA-01, Fang et al. 2023; baaivision/EVA `EVA-01/eva`): BEiT's mask-token encoder and block-wise mask
  (40%), a linear head over the masked tokens, the teacher's output patch features (CLS dropped; OpenCLIP: after
  ln_post and the projection), loss 1 - cosine similarity (EVA's minus cosine, up to a constant). Optimizer:
  run_eva_pretraining.py's defaults (lr 1e-3, AdamW (0.9, 0.98), wd 0.05, 2 warmup epochs, min lr 1e-5, clip 3.0,
  drop path 0.1, crops 0.2-1) at the paper's batch of 4096.
- `maskdistill` (Peng et al. 2022, "A Unified View of Masked Image Modeling"): the same encoder, mask and head;
  target = the teacher's last-block tokens normalized per token by LayerNorm without affine, loss Smooth-L1
  (beta 1). The official code is unreleased: the target and loss follow the paper; the optimizer is BEiT v2's
  recipe (the paper builds on that codebase), an assumption.
- `milan` (MILAN-style, Hou et al. 2022): MAE's encoder that drops masked patches and its decoder, predicting the
  teacher's features at masked positions with the cosine loss; not MILAN's prompting decoder or its
  attention-guided masking. It lets drop and mask-token encoders be compared under one teacher.
"""
from mimkit.parts import RECIPES

from .base import Method, register_method


@register_method("eva")
class EVA(Method):
    recipe = RECIPES["eva"]


@register_method("maskdistill")
class MaskDistill(Method):
    recipe = RECIPES["maskdistill"]


@register_method("milan")
class MILAN(Method):
    recipe = RECIPES["milan"]
