"""PNG output with generation settings that AUTOMATIC1111 and ComfyUI readers parse; written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .errors import UserError

SAMPLER_LABELS = {"ddim": "DDIM", "pndm": "PLMS", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M",
                  "dpmpp_2m_karras": "DPM++ 2M Karras", "lcm": "LCM"}


def parameters_text(s: dict[str, Any]) -> str:
    """The A1111 'parameters' block: prompt, negative prompt, then one line of `Key: value` pairs."""
    pairs = [("Steps", s["steps"]), ("Sampler", SAMPLER_LABELS.get(s["scheduler"], s["scheduler"])),
             ("CFG scale", s["guidance_scale"]), ("Seed", s["seed"]), ("Size", f"{s['width']}x{s['height']}"),
             ("Model hash", s.get("model_hash") or None), ("Model", s.get("model")), ("Version", f"diffrt {s['diffrt']}")]
    lines = [s["prompt"]]
    if s.get("negative_prompt"):
        lines.append(f"Negative prompt: {s['negative_prompt']}")
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs if v not in (None, "")))
    return "\n".join(lines)


def output_paths(path: str | Path, count: int) -> list[Path]:
    """One path per image: the path itself for one image, name-0.png, name-1.png ... for several."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"output {path} must end in .png")
    if not path.parent.is_dir():
        raise UserError(f"output folder {path.parent} does not exist; create it first or choose another -o")
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"output folder {path.parent} is not writable; choose another -o")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def save_png(image: Image.Image, path: Path, settings: dict[str, Any]) -> None:
    """Write the PNG to a temporary file beside path, then rename it over path: no partial file ever."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(settings))
    info.add_text("diffrt", json.dumps(settings, sort_keys=True))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an image is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
