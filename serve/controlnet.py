"""ControlNet over HTTP: the A1111 ControlNet extension's API (units under alwayson_scripts.controlnet.args, the model
and module lists, detect) and the `control` extension field of OpenAI's bodies, both made into ControlInputs."""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI

from .app import ApiError, Service, encode, image_from, validated
from .schemas import ControlUnit, OpenAIControl

# A1111's control modes (numbers or labels) -> diffrt's
CONTROL_MODES = {0: "balanced", 1: "prompt", 2: "control", "Balanced": "balanced",
                 "My prompt is more important": "prompt", "ControlNet is more important": "control"}
# the extension's resize modes (numbers or labels) -> diffrt's
RESIZE_MODES = {0: "just", 1: "crop", 2: "fill", "Just Resize": "just", "Crop and Resize": "crop",
                "Resize and Fill": "fill", "Inner Fit (Scale to Fit)": "crop", "Outer Fit (Shrink to Fit)": "fill"}
MODULES = {"none": "none", "None": "none", "canny": "canny"}  # the extension's module names diffrt runs
INERT_UNIT = ("low_vram", "lowvram", "processor_res", "pixel_perfect", "hr_option", "input_mode", "batch_images",
              "output_dir", "save_detected_map", "loopback", "is_ui", "effective_region_mask", "inpaint_crop_input_image")


def served(service: Service) -> dict[str, str]:
    """The served model's ControlNets and their short hashes (a Ray ingress knows them from a replica's description)."""
    return service.describe().get("controlnets") or {}


def check_name(service: Service, model: str | None, field: str) -> str:
    """The package's ControlNet a unit names (with or without the list's " [hash]"), a 400 naming the field if none."""
    have = served(service)
    name = (model or "").split(" [")[0]
    if name not in have:
        raise ApiError(400, f"{field}: {model!r} is not a ControlNet of this model; GET /controlnet/model_list lists "
                            f"{', '.join(sorted(have)) or 'none'}", field)
    return name


def a1111_controls(service: Service, scripts: Any, init_image: Any = None) -> tuple:
    """The ControlInputs of a txt2img / img2img body's alwayson_scripts.controlnet.args (disabled units left out);
    init_image: img2img's image as sent, read only for a unit that has no image of its own."""
    from diffrt.runtime.control import CANNY, ControlInput

    key = controlnet_key(scripts)
    where = f"alwayson_scripts.{key}.args"
    args = scripts[key].get("args", []) if key and isinstance(scripts[key], dict) else []
    if not isinstance(args, list):
        raise ApiError(400, f"{where} must be a list of ControlNet units", where)
    controls = []
    for k, raw in enumerate(args):
        field = f"{where}[{k}]"
        unit = validated(ControlUnit, raw if isinstance(raw, dict) else {"bad": raw})
        if not unit.enabled:
            continue
        name = check_name(service, unit.model, f"{field}.model")
        given = unit.image if unit.image not in (None, "") else unit.input_image
        if isinstance(given, dict):
            given, mask = given.get("image"), given.get("mask")
            unit.mask = unit.mask or mask
        if unit.mask not in (None, ""):
            raise ApiError(400, f"{field}.mask: a ControlNet unit's mask (inpainting ControlNets) is not built; leave it out",
                           f"{field}.mask")
        image = image_from(given, f"{field}.image") if given not in (None, "") else \
            image_from(init_image, "init_images") if init_image is not None else None
        if image is None:
            raise ApiError(400, f"{field}.image: the unit has no control image; send one (base64)", f"{field}.image")
        module, mode = MODULES.get(unit.module), CONTROL_MODES.get(unit.control_mode)
        if module is None:
            raise ApiError(400, f"{field}.module {unit.module!r} is not built; GET /controlnet/module_list lists "
                                f"{', '.join(sorted(set(MODULES.values())))}", f"{field}.module")
        mode = "control" if unit.guessmode else mode
        if mode is None:
            raise ApiError(400, f"{field}.control_mode must be 0, 1, 2 or Balanced, My prompt is more important, ControlNet "
                                "is more important", f"{field}.control_mode")
        resize = RESIZE_MODES.get(unit.resize_mode)
        if resize is None:
            raise ApiError(400, f"{field}.resize_mode must be Just Resize, Crop and Resize or Resize and Fill (0, 1, 2)",
                           f"{field}.resize_mode")
        if unit.guidance_start >= unit.guidance_end:
            raise ApiError(400, f"{field}: guidance_start must be below guidance_end", f"{field}.guidance_start")
        thresholds = (int(unit.threshold_a) if unit.threshold_a >= 0 else CANNY[0],
                      int(unit.threshold_b) if unit.threshold_b >= 0 else CANNY[1])
        controls.append(ControlInput(name, image, unit.weight, unit.guidance_start, unit.guidance_end, module, mode,
                                     thresholds, resize))
    return tuple(controls)


