"""diffrt's torch-free runtime: tokenizer, schedulers, engines and pipelines over a model package."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("diffrt")
except PackageNotFoundError:  # running from a checkout without install
    __version__ = "0.0.0+local"
