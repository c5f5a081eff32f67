"""`mimkit probe linear|knn|finetune --checkpoint CKPT [--config FILE] [key=value ...]` and
`mimkit export --checkpoint CKPT --out FILE`."""
from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """defaults: the checkpoint's data settings, then the protocol (MAE linear probe / DINO k-NN / MAE fine-tune),
then CPU presets for digits, synthetic and cifar10, then --config files, then key=value overrides.
keys: output_dir, epochs, batch_size, accum_iter, device, seed, overwrite, data.* (data.test_limit: test images), features.pool (cls|mean),
features.layer (0 = final, k = block k), features.cache, features.cache_dir, optim.blr, optim.weight_decay,
optim.warmup_epochs, optim.min_lr, linear.mode (augmented|cached), knn.k, knn.temperature, knn.backend,
knn.random_init, finetune.layer_decay, finetune.drop_path, finetune.mixup, finetune.cutmix, finetune.smoothing,
finetune.auto_augment, finetune.reprob
examples:
  mimkit probe knn --checkpoint runs/mae_digits/checkpoints/last.pt
  mimkit probe linear --checkpoint runs/mae_digits/checkpoints/last.pt features.pool=mean
  mimkit probe finetune --checkpoint CKPT --config configs/probe/finetune_cifar10.yaml"""


def cmd_probe(args) -> int:
    from .run import build_probe_config, run_probe
    cfg, ckpt = build_probe_config(args.protocol, args.checkpoint, args.config, args.overrides)
    m = run_probe(cfg, ckpt)
    extra = f" (random init {m['random_init'][f'top1_k{cfg.knn.k}']:.1f}%)" if "random_init" in m else ""
    print(f"{cfg.protocol} probe: top-1 {m['top1']:.2f}%{extra} top-5 {m['top5']:.2f}% "
          f"-> {cfg.output_dir}/metrics.json")
    return 0


def cmd_export(args) -> int:
    from mimkit.checkpoint import save

    from .export import export_state_dict, timm_recipe
    from mimkit.encoders import load_encoder
    encoder, _, _ = load_encoder(args.checkpoint)
    save(export_state_dict(encoder), args.out)
    print(f"wrote {args.out}; load it with timm:\n{timm_recipe(encoder, str(Path(args.out)))}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("probe", help="evaluate a pretrained encoder: linear probe, k-NN or fine-tune",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    protocols = p.add_subparsers(dest="protocol", required=True, parser_class=type(p))
    for name, text in (("linear", "linear probe (MAE protocol; linear.mode=cached: the fast variant)"),
                       ("knn", "weighted k-NN (DINO protocol)"), ("finetune", "end-to-end fine-tuning (MAE protocol)")):
        q = protocols.add_parser(name, help=text, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        q.add_argument("--checkpoint", default="", metavar="CKPT", help="a mimkit pretraining checkpoint (any method)")
        q.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                       help=f"YAML probe config(s), e.g. configs/probe/{name}_cifar10.yaml")
        q.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. features.pool=mean")
        q.set_defaults(func=cmd_probe)
    e = sub.add_parser("export", help="write an encoder's weights as a timm VisionTransformer state dict")
    e.add_argument("--checkpoint", required=True, metavar="CKPT", help="a mimkit pretraining checkpoint")
    e.add_argument("--out", required=True, metavar="FILE", help="output .pt file (a plain state dict)")
    e.set_defaults(func=cmd_export)
