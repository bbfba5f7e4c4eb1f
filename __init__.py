"""dyninfer: dynamic inference for language models.

Measure how much of a model each token needs (probe), compress with a guarantee
(calibrate, prune, steer), and ship the result (export, bench).
"""

__version__ = "0.1.0"

from dyninfer.errors import DyninferError

__all__ = ["DyninferError", "__version__"]
