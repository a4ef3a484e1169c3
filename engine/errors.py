"""Typed errors of the BSSAN engine.

Every user-facing error carries one line that names the thing (file, line, tensor or value),
what was expected and what was got. Command-line entry points catch `BssanError`, print
its message on one line and exit with code 2; anything else is a bug and keeps its traceback.
"""


class BssanError(Exception):
    """Base class of every error a user can cause (bad input, missing asset, bad artifact)."""

    exit_code = 2


class InputError(BssanError, ValueError):
    """A file, line, array or value given by the user is not what was expected."""


class DataError(InputError):
    """A dataset file (captions, split list, Karpathy JSON) is missing or malformed."""


class StoreError(InputError):
    """A feature store is missing, incomplete, or holds arrays of the wrong shape/dtype/values."""


class ImageError(InputError):
    """An image file cannot be decoded or has an unusable size."""


class CaptionError(InputError):
    """One caption of a list cannot be encoded. `index`: its 0-based position in the list given, so a
    caller that knows where each caption came from re-raises naming the file and line; `reason`: the
    message without the position."""

    def __init__(self, reason: str, index: int | None = None):
        super().__init__(reason if index is None else f"caption {index} (0-based) of the list given: {reason}")
        self.reason, self.index = reason, index


class ClosedError(BssanError, RuntimeError):
    """A Scorer (or its runner) was used after close()."""


class ArtifactError(BssanError):
    """A model artifact directory is missing files, has wrong hashes, or a newer format version."""


class BackendUnavailableError(BssanError, RuntimeError):
    """An explicitly requested backend (TensorRT, ONNX Runtime CUDA, torch) is not usable here."""


class AssetError(BssanError):
    """A pretrained asset (weights, word vectors) that must come from a package or local file is absent."""


class DivergenceError(BssanError):
    """Training diverged (a non-finite loss or weights): not the user's input; exit code 1, not 2."""

    exit_code = 1
