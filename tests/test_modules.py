"""Every module of the installed package imports (benchmark and model scripts included, whose own tests are in the
full suite or which run by hand), so the fast lane touches each one: a renamed import or a syntax error anywhere
fails here first."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

PARTS = ("runtime", "export", "serve", "benchmarks", "models")  # installed beside the top-level diffrt module


def modules() -> list[str]:
    found = ["diffrt"]
    for part in PARTS:
        package = importlib.import_module(f"diffrt.{part}")
        found += [package.__name__, *(m.name for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}."))]
    return sorted(found)


MODULES = modules()


def test_the_package_has_its_parts():
    for part in ("runtime.backends.registry", "runtime.families.base", "runtime.schedulers.flow_match_euler",
                 "export.precision", "serve.app", "benchmarks.bench", "models.train_shapes"):
        assert f"diffrt.{part}" in MODULES, part


@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports(name):
    importlib.import_module(name)
