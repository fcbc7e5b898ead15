"""Shared fixtures: a tiny random diffusers checkpoint, its diffrt export, and noise patching."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile

import numpy as np
import pytest

# samplers the fast lane (-m "not slow") compares with diffusers: one of each kind (DDIM-like, ancestral, multistep with
# Karras sigmas, predictor-corrector, two-call, consistency); the full suite compares every one
FAST_SAMPLERS = ("ddim", "euler_a", "dpmpp_2m_karras", "unipc", "heun", "lcm")


def sizes_for(name: str, sizes: tuple) -> tuple:
    """The (width, height) sizes a sampler is compared at: all for FAST_SAMPLERS, the last (non-square) for the
    others; a sampler's arithmetic does not depend on the latent size, the pipeline's is covered by the fast ones."""
    return sizes if name in FAST_SAMPLERS else sizes[-1:]


def sampler_params(names) -> list:
    """pytest params of sampler names, those outside FAST_SAMPLERS marked slow."""
    return [pytest.param(n, marks=() if n in FAST_SAMPLERS else pytest.mark.slow) for n in names]


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """`diffrt ARGS` run in this process (no new interpreter, onnxruntime already loaded): its exit code and what it
    wrote to stdout and stderr. Real subprocesses are kept for what only they show (signals, argv bytes, pipes)."""
    import io
    import signal
    import warnings
    from contextlib import redirect_stderr, redirect_stdout

    from diffrt.runtime import cli

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    handlers, showwarning = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)], warnings.showwarning
    try:
        if cwd is not None:
            os.chdir(cwd)
        with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")
            try:
                code = cli.main([str(a) for a in args])
            except SystemExit as exc:  # argparse's own errors
                code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    finally:
        os.chdir(here)
        for s, handler in zip((signal.SIGINT, signal.SIGTERM), handlers):
            signal.signal(s, handler)
        warnings.showwarning = showwarning
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def shared_noise(seed: int):
    """Make diffusers draw its noise (ancestral samplers' noise, the VAE encoder's sample, img2img's and inpainting's
    start noise) from numpy's default_rng(seed), in order, as diffrt does for one image."""
    torch = pytest.importorskip("torch")
    import diffusers.models.autoencoders.vae as vae
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint
    import diffusers.schedulers.scheduling_ddpm as ddpm
    import diffusers.schedulers.scheduling_dpmsolver_multistep as dpm
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea
    import diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete as dpm2a
    import diffusers.schedulers.scheduling_lcm as lcm
    import diffusers.schedulers.scheduling_tcd as tcd

    rng = np.random.default_rng(seed)

    def randn(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32)).to(dtype or torch.float32)

    modules = (ea, lcm, vae, img2img, inpaint, ddpm, dpm, dpm2a, tcd)
    saved = [m.randn_tensor for m in modules]
    for m in modules:
        m.randn_tensor = randn
    try:
        yield
    finally:
        for m, original in zip(modules, saved):
            m.randn_tensor = original


CORPUS_WORDS = ("a photo of the red blue green small large cat dog house tree on in at with under over painting "
                "portrait landscape city night day sun moon water mountain river car road street light dark bright "
                "old new beautiful ugly happy sad man woman child flower garden sky cloud rain snow fire stone").split()


def _corpus(n: int = 3000) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(CORPUS_WORDS, size=rng.integers(3, 12))) for _ in range(n)]


