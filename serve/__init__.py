"""diffrt's HTTP service (`diffrt serve`, extra `diffrt[serve]`): OpenAI and AUTOMATIC1111 APIs over a batched
pipeline."""

from .app import ServeOptions, create_app

__all__ = ["ServeOptions", "create_app"]
