"""Weighted k-NN classification (DINO protocol): cosine similarity of L2-normalized features, the top-k
neighbours vote with weight exp(sim / T)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, k: int = 20,
                T: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> torch.Tensor:
    """Class scores [n_test, C] summed over the k nearest training samples."""
    num_classes = num_classes or int(train_labels.max()) + 1
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    k = min(k, len(train))
    scores = []
    for start in range(0, len(test), chunk):
        sim = test[start:start + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(top_sim), num_classes)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / T).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, ks=(10, 20, 100, 200), T: float = 0.07,
                 num_classes: int | None = None) -> dict[str, float]:
    """Top-1 accuracy (%) for each k."""
    out = {}
    for k in ks:
        pred = knn_predict(train_feats, train_labels, test_feats, k, T, num_classes).argmax(1)
        out[f"top1_k{k}"] = 100.0 * (pred == test_labels).float().mean().item()
    return out
