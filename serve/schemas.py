"""Request bodies of the APIs diffrt serves, validated by pydantic: OpenAI's images API and AUTOMATIC1111's txt2img."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 8  # images per request
MAX_PROMPT = 4000  # characters


class OpenAIImageRequest(BaseModel):
    """POST /v1/images/generations; negative_prompt .. seed are diffrt's extensions."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT)
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    size: str | None = Field(None, description="WIDTHxHEIGHT; default: the model's size")
    response_format: Literal["b64_json"] = "b64_json"
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


class A1111Overrides(BaseModel):
    """The A1111 settings a txt2img request may override that diffrt honours (the rest are ignored)."""

    model_config = ConfigDict(extra="ignore")

    randn_source: Literal["GPU", "CPU", "NV"] | None = None  # NV is A1111's CPU copy of the GPU's Philox draws
    CLIP_stop_at_last_layers: int = Field(1, ge=1, le=48)


class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img, AUTOMATIC1111's fields that diffrt uses (others that A1111 clients send are ignored)."""

    model_config = ConfigDict(extra="ignore")

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

    def rng(self) -> str:
        """A1111's random number source as diffrt's rng; numpy when none is given."""
        return {"CPU": "torch-cpu", "GPU": "torch-cuda", "NV": "torch-cuda", None: "numpy"}[self.override_settings.randn_source]
