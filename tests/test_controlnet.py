"""ControlNet against diffusers' ControlNet pipelines: tiny random ControlNets made from the tiny UNets with their zero
convolutions randomized (left at zero they would add nothing and every comparison would pass), exported with the
package; one and two ControlNets, scales, guidance windows, guess mode, img2img, inpainting, SDXL, step batching."""

from __future__ import annotations

import base64
import json
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from diffrt.runtime.control import ControlInput
from diffrt.runtime.errors import UserError
from diffrt.runtime.pipeline import Pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from conftest import exported, make_tiny_sdxl_checkpoint, run_cli  # noqa: E402

PROMPT = "a red house under the night sky"


def make_controlnet(checkpoint, folder, seed: int):
    """A ControlNetModel made from the checkpoint's UNet, every weight diffusers zero-initializes drawn at random."""
    unet = diffusers.UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    vae_blocks = len(json.loads((checkpoint / "vae" / "config.json").read_text())["block_out_channels"])
    torch.manual_seed(seed)
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 48, 64)[:vae_blocks])
    randomized = 0
    with torch.no_grad():
        for p in net.parameters():
            if not p.abs().max() > 0:
                p.normal_(0, 0.3)
                randomized += 1
    assert randomized >= 8  # the zero convolutions (one per residual) and the conditioning embedding's last conv
    net.save_pretrained(folder)
    return folder


def control_picture(width: int, height: int, seed: int) -> Image.Image:
    """A map with edges and flat regions, as a control image is."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    grid = ((x // max(width // 4, 1) + y // max(height // 3, 1)) % 2) * 200 + rng.integers(0, 40, (height, width))
    return Image.fromarray(np.stack([grid, grid[::-1], grid[:, ::-1]], axis=2).astype(np.uint8))


@pytest.fixture(scope="module")
def controlnets(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    return [make_controlnet(tiny_checkpoint, root / name, seed) for name, seed in (("edges", 1), ("depth", 2))]


@pytest.fixture(scope="module")
def package(tiny_checkpoint, controlnets, tmp_path_factory):
    return exported(tiny_checkpoint, tmp_path_factory, "tiny-control", controlnets=controlnets)


@pytest.fixture(scope="module")
def ours(package):
    return Pipeline.from_package(package, backend="ort-cpu")


def reference(kind: str, checkpoint, controlnets):
    """diffusers' ControlNet pipeline of that kind over the checkpoint, with one ControlNet or a MultiControlNet,
    Euler as ours."""
    nets = [diffusers.ControlNetModel.from_pretrained(c) for c in controlnets]
    pipe = getattr(diffusers, kind).from_pretrained(checkpoint, controlnet=nets[0] if len(nets) == 1 else nets,
                                                    safety_checker=None, requires_safety_checker=False)
    pipe.checkpoint_scheduler_config = dict(pipe.scheduler.config)  # what the package holds (use_sampler builds on it)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = {"one": dict(scales=[1.0]), "half": dict(scales=[0.5]), "guess": dict(scales=[1.0], guess=True),
         "window": dict(scales=[0.8], start=0.2, end=0.7), "two": dict(scales=[1.0, 0.5]),
         "two-guess-window": dict(scales=[0.7, 1.2], guess=True, start=0.0, end=0.5)}


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c in ("one", "two") else pytest.mark.slow) for c in CASES])
def test_text_to_image_matches_diffusers(case, tiny_checkpoint, controlnets, ours):
    """StableDiffusionControlNetPipeline (MultiControlNet for two) with torch-cpu seeds: max |diff| <= 1e-3 in float,
    within 2 levels in uint8; and the ControlNets visibly change the image."""
    c = CASES[case]
    nets = controlnets[:len(c["scales"])]
    pipe = reference("StableDiffusionControlNetPipeline", tiny_checkpoint, nets)
    images = [control_picture(40, 24, k) for k in range(len(nets))]
    window = dict(control_guidance_start=c.get("start", 0.0), control_guidance_end=c.get("end", 1.0))
    with torch.no_grad():
        theirs = pipe(PROMPT, image=images if len(nets) > 1 else images[0], num_inference_steps=6, guidance_scale=7.5,
                      width=40, height=24, generator=torch.Generator().manual_seed(3), output_type="np",
                      controlnet_conditioning_scale=c["scales"] if len(nets) > 1 else c["scales"][0],
                      guess_mode=c.get("guess", False), **window).images
    control = [ControlInput(n.name, im, s) for n, im, s in zip(nets, images, c["scales"])]
    mine = ours(PROMPT, steps=6, guidance_scale=7.5, width=40, height=24, seed=3, rng="torch-cpu", scheduler="euler",
                control=control, guess_mode=c.get("guess", False), control_start=window["control_guidance_start"],
                control_end=window["control_guidance_end"])
    assert np.abs(mine.array - theirs).max() <= 1e-3
    levels = np.abs(np.asarray(mine.images[0], np.int16) - (theirs[0] * 255).round().astype(np.int16)).max()
    assert levels <= 2
    plain = ours(PROMPT, steps=6, guidance_scale=7.5, width=40, height=24, seed=3, rng="torch-cpu", scheduler="euler")
    assert np.abs(plain.array - theirs).max() > 0.02  # the ControlNets did something
    assert mine.settings["control"][0]["name"] == nets[0].name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["heun", "dpm2_a", "dpmpp_2m_karras", "unipc", "lcm", "ddim", "euler_a", "dpmpp_2m_sde"])
def test_every_kind_of_sampler_with_a_guidance_window_matches_diffusers(name, tiny_checkpoint, controlnets, ours):
    """The window is counted over diffusers' timesteps (Heun and DPM2 call the UNet twice a step), same noise."""
    from conftest import use_sampler

    pipe = reference("StableDiffusionControlNetPipeline", tiny_checkpoint, controlnets[:1])
    extra = use_sampler(pipe, name)
    control = control_picture(32, 32, 4)
    with torch.no_grad():
        theirs = pipe(PROMPT, image=control, num_inference_steps=5, guidance_scale=7.5, width=32, height=32,
                      generator=torch.Generator().manual_seed(3), output_type="np", controlnet_conditioning_scale=0.8,
                      control_guidance_start=0.2, control_guidance_end=0.7, **extra).images
    mine = ours(PROMPT, steps=5, guidance_scale=7.5, width=32, height=32, seed=3, rng="torch-cpu", scheduler=name,
                control=[ControlInput("edges", control, 0.8)], control_start=0.2, control_end=0.7)
    assert np.abs(mine.array - theirs).max() <= 1e-3


