"""Pretrain a ViT with a masked image modeling method: `python run_pretrain.py [--config FILE] [key=value ...]`.

With no arguments: MAE on scikit-learn's bundled digits, then a k-NN probe of the pretrained encoder vs a
random-init one. Same arguments as `mimkit pretrain`."""
import sys

from mimkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
