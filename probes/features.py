"""Frozen-encoder features for probes: CLS after the final norm, mean-pooled patches or a block's output of an
encoder (mimkit.encoders loads it from any pretraining checkpoint), cached on disk."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from mimkit import checkpoint
from mimkit.data import Transformed, build_dataset, eval_transform, make_loader
from mimkit.dist import autocast
from mimkit.loop import quiet_iter
from mimkit.vit import ViT


class RawPixels(nn.Module):
    """The raw-pixel baseline as an encoder: one token, the flattened normalized image [B, C*H*W], which is both
    its CLS and its only patch token, so every pool and probe reads it as it reads a ViT's features."""

    def forward(self, imgs: torch.Tensor, return_layers: tuple = ()) -> torch.Tensor:
        """imgs [B, C, H, W] -> tokens [B, 2, C*H*W]."""
        if return_layers:
            raise ValueError("raw pixels have no blocks: features.layer must be 0")
        return imgs.flatten(1).unsqueeze(1).expand(-1, 2, -1)


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """tokens [B, 1 + N, D] (CLS first) -> [B, D]."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")


def encode(encoder: ViT, imgs: torch.Tensor, pool: str = "cls", layer: int | None = None) -> torch.Tensor:
    """Features [B, D] of a batch. `layer` (0-based block index) probes that block's raw output instead of the
    final normed tokens."""
    with autocast(imgs.device):
        tokens = encoder(imgs) if layer is None else encoder(imgs, return_layers=(layer,))[1][0]
    return pool_tokens(tokens, pool).float()


@torch.no_grad()
def extract(encoder, loader: DataLoader, device: torch.device, pool: str = "cls",
            layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [n, D] and labels [n] of every batch of `loader` (eval mode, bf16 autocast on CUDA)."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    # without the loader's draw from the global generator: a run reads the same draws after its features whether
    # they came from the cache or from here
    for imgs, y in quiet_iter(loader):
        feats.append(encode(encoder, imgs.to(device, non_blocking=True), pool, layer).cpu())
        labels.append(torch.as_tensor(y))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def checkpoint_id(path: str | Path) -> str:
    """Cheap identity of a checkpoint file: resolved path, size and modification time (hashing a ViT-L
    checkpoint would cost seconds at every probe)."""
    st = os.stat(path)
    return hashlib.sha1(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def cache_key(ckpt_id: str, data_cfg, split: str, pool: str, layer: int, limit: int) -> dict:
    """Everything the features depend on: the weights, the images (dataset, root, subset, eval transform at
    img_size) and the representation."""
    root = str(Path(data_cfg.root).resolve()) if data_cfg.root else ""
    return {"checkpoint": ckpt_id, "dataset": data_cfg.name, "root": root, "split": split, "limit": limit,
            "img_size": data_cfg.img_size, "synthetic_size": data_cfg.synthetic_size, "pool": pool, "layer": layer,
            **({"subset": "spread"} if limit else {})}  # caches of the old first-N subsets are misses


def cache_file(cache_dir: str | Path, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    layer = f"layer{key['layer']}" if key["layer"] else "final"
    return Path(cache_dir) / f"{key['dataset']}_{key['split']}_{key['pool']}_{layer}_{key['img_size']}px_{digest}.pt"


def split_features(encoder: ViT, data_cfg, split: str, device: torch.device, pool: str = "cls", layer: int = 0,
                   limit: int = 0, batch_size: int = 256, cache_dir: str | Path | None = None,
                   ckpt_id: str = "", log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of one split under the eval transform; `layer` 0 = final normed tokens, k = block k
    (1-based). With `cache_dir` and `ckpt_id`, read from / write to the feature cache."""
    path = None
    if cache_dir and ckpt_id:
        key = cache_key(ckpt_id, data_cfg, split, pool, layer, limit)
        path = cache_file(cache_dir, key)
        if path.is_file():
            try:
                hit = torch.load(path, map_location="cpu", weights_only=True)
                if hit.get("key") == key:
                    log(f"features ({split}): cache hit {path}")
                    return hit["features"], hit["labels"]
            except Exception as e:  # a damaged cache file is only a miss
                log(f"features ({split}): ignoring unreadable cache file {path} ({type(e).__name__})")
    dataset = Transformed(build_dataset(data_cfg, split, limit), eval_transform(data_cfg))
    loader = make_loader(dataset, batch_size, data_cfg, pin_memory=device.type == "cuda")
    feats, labels = extract(encoder, loader, device, pool, layer - 1 if layer else None)
    if path is not None:
        checkpoint.save({"key": key, "features": feats, "labels": labels}, path)
        log(f"features ({split}): {tuple(feats.shape)} cached in {path}")
    return feats, labels
