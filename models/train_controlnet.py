"""Train the bundled model's ControlNet: a canny edge map of a scene places the shape where the map has it.

    python models/train_controlnet.py [--package models/shapes-tiny] [--images 8000] [--minutes 25] [--eval-seeds 2]

The model ignores position words; this ControlNet is what steers position. Its UNet is the package's own, rebuilt in
PyTorch from the package's ONNX weights (`unet_from_package`, checked against the graph) and frozen; the text encoder
and VAE encoder run from the package. The control maps are diffrt's canny preprocessor's (OpenCV) of the training
renders, so `--control edges:canny=PICTURE` makes the same kind of map from a user's picture. The result is exported into
the package as controlnet/edges (the UNet re-exported with residual inputs, the same weights), and its effect is
measured on the held-out scenes: how often the shape lands at the control map's position, with and without it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
from onnx import numpy_helper
from PIL import Image

from diffrt.export import ExportOptions
from diffrt.export.checkpoint import open_checkpoint
from diffrt.export.controlnet import add_controlnet
from diffrt.export.writer import _export_one, file_hashes
from diffrt.models.shapes_data import held_out_scenes, read_position, render, sample_training_set
from diffrt.runtime.control import ControlInput, canny
from diffrt.runtime.pipeline import Pipeline
from diffrt.runtime.stored import loaded

HERE = Path(__file__).resolve().parent
NAME = "edges"
EMBEDDING = (16, 32, 64)  # the control image's embedding: 64x64 pixels down to the 16x16 latents (factor 4)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in loaded(path).graph.initializer}


def twin_checkpoint(package: Path, unet: UNet2DConditionModel, folder: Path) -> Path:
    """A diffusers checkpoint folder holding `unet` with the package's tokenizer, scheduler and configs (what the
    exporter reads to export a UNet)."""
    unet.save_pretrained(folder / "unet")
    for part in ("tokenizer", "scheduler"):
        (folder / part).mkdir(parents=True, exist_ok=True)
        for f in (package / part).iterdir():
            (folder / part / f.name).write_bytes(f.read_bytes())
    for part, config in (("text_encoder", "text_encoder"), ("vae", "vae_decoder")):  # their configs only
        (folder / part).mkdir(exist_ok=True)
        (folder / part / "config.json").write_bytes((package / config / "config.json").read_bytes())
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.39.0", "unet": ["diffusers", "UNet2DConditionModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def export_unet(checkpoint: Path, dest: Path) -> Path:
    """The UNet exported as the package's was (float16-stored weights), without a check."""
    options = ExportOptions(components=("unet",), weights_fp16=True, check=False)
    _export_one(open_checkpoint(checkpoint), "unet", dest, options, lambda msg: None, {})
    return dest / "unet" / "model.onnx"


def placement(param: np.ndarray, stored: np.ndarray) -> str:
    """How the exporter stored a parameter: as it is, reshaped (GroupNorm's scale as C x 1 x 1) or transposed (MatMul)."""
    if stored.size != param.size:
        return ""
    if np.array_equal(stored.reshape(param.shape), param):
        return "reshape"
    if param.ndim == 2 and stored.shape == param.T.shape and np.array_equal(stored.T, param):
        return "transpose"
    return ""


def unet_from_package(package: Path, work: Path) -> UNet2DConditionModel:
    """The package's UNet in PyTorch: a twin with distinct random weights is exported the same way, which says where
    each parameter lands among the graph's initializers (as it is, reshaped or transposed; folded constants get made-up
    names, so places are matched by order); the package's values are read from the same places."""
    config = json.loads((package / "unet" / "config.json").read_text())
    twin = UNet2DConditionModel.from_config(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).half().float())
    stored = initializers(export_unet(twin_checkpoint(package, twin, work / "twin"), work / "twin-onnx"))
    params = {k: v.numpy() for k, v in twin.state_dict().items()}
    by_values = {np.sort(v.astype(np.float32).ravel()).tobytes(): k for k, v in params.items()}
    theirs = list(initializers(package / "unet" / "model.onnx").values())  # the same graph: its initializers in order
    if [a.shape for a in stored.values()] != [a.shape for a in theirs]:
        raise RuntimeError("the package's UNet graph is not laid out as this exporter lays it out")
    state, found = {}, set()
    for array, value in zip(stored.values(), theirs):
        key = by_values.get(np.sort(array.astype(np.float32).ravel()).tobytes())
        how = key and placement(params[key], array.astype(np.float32))
        if how:
            value = value.astype(np.float32)
            state[key] = torch.from_numpy(value.T.copy() if how == "transpose" else value.reshape(params[key].shape))
            found.add(key)
    missing = sorted(set(params) - found)
    if missing:
        raise RuntimeError(f"{len(missing)} UNet parameters not found in the package's graph, e.g. {missing[:3]}")
    unet = UNet2DConditionModel.from_config(config)
    unet.load_state_dict(state)
    return unet.eval()


