"""Typed errors. The CLI maps each to one line (what is wrong, how to fix it) and exit code 2.

Raise these for anything the *user* can fix (bad path, bad recipe, corrupt file). Library bugs stay
ordinary exceptions so that ``--debug`` shows where they came from.
"""

from __future__ import annotations


class EdgetlError(Exception):
    """Base class: a problem with the user's input, reported as one line with a fix."""

    exit_code = 2

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.one_line()

    def one_line(self) -> str:
        text = self.message.rstrip(".")
        if self.fix:
            text += f"; {self.fix.rstrip('.')}"
        return text.replace("\n", " ") + "."


class DataError(EdgetlError):
    """The image folder is missing, empty, has too few classes or unreadable images."""


class ConfigError(EdgetlError):
    """A flag or recipe value is wrong (unknown key, bad type, unknown backbone/format...)."""


class WeightsError(EdgetlError):
    """Pretrained weights cannot be found or do not fit the architecture."""


class ModelFileError(EdgetlError):
    """A model file (.keras/.tflite/.onnx) is missing, truncated, garbage or not what was expected."""


class RunDirError(EdgetlError):
    """A run directory is missing, incomplete, or from an incompatible edgetl version."""


class BundleError(EdgetlError):
    """A verification bundle is incomplete, tampered with (checksum mismatch) or unsafe (paths outside it)."""


class ExportError(EdgetlError):
    """An export variant cannot be produced from this run."""


class ClusterError(EdgetlError):
    """A multi-worker training cluster (TF_CONFIG) failed: a worker died or could not be reached. Exit 3: not the
    user's input, but not a bug in edgetl either; the message says which worker and what to do."""

    exit_code = 3
