"""Tokenizers that turn images into discrete targets, one module per kind; importing the package registers them
in TOKENIZERS (kmeans: ClusterMIM, dvae: BEiT, vqkd: BEiT v2, fsq: FSQ, lfq: MAGVIT-v2's LFQ, peco: PeCo,
lavit: LaVIT's dynamic tokenizer)."""
from .base import (TOKENIZERS, FitTraining, GradientTraining, Tokenizer, TrainableTokenizer, Training, codebook_stats,
                   count_stats, register_tokenizer, tokenizer_class)
from . import kmeans, dvae, vqkd, fsq, lfq, peco, lavit  # noqa: F401  (each registers its kind, in this order)

__all__ = ["TOKENIZERS", "FitTraining", "GradientTraining", "Tokenizer", "TrainableTokenizer", "Training",
           "codebook_stats", "count_stats", "register_tokenizer", "tokenizer_class"]
