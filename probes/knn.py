"""Weighted k-NN classification (DINO protocol): cosine similarity of L2-normalized features, the top-k
neighbours vote with weight exp(sim / T). The search runs on FAISS (a GPU index when faiss has GPUs) or torch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mimkit.config import ConfigError
from mimkit.encoders import random_encoder

from .config import KNN_KS
from .context import ProbeRun
from .features import RawPixels, split_features



def _faiss():
    try:
        import faiss
        return faiss
    except ImportError:
        return None


def search(train: torch.Tensor, test: torch.Tensor, k: int, backend: str = "auto",
           chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Inner products and indices [n_test, k] of the k nearest rows of `train` (both already normalized)."""
    faiss = _faiss() if backend in ("auto", "faiss") else None
    if backend == "faiss" and faiss is None:
        raise ConfigError("knn.backend=faiss but faiss is not installed (pip install faiss-cpu); use knn.backend=torch")
    if faiss is not None:
        index = faiss.IndexFlatIP(train.shape[1])
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(train.float().cpu().contiguous().numpy())
        sims, idx = index.search(test.float().cpu().contiguous().numpy(), k)
        return torch.from_numpy(sims), torch.from_numpy(idx).long()
    sims, idx = [], []
    for start in range(0, len(test), chunk):
        s, i = (test[start:start + chunk] @ train.T).topk(k, dim=1)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims).cpu(), torch.cat(idx).cpu()


def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, ks=KNN_KS,
               T: float = 0.07, num_classes: int | None = None, backend: str = "auto") -> dict[int, torch.Tensor]:
    """Class scores [n_test, C] for each k: sum of exp(sim / T) over the k nearest training samples. One search
    at the largest k serves every k (neighbours come sorted by similarity)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    kmax = min(max(ks), len(train))
    sims, idx = search(train, test, kmax, backend)
    weights, labels = (sims / T).exp(), train_labels.cpu()[idx]
    out = {}
    for k in ks:
        k_ = min(k, kmax)
        votes = torch.zeros(len(test), num_classes)
        out[k] = votes.scatter_add_(1, labels[:, :k_], weights[:, :k_])
    return out


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, ks=KNN_KS, T: float = 0.07,
                 num_classes: int | None = None, backend: str = "auto") -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) for each k: {"top1_k20": ..., "top5_k20": ..., ...}."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    out = {}
    for k, scores in knn_scores(train_feats, train_labels, test_feats, ks, T, num_classes, backend).items():
        top = scores.topk(min(5, num_classes), dim=1).indices
        hits = top == test_labels.view(-1, 1)
        out[f"top1_k{k}"] = 100.0 * hits[:, 0].float().mean().item()
        out[f"top5_k{k}"] = 100.0 * hits.any(1).float().mean().item()
    return out


def knn_compare(encoders: dict, features, ks=KNN_KS, k: int = 20, T: float = 0.07, backend: str = "auto",
                log=print) -> dict:
    """k-NN accuracies of several encoders (e.g. pretrained and random init); `features(encoder, name, split)`
    returns (features, labels). With a "pretrained" and a "random_init" entry, also `gain_points` at k."""
    ks = tuple(sorted({*ks, k}))
    result = {}
    for name, enc in encoders.items():
        (xtr, ytr), (xte, yte) = (features(enc, name, split) for split in ("train", "test"))
        result[name] = knn_accuracy(xtr, ytr, xte, yte, ks, T, backend=backend)
        log(f"k-NN ({name}): " + ", ".join(f"k={k_} {result[name][f'top1_k{k_}']:.1f}%" for k_ in ks))
    if "pretrained" in result and "random_init" in result:
        result["gain_points"] = result["pretrained"][f"top1_k{k}"] - result["random_init"][f"top1_k{k}"]
    return result


def run_knn(run: ProbeRun) -> dict:
    """`mimkit probe knn`: the checkpoint's encoder (features through the cache) and the baselines asked for:
    a random-init encoder of the same shape (knn.random_init), the raw pixels (knn.pixels)."""
    cfg, kc = run.cfg, run.cfg.knn
    encoders = {"pretrained": run.encoder}
    if kc.random_init:
        encoders["random_init"] = random_encoder(run.pretrain_cfg.model, cfg.data.img_size,
                                                 run.pretrain_cfg.seed).to(run.device)
    if kc.pixels:
        encoders["pixels"] = RawPixels()
    result = knn_compare(encoders, lambda enc, name, split: run.features(split, None if name == "pretrained" else enc),
                         KNN_KS, kc.k, kc.temperature, kc.backend, run.log)
    for name, acc in result.items():
        if isinstance(acc, dict):
            for k in sorted({*KNN_KS, kc.k}):
                run.writer.add_scalar(f"knn_{name}/top1", acc[f"top1_k{k}"], k)
                run.writer.add_scalar(f"knn_{name}/top5", acc[f"top5_k{k}"], k)
    train, test = (run.features(split) for split in ("train", "test"))
    return {"top1": result["pretrained"][f"top1_k{kc.k}"], "top5": result["pretrained"][f"top5_k{kc.k}"],
            "k": kc.k, "temperature": kc.temperature, "n_train": len(train[1]), "n_test": len(test[1]), **result}


def closing_probe(model, cfg, device: torch.device, log=print) -> dict:
    """What `mimkit pretrain` reports at the end (probe.enabled): k-NN accuracy (this module's protocol) of the
    pretrained encoder and of a random-init encoder of the same shape, the init this pretraining started from;
    {"knn": {"pretrained": {top1_k10, ...}, "random_init": {...}, "gain_points"}} (nothing when disabled)."""
    if not cfg.probe.enabled:
        return {}
    encoders = {"pretrained": model.encoder,
                "random_init": random_encoder(cfg.model, cfg.data.img_size, cfg.seed).to(device)}
    limits = {"train": cfg.data.limit, "test": cfg.data.test_limit}
    features = lambda enc, name, split: split_features(enc, cfg.data, split, device, limit=limits[split],  # noqa: E731
                                                       log=log)
    return {"knn": knn_compare(encoders, features, KNN_KS, cfg.probe.knn_k, cfg.probe.knn_t, log=log)}
