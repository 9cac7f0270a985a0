"""moe-sparsify: slim Mixture-of-Experts language models after training."""

__version__ = "0.1.0"