def unit_ignored(scripts: Any) -> list[str]:
    """alwayson_scripts other than controlnet, and the unit fields diffrt does not use, for the answer's ignored list."""
    if not isinstance(scripts, dict):
        return []
    key = controlnet_key(scripts)
    out = [f"alwayson_scripts.{k}" for k in scripts if k != key]
    for k, raw in enumerate((scripts[key].get("args") if key and isinstance(scripts[key], dict) else None) or []):
        extra = set(raw if isinstance(raw, dict) else {}) - set(ControlUnit.model_fields) - set(INERT_UNIT)
        out += [f"alwayson_scripts.{key}.args[{k}].{f}" for f in sorted(extra)]
    return out


def controlnet_key(scripts: Any) -> str | None:
    """The key of alwayson_scripts holding ControlNet's units: A1111 matches script titles in any case (webuiapi
    sends "ControlNet")."""
    if not isinstance(scripts, dict):
        return None
    return next((k for k in scripts if isinstance(k, str) and k.lower() == "controlnet"), None)


def openai_controls(service: Service, given: list[OpenAIControl]) -> tuple:
    """The ControlInputs of an OpenAI body's `control` field."""
    from diffrt.runtime.control import ControlInput

    controls = []
    for k, c in enumerate(given):
        name = check_name(service, c.name, f"control[{k}].name")
        controls.append(ControlInput(name, image_from(c.image, f"control[{k}].image"), c.scale, c.start, c.end,
                                     c.module, c.mode))
    return tuple(controls)


def add_controlnet_routes(app: FastAPI, service: Service) -> None:
    """The ControlNet extension's lists and detect, as A1111 front-ends call them."""
    from diffrt.runtime.control import CANNY, canny

    @app.get("/controlnet/version")
    async def version() -> dict:
        return {"version": 2}

    @app.get("/controlnet/model_list")
    async def model_list() -> dict:
        return {"model_list": [f"{n} [{h}]" if h else n for n, h in sorted(served(service).items())]}

    @app.get("/controlnet/module_list")
    async def module_list(alias_names: bool = False) -> dict:
        canny_detail = {"model_free": False, "sliders": [
            {"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048},
            {"name": "Canny Low Threshold", "value": CANNY[0], "min": 1, "max": 255},
            {"name": "Canny High Threshold", "value": CANNY[1], "min": 1, "max": 255}]}
        return {"module_list": ["none", "canny"],
                "module_detail": {"none": {"model_free": False, "sliders": []}, "canny": canny_detail}}

    @app.post("/controlnet/detect")
    async def detect(body: dict) -> dict:
        module = body.get("controlnet_module", "none")
        if module not in MODULES:
            raise ApiError(400, f"controlnet_module {module!r} is not built; send canny or none", "controlnet_module")
        images = body.get("controlnet_input_images") or body.get("controlnet_images") or []  # the extension's, webuiapi's
        low, high = (body.get(f"controlnet_threshold_{x}", d) for x, d in zip("ab", CANNY))
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (low, high)):
            raise ApiError(400, "controlnet_threshold_a and _b must be numbers", "controlnet_threshold_a")
        low, high = (int(v) if v >= 0 else d for v, d in zip((low, high), CANNY))
        out = []
        if not isinstance(images, list) or not images:
            raise ApiError(400, "controlnet_input_images must be a list of images (base64)", "controlnet_input_images")
        for k, data in enumerate(images):
            image = image_from(data, f"controlnet_input_images[{k}]")
            out.append(encode(canny(image, int(low), int(high)) if MODULES[module] == "canny" else image, None, "png"))
        return {"images": out, "info": "Success"}
