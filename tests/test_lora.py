"""LoRA: files made with peft for the tiny checkpoint (PEFT/diffusers and kohya forms), merged at export and applied at
run time, against diffusers' load_lora_weights + fuse_lora at the same scales; bad LoRAs refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from diffrt.runtime.errors import UserError
from diffrt.runtime.lora import LoraChoice, parse_choice
from diffrt.runtime.pipeline import Pipeline

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
from conftest import plant_addition, reference_pipeline, run_cli  # noqa: E402

PROMPT = "a red house under a green sky"


def make_lora(checkpoint, path, seed: int, unet_targets: tuple[str, ...], text: bool = True, alpha: int = 8) -> None:
    """A random PEFT LoRA (rank 4) for the checkpoint's UNet (and text encoder), saved as diffusers saves one."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    unet_config = LoraConfig(r=4, lora_alpha=alpha, target_modules=list(unet_targets), init_lora_weights=False)
    unet.add_adapter(unet_config)
    layers = {"unet_lora_layers": get_peft_model_state_dict(unet), "unet_lora_adapter_metadata": unet_config.to_dict()}
    if text:
        encoder = CLIPTextModel.from_pretrained(checkpoint / "text_encoder")
        text_config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False)
        encoder.add_adapter(text_config)
        layers.update(text_encoder_lora_layers=get_peft_model_state_dict(encoder),
                      text_encoder_lora_adapter_metadata=text_config.to_dict())
    StableDiffusionPipeline.save_lora_weights(path.parent, weight_name=path.name, **layers)


