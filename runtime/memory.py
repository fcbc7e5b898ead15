"""The memory a request needs on the CPU, estimated before any work, so that a size this machine cannot hold is
refused in one line instead of failing to allocate after minutes.

onnxruntime's CPU attention holds the scores of the UNet's first attention level whole: batch x heads x tokens²
floats, several times over. Measured with the bundled model (peak RSS of `diffrt generate --steps 1`, 2026-11-26):
512² 4.5 GB, 768² 22.5 GB, about ATTENTION_COPIES times the scores' size."""

from __future__ import annotations

import json
from pathlib import Path

ATTENTION_COPIES = 4.2
HEADROOM = 0.9  # of the memory the system reports available


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where the system does not say)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def attention_layout(root: Path) -> tuple[int, int] | None:
    """(heads, downsampling of the first level with attention) from the package's UNet config, or a DiT's (its heads,
    its patch); None without one."""
    try:
        config = json.loads((root / "transformer" / "config.json").read_text())
        return int(config.get("num_attention_heads", 24)), int(config.get("patch_size", 2))
    except (OSError, ValueError):
        pass
    try:
        config = json.loads((root / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    blocks = config.get("down_block_types") or []
    level = next((i for i, b in enumerate(blocks) if "Attn" in b), None)
    if level is None:
        return None
    heads = config.get("num_attention_heads") or config.get("attention_head_dim") or 8
    heads = heads[level] if isinstance(heads, list) else heads
    return int(heads), 2**level


def request_bytes(layout: tuple[int, int], latent_h: int, latent_w: int, unet_batch: int) -> float:
    heads, down = layout
    tokens = (latent_h // down) * (latent_w // down)
    return ATTENTION_COPIES * unet_batch * heads * tokens**2 * 4


def check_fits(layout: tuple[int, int] | None, width: int, height: int, factor: int, unet_batch: int) -> str | None:
    """Why this request would not fit in this machine's memory (with the largest square size that would), or None;
    layout is attention_layout's, read once when the package loads."""
    free = available_bytes()
    if layout is None or free is None:
        return None
    need = request_bytes(layout, height // factor, width // factor, unet_batch)
    if need <= free * HEADROOM:
        return None
    step = 8 * factor  # suggest a round size
    side = max(width, height) // step * step
    while side > step and request_bytes(layout, side // factor, side // factor, unet_batch) > free * HEADROOM:
        side -= step
    return (f"{width}x{height} with a UNet batch of {unet_batch} needs about {need / 2**30:.0f} GB for attention and this "
            f"machine has {free / 2**30:.0f} GB free; the largest square size that fits is about {side}x{side} "
            "(fewer images at once also helps)")
