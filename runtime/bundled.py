"""Where the bundled default model (models/shapes-tiny) lives, in a checkout or after pip install."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

BUNDLED_NAME = "shapes-tiny"


def bundled_model() -> Path:
    """The bundled package's folder, found without importing diffrt.models' code."""
    from importlib.util import find_spec

    spec = find_spec("diffrt.models")
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = Path(base) / BUNDLED_NAME
        if (path / "diffrt.json").is_file():
            return path
    raise UserError(f"the bundled model {BUNDLED_NAME} is not installed with this diffrt; "
                    "pass --model PACKAGE_DIR (a folder made by `diffrt export`)")