def to_kohya(peft_file, path, alpha: float) -> None:
    """The same LoRA in kohya's form: lora_unet_/lora_te_ names with underscores, lora_down/lora_up, alpha."""
    from safetensors.numpy import load_file, save_file

    out = {}
    for key, value in load_file(str(peft_file)).items():
        component, _, rest = key.partition(".")
        module, kind = rest.rsplit(".lora_", 1)
        stem = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component] + module.replace(".", "_")
        out[f"{stem}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
        out[f"{stem}.alpha"] = np.array(alpha if component == "unet" else 4.0, dtype=np.float32)
    save_file(out, str(path))


@pytest.fixture(scope="module")
def loras(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    make_lora(tiny_checkpoint, root / "style.safetensors", 1, ("to_q", "to_k", "to_v", "to_out.0"))
    make_lora(tiny_checkpoint, root / "other.safetensors", 2, ("proj_in", "ff.net.2", "conv1"), text=False, alpha=4)
    to_kohya(root / "style.safetensors", root / "style-kohya.safetensors", alpha=8.0)
    to_kohya(root / "other.safetensors", root / "other-kohya.safetensors", alpha=4.0)
    return root


def diffusers_images(checkpoint, choices: list[LoraChoice], latents: np.ndarray) -> np.ndarray:
    """diffusers with each LoRA loaded and fused at its scale, one after another."""
    pipe = reference_pipeline("StableDiffusionPipeline", checkpoint)
    for i, choice in enumerate(choices):
        pipe.load_lora_weights(choice.path.parent, weight_name=choice.path.name, adapter_name=f"l{i}")
        pipe.fuse_lora(lora_scale=choice.scale, adapter_names=[f"l{i}"])
        pipe.unload_lora_weights()
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=4, guidance_scale=7.5, latents=torch.from_numpy(latents),
                    output_type="np").images


SETS = [[("style.safetensors", 1.0)], [("style.safetensors", 0.5)], [("other-kohya.safetensors", 0.5)],
        [("style.safetensors", 1.0), ("other.safetensors", 0.5)]]


@pytest.mark.parametrize("chosen", [SETS[0], *(pytest.param(c, marks=pytest.mark.slow) for c in SETS[1:])],
                         ids=["peft-1.0", "peft-0.5", "kohya-0.5", "two"])
def test_run_time_and_export_time_match_diffusers(chosen, loras, tiny_checkpoint, tiny_package, tmp_path):
    from diffrt.export import ExportOptions, export_package

    choices = [LoraChoice(loras / name, scale) for name, scale in chosen]
    latents = np.random.default_rng(7).standard_normal((1, 4, 16, 16), dtype=np.float32)
    theirs = diffusers_images(tiny_checkpoint, choices, latents)
    run_time = Pipeline.from_package(tiny_package, backend="ort-cpu", loras=choices)
    merged = export_package(tiny_checkpoint, tmp_path / "merged", ExportOptions(loras=choices), log=lambda m: None)
    plain = Pipeline.from_package(tiny_package, backend="ort-cpu")(PROMPT, steps=4, scheduler="pndm", latents=latents)
    assert np.abs(plain.array - theirs).max() > 0.02  # the LoRA changes the image
    for pipe in (run_time, Pipeline.from_package(merged, backend="ort-cpu")):
        mine = pipe(PROMPT, steps=4, scheduler="pndm", latents=latents)
        assert np.abs(mine.array - theirs).max() <= 1e-3
        assert np.abs(np.round(mine.array * 255) - np.round(theirs * 255)).max() <= 1
    recorded = json.loads((merged / "diffrt.json").read_text())["loras"]
    assert [(r["file"], r["scale"]) for r in recorded] == chosen


def test_kohya_text_encoder_layers_equal_their_peft_form(loras, tiny_package):
    """The kohya file with text encoder layers gives the PEFT file's image (checked against diffusers above); diffusers
    itself cannot be the oracle here: it renames kohya's q_proj/v_proj layers to a form its text encoder then drops."""
    pipe = Pipeline.from_package(tiny_package, backend="ort-cpu", loras=[LoraChoice(loras / "style.safetensors", 0.7)])
    peft = pipe(PROMPT, steps=3, seed=2)
    pipe.set_loras([LoraChoice(loras / "style-kohya.safetensors", 0.7)])
    assert np.abs(pipe(PROMPT, steps=3, seed=2).array - peft.array).max() <= 1e-5


def test_switching_loras_at_run_time(loras, tiny_package):
    """set_loras swaps the applied set; [] returns to the package's own weights; the package is never written."""
    before = {p: p.stat().st_mtime_ns for p in tiny_package.rglob("*") if p.is_file()}
    pipe = Pipeline.from_package(tiny_package, backend="ort-cpu")
    plain = pipe(PROMPT, steps=3, seed=1)
    pipe.set_loras([LoraChoice(loras / "style.safetensors", 1.0)])
    styled = pipe(PROMPT, steps=3, seed=1)
    pipe.set_loras([LoraChoice(loras / "other.safetensors", 1.0)])
    other = pipe(PROMPT, steps=3, seed=1)
    pipe.set_loras([])
    again = pipe(PROMPT, steps=3, seed=1)
    assert np.abs(styled.array - plain.array).max() > 0.02 and np.abs(other.array - styled.array).max() > 0.02
    assert np.array_equal(again.array, plain.array)
    assert before == {p: p.stat().st_mtime_ns for p in tiny_package.rglob("*") if p.is_file()}


def test_loras_read_weights_from_hard_linked_files(loras, tiny_package, tmp_path):
    """`diffrt quantize --precision int8-weights` hard-links the float weights into its package: onnx's own reader
    refuses such a file ("potential hardlink attack"), so the LoRA merge reads the bytes itself, the same values."""
    import os
    import shutil

    source, linked = shutil.copytree(tiny_package, tmp_path / "source"), tmp_path / "linked"  # the fixture never linked
    shutil.copytree(source, linked, copy_function=lambda src, dst: os.link(src, dst) if src.endswith(".onnx_data")
                    else shutil.copy2(src, dst))
    assert (linked / "unet" / "model.onnx_data").stat().st_nlink > 1
    choice = [LoraChoice(loras / "style.safetensors", 0.8)]
    got = Pipeline.from_package(linked, backend="ort-cpu", loras=choice)(PROMPT, steps=3, seed=1)
    want = Pipeline.from_package(tiny_package, backend="ort-cpu", loras=choice)(PROMPT, steps=3, seed=1)
    assert np.array_equal(got.array, want.array)


def test_bad_loras_are_refused(loras, tiny_package, tiny_sdxl_package, tmp_path):
    pipe = Pipeline.from_package(tiny_package, backend="ort-cpu")
    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"\x80\x04junk")
    with pytest.raises(UserError, match="pickle file"):
        pipe.set_loras([LoraChoice(pickle)])
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UserError, match="not a readable .safetensors"):
        pipe.set_loras([LoraChoice(corrupt)])
    with pytest.raises(UserError, match="made for another architecture|match no weight"):
        Pipeline.from_package(tiny_sdxl_package, backend="ort-cpu", loras=[LoraChoice(loras / "style.safetensors")])
    with pytest.raises(UserError, match="is not a number"):
        parse_choice("style.safetensors:strong")
    assert parse_choice("a/b.safetensors:0.7") == LoraChoice(parse_choice("a/b.safetensors").path, 0.7)


