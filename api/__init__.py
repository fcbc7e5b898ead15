"""diffrt: a lean, torch-free runtime and export toolchain for Stable-Diffusion-class models.

    from diffrt import Pipeline
    result = Pipeline.from_package(None)("a red circle on a blue background", seed=0)   # None: the bundled model
    result.save("circle.png")
"""

from diffrt.runtime import __version__
from diffrt.runtime.errors import UserError
from diffrt.runtime.pipeline import Pipeline, Result

__all__ = ["Pipeline", "Result", "UserError", "__version__"]