def test_without_control_the_unet_gives_the_plain_package_image(ours, tiny_package):
    """Zero residuals: the ControlNet-taking UNet's image equals the plain package's."""
    plain = Pipeline.from_package(tiny_package, backend="ort-cpu")
    a = ours(PROMPT, steps=4, width=32, height=32, seed=1)
    b = plain(PROMPT, steps=4, width=32, height=32, seed=1)
    assert np.abs(a.array - b.array).max() <= 1e-5
    assert "control" not in a.settings


def test_img2img_and_inpainting_match_diffusers(tiny_checkpoint, controlnets, ours):
    """StableDiffusionControlNetImg2ImgPipeline and ...InpaintPipeline (a 4-channel UNet: blended), torch-cpu seeds."""
    from test_img2img import mask_picture, picture

    image, control = picture(40, 24), control_picture(40, 24, 5)
    for kind, extra in (("StableDiffusionControlNetImg2ImgPipeline", {}),
                        ("StableDiffusionControlNetInpaintPipeline", {"mask": mask_picture(40, 24)})):
        pipe = reference(kind, tiny_checkpoint, controlnets[:1])
        theirs_extra = {"mask_image": extra["mask"]} if extra else {}
        with torch.no_grad():
            theirs = pipe(PROMPT, image=image, control_image=control, strength=0.7, num_inference_steps=6,
                          guidance_scale=7.5, width=40, height=24, generator=torch.Generator().manual_seed(4),
                          output_type="np", controlnet_conditioning_scale=0.9, **theirs_extra).images
        mine = ours(PROMPT, image=image, strength=0.7, steps=6, guidance_scale=7.5, seed=4, rng="torch-cpu",
                    scheduler="euler", control=[ControlInput("edges", control, 0.9)], **extra)
        assert np.abs(mine.array - theirs).max() <= 1e-3, kind


