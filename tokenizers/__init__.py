"""Tokenizers that turn images into discrete targets: dVAE (BEiT), VQ-KD (BEiT v2), k-means (ClusterMIM)."""
from .base import TOKENIZERS, FrozenTokenizer, Tokenizer, codebook_stats, load_for_method  # noqa: F401
from . import dvae, kmeans, vqkd  # noqa: F401,E402  (register their kinds)