def check_unet(unet: UNet2DConditionModel, package: Path) -> float:
    """Largest difference between the rebuilt UNet and the package's graph on random inputs."""
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32),
             "timestep": np.array([10.0, 700.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, unet.config.cross_attention_dim), dtype=np.float32)}
    pipe = Pipeline.from_package(package, backend="ort-cpu")
    zeros = pipe.controls.zeros(2, 16, 16) if pipe.controls else {}  # a UNet that takes ControlNet residuals: none
    want = pipe.unet.run({**feeds, **zeros})["out_sample"]
    with torch.no_grad():
        got = unet(*(torch.from_numpy(v) for v in feeds.values())).sample.numpy()
    return float(np.abs(got - want).max())


def training_data(pipe: Pipeline, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latent means, text states, control maps in [0, 1], the empty prompt's states) for count training renders."""
    images, captions = sample_training_set(count, seed)
    scale = np.float32(pipe.package.vae_scaling_factor)
    latents, maps = [], []
    for start in range(0, count, 200):
        batch = images[start:start + 200]
        pixels = batch.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
        params = pipe._encoder().run({"sample": pixels})["latent_parameters"]
        latents.append(params[:, :pipe.package.latent_channels] * scale)
        maps += [np.asarray(canny(Image.fromarray(image)), np.float32).transpose(2, 0, 1) / 255.0 for image in batch]
    unique = sorted(set(captions))
    states = dict(zip(unique, pipe.embed(unique, syntax="plain")))
    text = np.stack([states[c] for c in captions])
    empty = pipe.embed([""], syntax="plain")
    return (torch.from_numpy(np.concatenate(latents)), torch.from_numpy(text), torch.from_numpy(np.stack(maps)),
            torch.from_numpy(empty))


def train(unet: UNet2DConditionModel, net: ControlNetModel, data: tuple, schedule: DDPMScheduler, steps: int, batch: int,
          lr: float, deadline: float) -> tuple[list[dict], int]:
    """The ControlNet fitted to predict, through the frozen UNet, the noise of noised training latents (10 % of the
    prompts dropped, as for the UNet), for `steps` steps or until the clock passes `deadline`; returns the loss
    curve and the steps taken."""
    latents, text, maps, empty = data
    unet.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-2)
    rng = np.random.default_rng(3)
    alphas = schedule.alphas_cumprod
    curve, running, t0 = [], 0.0, time.time()
    for step in range(1, steps + 1):
        if time.time() > deadline:
            log(f"stopped at step {step - 1}: the time budget is spent")
            return curve, step - 1
        idx = torch.from_numpy(rng.choice(len(latents), batch, replace=False))
        x0, cond, hint = latents[idx], text[idx].clone(), maps[idx]
        cond[torch.from_numpy(rng.random(batch) < 0.1)] = empty[0]
        t = torch.from_numpy(rng.integers(0, len(alphas), batch))
        noise = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        down, mid = net(xt, t, cond, controlnet_cond=hint, return_dict=False)
        pred = unet(xt, t, cond, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()
        if step % 100 == 0:
            curve.append({"step": step, "loss": running / 100, "seconds": round(time.time() - t0, 1)})
            log(f"step {step}/{steps}: loss {running / 100:.4f} ({time.time() - t0:.0f} s)")
            running = 0.0
    return curve, steps


def steering(pipe: Pipeline, seeds: int, work: Path) -> dict:
    """On the held-out scenes, prompted without position words: how often the shape lands at the control map's
    position, with the ControlNet and without it (then by chance or the model's habit)."""
    hits = {"with": 0, "without": 0}
    rng = np.random.default_rng(7)
    total = 0
    for i, scene in enumerate(held_out_scenes()):
        edges = work / f"edges-{i}.png"
        canny(Image.fromarray(render(scene, rng))).save(edges)
        prompt = scene.caption(with_position=False)
        for seed in range(seeds):
            total += 1
            for key, control in (("with", [ControlInput(NAME, str(edges))]), ("without", None)):
                image = np.asarray(pipe(prompt, seed=seed, control=control).images[0])
                hits[key] += read_position(image) == scene.position
    return {"scenes": total, **{f"position_{k}": v / total for k, v in hits.items()}}


def card_grid(pipe: Pipeline, path: Path, work: Path) -> None:
    """Rows of held-out scenes, one per corner: the render a map is made from, its canny map, the image with the
    ControlNet and without (prompted without position words), 4x enlarged."""
    rng, rows, shapes = np.random.default_rng(5), [], set()
    for i, scene in enumerate(s for s in held_out_scenes() if s.position != "center"):
        if len(rows) == 4 or scene.position in {r[0] for r in rows} or scene.shape in shapes:
            continue
        shapes.add(scene.shape)
        render_ = Image.fromarray(render(scene, rng))
        edges = canny(render_)
        edges.save(work / "grid-edges.png")
        prompt = scene.caption(with_position=False)
        steered = pipe(prompt, seed=i, control=[ControlInput(NAME, str(work / "grid-edges.png"))]).images[0]
        rows.append((scene.position, [render_, edges, steered, pipe(prompt, seed=i).images[0]]))
    grid = Image.new("RGB", (4 * 64 * 4, len(rows) * 64 * 4))
    for y, (_, images) in enumerate(rows):
        for x, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((256, 256), Image.NEAREST), (x * 256, y * 256))
    grid.save(path)