@pytest.mark.slow
def test_sdxl_matches_diffusers(tmp_path_factory):
    """StableDiffusionXLControlNetPipeline: the ControlNet takes the pooled text embeddings and time ids too."""
    checkpoint = make_tiny_sdxl_checkpoint(tmp_path_factory.mktemp("sdxl-control"))
    net = make_controlnet(checkpoint, checkpoint.parent / "pose", 7)
    package = exported(checkpoint, tmp_path_factory, "sdxl-control", controlnets=[net])
    pipe = reference("StableDiffusionXLControlNetPipeline", checkpoint, [net])
    control = control_picture(48, 32, 1)
    for guess in (False, True):
        with torch.no_grad():
            theirs = pipe(PROMPT, image=control, num_inference_steps=5, guidance_scale=6.0, width=48, height=32,
                          generator=torch.Generator().manual_seed(2), output_type="np", guess_mode=guess,
                          controlnet_conditioning_scale=0.8).images
        mine = Pipeline.from_package(package, backend="ort-cpu")(
            PROMPT, steps=5, guidance_scale=6.0, width=48, height=32, seed=2, rng="torch-cpu", scheduler="euler",
            control=[ControlInput("pose", control, 0.8)], guess_mode=guess)
        assert np.abs(mine.array - theirs).max() <= 1e-3, guess


def test_requests_with_different_control_images_share_a_step(ours):
    """Step-level batching: streams with different ControlNets, images, scales and modes, and one without any, stepped
    together, give each one's image alone."""
    calls = [dict(control=[ControlInput("edges", control_picture(32, 32, 1), 1.0)]),
             dict(control=[ControlInput("depth", control_picture(32, 32, 2), 0.6), ControlInput("edges", control_picture(32, 32, 3), 0.4)]),
             dict(control=[ControlInput("edges", control_picture(32, 32, 4), 1.0)], guess_mode=True),
             dict()]
    settings = dict(steps=4, width=32, height=32, guidance_scale=7.5, scheduler="euler")
    alone = [ours(PROMPT, seed=10 + k, **settings, **c).array for k, c in enumerate(calls)]
    streams = [ours.begin(PROMPT, seed=10 + k, **settings, **c) for k, c in enumerate(calls)]
    while not all(s.done for s in streams):
        ours.step(streams)
    for k, s in enumerate(streams):
        assert np.abs(ours.finish(s).array - alone[k]).max() <= 1e-4, k


def test_bad_control_input_is_refused_in_one_line(ours, tiny_package, tmp_path):
    picture = control_picture(32, 32, 0)
    bad = [(dict(control=[ControlInput("nope", picture)]), "has no ControlNet 'nope'; it has: depth, edges"),
           (dict(control=[ControlInput("edges", picture, float("nan"))]), "scale must be a number"),
           (dict(control=[ControlInput("edges", picture, start=0.6, end=0.4)]), "0 <= start < end <= 1"),
           (dict(control=[ControlInput("edges", tmp_path / "missing.png")]), "could not be read as an image"),
           (dict(control=[ControlInput("edges", picture, module="sobel")]), "module must be one of none, canny"),
           (dict(control=[ControlInput("edges", picture, mode="loud")]), "mode must be one of"),
           (dict(control=["edges.png"]), "must be a ControlInput"),
           (dict(guess_mode=True), "give one with --control")]
    for settings, message in bad:
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            ours(PROMPT, steps=2, width=32, height=32, **settings)
    with pytest.raises(UserError, match="takes no ControlNet residuals"):
        Pipeline.from_package(tiny_package, backend="ort-cpu")(PROMPT, steps=2, control=[ControlInput("edges", picture)])


