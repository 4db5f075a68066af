"""treelora: continual training of layer-wise LoRA adapters guided by a gradient-similarity tree."""

__version__ = "0.1.0"
