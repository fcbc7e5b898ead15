"""A generation request checked before any work: sizes, steps, guidance, prompts, seeds and the scheduler."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .generators import MAX_SEED, random_seed
from .schedulers import make_scheduler
from .stepcache import CacheChoice

MAX_STEPS = 1000
MAX_SIDE = 4096
MAX_IMAGES = 64


ALIASES = {"num_inference_steps": "steps", "num_images_per_prompt": "num_images"}  # diffusers' names for two settings
SOURCE_KEYS = ("image", "mask")  # image-to-image sources: recorded by path and pixel hash, taken again by --from


@dataclass
class GenerationRequest:
    """Every setting of one call, as a user gives it (None: the package's default): built by the Python API
    (`Pipeline.begin(prompt, **settings)`), the CLI (its options, or an image's settings with --from) and the server
    (its request bodies) alike, then checked and resolved once by `Pipeline.check`."""

    prompt: str | list[str]
    negative_prompt: str | list[str] = ""
    steps: int | None = None
    guidance_scale: float | list[float | None] | None = None  # one, or one per image (None entries: the default)
    scheduler: str | None = None
    seed: int | None = None  # image i gets seed + i; None or -1: random
    seeds: list[int] | None = None  # every image's own seed instead
    width: int | None = None
    height: int | None = None
    num_images: int = 1  # per prompt
    rng: str = "numpy"  # what draws each image's noise: numpy, torch-cpu, torch-cuda
    clip_skip: int = 1
    prompt_syntax: str | None = None  # a1111 (weights, BREAK, 75-token chunks) or plain (diffusers': cut at the
    # encoder); None: the family's own (a1111 for SD 1.x/2.x/SDXL, plain for SD3 and FLUX)
    guidance_rescale: float = 0.0
    true_cfg_scale: float | None = None  # FLUX: diffusers' true CFG with the negative prompt, over the distilled guidance
    original_size: tuple[int, int] | None = None  # SDXL's size conditioning (height, width)
    crops_coords_top_left: tuple[int, int] = (0, 0)  # SDXL's crop conditioning (top, left)
    loras: list[Any] | None = None  # LoraChoice files and scales; None: keep those the pipeline has applied
    image: Any = None  # image-to-image source: a path or a Pillow image
    strength: float = 0.8
    resize: bool = False  # scale the image down to the VAE's multiple instead of refusing its size
    mask: Any = None  # inpainting: white repaints
    mask_blur: float = 0.0  # blur the mask's edge by this many pixels
    latents: np.ndarray | None = field(default=None, repr=False)  # the start noise, instead of drawing it
    decoder: str = "vae"  # the final decode: vae (the model's own) or tiny (the package's tiny decoder, TAESD)
    cache: str | None = None  # step caching: deepcache[:N], fbcache[:T] or none; None: the pipeline's own (stepcache.py)
    vae_tiling: str = "auto"  # the VAE in tiles as diffusers' enable_tiling(): on, off, or auto (above 1024x1024 pixels)
    control: list[Any] | None = None  # ControlInputs: ControlNets of the package, their images and scales
    control_start: float = 0.0  # the fraction of the steps where ControlNets start acting (diffusers' control_guidance_start)
    control_end: float = 1.0  # and where they stop (control_guidance_end)
    guess_mode: bool = False  # diffusers' guess mode: ControlNets on the prompts' rows only, ramped (A1111's "ControlNet is
    # more important")

    @classmethod
    def of(cls, prompt: Any, negative_prompt: Any = "", **settings: Any) -> GenerationRequest:
        """A request from keyword settings, diffusers' names (num_inference_steps, num_images_per_prompt) taken too;
        an unknown setting is refused naming the known ones."""
        for alias, name in ALIASES.items():
            if alias in settings:
                value = settings.pop(alias)
                if value is not None:
                    settings[name] = value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(unknown)}; the settings are: {', '.join(sorted(known))}")
        return cls(prompt, negative_prompt, **settings)

    @classmethod
    def from_settings(cls, settings: dict[str, Any], replaced: tuple[str, ...] = ()) -> GenerationRequest:
        """The request that makes an image again from its saved settings: prompt, seed and sampling, the LoRAs
        (their files, which must still be there) and the image-to-image source and mask (the same files); replaced
        names the fields the caller gives anew (loras, image, mask), which are not looked for."""
        from .lora import LoraChoice

        known = {f.name for f in fields(cls)} - {"loras", "latents", "seeds", "num_images", "control", *SOURCE_KEYS}
        given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in settings.items() if k in known and v is not None}
        loras = [LoraChoice(Path(x["path"]), float(x["scale"])) for x in settings.get("lora_files", [])]
        for choice in loras if "loras" not in replaced else []:
            if not choice.path.is_file():
                raise UserError(f"the image was made with the LoRA {choice.path}, which is no longer there; put it back, or "
                                "give --lora FILE[:SCALE] to choose")
        sources = {key: source_file(settings, key) for key in SOURCE_KEYS
                   if settings.get(f"{key}_sha256") and key not in replaced}
        if "control" in replaced or not settings.get("control"):
            return cls(**given, loras=loras, **sources)
        return cls(**given, loras=loras, **sources, control=[recorded_control(r) for r in settings["control"]])

    def with_defaults(self, defaults: dict[str, Any]) -> GenerationRequest:
        """The request with the package's defaults in place of what it leaves unset."""
        guidance = self.guidance_scale
        default = defaults["guidance_scale"]
        guidance = default if guidance is None else [default if g is None else g for g in guidance] \
            if isinstance(guidance, (list, tuple)) else guidance
        return replace(self, steps=self.steps if self.steps is not None else defaults["steps"], guidance_scale=guidance,
                       scheduler=self.scheduler or defaults.get("scheduler"),
                       width=defaults["width"] if self.width is None else self.width,
                       height=defaults["height"] if self.height is None else self.height)


def recorded_control(record: dict[str, Any]) -> Any:
    """A ControlInput as an image's settings record it, its control image the same file (refused when it is gone)."""
    from .control import CANNY, ControlInput

    path = record.get("image")
    if not path or not Path(path).is_file():
        raise UserError(f"the image was made with the control image {path or '(not a file)'} for the ControlNet "
                        f"{record.get('name')}, which is not there now; give --control NAME:IMAGE to choose")
    return ControlInput(record["name"], path, record["scale"], record["start"], record["end"],
                        record.get("module", "none"), record.get("mode", "balanced"),
                        tuple(record.get("thresholds", CANNY)), record.get("resize", "just"))


def source_file(settings: dict[str, Any], key: str) -> Path:
    """An image-to-image source (image or mask) recorded in an image's settings, refused when it is gone."""
    path = settings.get(f"{key}_path")
    if not path or not Path(path).is_file():
        flag = "--image" if key == "image" else "--mask"
        raise UserError(f"the image was made from the {key} {path or settings.get(key, 'given')}, which is not there now; "
                        f"give it with {flag} FILE")
    return Path(path)


@dataclass
class Request:
    """A checked request as the pipeline runs it: a prompt and negative prompt per image, and each image's seed."""

    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    steps: int
    guidances: list[float]  # one per image
    width: int
    height: int
    rng: str = "numpy"  # what draws each image's noise (rng.RNGS)
    clip_skip: int = 1  # the text encoder layer taken, counted from the end (A1111's numbering)
    prompt_syntax: str = "a1111"  # a1111: weights, BREAK, 75-token chunks; plain: diffusers' reading, cut at the encoder
    guidance_rescale: float = 0.0  # diffusers' guidance_rescale (Lin et al. 2023, for zero-terminal-SNR / v models)
    true_cfg_scale: float = 1.0  # FLUX: CFG with the negative prompt (above 1 with one) on top of the guidance input
    original_size: tuple[int, int] | None = None  # SDXL's size conditioning (height, width); None: the image's
    crops_coords_top_left: tuple[int, int] = (0, 0)  # SDXL's crop conditioning (top, left)
    source: GenerationRequest | None = None  # what it was made from
    cfg: bool = True  # the family guides by classifier-free guidance (a doubled batch); False: its own way, or none
    decoder: str = "vae"  # the final decode: vae or tiny
    cache: CacheChoice = CacheChoice()  # step caching (stepcache.py): DeepCache's interval, First-Block Cache's threshold
    vae_tiling: str = "auto"  # tiling.MODES
    control: list[Any] = field(default_factory=list)  # checked ControlNet units (control.Unit)

    @property
    def guided(self) -> bool:
        """Whether the denoiser runs on negatives too: the family guides by CFG and some image's guidance is above 1,
        or (FLUX) true CFG above 1 with a negative prompt, as diffusers' do_true_cfg."""
        if not self.cfg:
            return self.true_cfg_scale > 1.0 and any(self.negatives)
        return any(g > 1.0 for g in self.guidances)

    @property
    def mix_scales(self) -> list[float]:
        """Each image's scale mixing its negative and prompt rows: its guidance, or with true CFG the true CFG scale."""
        return self.guidances if self.cfg else [self.true_cfg_scale] * len(self.guidances)


def nearest_sizes(value: int, multiple: int) -> str:
    lo = max(multiple, value // multiple * multiple)
    hi = lo + multiple if lo < value else lo
    return f"{lo}" if lo == hi else f"{lo} or {hi}"


def is_whole(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_rng(rng: Any) -> str:
    from .rng import RNGS

    if rng not in RNGS:
        raise UserError(f"rng must be one of {', '.join(RNGS)}, not {rng!r}")
    return rng


def check_clip_skip(clip_skip: Any, layers: int | None) -> int:
    """clip_skip as a whole number from 1 to the text encoder's layers (None: the graph has no per-layer output)."""
    if not is_whole(clip_skip) or clip_skip < 1:
        raise UserError(f"clip skip must be a whole number from 1 (the last layer), not {clip_skip!r}")
    if clip_skip == 1:
        return 1
    if layers is None:
        raise UserError("this package's text encoder has no per-layer output, so clip skip above 1 cannot be applied; "
                        "re-export the checkpoint with this diffrt (`diffrt export CHECKPOINT OUT`)")
    if not isinstance(layers, int) or clip_skip > layers:
        raise UserError(f"clip skip {clip_skip} is more than the text encoder's {layers} layers; use 1 to {layers}")
    return int(clip_skip)


def check_size_conditioning(original_size: Any, crop: Any, takes: bool) -> tuple[tuple[int, int] | None, tuple[int, int]]:
    """SDXL's micro-conditioning: original_size (height, width) and crops_coords_top_left (top, left), whole numbers,
    for a family that takes them."""
    if not takes:
        if original_size is not None or tuple(crop) != (0, 0):
            raise UserError("original size and crop conditioning apply to SDXL models only; leave them out")
        return None, (0, 0)

    def pair(value: Any, what: str, least: int) -> tuple[int, int]:
        if (not isinstance(value, (tuple, list)) or len(value) != 2
                or not all(is_whole(v) and least <= v <= 16 * MAX_SIDE for v in value)):
            raise UserError(f"{what} must be two whole numbers from {least} to {16 * MAX_SIDE}, not {value!r}")
        return int(value[0]), int(value[1])

    return (None if original_size is None else pair(original_size, "original size (height, width)", 1),
            pair(crop, "crop top-left (top, left)", 0))


def check_request(width: int, height: int, steps: int, num_images: int, guidance: float | list[float],
                  multiple: int) -> None:
    """Refuse settings the models cannot take, each with its fix."""
    for name, value in (("width", width), ("height", height)):
        if not is_whole(value) or value < multiple or value > MAX_SIDE or value % multiple:
            near = nearest_sizes(min(int(value), MAX_SIDE), multiple) if is_whole(value) and value > 0 else multiple
            raise UserError(f"{name} {value} is not a multiple of {multiple} between {multiple} and {MAX_SIDE}; "
                            f"use {near}")
    if not is_whole(steps) or not 1 <= steps <= MAX_STEPS:
        raise UserError(f"steps must be a whole number from 1 to {MAX_STEPS}, not {steps!r}")
    if not is_whole(num_images) or not 1 <= num_images <= MAX_IMAGES:
        raise UserError(f"the number of images must be from 1 to {MAX_IMAGES}, not {num_images!r}")
    for g in guidance if isinstance(guidance, (list, tuple)) else [guidance]:
        check_guidance(g)


def check_rescale(rescale: Any) -> float:
    if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not 0 <= rescale <= 1:
        raise UserError(f"guidance rescale must be a number from 0 to 1, not {rescale!r}")
    return float(rescale)


def check_true_cfg(scale: Any) -> float:
    """FLUX's true CFG scale (None: 1, off) as a finite number of at least 0."""
    if scale is None:
        return 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= 100:
        raise UserError(f"true CFG scale must be a number from 0 to 100, not {scale!r}")
    return float(scale)


def check_guidance(guidance: Any) -> None:
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise UserError(f"guidance scale must be a finite number, not {guidance!r}")
    if guidance < 0:
        raise UserError(f"guidance scale must be 0 or more, not {guidance:g} (1 or less turns guidance off; "
                        "to steer away from something, put it in the negative prompt)")


def per_image(guidance: float | list[float], count: int) -> list[float]:
    """One guidance scale per image: a single value for all, or a list with one per image."""
    if not isinstance(guidance, (list, tuple)):
        return [float(guidance)] * count
    if len(guidance) != count:
        raise UserError(f"give one guidance scale, or one per image ({count}), not {len(guidance)}")
    return [float(g) for g in guidance]


def check_text(text: Any, what: str) -> str:
    """A prompt as text that can be encoded: invalid UTF-8 from a shell arrives as surrogate escapes."""
    if not isinstance(text, str):
        raise UserError(f"the {what} must be text, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start].encode("utf-8", "surrogateescape")
        raise UserError(f"the {what} is not valid UTF-8 text (byte {bad!r} at position {exc.start}); "
                        "fix its encoding") from None
    return text


def as_list(value: Any, what: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise UserError(f"no {what} given")
    return [check_text(v, what) for v in items]


def expand_prompts(prompt: Any, negative: Any, per_prompt: int) -> tuple[list[str], list[str]]:
    """One prompt and one negative prompt per image: each prompt repeated per_prompt times, in order."""
    prompts = as_list(prompt, "prompt")
    negatives = as_list(negative, "negative prompt")
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    elif len(negatives) != len(prompts):
        raise UserError(f"{len(prompts)} prompts but {len(negatives)} negative prompts; give one, or one per prompt")
    if len(prompts) * per_prompt > MAX_IMAGES:
        raise UserError(f"{len(prompts)} prompts x {per_prompt} images is more than {MAX_IMAGES} images in one call; "
                        "split the request")
    return ([p for p in prompts for _ in range(per_prompt)], [n for n in negatives for _ in range(per_prompt)])


def image_seeds(seed: Any, count: int) -> list[int]:
    """seed, seed + 1, ... one per image; None or -1 picks a random first seed."""
    if seed is None or (is_whole(seed) and seed == -1):
        seed = random_seed()
    if not is_whole(seed) or not 0 <= seed <= MAX_SEED - count:
        raise UserError(f"seed must be a whole number from 0 to {MAX_SEED - count} (or -1 for a random one), not {seed!r}")
    return [int(seed) + i for i in range(count)]


def check_seeds(seeds: Any, count: int) -> list[int]:
    """One explicit seed per image."""
    if not isinstance(seeds, (list, tuple)) or len(seeds) != count:
        raise UserError(f"give one seed per image ({count}), not {seeds!r}")
    for s in seeds:
        if not is_whole(s) or not 0 <= s <= MAX_SEED:
            raise UserError(f"seed must be a whole number from 0 to {MAX_SEED}, not {s!r}")
    return [int(s) for s in seeds]


def make_checked_scheduler(name: str | None, config: dict, steps: int, image_seq_len: int | None = None,
                           sigmas: np.ndarray | None = None):
    """The scheduler set to `steps` for an image of image_seq_len latent tokens (over the family's own sigmas, where it
    gives them: FLUX's), refused in one line when it cannot take that many steps (naming the most it can)."""
    try:
        sched = make_scheduler(name, config)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if schedule_fits(sched, steps, image_seq_len, sigmas):
        return sched
    most = max((n for n in range(1, steps) if schedule_fits(sched, n, image_seq_len)), default=0)
    raise UserError(f"the {type(sched).name} scheduler cannot take {steps} steps with this model's scheduler config; "
                    f"use at most {most}")


def schedule_fits(sched, steps: int, image_seq_len: int | None = None, sigmas: np.ndarray | None = None) -> bool:
    """Whether every timestep of a `steps`-step schedule is one the model was trained on (a discrete one it can
    index; a flow's run up to num_train_timesteps itself)."""
    try:
        sched.set_timesteps(steps, image_seq_len, **({} if sigmas is None else {"sigmas": sigmas}))
    except (ValueError, IndexError):
        return False
    top = sched.config["num_train_timesteps"] - (0 if sched.flow else 1)
    t = np.asarray(sched.timesteps, np.float64)
    return len(t) > 0 and bool(np.all(t >= 0) and np.all(t <= top))


def size_note(defaults: dict, width: int, height: int) -> str | None:
    """A warning when the size is far from the model's native one (models tile or break up there)."""
    w, h = width, height
    native = defaults["width"] * defaults["height"]
    if not 0.25 <= (w * h) / native <= 4:
        return (f"{w}x{h} is far from the {defaults['width']}x{defaults['height']} this model was made for; "
                "expect repeated or broken-up subjects")
    return None
