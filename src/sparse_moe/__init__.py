"""sparse_moe: the Sparsely-Gated Mixture-of-Experts as a DeepSpeed training stack."""

__version__ = "0.1.0"
