"""cnn_lab: ablation studies on the classic CNNs, layer by layer (JAX/Flax)."""

__version__ = '0.1.0'