def test_from_an_image_applies_its_loras_again(loras, tiny_package, tmp_path):
    """`diffrt generate --from IMAGE` applies the LoRAs (files and scales) the image was made with: the same image;
    a LoRA file gone since is refused in one line; --lora given again wins."""
    made = run_cli("generate", "a house", "--model", tiny_package, "--lora", f"{loras / 'style.safetensors'}:0.7",
                   "--steps", 3, "--seed", 4, "-q", "-o", tmp_path / "styled.png")
    assert made.returncode == 0, made.stderr
    again = run_cli("generate", "--from", tmp_path / "styled.png", "--model", tiny_package, "-q", "-o", tmp_path / "again.png")
    assert again.returncode == 0, again.stderr
    image = lambda name: np.asarray(Image.open(tmp_path / name))  # noqa: E731
    assert np.array_equal(image("again.png"), image("styled.png"))
    plain = run_cli("generate", "--from", tmp_path / "styled.png", "--model", tiny_package, "--lora", loras / "other.safetensors",
                    "-q", "-o", tmp_path / "other.png")
    assert plain.returncode == 0 and not np.array_equal(image("other.png"), image("styled.png"))
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(loras / "style.safetensors", moved / "style.safetensors")
    made = run_cli("generate", "a house", "--model", tiny_package, "--lora", moved / "style.safetensors", "--steps", 2,
                   "-q", "-o", tmp_path / "gone.png")
    (moved / "style.safetensors").unlink()
    gone = run_cli("generate", "--from", tmp_path / "gone.png", "--model", tiny_package, "-o", tmp_path / "x.png")
    assert gone.returncode == 2 and "LoRA" in gone.stderr and "no longer there" in gone.stderr, gone.stderr


def test_cli_lora_bad_input_exits_2(loras, tiny_package, tmp_path):
    for lora, message in (("style.safetensors:x", "is not a number"), ("missing.safetensors", "does not exist")):
        proc = run_cli("generate", "a house", "--model", str(tiny_package),
                               "--lora", str(loras / lora), "-o", str(tmp_path / "x.png"), "--steps", "1")
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_server_takes_loras_per_request(loras, tiny_package):
    """`diffrt serve --lora-dir`: <lora:NAME:SCALE> in the prompt and the loras field name LoRAs per request; the
    server switches between sets (images equal the pipeline's with that set) and refuses unknown names with a 400."""
    pytest.importorskip("fastapi")
    import base64
    from io import BytesIO

    from PIL import Image
    from test_serve import Server

    server = Server(tiny_package, "--lora-dir", str(loras), "--max-wait-ms", "0")
    try:
        def image(body: dict) -> np.ndarray:
            response = server.post("/v1/images/generations", {"steps": 3, "seed": 4, "size": "32x32", **body})
            assert response.status_code == 200, response.text
            return np.asarray(Image.open(BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))))

        tagged = image({"prompt": f"{PROMPT} <lora:style:0.5>"})
        plain = image({"prompt": PROMPT})
        field = image({"prompt": PROMPT, "loras": {"style": 0.5}})
        assert np.array_equal(tagged, field) and not np.array_equal(tagged, plain)
        pipe = Pipeline.from_package(tiny_package, backend="ort-cpu", loras=[LoraChoice(loras / "style.safetensors", 0.5)])
        ours = np.asarray(pipe(PROMPT, steps=3, seed=4, width=32, height=32).images[0])
        assert np.abs(ours.astype(int) - tagged).max() <= 1
        listed = httpx_get(server.url + "/sdapi/v1/loras")
        assert {"style", "other", "style-kohya"} <= {entry["name"] for entry in listed}
        for bad, message in (({"prompt": "x <lora:nothere:1>"}, "not in the server's LoRA folder"),
                             ({"prompt": "x", "loras": {"../style": 1.0}}, "not a plain file name"),
                             ({"prompt": "x <lora:style:lots>"}, "is not a number")):
            response = server.post("/v1/images/generations", {"steps": 1, **bad})
            assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
    finally:
        assert server.stop() == 0


