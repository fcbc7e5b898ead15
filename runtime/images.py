"""PNG output with generation settings that AUTOMATIC1111 and ComfyUI readers parse; written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .errors import UserError
from .files import ordinary_mode
from .schedulers import A1111_NAMES

SAMPLER_LABELS = {short: label for label, short in A1111_NAMES.items()}
A1111_RNG = {"torch-cpu": "CPU", "torch-cuda": "GPU"}  # A1111's "RNG" (random number source); numpy has none there


def parameters_text(s: dict[str, Any]) -> str:
    """The A1111 'parameters' block: prompt, negative prompt, then one line of `Key: value` pairs."""
    pairs = [("Steps", s["steps"]), ("Sampler", SAMPLER_LABELS.get(s["scheduler"], s["scheduler"])),
             ("CFG scale", s["guidance_scale"]), ("Seed", s["seed"]), ("Size", f"{s['width']}x{s['height']}"),
             ("RNG", A1111_RNG.get(s.get("rng"))), ("Clip skip", s["clip_skip"] if s.get("clip_skip", 1) > 1 else None),
             ("Model hash", s.get("model_hash") or None), ("Model", s.get("model")),
             ("Denoising strength", s.get("strength")), ("Mode", s.get("mode")), ("Version", f"diffrt {s['diffrt']}")]
    lines = [s["prompt"]]
    if s.get("negative_prompt"):
        lines.append(f"Negative prompt: {s['negative_prompt']}")
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs if v not in (None, "")))
    return "\n".join(lines)


FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
EXIF_IFD, USER_COMMENT, IMAGE_DESCRIPTION = 0x8769, 0x9286, 0x010E


def numbered(folder: Path, seeds: list[int], ext: str = ".png") -> list[Path]:
    """AUTOMATIC1111's names in folder: 00001-<seed>.png, numbered on from the highest number already there."""
    taken = [int(p.name[:5]) for p in folder.iterdir() if p.name[:5].isdigit() and p.name[5:6] == "-"]
    start = max(taken, default=0) + 1
    return [folder / f"{start + i:05d}-{seed}{ext}" for i, seed in enumerate(seeds)]


def output_paths(path: str | Path | None, seeds: list[int], overwrite: bool = False) -> list[Path]:
    """One path per image. A folder (or no path: the current one) gets numbered names; a file name is used as it is
    for one image and as name-0, name-1, ... for several. Existing files are refused unless overwrite."""
    path = Path(path) if path is not None else Path(".")
    if path.is_dir() or str(path).endswith(("/", "\\")):
        if not path.is_dir():
            raise UserError(f"output folder {path} does not exist; create it first or choose another -o")
        folder, paths = path, numbered(path, seeds)
    else:
        if path.suffix.lower() not in FORMATS:
            raise UserError(f"output {path} must end in .png, .jpg or .webp (or name a folder)")
        folder = path.parent
        if not folder.is_dir():
            raise UserError(f"output folder {folder} does not exist; create it first or choose another -o")
        paths = [path] if len(seeds) == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(len(seeds))]
    check_writable(folder)
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} exists; pass --overwrite to replace it, or give -o a folder for numbered names")
    return paths


def check_writable(folder: Path, option: str = "-o") -> None:
    """Refuse a folder no file can be written in, before any work (a probe file: os.access says yes to root on /sys)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".diffrt-", suffix=".probe", dir=folder)
    except OSError as exc:
        raise UserError(f"output folder {folder} is not writable ({exc.strerror}); choose another {option}") from None
    os.close(fd)
    os.unlink(probe)


def encoded(image: Image.Image, fmt: str, settings: dict[str, Any]) -> tuple[Image.Image, dict[str, Any]]:
    """The image and Pillow save options carrying the settings: PNG text chunks, or EXIF (UserComment holds the
    A1111 parameters, ImageDescription diffrt's JSON) for JPEG and WebP."""
    text = parameters_text(settings)
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
        info.add_text("diffrt", json.dumps(settings, sort_keys=True))
        return image, {"pnginfo": info}
    exif = Image.Exif()
    exif[IMAGE_DESCRIPTION] = json.dumps(settings, sort_keys=True)  # ASCII: json escapes the rest
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be")
    return image.convert("RGB"), {"exif": exif, "quality": 95}


def save_image(image: Image.Image, path: Path, settings: dict[str, Any] | None) -> None:
    """Write to a temporary file beside path, then rename it over path: no partial file ever (a viewer that reloads
    it never sees half an image). settings None: no metadata (a preview)."""
    image, options = encoded(image, FORMATS[path.suffix.lower()], settings) if settings is not None else (image, {})
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"could not write {path} ({exc.strerror}); choose another file") from None
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=FORMATS[path.suffix.lower()], **options)
        os.chmod(tmp, ordinary_mode(0o666))  # mkstemp makes 0600; an image is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_settings(path: Path) -> dict[str, Any]:
    """The diffrt settings an image was saved with (PNG text chunk, or EXIF ImageDescription)."""
    try:
        with Image.open(path) as image:
            text = image.info.get("diffrt") or image.getexif().get(IMAGE_DESCRIPTION)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} could not be read as an image ({exc})") from None
    try:
        settings = json.loads(text) if text else None
    except json.JSONDecodeError:
        settings = None
    if not isinstance(settings, dict) or "prompt" not in settings:
        raise UserError(f"{path} holds no diffrt settings (it was not written by diffrt generate)")
    return settings