def test_cli_control_canny_preprocess_and_controlnet_add(package, tiny_checkpoint, controlnets, tiny_package, tmp_path):
    """generate --control (a map, canny=PHOTO), preprocess canny equal to OpenCV's, bad specs exit 2 in one line,
    --from makes the same image again, and `controlnet add` gives a plain package its ControlNet (its UNet exported
    again from the recorded checkpoint)."""
    cv2 = pytest.importorskip("cv2")
    photo = tmp_path / "photo.png"
    control_picture(32, 32, 9).save(photo)
    done = run_cli("preprocess", "canny", str(photo), str(tmp_path / "map.png"), "--low", "50", "--high", "120")
    assert done.returncode == 0, done.stderr
    want = cv2.Canny(np.asarray(Image.open(photo).convert("RGB")), 50, 120)
    assert (np.asarray(Image.open(tmp_path / "map.png"))[:, :, 0] == want).all() and want.any()
    out = tmp_path / "a.png"
    done = run_cli("generate", PROMPT, "--model", str(package), "--backend", "ort-cpu", "--steps", "3", "--seed", "1",
                   "--control", f"edges:canny={photo}:0.8", "--control", f"depth:{tmp_path / 'map.png'}", "-o", str(out), "-q")
    assert done.returncode == 0, done.stderr
    again = run_cli("generate", "--from", str(out), "--model", str(package), "--backend", "ort-cpu", "-o",
                    str(tmp_path / "b.png"), "-q")
    assert again.returncode == 0, again.stderr
    assert (np.asarray(Image.open(out)) == np.asarray(Image.open(tmp_path / "b.png"))).all()
    for spec, message in (("edges", "write NAME:IMAGE"), ("nope:x.png", "no ControlNet 'nope'"),
                          ("edges:map.png:inf", "scale must be a number")):
        done = run_cli("generate", PROMPT, "--model", str(package), "--control", spec, "-o", str(tmp_path / "c.png"),
                       cwd=tmp_path)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_package, plain)
    done = run_cli("controlnet", "add", str(plain), str(controlnets[0]))
    assert done.returncode == 0, done.stderr
    added = Pipeline.from_package(plain, backend="ort-cpu")
    control = [ControlInput("edges", control_picture(32, 32, 1), 0.7)]
    settings = dict(steps=3, width=32, height=32, seed=2, control=control)
    exported_whole = Pipeline.from_package(package, backend="ort-cpu")
    assert np.abs(added(PROMPT, **settings).array - exported_whole(PROMPT, **settings).array).max() <= 1e-5