def httpx_get(url: str):
    import httpx

    return httpx.get(url, timeout=30).json()


def to_ldm_kohya(peft_file, path, alpha: float, per_block: int = 2) -> None:
    """A PEFT UNet LoRA rewritten as kohya writes SDXL LoRAs: the original LDM / SGM block names (input_blocks_N_M,
    middle_block_N, output_blocks_N_M, in_layers_2 for conv1, ...), lora_down/lora_up, alpha."""
    import re

    from safetensors.numpy import load_file, save_file

    def ldm(module: str) -> str:
        resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                  "conv_shortcut": "skip_connection"}
        if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
            rest = resnet.get(m[4], m[4]) if m[2] == "resnets" else m[4]
            return f"input_blocks.{1 + int(m[1]) * (per_block + 1) + int(m[3])}.{0 if m[2] == 'resnets' else 1}.{rest}"
        if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
            rest = resnet.get(m[4], m[4]) if m[2] == "resnets" else m[4]
            return f"output_blocks.{int(m[1]) * (per_block + 1) + int(m[3])}.{0 if m[2] == 'resnets' else 1}.{rest}"
        if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
            return f"middle_block.1.{m[1]}"
        if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", module):
            return f"middle_block.{2 * int(m[1])}.{resnet.get(m[2], m[2])}"
        raise AssertionError(module)

    out = {}
    for key, value in load_file(str(peft_file)).items():
        module, kind = key.removeprefix("unet.").rsplit(".lora_", 1)
        stem = "lora_unet_" + ldm(module).replace(".", "_")
        out[f"{stem}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
        out[f"{stem}.alpha"] = np.array(alpha, dtype=np.float32)
    save_file(out, str(path))


@pytest.mark.slow
def test_kohya_sdxl_lora_with_ldm_block_names(tiny_sdxl_checkpoint, tiny_sdxl_package, tmp_path):
    """kohya's SDXL LoRAs name the UNet's blocks as the original (LDM / SGM) code does; diffusers reads them, and so
    does diffrt: the same image as the PEFT form, in diffusers and in diffrt."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(3)
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_checkpoint / "unet")
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "proj_out", "conv1"], init_lora_weights=False)
    unet.add_adapter(config)
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, weight_name="peft.safetensors",
                                                unet_lora_layers=get_peft_model_state_dict(unet))
    to_ldm_kohya(tmp_path / "peft.safetensors", tmp_path / "ldm.safetensors", alpha=4.0)
    latents = np.random.default_rng(1).standard_normal((1, 4, 16, 16), dtype=np.float32)
    images = {}
    for form in ("peft", "ldm"):
        pipe = reference_pipeline("StableDiffusionXLPipeline", tiny_sdxl_checkpoint)
        pipe.load_lora_weights(tmp_path, weight_name=f"{form}.safetensors")
        pipe.fuse_lora(lora_scale=0.7)
        with torch.no_grad():
            images[form] = pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, width=32, height=32,
                                latents=torch.from_numpy(latents), output_type="np").images
    assert np.abs(images["peft"] - images["ldm"]).max() <= 1e-4  # diffusers reads both forms alike
    plain = Pipeline.from_package(tiny_sdxl_package, backend="ort-cpu")
    before = plain(PROMPT, steps=3, guidance_scale=5.0, width=32, height=32, latents=latents, scheduler="euler")
    assert np.abs(before.array - images["ldm"]).max() > 0.02
    mine = Pipeline.from_package(tiny_sdxl_package, backend="ort-cpu", loras=[LoraChoice(tmp_path / "ldm.safetensors", 0.7)])
    result = mine(PROMPT, steps=3, guidance_scale=5.0, width=32, height=32, latents=latents, scheduler="euler")
    assert np.abs(result.array - images["ldm"]).max() <= 1e-3


def test_refit_weights_restore_what_only_the_old_set_changed(loras, tiny_package):
    """TensorRT refits in place: going from set A to B sets B's values and the graph's own for what only A changed;
    going to none sets every changed weight back (the refit itself needs TensorRT: tests marked trt)."""
    from onnx import numpy_helper

    from diffrt.runtime.lora import LoraSets, restored

    graph = tiny_package / "unet" / "model.onnx"
    sets = LoraSets(tiny_package, {"unet": graph, "text_encoder": tiny_package / "text_encoder" / "model.onnx"})
    a = sets.weights([LoraChoice(loras / "style.safetensors")])["unet"]
    b = sets.weights([LoraChoice(loras / "other.safetensors")])["unet"]
    assert a and b and not set(a) & set(b)
    to_b = restored(graph, b, a)
    assert set(to_b) == set(a) | set(b) and all(np.array_equal(to_b[k], v) for k, v in b.items())
    import onnx

    inits = {i.name: i for i in onnx.load(str(graph)).graph.initializer}
    assert all(np.array_equal(to_b[k], numpy_helper.to_array(inits[k])) for k in a)
    assert all(not np.array_equal(a[k], numpy_helper.to_array(inits[k])) for k in a)
    assert set(restored(graph, {}, a)) == set(a)


def test_build_flags_refit():
    from diffrt.export.trt_build import build_flags

    assert build_flags("fp16", "fp16", 10, False, refittable=True) == {"strongly_typed": True, "builder": ["REFIT"]}


def test_openvino_applies_loras_too(loras, tiny_package):
    """ov-cpu (what auto picks where OpenVINO is installed) applies LoRAs by replacing the graph's named constants:
    in float32 the same image as onnxruntime's with the LoRA, and switching back gives its own again."""
    pytest.importorskip("openvino")
    choice = [LoraChoice(loras / "other.safetensors", 0.8)]
    ort = Pipeline.from_package(tiny_package, backend="ort-cpu", loras=choice)(PROMPT, steps=3, seed=5)
    ov = Pipeline.from_package(tiny_package, backend="ov-cpu", precision="fp32", loras=choice)
    assert np.abs(ov(PROMPT, steps=3, seed=5).array - ort.array).max() <= 1e-3
    plain = Pipeline.from_package(tiny_package, backend="ov-cpu", precision="fp32")(PROMPT, steps=3, seed=5)
    ov.set_loras([])
    assert np.abs(ov(PROMPT, steps=3, seed=5).array - plain.array).max() <= 1e-5
    assert np.abs(plain.array - ort.array).max() > 0.02


@pytest.mark.slow
def test_lora_on_a_package_with_float16_weights(loras, tiny_checkpoint, tmp_path):
    """`diffrt export --weights-fp16` stores each weight as NAME__fp16 behind a Cast, which onnxruntime folds before an
    override reaches it: ort refuses in one line (nothing changes); OpenVINO replaces the constant and gives the image
    the export-time merge gives."""
    pytest.importorskip("openvino")
    from diffrt.export import ExportOptions, export_package

    choice = [LoraChoice(loras / "style.safetensors", 0.7)]
    half = export_package(tiny_checkpoint, tmp_path / "half", ExportOptions(weights_fp16=True, check=False),
                          log=lambda m: None)
    merged = export_package(tiny_checkpoint, tmp_path / "merged", ExportOptions(weights_fp16=True, loras=choice, check=False),
                            log=lambda m: None)
    ort = Pipeline.from_package(half, backend="ort-cpu")
    with pytest.raises(UserError, match="stores its weights as float16"):
        ort.set_loras(choice)
    assert ort.loras == [] and np.isfinite(ort(PROMPT, steps=1, seed=3).array).all()
    ov = lambda package, **k: Pipeline.from_package(package, backend="ov-cpu", precision="fp32", **k)(  # noqa: E731
        PROMPT, steps=3, seed=3).array
    run_time, at_export, plain = ov(half, loras=choice), ov(merged), ov(half)
    assert np.abs(run_time - at_export).max() <= 2e-3 < np.abs(plain - at_export).max()


@pytest.mark.slow
def test_lora_on_a_streamed_export(loras, tiny_checkpoint, tmp_path, monkeypatch):
    """A model over the size threshold (SDXL's UNet) is exported by dynamo with its weights streamed; its Linear
    weights are stored transposed (no Transpose for onnxruntime to fold from the file), so run-time LoRAs reach them:
    the image equals the export-time merge's."""
    import diffrt.export.writer as writer
    from diffrt.export import ExportOptions, export_package

    unet_bytes = 4 * sum(p.numel() for p in __import__("diffusers").UNet2DConditionModel.from_pretrained(
        tiny_checkpoint / "unet").parameters())
    monkeypatch.setattr(writer, "BIG_MODEL_BYTES", unet_bytes - 1)  # the UNet alone is streamed, as SDXL's would be
    choice = [LoraChoice(loras / "style.safetensors", 0.7)]
    options = dict(components=("text_encoder", "unet", "vae_decoder"))
    streamed = export_package(tiny_checkpoint, tmp_path / "s", ExportOptions(**options), log=lambda m: None)
    monkeypatch.undo()
    manifest = json.loads((streamed / "diffrt.json").read_text())
    assert manifest["components"]["unet"]["made_by"].startswith("torch.onnx dynamo") and all(
        c["check"]["passed"] for c in manifest["components"].values())
    unet_map = json.loads((streamed / "unet" / "weights_map.json").read_text())
    assert any(name.endswith("__transposed") and flag == "T" for name, flag in unet_map.values())
    merged = export_package(tiny_checkpoint, tmp_path / "m", ExportOptions(loras=choice, check=False, **options),
                            log=lambda m: None)
    run = lambda package, **k: Pipeline.from_package(package, backend="ort-cpu", **k)(PROMPT, steps=3, seed=3).array  # noqa: E731
    run_time, at_export, plain = run(streamed, loras=choice), run(merged), run(streamed)
    assert np.abs(run_time - at_export).max() <= 1e-4 < 0.02 < np.abs(plain - at_export).max()


def test_float32_fallback_keeps_the_loras(loras, fp16_package, tiny_package, tmp_path, monkeypatch):
    """An fp16 UNet that overflows reruns on its float32 copy with the applied LoRAs (the metadata lists them); after
    set_loras it stays in float32 with the new set; a set whose engines fail to open changes nothing."""
    broken = tmp_path / "broken"
    shutil.copytree(fp16_package, broken)
    plant_addition(broken, np.inf)  # the inf an fp16 overflow gives
    style, other = ([LoraChoice(loras / f"{n}.safetensors", 1.0)] for n in ("style", "other"))
    run = dict(steps=3, seed=1, scheduler="ddim")
    pipe = Pipeline.from_package(broken, backend="ort-cpu", fp32_fallback=True, loras=style)
    with pytest.warns(UserWarning, match="rerunning it in float32"):
        rescued = pipe(PROMPT, **run)
    reference = Pipeline.from_package(tiny_package, backend="ort-cpu", loras=style)
    plain = Pipeline.from_package(tiny_package, backend="ort-cpu")(PROMPT, **run).array
    near = lambda a, b: np.abs(a - b).max()  # noqa: E731
    assert near(rescued.array, reference(PROMPT, **run).array) < near(rescued.array, plain) / 3
    assert rescued.settings["loras"] == [c.label for c in style]
    pipe.set_loras(other)
    assert pipe.fell_back == ["unet"]
    again = pipe(PROMPT, **run)  # no overflow: the UNet is still the float32 one, now with the other LoRA
    reference.set_loras(other)
    assert near(again.array, reference(PROMPT, **run).array) < near(again.array, plain) / 3

    def fails(*args, **kwargs):
        raise UserError("no memory left for the engine")

    monkeypatch.setattr(pipe, "_engine", fails)
    with pytest.raises(UserError, match="no memory left"):
        pipe.set_loras(style)
    monkeypatch.undo()
    assert pipe.loras == other
    assert np.array_equal(pipe(PROMPT, **run).array, again.array)  # the engines in place were not closed
