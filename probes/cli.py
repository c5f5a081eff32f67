"""`mimkit probe linear|knn|finetune --checkpoint CKPT [--config FILE] [key=value ...]` (`mimkit export` and
`mimkit convert`: mimkit.probes.weights_cli)."""
from __future__ import annotations

import argparse

EPILOG = """defaults: the checkpoint's data settings, then the protocol (MAE linear probe / DINO k-NN / MAE fine-tune),
then CPU presets for digits, synthetic and cifar10, then --config files, then key=value overrides.
keys: output_dir, epochs, batch_size, accum_iter, device, seed, overwrite, resume (auto|none),
data.* (data.test_limit: test images), features.pool (cls|mean), features.layer (0 = final, k = block k),
features.cache, features.cache_dir, optim.blr, optim.weight_decay, optim.warmup_epochs, optim.min_lr,
linear.mode (augmented|cached), knn.k, knn.temperature, knn.backend, knn.random_init, finetune.layer_decay,
finetune.drop_path, finetune.mixup, finetune.cutmix, finetune.smoothing, finetune.auto_augment, finetune.reprob
examples:
  mimkit probe knn --checkpoint runs/mae_digits/checkpoints/last.pt
  mimkit probe linear --checkpoint runs/mae_digits/checkpoints/last.pt features.pool=mean
  mimkit probe finetune --checkpoint CKPT --config configs/probe/finetune_cifar10.yaml
  mimkit probe knn --checkpoint timm:vit_base_patch16_224.mae --weights mae_pretrain_vit_base.pth data.name=cifar10"""


def cmd_probe(args) -> int:
    from .config import probe_config
    probe_config(args.protocol, args.config, args.overrides)  # a mistake stops here, before torch loads

    from .run import build_probe_config, run_probe
    weights = [f"weights={args.weights}"] if args.weights else []
    cfg, ckpt = build_probe_config(args.protocol, args.checkpoint, args.config, [*args.overrides, *weights])
    m = run_probe(cfg, ckpt)
    key = f"top1_k{cfg.knn.k}" if cfg.protocol == "knn" else "top1"
    base = [f"{name.replace('_', ' ')} {m[name][key]:.1f}%" for name in ("random_init", "pixels") if name in m]
    extra = f" ({', '.join(base)})" if base else ""
    print(f"{cfg.protocol} probe: top-1 {m['top1']:.2f}%{extra} top-5 {m['top5']:.2f}% "
          f"-> {cfg.output_dir}/metrics.json")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("probe", help="evaluate a pretrained encoder: linear probe, k-NN or fine-tune",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    protocols = p.add_subparsers(dest="protocol", required=True, parser_class=type(p))
    for name, text in (("linear", "linear probe (MAE protocol; linear.mode=cached: the fast variant)"),
                       ("knn", "weighted k-NN (DINO protocol)"), ("finetune", "end-to-end fine-tuning (MAE protocol)")):
        q = protocols.add_parser(name, help=text, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        q.add_argument("--checkpoint", default="", metavar="CKPT",
                       help="a mimkit pretraining checkpoint (any method), an official MAE one, or timm:<model> / "
                            "openclip:<model> with --weights")
        q.add_argument("--weights", default="", metavar="FILE",
                       help="timm:/openclip: models: a local weights file (official BEiT/SimMIM/I-JEPA converted)")
        q.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                       help=f"YAML probe config(s), e.g. configs/probe/{name}_cifar10.yaml")
        q.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. features.pool=mean")
        q.set_defaults(func=cmd_probe)
