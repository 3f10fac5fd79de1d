"""sparse_jax: activation-sparse Transformer MLPs in JAX/Flax."""

__version__ = "0.1.0"