def make_tiny_checkpoint(root, pad_token: str | None = None, unet_in_channels: int = 4, sd2: bool = False,
                         norm_groups: int = 32):
    """A tiny random SD-1.x-shaped diffusers checkpoint, built from configs (no download); sd2: shaped as SD 2.x is
    (OpenCLIP's GELU text encoder, `!` padding, v-prediction over zero-terminal-SNR betas, trailing spacing);
    norm_groups: the UNet's and VAE's GroupNorm groups (SD's 32 leaves one channel per group at 32 channels)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffrt.models.train_shapes import build_tokenizer

    tokenizer = build_tokenizer(_corpus(), root / "tok-build", vocab_size=800)
    if pad_token or sd2:
        tokenizer.pad_token = pad_token or "!"
    torch.manual_seed(0)
    vocab = len(tokenizer)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=5,
                                        num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab - 2,
                                        eos_token_id=vocab - 1, pad_token_id=vocab - 1,
                                        hidden_act="gelu" if sd2 else "quick_gelu"))
    with torch.no_grad():  # a trained CLIP's last layer norm has a bias, so its output's mean is not ~0 (prompt
        text.text_model.final_layer_norm.bias.normal_(0.3, 0.5)  # emphasis divides by that mean); so has this one
    unet = UNet2DConditionModel(sample_size=16, in_channels=unet_in_channels, out_channels=4, layers_per_block=2,
                                block_out_channels=(32, 64),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=norm_groups)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=norm_groups)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False,
                              **({"prediction_type": "v_prediction", "timestep_spacing": "trailing"} if sd2 else {}))
    if sd2:  # PNDM has no zero-terminal-SNR option; the samplers built over this config (DDIM, DPM++, ...) read it
        scheduler.register_to_config(rescale_betas_zero_snr=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    path = root / "checkpoint"
    pipe.save_pretrained(path)
    return path


def make_tiny_sdxl_checkpoint(root, turbo: bool = False):
    """A tiny random SDXL checkpoint (StableDiffusionXLPipeline's layout) built from configs: a CLIP text encoder and a
    CLIP text encoder with projection (its tokenizer pads with `!`), a UNet taking pooled text embeddings and six
    size/crop time ids, force_zeros_for_empty_prompt; turbo: SDXL-Turbo's trailing Euler a scheduler."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffrt.models.train_shapes import build_tokenizer

    tokenizer = build_tokenizer(_corpus(), root / "tok-build", vocab_size=800)
    tokenizer_2 = build_tokenizer(_corpus(), root / "tok-build-2", vocab_size=800)
    tokenizer_2.pad_token = "!"
    torch.manual_seed(0)
    vocab = len(tokenizer)

    def text_config(hidden: int, layers: int, **extra) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=37, num_hidden_layers=layers,
                              num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab - 2,
                              eos_token_id=vocab - 1, pad_token_id=vocab - 1, hidden_act="gelu", **extra)

    text = CLIPTextModel(text_config(32, 5))
    text_2 = CLIPTextModelWithProjection(text_config(32, 4, projection_dim=24))
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=24 + 6 * 8)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        scaling_factor=0.13025, force_upcast=True)
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    scheduler = (EulerAncestralDiscreteScheduler(**common, timestep_spacing="trailing") if turbo
                 else EulerDiscreteScheduler(**common, timestep_spacing="leading"))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)
    path = root / "checkpoint"
    pipe.save_pretrained(path)
    return path


def make_t5_tokenizer(folder, max_length: int = 512):
    """A T5 tokenizer learnt here on the test corpus, saved as T5TokenizerFast into folder; returns it."""
    from diffrt.models.train_shapes import build_t5_tokenizer

    return build_t5_tokenizer(_corpus(), folder, max_length=max_length)


