"""The embedded default: SupNet-M family, small, on Fashion-MNIST (offline, Debian package
``dataset-fashion-mnist``), sized for a 2-core CPU.

    python -m pgnas_jax.main --config=configs/default.py --workdir=/tmp/pgnas_default

Same as running without --config. Expected on a 2-core CPU: about 8 minutes, a winner with
about 30% fewer parameters than the super-network at test accuracy about 0.89, no fine-tuning
(see README.md for the measured run).
"""

from pgnas_jax.config import get_config  # noqa: F401  (the file's entry point)
