"""diffrt: a lean, torch-free runtime and export toolchain for Stable-Diffusion-class models.

    from diffrt import Pipeline
    result = Pipeline.from_package(None)("a red circle on a blue background", seed=0)   # None: the bundled model
    result.save("circle.png")

Names are imported on first use, so `diffrt`'s command starts without loading numpy or onnxruntime first.
"""

import os as _os
import sys as _sys

if _os.path.basename(_sys.argv[0]) == "diffrt":  # the `diffrt` command is starting: Ctrl-C now leaves quietly
    from diffrt.runtime.interrupt import exit_quietly_on_ctrl_c

    exit_quietly_on_ctrl_c()

__all__ = ["ControlInput", "GenerationRequest", "LoraChoice", "Pipeline", "Result", "UserError", "__version__"]


def __getattr__(name: str):
    if name == "__version__":
        from diffrt import runtime

        return runtime.__version__
    if name in ("Pipeline", "Result"):
        from diffrt.runtime import pipeline

        return getattr(pipeline, name)
    if name == "GenerationRequest":
        from diffrt.runtime.request import GenerationRequest

        return GenerationRequest
    if name == "ControlInput":
        from diffrt.runtime.control import ControlInput

        return ControlInput
    if name == "LoraChoice":
        from diffrt.runtime.lora import LoraChoice

        return LoraChoice
    if name == "UserError":
        from diffrt.runtime.errors import UserError

        return UserError
    raise AttributeError(f"module 'diffrt' has no attribute {name!r}")
