"""The optional packages each export step needs, checked before any work starts."""

from __future__ import annotations

import importlib.util

from nearvoice.export.errors import MissingDependency

OPTIMIZE = ("onnx", "matplotlib")
FROM_TRANSFORMERS = ("torch", "transformers", "onnx", "onnxscript")


def require(modules: tuple[str, ...], step: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependency(
            f"{step} needs {', '.join(missing)}: install the export extra, "
            "pip install 'nearvoice[export]' (torch==2.13.0 CPU)"
        )
