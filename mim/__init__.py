"""mimkit: masked image modeling on one ViT engine."""
__version__ = "0.1.0"
