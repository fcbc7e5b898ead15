"""diffrt's torch-free runtime: tokenizer, schedulers, engines and pipelines over a model package."""


def __getattr__(name: str) -> str:
    """__version__, looked up on first use (importlib.metadata costs the command's start-up 35 ms)."""
    if name != "__version__":
        raise AttributeError(f"module 'diffrt.runtime' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffrt")
    except PackageNotFoundError:  # running from a checkout without install
        return "0.0.0+local"