def make_tiny_sd3_checkpoint(root, t5: bool = True, sample_size: int = 16):
    """A tiny random SD3 checkpoint (StableDiffusion3Pipeline's layout) built from configs: two CLIP encoders with
    projections of different widths (the second pads with `!`), a T5 encoder wider than both CLIPs together (so
    CLIP's states are zero-padded to its width), an MMDiT over 2x2 patches, a 16-channel VAE with a shift, and
    FlowMatchEuler with shift 3; t5=False leaves T5 out, as diffusers allows (text_encoder_3=None)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from diffrt.models.train_shapes import build_tokenizer

    tokenizer = build_tokenizer(_corpus(), root / "tok-build", vocab_size=800)
    tokenizer_2 = build_tokenizer(_corpus(), root / "tok-build-2", vocab_size=800)
    tokenizer_2.pad_token = "!"
    t5_tokenizer = make_t5_tokenizer(root / "tok-build-3") if t5 else None
    torch.manual_seed(0)
    vocab = len(tokenizer)

    def clip(hidden: int, layers: int) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=37, num_hidden_layers=layers, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
            hidden_act="gelu", projection_dim=hidden))

    t5_model = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=96, d_ff=64, d_kv=8, num_layers=2,
                                       num_heads=4, relative_attention_num_buckets=8)) if t5 else None
    transformer = SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=96, pooled_projection_dim=80, out_channels=16,
                                        pos_embed_max_size=32)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=16,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=clip(32, 4), tokenizer=tokenizer, text_encoder_2=clip(48, 3),
                                    tokenizer_2=tokenizer_2, text_encoder_3=t5_model, tokenizer_3=t5_tokenizer)
    path = root / "checkpoint"
    pipe.save_pretrained(path)
    return path


def make_tiny_flux_checkpoint(root, guidance: bool = True):
    """A tiny random FLUX.1 checkpoint (FluxPipeline's layout) built from configs: a CLIP encoder (its pooled output),
    a T5 encoder, a FLUX transformer over 2x2-packed latents with rotary image / text ids, a 16-channel VAE with a
    shift, and FlowMatchEuler with dynamic shifting; guidance: FLUX.1-dev's guidance-distilled input (schnell lacks it)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from diffrt.models.train_shapes import build_tokenizer

    tokenizer = build_tokenizer(_corpus(), root / "tok-build", vocab_size=800)
    t5_tokenizer = make_t5_tokenizer(root / "tok-build-2")
    torch.manual_seed(0)
    vocab = len(tokenizer)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                        num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab - 2,
                                        eos_token_id=vocab - 1, pad_token_id=vocab - 1, hidden_act="quick_gelu"))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=48, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                         pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=16,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    path = root / "checkpoint"
    pipe.save_pretrained(path)
    return path


# doctor's per-machine verdicts (runtime/trust.py) go to a folder of the run's own, never the user's cache; CLI
# subprocesses inherit it
os.environ["DIFFRT_CACHE_DIR"] = tempfile.mkdtemp(prefix="diffrt-checks-")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    pytest.importorskip("diffusers")
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def bundled_without(dest, component: str = "vae_encoder"):
    """A copy of the bundled package at dest with one component taken out (graph and manifest entries)."""
    import shutil

    from diffrt.runtime.bundled import bundled_model

    shutil.copytree(bundled_model(), dest)
    shutil.rmtree(dest / component)
    manifest = json.loads((dest / "diffrt.json").read_text())
    del manifest["components"][component]
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith(f"{component}/")}
    (dest / "diffrt.json").write_text(json.dumps(manifest))
    return dest


def with_cache_graphs(package, dest, method: str):
    """A copy of a package with a step-caching method's graphs added by the CLI (`diffrt deepcache|fbcache add`)."""
    import shutil

    shutil.copytree(package, dest)
    done = run_cli(method, "add", dest)
    assert done.returncode == 0, done.stderr
    return dest


def exported(checkpoint, tmp_path_factory, name: str, **options):
    """checkpoint exported quietly by diffrt into a fresh folder as package `name` (ExportOptions from options)."""
    from diffrt.export import ExportOptions, export_package

    return export_package(checkpoint, tmp_path_factory.mktemp(f"pkg-{name}") / name, ExportOptions(**options),
                          log=lambda msg: None)


