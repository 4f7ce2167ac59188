"""Examples of pgnas_jax used as a library (docs/library.md)."""
