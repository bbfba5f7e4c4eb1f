"""dyninfer: dynamic inference for language models.

Measure how much of a model each token needs (probe, profile), compress it with a guarantee
(calibrate, prune, steer) and ship the result (export, run, bench); `audit` does the measuring
in one go. The layers, from the bottom: `core` (models, data, artifacts, lenses, cost model),
`kernels`, `compressors` and `early_exit` (the methods), `runtime` (the dynamic model on torch and
on ONNX Runtime), `certification` (guarantees on what runs), `exporters` (the ONNX package),
`profilers` (measurement), `jobs` (one per command) and `cli`. Each
package imports only from the layers below it; `docs/architecture.md` draws the picture.
"""

from dyninfer.core.errors import DyninferError
from dyninfer.core.version import __version__

__all__ = ["DyninferError", "__version__"]