@pytest.fixture(scope="session")
def tiny_package(tiny_checkpoint, tmp_path_factory):
    return exported(tiny_checkpoint, tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def fp16_package(tiny_package, tmp_path_factory):
    """The tiny package quantized to fp16, its float32 graphs kept for the NaN/inf fallback."""
    from diffrt.export.precision import QuantizeOptions, quantize_package

    out = tmp_path_factory.mktemp("fp16") / "tiny-fp16"
    quantize_package(tiny_package, out, QuantizeOptions(precision="fp16", steps=6, gate_seeds=1), log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def tiny_plain_package(tiny_checkpoint, tmp_path_factory):
    """The tiny model exported with plain (MatMul/Softmax) attention: the form TensorRT parses."""
    return exported(tiny_checkpoint, tmp_path_factory, "tiny-plain", attention="plain")


@pytest.fixture(scope="session")
def tiny_sd2_checkpoint(tmp_path_factory):
    pytest.importorskip("diffusers")
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-sd2"), sd2=True)


@pytest.fixture(scope="session")
def tiny_sd2_package(tiny_sd2_checkpoint, tmp_path_factory):
    return exported(tiny_sd2_checkpoint, tmp_path_factory, "tiny-sd2")


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(tmp_path_factory):
    pytest.importorskip("diffusers")
    return make_tiny_sdxl_checkpoint(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sdxl_package(tiny_sdxl_checkpoint, tmp_path_factory):
    return exported(tiny_sdxl_checkpoint, tmp_path_factory, "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_inpaint_checkpoint(tmp_path_factory):
    """The tiny checkpoint with a 9-channel inpainting UNet (latents, mask, masked-image latents)."""
    pytest.importorskip("diffusers")
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-inpaint"), unet_in_channels=9)


@pytest.fixture(scope="session")
def tiny_inpaint_package(tiny_inpaint_checkpoint, tmp_path_factory):
    return exported(tiny_inpaint_checkpoint, tmp_path_factory, "tiny-inpaint")


def reference_pipeline(class_name: str, checkpoint):
    """A diffusers pipeline of that class over the checkpoint, its progress bar off."""
    import diffusers

    pipe = getattr(diffusers, class_name).from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    pipe.checkpoint_scheduler_config = dict(pipe.scheduler.config)  # what a package of it holds
    return pipe


def use_sampler(pipe, name: str) -> dict:
    """Give a diffusers pipeline diffrt's sampler `name` over the checkpoint's own scheduler config (not that of a
    sampler swapped in before, whose keys would carry over); returns the call's arguments the sampler needs (eta)."""
    import diffusers

    from diffrt.runtime.schedulers import SHORT_NAMES

    cls, overrides = SHORT_NAMES[name]
    pipe.scheduler = getattr(diffusers, cls.class_name).from_config({**pipe.checkpoint_scheduler_config, **overrides})
    return {"eta": getattr(cls, "eta", 0.0)}


@pytest.fixture(scope="session")
def ours(tiny_package):
    """diffrt's pipeline over the tiny package, on the CPU."""
    from diffrt.runtime.pipeline import Pipeline

    return Pipeline.from_package(tiny_package, backend="ort-cpu")


def plant_addition(package, value: float, name: str = "unet") -> None:
    """Make a component's graph add `value` to its output (inf: what an fp16 overflow gives; a finite one: a path
    that draws wrong images), its manifest no longer vouching for the file."""
    import onnx
    from onnx import TensorProto, helper

    path = package / name / "model.onnx"
    model = onnx.load(str(path))
    g = model.graph
    old = g.output[0].name
    for node in g.node:
        node.output[:] = [f"{o}__pre" if o == old else o for o in node.output]
        node.input[:] = [f"{o}__pre" if o == old else o for o in node.input]
    g.node.extend([
        helper.make_node("Constant", [], [f"{old}__add"], value=helper.make_tensor("add", TensorProto.FLOAT, [], [value])),
        helper.make_node("Add", [f"{old}__pre", f"{old}__add"], [old]),
    ])
    onnx.save(model, str(path))
    manifest = json.loads((package / "diffrt.json").read_text())
    manifest["files"].pop(f"{name}/model.onnx")
    (package / "diffrt.json").write_text(json.dumps(manifest))


@contextlib.contextmanager
def browser_page(url: str):
    """A page of headless Chromium (Debian's package, driven by Playwright) opened at url; skips without them."""
    import shutil

    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser_path:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url)
            yield page
        finally:
            browser.close()
