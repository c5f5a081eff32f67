"""Evaluation of pretrained encoders: features, k-NN, linear probe, fine-tuning, token semantics."""
