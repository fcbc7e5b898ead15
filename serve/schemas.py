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
    override_settings: dict = Field(default_factory=dict)

    def rng(self) -> str:
        """A1111's random number source (override_settings.randn_source: GPU, CPU or NV) as diffrt's rng; numpy when
        none is given (A1111's own default, GPU, is asked for by name)."""
        source = str(self.override_settings.get("randn_source", "")).upper()
        return {"CPU": "torch-cpu", "GPU": "torch-cuda", "NV": "torch-cuda"}.get(source, "numpy")
