"""The family seam holds a new kind of model: a toy flow-matching DiT (2x2 patches packed into tokens, a VAE with a
shift factor, FlowMatchEuler over its own scheduler config) added by this test alone, its class registered in
FAMILIES, no runtime source file changed. Its images equal a PyTorch loop over the same modules with diffusers'
FlowMatchEulerDiscreteScheduler, and the pipeline's other paths (step batching, metadata) work for it unchanged."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from diffrt.runtime.families import FAMILIES, Family
from diffrt.runtime.pipeline import Pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PATCH, CHANNELS, WIDTH, TEXT = 2, 4, 48, 32
SHIFT_FACTOR, FLOW_CONFIG = 0.1, {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}


class ToyDiT(torch.nn.Module):
    """Tokens of 2x2 latent patches, attending to the text; predicts the flow's velocity per token."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.proj_in = torch.nn.Linear(CHANNELS * PATCH * PATCH, WIDTH)
        self.time = torch.nn.Linear(1, WIDTH)
        self.text = torch.nn.Linear(TEXT, WIDTH)
        self.attn = torch.nn.MultiheadAttention(WIDTH, 4, batch_first=True)
        self.proj_out = torch.nn.Linear(WIDTH, CHANNELS * PATCH * PATCH)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        h = self.proj_in(hidden_states) + self.time(timestep[:, None, None])
        context = self.text(encoder_hidden_states)
        h = h + self.attn(h, context, context, need_weights=False)[0]
        return self.proj_out(torch.nn.functional.silu(h))


def pack(x):
    """(n, c, h, w) latents -> (n, h/2 * w/2, c*4) tokens, as FLUX packs them (numpy or torch)."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // PATCH, PATCH, w // PATCH, PATCH)
    x = x.transpose(0, 2, 4, 1, 3, 5) if isinstance(x, np.ndarray) else x.permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens, shape):
    n, c, h, w = shape
    x = tokens.reshape(n, h // PATCH, w // PATCH, c, PATCH, PATCH)
    x = x.transpose(0, 3, 1, 4, 2, 5) if isinstance(x, np.ndarray) else x.permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, c, h, w)


class ToyFlow(Family):
    """The family this test adds: a CLIP encoder's last state, a packed DiT called "transformer", flow timesteps /1000."""

    name = "toy-flow"
    denoiser = "transformer"
    denoiser_output = "velocity"
    patch = PATCH

    def hidden_output(self, encoder, clip_skip):
        return "last_hidden_state", None

    def denoise(self, engine, run, x, t, cond, extras=None):
        return unpack(super().denoise(engine, run, x, t, cond, extras), x.shape)

    def denoiser_feeds(self, engine, sample, t, cond):
        t = np.broadcast_to(np.asarray(t, np.float32) / 1000, (len(sample),)).astype(np.float32)
        return {"hidden_states": pack(sample).astype(np.float32), "timestep": t, **cond}


@pytest.fixture(scope="module")
def toy(tiny_checkpoint, tiny_package, tmp_path_factory):
    """A package of the toy family: the tiny model's text encoder, tokenizer and VAE, the toy DiT as `transformer`."""
    root = tmp_path_factory.mktemp("toy") / "toy-flow"
    shutil.copytree(tiny_package, root, ignore=shutil.ignore_patterns("unet"))
    model = ToyDiT().eval()
    (root / "transformer").mkdir()
    example = (torch.zeros(2, 16, CHANNELS * PATCH * PATCH), torch.zeros(2), torch.zeros(2, 77, TEXT))
    torch.onnx.export(model, example, str(root / "transformer" / "model.onnx"), dynamo=False,
                      input_names=["hidden_states", "timestep", "encoder_hidden_states"], output_names=["velocity"],
                      dynamic_axes={"hidden_states": {0: "batch", 1: "tokens"}, "timestep": {0: "batch"},
                                    "encoder_hidden_states": {0: "batch", 1: "text"}, "velocity": {0: "batch", 1: "tokens"}})
    manifest = json.loads((root / "diffrt.json").read_text())
    manifest.update(family="toy-flow", prediction_type="flow", vae_shift_factor=SHIFT_FACTOR,
                    defaults={**manifest["defaults"], "scheduler": None})
    manifest["components"].pop("unet")
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith(("unet/", "scheduler/"))}
    (root / "diffrt.json").write_text(json.dumps(manifest))
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(FLOW_CONFIG))
    return root, model


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(FAMILIES, "toy-flow", ToyFlow)


