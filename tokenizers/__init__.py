"""Tokenizers that turn images into discrete targets: dVAE (BEiT), VQ-KD (BEiT v2), k-means (ClusterMIM)."""
from .base import FrozenTokenizer, Tokenizer, codebook_stats, load_for_method, tokenizer_classes  # noqa: F401
