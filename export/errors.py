"""Typed export failures: each names what is wrong and what to do, and maps to one exit code."""

from __future__ import annotations


class ExportError(Exception):
    """An export that cannot go on. `code` is a stable identifier for scripts."""

    code = "export_failed"
    exit_status = 1


class ModelNotFound(ExportError):
    code = "model_not_found"
    exit_status = 2


class CorruptModel(ExportError):
    code = "corrupt_model"
    exit_status = 3


class UnsupportedArchitecture(ExportError):
    code = "unsupported_architecture"
    exit_status = 4


class ParityFailure(ExportError):
    """The exported graph does not compute what the source model computes."""

    code = "parity_failed"
    exit_status = 5


class MissingDependency(ExportError):
    code = "missing_dependency"
    exit_status = 6
