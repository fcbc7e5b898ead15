"""diffrt: a lean, torch-free runtime and export toolchain for Stable-Diffusion-class models.

    from diffrt import Pipeline
    result = Pipeline.from_package(None)("a red circle on a blue background", seed=0)   # None: the bundled model
    result.save("circle.png")

Names are imported on first use, so `diffrt`'s command starts without loading numpy or onnxruntime first.
"""

from diffrt.runtime import __version__

__all__ = ["Pipeline", "Result", "UserError", "__version__"]


def __getattr__(name: str):
    if name in ("Pipeline", "Result"):
        from diffrt.runtime import pipeline

        return getattr(pipeline, name)
    if name == "UserError":
        from diffrt.runtime.errors import UserError

        return UserError
    raise AttributeError(f"module 'diffrt' has no attribute {name!r}")