def test_http_a1111_controlnet_extension_api_and_openai_control(package, ours, tmp_path):
    """A real server: webuiapi's ControlNetUnit through /sdapi/v1/txt2img and img2img (units under
    alwayson_scripts.controlnet), the extension's model and module lists and detect, the OpenAI SDK with the `control`
    extension field; each image equal to the pipeline's with the same ControlNets; bad units a 400 naming the field."""
    webuiapi = pytest.importorskip("webuiapi")
    openai = pytest.importorskip("openai")
    cv2 = pytest.importorskip("cv2")
    from test_serve import Server, decode

    control, photo = control_picture(32, 32, 1), control_picture(32, 32, 6)
    settings = dict(steps=3, width=32, height=32, guidance_scale=7.0, scheduler="euler_a", seed=5)
    srv = Server(package, "--max-wait-ms", "100")
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=srv.port, sampler="Euler a", steps=3)
        assert api.controlnet_model_list() == [n + " [" + n_hash + "]" for n, n_hash in
                                               [(n, json.loads((package / "diffrt.json").read_text())["files"][
                                                   f"controlnet/{n}/model.onnx"]["sha256"][:8]) for n in ("depth", "edges")]]
        assert "canny" in api.controlnet_module_list()
        units = [webuiapi.ControlNetUnit(image=control, model=api.controlnet_model_list()[1], weight=0.8,
                                         resize_mode="Just Resize", guidance_end=0.7),
                 webuiapi.ControlNetUnit(image=photo, module="canny", model="depth", weight=0.5, threshold_a=50,
                                         threshold_b=120, control_mode=2)]
        # alwayson_scripts given fresh each call: webuiapi's default dict is shared by every call in the process and
        # keeps the units it was given (a later test's webuiapi calls to a server without ControlNets would carry them)
        got = api.txt2img(prompt=PROMPT, seed=5, steps=3, width=32, height=32, cfg_scale=7.0, controlnet_units=units,
                          alwayson_scripts={})
        want = ours(PROMPT, rng="numpy", **settings, control=[
            ControlInput("edges", control, 0.8, end=0.7), ControlInput("depth", photo, 0.5, module="canny", mode="control",
                                                                       thresholds=(50, 120))])
        assert "ignored" not in got.info or not got.info["ignored"], got.info
        assert np.abs(np.asarray(got.image, np.int16) - np.asarray(want.images[0], np.int16)).max() <= 1
        unit_free = ours(PROMPT, **settings)
        assert np.abs(np.asarray(unit_free.images[0], np.int16) - np.asarray(got.image, np.int16)).max() > 2
        init = control_picture(32, 32, 8)
        got = api.img2img(images=[init], prompt=PROMPT, seed=5, steps=3, cfg_scale=7.0, denoising_strength=0.6, width=32, height=32,
                          controlnet_units=[webuiapi.ControlNetUnit(model="edges", resize_mode="Just Resize")],
                          alwayson_scripts={})
        want = ours(PROMPT, image=init, strength=0.6, steps=3, guidance_scale=7.0, scheduler="euler_a", seed=5,
                    control=[ControlInput("edges", init)])  # a unit without an image takes the init image
        assert np.abs(np.asarray(got.image, np.int16) - np.asarray(want.images[0], np.int16)).max() <= 1
        detected = api.controlnet_detect([photo], module="canny", threshold_a=50, threshold_b=120)
        edges = cv2.Canny(np.asarray(photo), 50, 120)
        assert (np.asarray(detected.image.convert("L")) == edges).all()

        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
        buffer = BytesIO()
        control.save(buffer, format="PNG")
        b64 = base64.b64encode(buffer.getvalue()).decode()
        answer = client.images.generate(prompt=PROMPT, size="32x32", extra_body={
            "seed": 5, "steps": 3, "guidance_scale": 7.0, "scheduler": "euler_a",
            "control": [{"name": "edges", "image": b64, "scale": 0.9, "start": 0.1}]})
        want = ours(PROMPT, **settings, control=[ControlInput("edges", control, 0.9, start=0.1)])
        assert np.abs(decode(answer.data[0].b64_json).astype(np.int16) - np.asarray(want.images[0], np.int16)).max() <= 1

        bad = [({"model": "nope", "image": b64}, "args[0].model"), ({"model": "edges", "image": "not-an-image"}, "args[0].image"),
               ({"model": "edges", "image": b64, "module": "openpose"}, "args[0].module"),
               ({"model": "edges", "image": b64, "weight": "NaN"}, "weight"),
               ({"model": "edges", "image": b64, "control_mode": 7}, "args[0].control_mode"),
               ({"model": "edges"}, "args[0].image")]
        for unit, field in bad:
            r = srv.post("/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "width": 32, "height": 32,
                                               "alwayson_scripts": {"controlnet": {"args": [unit]}}})
            assert r.status_code in (400, 422) and field in r.text, (unit, r.status_code, r.text)
        r = srv.post("/v1/images/generations", {"prompt": "x", "size": "32x32", "control": [{"name": "edges", "image": b64,
                                                                                               "scale": "inf"}]})
        assert r.status_code == 422 and "scale" in r.text
        r = srv.post("/v1/images/generations", {"prompt": "x", "size": "32x32", "control": [{"name": "x", "image": b64}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "control[0].name"
    finally:
        assert srv.stop() == 0


def test_loras_switched_at_run_time_with_a_controlnet_match_diffusers(package, tiny_checkpoint, controlnets, tmp_path):
    """A run-time LoRA on the residual-taking UNet and the text encoder, with a ControlNet, against diffusers' ControlNet
    pipeline with the LoRA fused."""
    pytest.importorskip("peft")
    from test_lora import make_lora

    from diffrt.runtime.lora import LoraChoice

    lora = tmp_path / "style.safetensors"
    make_lora(tiny_checkpoint, lora, 1, ("to_q", "to_k", "to_v", "to_out.0"))
    pipe = reference("StableDiffusionControlNetPipeline", tiny_checkpoint, controlnets[:1])
    pipe.load_lora_weights(lora.parent, weight_name=lora.name, adapter_name="style")
    pipe.fuse_lora(lora_scale=0.7, adapter_names=["style"])
    pipe.unload_lora_weights()
    control = control_picture(32, 32, 2)
    with torch.no_grad():
        theirs = pipe(PROMPT, image=control, num_inference_steps=4, guidance_scale=7.5, width=32, height=32,
                      generator=torch.Generator().manual_seed(1), output_type="np").images
    mine = Pipeline.from_package(package, backend="ort-cpu", loras=[LoraChoice(lora, 0.7)])(
        PROMPT, steps=4, guidance_scale=7.5, width=32, height=32, seed=1, rng="torch-cpu", scheduler="euler",
        control=[ControlInput("edges", control)])
    assert np.abs(mine.array - theirs).max() <= 1e-3


@pytest.mark.slow
def test_openvino_and_quantized_packages_run_controlnets(package, ours, tmp_path):
    """ov-cpu in float32 equals ort-cpu; an fp16 package (ControlNets converted too) on both backends stays within the
    fp16 gate of the float32 image."""
    pytest.importorskip("openvino")
    from diffrt.export.precision import QuantizeOptions, quantize_package

    settings = dict(steps=4, width=32, height=32, seed=1, control=[ControlInput("edges", control_picture(32, 32, 3), 0.9)])
    want = ours(PROMPT, **settings).array
    ov = Pipeline.from_package(package, backend="ov-cpu", precision="fp32")(PROMPT, **settings).array
    assert np.abs(ov - want).max() <= 1e-3
    fp16 = tmp_path / "fp16"
    quantize_package(package, fp16, QuantizeOptions(precision="fp16", steps=4, gate_seeds=1), log=lambda m: None)
    assert json.loads((fp16 / "diffrt.json").read_text())["components"]["controlnet/edges"]["precision"] == "fp16"
    for backend in ("ort-cpu", "ov-cpu"):
        got = Pipeline.from_package(fp16, backend=backend)(PROMPT, **settings).array
        psnr = 10 * np.log10(1 / max(float(np.mean((got - want) ** 2)), 1e-12))
        assert psnr >= 35, (backend, psnr)


def test_bundled_unet_rebuilt_in_pytorch_equals_its_graph(tmp_path):
    """What the bundled ControlNet was trained against: the package's own UNet, read back from its ONNX weights."""
    from diffrt.models.train_controlnet import check_unet, unet_from_package
    from diffrt.runtime.bundled import bundled_model

    package = bundled_model()
    unet = unet_from_package(package, tmp_path)
    assert check_unet(unet, package) < 1e-5


def test_a_backend_that_opens_engines_together_opens_the_controlnets_with_the_stages(package, ours, monkeypatch):
    """TensorRT opens every engine at the start (one stream, one device-memory block): its ControlNets must be among
    them, since it opens none later. The same path on onnxruntime engines gives the ort-cpu image."""
    from dataclasses import replace

    from diffrt.runtime.backends import registry

    opened, ort = [], registry.REGISTRY["ort-cpu"]

    def together(root, unet_precision, components):
        opened.extend(components)
        return {c: ort.open(root / c / "model.onnx", c, "fp32", registry.EngineOptions(), None) for c in components}

    monkeypatch.setitem(registry.REGISTRY, "ort-cpu", replace(ort, opener=None, group_opener=together))
    pipe = Pipeline.from_package(package, backend="ort-cpu")
    assert {"controlnet/edges", "controlnet/depth", "unet"} <= set(opened)
    settings = dict(steps=3, width=32, height=32, seed=2, control=[ControlInput("depth", control_picture(32, 32, 1), 0.7)])
    got = pipe(PROMPT, **settings)
    monkeypatch.undo()
    assert np.abs(got.array - ours(PROMPT, **settings).array).max() <= 1e-5
