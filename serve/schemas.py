"""Request bodies of the APIs diffrt serves, validated by pydantic: OpenAI's images API and AUTOMATIC1111's txt2img."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 8  # images per request
MAX_PROMPT = 4000  # characters


def ignored(given: dict[str, Any], inert: dict[str, Any]) -> list[str]:
    """The fields a body sets that diffrt does not use, except at values that change nothing (inert: a field's
    harmless values, or a test of the value and the whole body)."""
    out = []
    for name, value in given.items():
        harmless = inert.get(name, ())
        if callable(harmless) and harmless(value, given) or not callable(harmless) and value in harmless:
            continue
        out.append(name)
    return sorted(out)


# OpenAI fields diffrt does not use, and their values that ask for nothing diffrt leaves undone
OPENAI_INERT = {"quality": ("auto", "standard", None), "background": ("auto", "opaque", None), "moderation": ("auto", "low", None),
                "user": lambda v, body: True, "safety_identifier": lambda v, body: True,
                "output_compression": (100, None), "style": (None,)}


class ControlUnit(BaseModel):
    """One unit of the A1111 ControlNet extension's API."""

    model_config = ConfigDict(extra="allow")

    enabled: bool = True
    image: Any = None  # base64, or {"image": base64, "mask": ...} in newer clients
    input_image: Any = None  # the older name of image
    mask: Any = None
    module: str = "none"
    model: str | None = None
    weight: float = Field(1.0, allow_inf_nan=False)
    guidance_start: float = Field(0.0, ge=0, le=1)
    guidance_end: float = Field(1.0, ge=0, le=1)
    control_mode: int | str = 0
    resize_mode: int | str = "Crop and Resize"
    threshold_a: float = -1
    threshold_b: float = -1
    guessmode: bool | None = None  # the oldest clients' control mode


class OpenAIControl(BaseModel):
    """An item of diffrt's `control` extension field on OpenAI bodies."""

    model_config = ConfigDict(extra="forbid")

    name: str
    image: str = Field(description="base64 or a data: URL")
    scale: float = Field(1.0, allow_inf_nan=False)
    start: float | None = Field(None, ge=0, le=1)
    end: float | None = Field(None, ge=0, le=1)
    module: str = "none"
    mode: str = "balanced"


class OpenAIImageRequest(BaseModel):
    """POST /v1/images/generations; negative_prompt .. seed are diffrt's extensions."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT)
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    size: str | None = Field(None, description="WIDTHxHEIGHT; default: the model's size")
    response_format: str | None = "b64_json"
    stream: bool = False
    partial_images: int = Field(0, ge=0, le=3, description="with stream: previews sent before each final image")
    output_format: Literal["png", "jpeg", "webp"] = "png"
    negative_prompt: str = Field("", max_length=MAX_PROMPT)
    steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    scheduler: str | None = None
    seed: int | None = Field(None, ge=-1, le=2**63 - 1 - MAX_N)
    rng: Literal["numpy", "torch-cpu", "torch-cuda"] = "numpy"
    clip_skip: int = Field(1, ge=1, le=48)
    true_cfg_scale: float | None = Field(None, ge=0, le=100, description="FLUX: true CFG with negative_prompt (diffusers')")
    prompt_syntax: Literal["a1111", "plain"] | None = Field(None, description="a1111: weights, BREAK, long prompts; "
                                                            "plain: as diffusers reads prompts; default: the model's own "
                                                            "(a1111 for SD 1.x/2.x/SDXL, plain for SD3 and FLUX)")
    loras: dict[str, float] = Field(default_factory=dict, description="LoRA name -> scale, from the server's --lora-dir")
    original_size: tuple[int, int] | None = Field(None, description="SDXL: (height, width) the image is conditioned on")
    crops_coords_top_left: tuple[int, int] = Field((0, 0), description="SDXL: (top, left) crop conditioning")
    control: list[OpenAIControl] = Field(default_factory=list, max_length=8, description="ControlNets of the model, "
                                         "their control images and scales")
    cache: str | None = Field(None, description="step caching: deepcache[:N] (a full UNet step every N), fbcache[:T] (SD3/FLUX: "
                              "the other blocks skipped while the first block's residual changes less than T) or none (exact); "
                              "default: the server's --cache")

    def ignored(self) -> list[str]:
        return ignored(self.model_extra or {}, OPENAI_INERT)

    @field_validator("cache")
    @classmethod
    def check_cache(cls, value: str | None) -> str | None:
        from diffrt.runtime.errors import UserError
        from diffrt.runtime.stepcache import parse_cache

        try:
            parse_cache(value)
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("size")
    @classmethod
    def parse_size(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return None
        w, sep, h = value.lower().partition("x")
        if not (sep and w.isdigit() and h.isdigit()):
            raise ValueError("size must be WIDTHxHEIGHT, e.g. 512x512")
        return value

    def dimensions(self) -> tuple[int | None, int | None]:
        if self.size is None:
            return None, None
        w, _, h = self.size.lower().partition("x")
        return int(w), int(h)


RANDN_SOURCES = {"CPU": "torch-cpu", "GPU": "torch-cuda", "NV": "torch-cuda", "numpy": "numpy"}  # NV: A1111's CPU
# copy of the GPU's Philox draws; numpy is diffrt's own source


class A1111Overrides(BaseModel):
    """The A1111 settings diffrt honours, as a txt2img request overrides them or /sdapi/v1/options sets them (others
    are listed as ignored)."""

    model_config = ConfigDict(extra="allow")

    randn_source: Literal["GPU", "CPU", "NV", "numpy"] | None = None
    CLIP_stop_at_last_layers: int | None = Field(None, ge=1, le=48)
    sd_model_checkpoint: str | None = None
    samples_format: Literal["png", "jpg", "jpeg", "webp"] | None = None


def no_full_res(value: Any, body: dict) -> bool:
    """Inpainting's full-resolution padding, inert while inpaint_full_res is off."""
    return not body.get("inpaint_full_res")