def bundle(package: Path, unet: UNet2DConditionModel, net: ControlNetModel, work: Path) -> None:
    """Export the ControlNet into the package (its UNet re-exported from the rebuilt one to take residuals); the
    manifest names the script that made it, not a path of this machine."""
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(p.half().float())  # stored as float16 like the rest of the package, and checked exactly so
    net.save_pretrained(work / NAME)
    add_controlnet(package, work / NAME, twin_checkpoint(package, unet, work / "checkpoint"), log)
    manifest = json.loads((package / "diffrt.json").read_text())
    manifest["components"][f"controlnet/{NAME}"]["source"] = "models/train_controlnet.py"
    (package / "diffrt.json").write_text(json.dumps(manifest, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", type=Path, default=HERE / "shapes-tiny")
    ap.add_argument("--images", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-seeds", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=25.0, help="stop training this long after the start (data included)")
    args = ap.parse_args(argv)
    start = time.time()
    work = Path(tempfile.mkdtemp(prefix="controlnet-"))
    torch.manual_seed(0)
    unet = unet_from_package(args.package, work)
    unet_check = check_unet(unet, args.package)
    log(f"the package's UNet rebuilt in PyTorch: max |diff| against its graph {unet_check:.2e}")
    if unet_check > 1e-4:
        raise SystemExit("the rebuilt UNet does not match the package's graph")
    pipe = Pipeline.from_package(args.package, backend="ort-cpu")
    data = training_data(pipe, args.images, seed=11)
    log(f"{args.images} training renders encoded, with their canny maps")
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING)
    curve, trained = train(unet, net, data, DDPMScheduler.from_pretrained(args.package / "scheduler"), args.steps, args.batch,
                  args.lr, start + 60 * args.minutes)
    minutes = (time.time() - start) / 60
    log(f"trained in {minutes:.1f} min (from the start, data included)")
    bundle(args.package, unet, net, work)
    pipe = Pipeline.from_package(args.package, backend="ort-cpu")
    result = steering(pipe, args.eval_seeds, work)
    card_grid(pipe, args.package / "card" / "controlnet.png", work)
    log(f"held-out scenes at the control map's position: {result['position_with']:.0%} with the ControlNet, "
        f"{result['position_without']:.0%} without")
    card = {"minutes": round(minutes, 1), "images": args.images, "steps": trained, "batch": args.batch, "lr": args.lr,
            "embedding_channels": EMBEDDING, "unet_rebuilt_max_diff": unet_check, "steering": result, "curve": curve,
            "source": "models/train_controlnet.py"}
    (args.package / "card" / "controlnet.json").write_text(json.dumps(card, indent=1) + "\n")
    manifest = json.loads((args.package / "diffrt.json").read_text())
    manifest["files"] = file_hashes(args.package)
    (args.package / "diffrt.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
