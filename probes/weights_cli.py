"""`mimkit convert IN OUT` (an official checkpoint -> a mimkit one, or timm weights) and `mimkit export --format
timm|safetensors|hf CKPT OUT` (a mimkit encoder or tokenizer -> the formats the ecosystem reads). The parsers
import nothing; the commands import torch when they run."""
from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("timm", "safetensors", "hf")
EXPORT_EPILOG = """formats:
  timm         a plain torch state dict of timm's VisionTransformer (load_state_dict; the Python line is printed)
  safetensors  the same tensors as safetensors, timm.create_model's kwargs and mean/std in its metadata
               (mimkit probe --checkpoint timm:<arch> --weights FILE reads them); tokenizers too
  hf           a folder with model.safetensors and config.json (timm's pretrained config: architecture,
               img_size, patch_size, mean/std, num_classes=0) for timm.create_model("local-dir:OUT",
               pretrained=True) or
               huggingface_hub.upload_folder
examples:
  mimkit export --format hf runs/mae_digits/checkpoints/last.pt exported/mae_digits
  mimkit export --format safetensors runs/tokenizer_vqkd_digits/tokenizer.pt vqkd.safetensors"""


def cmd_convert(args) -> int:
    from mimkit.convert import convert
    print(convert(args.src, args.out))
    return 0


def export_encoder(src: str, fmt: str, out: str) -> str:
    """A mimkit pretraining checkpoint's encoder written as `fmt`; returns the line to print."""
    import torch

    from mimkit import checkpoint
    from mimkit.weights import write_safetensors
    from mimkit.data import dataset_stats
    from mimkit.encoders import load_encoder

    from .export import export_state_dict, python_line, timm_arch_args, timm_recipe, write_hf
    encoder, spec, _ = load_encoder(src)
    mean, std = dataset_stats(spec.data.name)
    if fmt == "timm":
        state = export_state_dict(encoder)  # a bare state dict: nothing but timm's keys
        checkpoint.atomic_write(out, lambda f: torch.save(state, f))
        return f"wrote {out}; load it with timm:\n{timm_recipe(encoder, str(Path(out)))}"
    if fmt == "hf":
        arch = write_hf(encoder, mean, std, out)
        return (f"wrote {out}/model.safetensors and config.json ({arch}); load it with "
                f"timm.create_model('local-dir:{out}', pretrained=True) or mimkit probe --checkpoint timm:{arch} --weights {out}")
    arch, args = timm_arch_args(encoder)
    cfg = {"mean": list(mean), "std": list(std), "input_size": [3, encoder.img_size, encoder.img_size]}
    write_safetensors(export_state_dict(encoder), out, {"architecture": arch, "model_args": args,
                                                        "pretrained_cfg": cfg})
    return f"wrote {out}; load it with:\n{python_line(arch, args, str(out))}"


def cmd_export(args) -> int:
    from mimkit.config import ConfigError
    from mimkit.weights import export_tokenizer, read_tokenizer
    src, out = args.src or args.checkpoint, args.out_path or args.out
    if not src or not out:
        raise ConfigError("export needs CKPT and OUT: mimkit export --format timm|safetensors|hf CKPT OUT")
    tokenizer = read_tokenizer(src)
    if tokenizer is not None:
        if args.format != "safetensors":
            raise ConfigError(f"--format {args.format} is for encoders; a tokenizer exports with --format "
                              f"safetensors")
        print(export_tokenizer(tokenizer, out))
        return 0
    print(export_encoder(src, args.format, out))
    return 0


def add_commands(sub) -> None:
    c = sub.add_parser("convert", help="an official checkpoint (MAE, BEiT, BEiT v2, SimMIM, I-JEPA) -> a mimkit "
                                       "checkpoint (MAE) or timm weights")
    c.add_argument("src", metavar="IN", help="the official checkpoint file")
    c.add_argument("out", metavar="OUT", help="MAE: a mimkit .pt checkpoint; the others: a .safetensors file")
    c.set_defaults(func=cmd_convert)
    e = sub.add_parser("export", help="write an encoder (or tokenizer) as timm weights, safetensors or an hf folder",
                       epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--format", default="timm", choices=FORMATS, help="timm (default), safetensors or hf")
    e.add_argument("src", nargs="?", default="", metavar="CKPT", help="a mimkit pretraining checkpoint or tokenizer")
    e.add_argument("out_path", nargs="?", default="", metavar="OUT", help="output file (hf: a folder)")
    e.add_argument("--checkpoint", default="", metavar="CKPT", help="the same as CKPT")
    e.add_argument("--out", default="", metavar="FILE", help="the same as OUT")
    e.set_defaults(func=cmd_export)
