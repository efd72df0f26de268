"""Benchmarks: cnn_lab's Flax models against PyTorch twins of them."""