def no_hires(value: Any, body: dict) -> bool:
    """A hires-fix field, inert while enable_hr is off."""
    return not body.get("enable_hr")


# A1111 txt2img fields diffrt does not use, and their values that change nothing (what A1111 clients send by default)
A1111_INERT = {"enable_hr": (False, None), "denoising_strength": no_hires, "firstphase_width": no_hires,
               "firstphase_height": no_hires, "hr_scale": no_hires, "hr_upscaler": no_hires, "hr_second_pass_steps": no_hires,
               "hr_resize_x": no_hires, "hr_resize_y": no_hires, "hr_checkpoint_name": no_hires, "hr_sampler_name": no_hires,
               "hr_scheduler": no_hires, "hr_prompt": no_hires, "hr_negative_prompt": no_hires,
               "restore_faces": (False, None), "tiling": (False, None), "styles": ([], None),
               "subseed": lambda v, body: not body.get("subseed_strength"), "subseed_strength": (0, 0.0, None),
               "seed_resize_from_h": (0, -1, None), "seed_resize_from_w": (0, -1, None), "eta": (None, 1, 1.0),
               "s_churn": (0, 0.0, None), "s_tmax": (0, 0.0, None), "s_tmin": (0, 0.0, None), "s_noise": (1, 1.0, None),
               "do_not_save_samples": lambda v, body: True, "do_not_save_grid": lambda v, body: True,
               "save_images": (False, None), "send_images": (True, None), "override_settings_restore_afterwards": lambda v, body: True,
               "script_name": (None, ""), "script_args": ([], None), "alwayson_scripts": lambda v, body: True, "comments": ({}, None),
               "refiner_checkpoint": (None, ""), "refiner_switch_at": lambda v, body: not body.get("refiner_checkpoint"),
               "disable_extra_networks": (False, None), "infotext": (None, ""), "force_task_id": lambda v, body: True,
               "sampler_index": lambda v, body: True, "image_cfg_scale": lambda v, body: True,
               "include_init_images": lambda v, body: True, "initial_noise_multiplier": (1, 1.0, None),
               "inpaint_full_res_padding": no_full_res}


class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img, AUTOMATIC1111's fields that diffrt uses (others that A1111 clients send are listed in
    the answer's info as ignored, unless they are at values that change nothing)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field("", max_length=MAX_PROMPT)
    negative_prompt: str = Field("", max_length=MAX_PROMPT)
    seed: int = Field(-1, ge=-1, le=2**63 - 1 - MAX_N * MAX_N)
    sampler_name: str | None = None
    scheduler: str | None = None
    steps: int | None = Field(None, ge=1, le=1000)
    cfg_scale: float | None = Field(None, ge=0, le=100)
    width: int | None = Field(None, ge=8, le=4096)
    height: int | None = Field(None, ge=8, le=4096)
    batch_size: int = Field(1, ge=1, le=MAX_N)
    n_iter: int = Field(1, ge=1, le=MAX_N)
    override_settings: A1111Overrides = Field(default_factory=lambda: A1111Overrides())
    loras: dict[str, float] = Field(default_factory=dict, description="diffrt's: LoRA name -> scale (or <lora:NAME:SCALE>)")

    def sampler(self) -> str | None:
        """sampler_name, or the older sampler_index that some clients still send in its place."""
        index = (self.model_extra or {}).get("sampler_index")
        return self.sampler_name or (index if isinstance(index, str) and index else None)

    def ignored(self) -> list[str]:
        from .controlnet import unit_ignored

        overrides = sorted(f"override_settings.{k}" for k in self.override_settings.model_extra or {})
        return ignored(self.model_extra or {}, A1111_INERT) + overrides + unit_ignored(self.scripts())

    def scripts(self) -> Any:
        """alwayson_scripts as sent (ControlNet's units are read from it)."""
        return (self.model_extra or {}).get("alwayson_scripts")


class Img2ImgRequest(Txt2ImgRequest):
    """POST /sdapi/v1/img2img: txt2img's fields and the image (one), an optional mask (white repaints), how much of
    the schedule repaints (denoising_strength) and the mask's blur; the output is width x height (the image resized
    to it, A1111's resize_mode 0) or the image's own size."""

    init_images: list[str] = Field(min_length=1, max_length=1, description="one image, base64 or a data: URL")
    mask: str | None = None
    denoising_strength: float = Field(0.75, gt=0, le=1)
    mask_blur: float = Field(4, ge=0, le=64)
    inpainting_fill: int = Field(1, ge=0, le=3, description="1 (original) is built; 0, 2 and 3 are refused with a mask")
    inpaint_full_res: bool = False
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    resize_mode: int = Field(0, ge=0, le=3)


class OpenAIEditRequest(OpenAIImageRequest):
    """POST /v1/images/edits, the form fields beside its image and mask files; strength and mask_blur are diffrt's."""

    strength: float | None = Field(None, gt=0, le=1, description="how much of the schedule repaints (default 1 with a "
                                   "mask: the masked area anew; 0.8 without: the whole image)")
    mask_blur: float = Field(0, ge=0, le=64)
