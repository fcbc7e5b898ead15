"""The family seam: everything model-specific behind one object, so the pipeline's loop knows no model.

A Family is made over a package and says which graphs the family runs (text encoders, the denoiser, the VAE), how
prompts become the denoiser's text inputs (tokenizers, encoders, how their outputs combine), the latent geometry
(channels, VAE factor, tokens per side of a patch), the VAE's scaling and shift, the guidance policy, and how the
denoiser is called: `denoise(...)`, the one call the sampling loop makes, to which hooks may add inputs (`extras`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..backends.engine import Engine, TensorSpec
from ..errors import UserError
from ..prompts import chunked, emphasized, plain

if TYPE_CHECKING:
    from ..package import Package

PER_ROW_FIX = ("make it take one per row with `python -m diffrt.export.timestep_rows PACKAGE`, or re-export the package "
               "with `diffrt export`")
PROMPT_SYNTAXES = ("a1111", "plain")  # AUTOMATIC1111's reading (weights, BREAK, 75-token chunks) or diffusers' (as is)
# runs a component's engine on feeds, guarded against NaN / inf: (component, feeds, outputs, where) -> the outputs
Runner = Callable[[str, dict[str, Any], tuple[str, ...], str], list[np.ndarray]]


def one_per_row(spec: TensorSpec) -> bool:
    """Whether a denoiser's timestep input takes one value per batch row (1-d, of dynamic length), so rows at
    different steps can share a call."""
    return len(spec.shape) == 1 and spec.shape[0] is None


def timestep_feed(spec: TensorSpec, t: float | np.ndarray, batch: int) -> np.ndarray:
    """The timestep in the dtype and rank the denoiser graph declares: a scalar, [1], or one per batch row. t is one
    value, or one per row (rows at different steps), which only a graph taking one per row can be given."""
    value = np.asarray(t, np.float64)
    value = (value.round() if np.issubdtype(spec.dtype, np.integer) else value).astype(spec.dtype)
    if value.ndim:
        if not one_per_row(spec):
            raise UserError(f"this UNet takes one timestep per call, so rows at different steps cannot share one; {PER_ROW_FIX}")
        return value
    if len(spec.shape) == 0:
        return value
    return np.full((spec.shape[0] or batch,), value, dtype=value.dtype)


class Family:
    """A model family over one package: the pipeline asks it for everything that differs between models."""

    name: ClassVar[str]
    encoders: tuple[str, ...] = ("text_encoder",)  # text encoder components, in the order they run (the package's)
    optional: ClassVar[tuple[str, ...]] = ()  # encoders a package may leave out (SD3's T5)
    denoiser: ClassVar[str] = "unet"  # the component the sampling loop calls
    denoiser_output: ClassVar[str] = "out_sample"
    vae_output: ClassVar[str] = "sample"
    encoder_output: ClassVar[str] = "latent_parameters"
    patch: ClassVar[int] = 1  # latent pixels per side of one denoiser token (FLUX packs 2x2)
    # "cfg": negatives and prompts in one doubled batch, mixed by the guidance scale; "embedded": the prompt alone, the
    # scale fed to the denoiser as an input (FLUX-dev: encode() puts it in the conditioning, one row per image); "none"
    guidance: ClassVar[str] = "cfg"
    size_conditioning: ClassVar[bool] = False  # takes SDXL's original size and crop ids
    default_guidance: ClassVar[float] = 7.5  # for a package that does not record its own (an optimum export)
    default_steps: ClassVar[int] = 30
    zeros_for_empty_prompt: ClassVar[bool] = False  # diffusers' force_zeros_for_empty_prompt, where model_index omits it
    prompt_syntaxes: ClassVar[tuple[str, ...]] = PROMPT_SYNTAXES  # those the family reads; the first is its default
    loras: ClassVar[bool] = True  # LoRAs may patch its text encoders and denoiser
    inpainting: ClassVar[bool] = True  # a mask repaints part of the image (blended, or a 9-channel UNet)
    settings: ClassVar[frozenset[str]] = frozenset({"clip_skip", "guidance_rescale"})  # optional settings it takes
    exact_strength: ClassVar[bool] = False  # img2img skips steps * (1 - strength), rounded down (SD3, FLUX pipelines)

    def __init__(self, package: Package) -> None:
        self.package = package
        self.encoders = tuple(e for e in type(self).encoders if e not in self.optional or package.has(e))

    @classmethod
    def sequence_lengths(cls, clip: int, t5: int) -> dict[str, int]:
        """Each component's text length where it is not CLIP's (TensorRT profiles fix it)."""
        return {}

    @classmethod
    def export_defaults(cls, denoiser_config: dict[str, Any]) -> dict[str, Any]:
        """The family's own settings a package's defaults record, from its denoiser's config."""
        return {}

    @classmethod
    def components(cls) -> tuple[str, ...]:
        """What text-to-image needs, in the order it runs (optional encoders left out)."""
        return (*(e for e in cls.encoders if e not in cls.optional), cls.denoiser, "vae_decoder")

    def stages(self) -> tuple[str, ...]:
        """What text-to-image runs on this package, in the order it runs."""
        return (*self.encoders, self.denoiser, "vae_decoder")

    @property
    def guidance_note(self) -> str:
        """What a request's guidance_scale means for this family, in words (the server's /v1/models says it)."""
        return {"cfg": "classifier-free guidance: guidance_scale mixes the negative prompt's and the prompt's predictions",
                "embedded": "guidance-distilled: guidance_scale is the transformer's guidance input, no negative-prompt "
                            "batch (true_cfg_scale above 1 with a negative prompt adds one, as diffusers' true CFG)",
                "none": "none: the model samples without guidance (timestep-distilled); guidance_scale is not taken"}[
            self.guidance]

    def refuse(self, request: Any) -> None:
        """Refuse, in one line, a setting given that this family does not take (a value other than its neutral one)."""
        for setting, neutral in (("clip_skip", 1), ("guidance_rescale", 0.0), ("true_cfg_scale", 1.0)):
            value = getattr(request, setting)
            if setting not in self.settings and value is not None and value != neutral:
                raise UserError(f"{self.name} models take no {setting.replace('_', ' ')} (diffusers' pipeline for them has "
                                "none); leave it out")
        given = request.guidance_scale if isinstance(request.guidance_scale, (list, tuple)) else [request.guidance_scale]
        if self.guidance == "none" and any(g not in (None, 0, 1) for g in given):
            raise UserError(f"this {self.name} model takes no guidance scale (it is guidance-distilled, as FLUX.1-schnell "
                            "is); leave it out or give 0")

    def prompt_syntax(self, syntax: str | None) -> str:
        """The prompt syntax a request asks for (None: the family's default), refused where the family lacks it."""
        if syntax is None:
            return self.prompt_syntaxes[0]
        if syntax not in PROMPT_SYNTAXES:
            raise UserError(f"prompt syntax must be one of {', '.join(PROMPT_SYNTAXES)}, not {syntax!r} (a1111: weights, "
                            "BREAK and long prompts as AUTOMATIC1111 reads them; plain: as diffusers reads them)")
        if syntax not in self.prompt_syntaxes:
            raise UserError(f"{self.name} models read prompts as diffusers does (prompt syntax "
                            f"{' or '.join(self.prompt_syntaxes)}); {syntax} is for SD 1.x/2.x and SDXL")
        return syntax

    # text ---------------------------------------------------------------------------------------------------------
    def tokenizers(self) -> list[Any]:
        """One tokenizer per text encoder, from the package's tokenizer folders."""
        from ..tokenizer import ClipTokenizer

        return [ClipTokenizer.from_folder(self.package.root / name.replace("text_encoder", "tokenizer"),
                                          self.package.text_max_length) for name in self.encoders]

    def embed(self, run: Runner, encoders: list[Engine], tokenizers: list[Any], prompts: list[str], clip_skip: int,
              syntax: str = "a1111") -> tuple[np.ndarray, np.ndarray | None, float]:
        """(len(prompts), 77 k, hidden) float32, the pooled embedding where the family takes one, and the seconds
        spent tokenizing. a1111: each prompt in A1111's chunks of 75 tokens (weights, BREAK), every chunk through the
        text encoder(s), emphasized, chunks concatenated, shorter prompts filled with the empty prompt's chunks;
        plain: diffusers' reading, the text as it is, cut at the encoder's length with a warning."""
        hidden, pooled, tokenize = [], [], 0.0
        read = chunked if syntax == "a1111" else plain
        for name, tokenizer, encoder in zip(self.encoders, tokenizers, encoders):
            start = time.perf_counter()
            chunks = [read(tokenizer, p) for p in prompts]
            count = max(len(c.ids) for c in chunks)
            empty = read(tokenizer, "")
            ids = np.concatenate([np.concatenate([c.ids, *[empty.ids] * (count - len(c.ids))]) for c in chunks])
            weights = np.concatenate([np.concatenate([c.weights, *[empty.weights] * (count - len(c.ids))]) for c in chunks])
            tokenize += time.perf_counter() - start
            output, layer = self.hidden_output(encoder, clip_skip)
            pooled_name = self.pooled_output(name)
            outs = run(name, self.text_feeds(encoder, ids), (output,) + ((pooled_name,) if pooled_name else ()),
                       "on the prompt")
            z = outs[0] if layer is None else outs[0][:, outs[0].shape[1] + layer]
            z = emphasized(np.asarray(z, np.float32), weights)
            hidden.append(z.reshape(len(prompts), count * z.shape[1], z.shape[2]))
            if pooled_name:
                pooled.append(np.asarray(outs[1], np.float32)[::count])
        return self.combine(hidden), np.concatenate(pooled, axis=-1) if pooled else None, tokenize

    def combine(self, hidden: list[np.ndarray]) -> np.ndarray:
        """The encoders' hidden states joined as the denoiser takes them (side by side on the feature axis)."""
        return np.concatenate(hidden, axis=-1)

    def encode(self, run: Runner, encoders: list[Engine], tokenizers: list[Any], req: Any,
               timings: dict) -> dict[str, np.ndarray]:
        """The denoiser's text inputs for a request (negatives then prompts when guided), in host memory."""
        texts = (req.negatives if req.guided else []) + req.prompts
        hidden, pooled, timings["tokenize"] = self.embed(run, encoders, tokenizers, texts, req.clip_skip,
                                                         req.prompt_syntax)
        return self.conditioning(hidden, pooled, req)

    def hidden_output(self, encoder: Engine, clip_skip: int) -> tuple[str, int | None]:
        """The encoder output holding the hidden state clip_skip picks, and its layer index there (None: the output
        itself)."""
        raise NotImplementedError

    def pooled_output(self, name: str) -> str | None:
        """The output the denoiser takes a pooled embedding from (of encoder `name`), None where it takes none."""
        return None

    def layers(self, encoders: list[Engine]) -> int | None:
        """How far back clip skip may go (None: the graphs have no per-layer output)."""
        return None

    def conditioning(self, hidden: np.ndarray, pooled: np.ndarray | None, req: Any) -> dict[str, np.ndarray]:
        """The denoiser's text inputs (besides sample and timestep) for a batch of embedded prompts."""
        return {"encoder_hidden_states": hidden}

    def size_settings(self, req: Any) -> dict[str, Any]:
        """Family-specific conditioning as an image's settings record it."""
        return {}

    def text_feeds(self, encoder: Engine, ids: np.ndarray) -> dict[str, Any]:
        return {"input_ids": ids.astype(encoder.inputs["input_ids"].dtype)}

    # geometry and the VAE ---------------------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """What an image's sides must be multiples of."""
        return self.package.vae_scale_factor * self.patch

    def latent_shape(self, count: int, width: int, height: int) -> tuple[int, ...]:
        """The sampler's latents for count images of width x height."""
        f = self.package.vae_scale_factor
        return (count, self.package.latent_channels, height // f, width // f)

    def image_seq_len(self, width: int, height: int) -> int:
        """How many denoiser tokens an image of this size is (what flow schedules shift by)."""
        f = self.package.vae_scale_factor * self.patch
        return (height // f) * (width // f)

    def sigmas(self, steps: int) -> np.ndarray | None:
        """The flow sigmas the family's pipeline asks its scheduler for (None: the scheduler's own spacing)."""
        return None

    def vae_input(self, latents: np.ndarray) -> np.ndarray:
        """Sampler latents as the VAE decoder takes them: divided by the scaling factor, plus the shift."""
        p = self.package
        return latents / np.float32(p.vae_scaling_factor) + np.float32(p.vae_shift_factor)

    def vae_feeds(self, decoder: Engine, latents: np.ndarray) -> dict[str, Any]:
        return {"latent_sample": latents.astype(decoder.inputs["latent_sample"].dtype)}

    def encoder_feeds(self, encoder: Engine, pixels: np.ndarray) -> dict[str, Any]:
        return {"sample": pixels.astype(encoder.inputs["sample"].dtype)}

    # the denoiser -----------------------------------------------------------------------------------------------
    def denoise(self, engine: Engine, run: Callable[[dict[str, Any]], np.ndarray], x: np.ndarray,
                t: float | np.ndarray, cond: dict[str, Any], extras: dict[str, Any] | None = None) -> np.ndarray:
        """The denoiser's output for sampler rows x at timestep t (one, or one per row): its feeds made from x, t and
        the text inputs, plus what hooks add (extras), run by `run` (the guarded engine call)."""
        return run({**self.denoiser_feeds(engine, x, t, cond), **(extras or {})})

    def takes_mask(self, engine: Engine) -> bool:
        """Whether the denoiser is an inpainting one: latents, mask and masked image's latents (9 channels)."""
        spec = engine.inputs.get("sample")
        return spec is not None and len(spec.shape) == 4 and spec.shape[1] == 9

    def denoiser_feeds(self, engine: Engine, sample: np.ndarray, t: float | np.ndarray,
                       cond: dict[str, Any]) -> dict[str, Any]:
        return {"sample": sample.astype(engine.inputs["sample"].dtype),
                "timestep": timestep_feed(engine.inputs["timestep"], t, len(sample)), **cond}
