"""The ControlNet commands: `diffrt controlnet add` (a ControlNet into a package) and `diffrt preprocess` (a control
map from a photo)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CANNY = (100, 200)  # control.CANNY, written out: the command line starts without numpy and Pillow


def cmd_controlnet(args: argparse.Namespace) -> int:
    from .cli import require

    require("export", "torch", "diffusers", "onnx")
    from diffrt.export.controlnet import add_controlnet

    add_controlnet(args.package, args.folder, args.checkpoint, log=lambda m: print(m, file=sys.stderr))
    print(args.package)
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from .control import canny
    from .images import output_paths, save_image

    (out,) = output_paths(args.output, [0], args.overwrite)
    save_image(canny(args.input, args.low, args.high), out, None)
    print(out)
    return 0


def add_controlnet_commands(sub, parser_class) -> None:
    c = sub.add_parser("controlnet", help="add a ControlNet to a package (needs diffrt[export])")
    actions = c.add_subparsers(dest="action", required=True, parser_class=parser_class,
                               help="add: export a diffusers ControlNetModel folder into a package")
    a = actions.add_parser("add", help="export a ControlNetModel folder into the package as controlnet/<folder name>")
    a.add_argument("package", type=Path, help="model package folder (SD 1.x/2.x or SDXL)")
    a.add_argument("folder", type=Path, help="diffusers ControlNetModel folder (config.json and weights)")
    a.add_argument("--checkpoint", type=Path, help="the checkpoint the package was exported from (default: the one its "
                   "manifest records); its UNet is exported again to take ControlNet residuals if it does not yet")
    a.set_defaults(func=cmd_controlnet)
    p = sub.add_parser("preprocess", help="make a control map from a photo (canny edges; needs diffrt[control])")
    p.add_argument("module", choices=("canny",), help="the preprocessor: canny (OpenCV's Canny edges, as A1111's module)")
    p.add_argument("input", type=Path, help="the photo")
    p.add_argument("output", type=Path, help="the map to write (.png, .jpg, .webp)")
    p.add_argument("--low", type=int, default=CANNY[0], help="canny's low threshold (default %(default)s)")
    p.add_argument("--high", type=int, default=CANNY[1], help="canny's high threshold (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=cmd_preprocess)
