"""BSSAN image-text matching engine: the product's runtime core.

Imports only numpy and onnxruntime; torch, TensorRT and CUDA libraries are imported lazily
by the backends that need them. See README.md for a runnable example.
"""

__version__ = "0.1.0"

from engine.errors import (  # noqa: F401  (re-exported: the public error types)
    ArtifactError,
    BackendUnavailableError,
    BssanError,
    InputError,
)