def reference_images(checkpoint, model, prompt, negative, latents, steps, guidance):
    """The same model in PyTorch: CLIP from transformers, diffusers' FlowMatchEulerDiscreteScheduler and VAE."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(checkpoint / "tokenizer")
    encoder = transformers.CLIPTextModel.from_pretrained(checkpoint / "text_encoder")
    vae = diffusers.AutoencoderKL.from_pretrained(checkpoint / "vae")
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(FLOW_CONFIG)
    sched.set_timesteps(steps)
    with torch.no_grad():
        ids = tokenizer([negative, prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        text = encoder(ids.input_ids).last_hidden_state
        x = torch.from_numpy(latents)
        for t in sched.timesteps:
            rows = torch.cat([x, x])
            v = unpack(model(pack(rows), t.expand(2) / 1000, text), rows.shape)
            v = v[:1] + guidance * (v[1:] - v[:1])
            x = sched.step(v, t, x).prev_sample
        image = vae.decode(x / vae.config.scaling_factor + SHIFT_FACTOR).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_a_toy_flow_family_equals_its_pytorch_reference(toy, registered, tiny_checkpoint):
    root, model = toy
    pipe = Pipeline.from_package(root, backend="ort-cpu")
    assert pipe.stages == ("text_encoder", "transformer", "vae_decoder") and pipe.family.size_multiple == 4
    latents = np.random.default_rng(5).standard_normal((1, CHANNELS, 16, 16), dtype=np.float32)
    for steps, guidance in ((4, 5.0), (7, 1.0)):
        ours = pipe("a red house", negative_prompt="blurry", steps=steps, guidance_scale=guidance, width=32, height=32,
                    latents=latents)
        theirs = reference_images(tiny_checkpoint, model, "a red house", "blurry", latents, steps, guidance)
        assert np.abs(ours.array - theirs).max() <= 1e-3, f"steps {steps}, guidance {guidance}"
        assert ours.settings["scheduler"] == "flow_euler"


def test_a_family_that_does_not_guide_by_cfg_runs_one_row_per_image(toy, monkeypatch):
    """guidance = "embedded": no negative rows whatever the guidance scale; "cfg" doubles them; "none" refuses a
    guidance scale in one line."""
    from diffrt.runtime.errors import UserError

    class Embedded(ToyFlow):
        guidance = "embedded"

    class Unguided(ToyFlow):
        guidance = "none"

    root, _ = toy
    monkeypatch.setitem(FAMILIES, "toy-flow", Unguided)
    with pytest.raises(UserError, match="takes no guidance scale"):
        Pipeline.from_package(root, backend="ort-cpu")("a cat", steps=2, guidance_scale=7.5, width=32, height=32)
    for family, rows in ((ToyFlow, 4), (Embedded, 2)):
        monkeypatch.setitem(FAMILIES, "toy-flow", family)
        pipe = Pipeline.from_package(root, backend="ort-cpu")
        seen, run = [], pipe.transformer.run

        def counted(feeds, seen=seen, run=run):
            seen.append(len(feeds["hidden_states"]))
            return run(feeds)

        monkeypatch.setattr(pipe.transformer, "run", counted)
        pipe("a cat", steps=2, guidance_scale=7.5, num_images=2, width=32, height=32)
        assert seen == [rows, rows], family.__name__


def test_the_toy_family_shares_the_loop_and_its_checks(toy, registered):
    """Step-level batching joins two of its requests at different steps; sizes that its 2x2 patches cannot tile and
    discrete-time samplers are refused in one line."""
    from diffrt.runtime.errors import UserError

    root, _ = toy
    pipe = Pipeline.from_package(root, backend="ort-cpu")
    alone = [pipe(p, steps=4, seed=s, width=32, height=32).array for p, s in (("a cat", 1), ("a dog", 2))]
    first = pipe.begin("a cat", steps=4, seed=1, width=32, height=32)
    pipe.step([first])
    second = pipe.begin("a dog", steps=4, seed=2, width=32, height=32)
    while not (first.done and second.done):
        pipe.step([s for s in (first, second) if not s.done])
    assert np.abs(pipe.finish(first).array - alone[0]).max() <= 1e-5
    assert np.abs(pipe.finish(second).array - alone[1]).max() <= 1e-5
    with pytest.raises(UserError, match="width 34 is not a multiple of 4"):
        pipe("a cat", width=34, height=32)
    with pytest.raises(UserError, match="euler scheduler cannot sample a flow-matching model"):
        pipe("a cat", scheduler="euler")
