"""Tokenizers that turn images into discrete targets: dVAE (BEiT), VQ-KD (BEiT v2), k-means (ClusterMIM)."""
