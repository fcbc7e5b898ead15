"""One ONNX graph per component, with optimum's input/output names and dynamic axes."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from diffrt.runtime.control import CONTROL, residual_names

from .checkpoint import Checkpoint
from .controlnet import ControlNetGraph, residual_inputs

EXTERNAL_DATA = "model.onnx_data"


@dataclass(frozen=True)
class ComponentSpec:
    """Names and dynamic axes of one exported graph (as optimum's ONNX configs write them)."""

    inputs: dict[str, dict[int, str]]
    outputs: dict[str, dict[int, str]]


TEXT_IN = {"input_ids": {0: "batch_size", 1: "sequence_length"}}
SEQUENCE = {0: "batch_size", 1: "sequence_length"}
# graph kind -> its names; one timestep per row in every denoiser, so that rows at different steps share a call (a
# server's step-level batching)
SPECS = {
    "text_encoder": ComponentSpec(TEXT_IN, {"last_hidden_state": SEQUENCE, "pooler_output": {0: "batch_size"},
                                            "layer_states": {0: "batch_size", 2: "sequence_length"}}),
    "t5": ComponentSpec(TEXT_IN, {"last_hidden_state": SEQUENCE}),
    "unet": ComponentSpec({"sample": {0: "batch_size", 2: "height", 3: "width"}, "timestep": {0: "batch_size"},
                           "encoder_hidden_states": SEQUENCE},
                          {"out_sample": {0: "batch_size", 2: "height", 3: "width"}}),
    "sd3_transformer": ComponentSpec({"hidden_states": {0: "batch_size", 2: "height", 3: "width"},
                                      "timestep": {0: "batch_size"}, "encoder_hidden_states": SEQUENCE,
                                      "pooled_projections": {0: "batch_size"}},
                                     {"out_hidden_states": {0: "batch_size", 2: "height", 3: "width"}}),
    "flux_transformer": ComponentSpec({"hidden_states": {0: "batch_size", 1: "image_tokens"},
                                       "encoder_hidden_states": SEQUENCE, "pooled_projections": {0: "batch_size"},
                                       "timestep": {0: "batch_size"}, "img_ids": {0: "image_tokens"},
                                       "txt_ids": {0: "sequence_length"}},
                                      {"out_hidden_states": {0: "batch_size", 1: "image_tokens"}}),
    "vae_decoder": ComponentSpec({"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"}},
                                 {"sample": {0: "batch_size", 2: "height", 3: "width"}}),
    "vae_encoder": ComponentSpec({"sample": {0: "batch_size", 2: "sample_height", 3: "sample_width"}},
                                 {"latent_parameters": {0: "batch_size", 2: "height_latent", 3: "width_latent"}}),
}


def graph_kind(name: str, ckpt: Checkpoint) -> str:
    """What graph a component becomes: T5; CLIP with every hidden state (SDXL's and SD3's encoders, "clip_layers")
    or SD's encoder; SD's or SDXL's UNet; SD3's or FLUX's transformer; a VAE half."""
    if name.startswith("text_encoder"):
        if ckpt.class_of(name) == "T5EncoderModel":
            return "t5"
        return "clip_layers" if ckpt.family in ("sdxl", "sd3") else "text_encoder"
    if name == "unet":
        return "sdxl_unet" if ckpt.family == "sdxl" else "unet"
    if name.startswith(CONTROL):
        return "controlnet"
    if name == "transformer":
        return f"{ckpt.family}_transformer"
    return name


def spec_for(name: str, ckpt: Checkpoint) -> ComponentSpec:
    """The graph's names: SDXL's and SD3's CLIP encoders give optimum's hidden_states.0..N (each layer's raw output,
    which they read, penultimate by default) and SDXL's UNet also takes the pooled text embeddings and the six time
    ids; FLUX's transformer takes FLUX guidance where it is guidance-distilled (dev)."""
    kind = graph_kind(name, ckpt)
    sdxl = {"text_embeds": {0: "batch_size"}, "time_ids": {0: "batch_size"}} if ckpt.family == "sdxl" else {}
    if kind in ("unet", "sdxl_unet", "controlnet"):
        unet = SPECS["unet"]
        residuals = residual_axes(ckpt.denoiser_config) if kind == "controlnet" or ckpt.control_inputs else {}
        if kind == "controlnet":
            image = {"controlnet_cond": {0: "batch_size", 2: "image_height", 3: "image_width"}}
            return ComponentSpec({**unet.inputs, **image, **sdxl}, residuals)
        return ComponentSpec({**unet.inputs, **sdxl, **residuals}, unet.outputs)
    if kind == "flux_transformer" and ckpt.denoiser_config.get("guidance_embeds"):
        flux = SPECS[kind]
        return ComponentSpec({**flux.inputs, "guidance": {0: "batch_size"}}, flux.outputs)
    if kind != "clip_layers":
        return SPECS[kind]
    config = ckpt.text_config(name)
    layers = {f"hidden_states.{i}": SEQUENCE for i in range(int(config["num_hidden_layers"]) + 1)}
    first = {"last_hidden_state": SEQUENCE, "pooler_output": {0: "batch_size"}}
    if ckpt.class_of(name) == "CLIPTextModelWithProjection":
        first = {"text_embeds": {0: "batch_size"}, "last_hidden_state": SEQUENCE}
    return ComponentSpec(TEXT_IN, {**first, **layers})


class TextEncoder(torch.nn.Module):
    """optimum's two outputs, and layer_states: every layer's output through the final layer norm, (batch, layers,
    sequence, hidden), which is what CLIP skip N takes (layer -N) without a graph per setting."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, return_dict=True, output_hidden_states=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        norm = self.model.text_model.final_layer_norm
        return out.last_hidden_state, pooled, torch.stack([norm(h) for h in out.hidden_states[1:]], dim=1)


class SdxlTextEncoder(torch.nn.Module):
    """optimum's SDXL outputs: the first two (pooled or projected, and last hidden state), then every hidden state."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, return_dict=True, output_hidden_states=True)
        first = (out.text_embeds, out.last_hidden_state) if hasattr(out, "text_embeds") else (out.last_hidden_state,
                                                                                                out.pooler_output)
        return (*first, *out.hidden_states)


def residual_axes(unet: dict) -> dict[str, dict[int, str]]:
    """The UNet's ControlNet residual inputs (a ControlNet's outputs) and their dynamic axes, per halving of the
    latents."""
    from .controlnet import residual_halvings

    halvings = residual_halvings(unet)
    return {name: {0: "batch_size", 2: f"height_{k}", 3: f"width_{k}"}
            for name, (_, k) in zip(residual_names(len(halvings)), halvings)}


def control_kwargs(residuals: tuple) -> dict:
    """diffusers' UNet arguments for ControlNet residuals given as graph inputs (none: a plain UNet)."""
    if not residuals:
        return {}
    return {"down_block_additional_residuals": residuals[:-1], "mid_block_additional_residual": residuals[-1]}


class SdxlUNet(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, *residuals):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.model(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False,
                          **control_kwargs(residuals))[0]


class UNet(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states, *residuals):
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False, **control_kwargs(residuals))[0]


class T5Encoder(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, return_dict=False)[0]


class SD3Transformer(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
        return self.model(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                          pooled_projections=pooled_projections, return_dict=False)[0]


class FluxTransformer(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None):
        return self.model(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                          pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids, txt_ids=txt_ids,
                          guidance=guidance, return_dict=False)[0]


class VaeDecoder(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, latent_sample):
        return self.model.decode(latent_sample, return_dict=False)[0]


class VaeEncoder(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample):
        return self.model.encode(sample).latent_dist.parameters


WRAPPERS = {"text_encoder": TextEncoder, "clip_layers": SdxlTextEncoder, "t5": T5Encoder, "unet": UNet,
            "sdxl_unet": SdxlUNet, "sd3_transformer": SD3Transformer, "flux_transformer": FluxTransformer,
            "vae_decoder": VaeDecoder, "vae_encoder": VaeEncoder, "controlnet": ControlNetGraph}


def wrapped(name: str, module: torch.nn.Module, ckpt: Checkpoint) -> torch.nn.Module:
    """The module as its graph is exported: optimum's inputs and outputs for the checkpoint's family."""
    return WRAPPERS[graph_kind(name, ckpt)](module).eval()


def latent_size(ckpt: Checkpoint) -> int:
    return int(ckpt.denoiser_config.get("sample_size", 128 if ckpt.family == "flux" else 64))  # FLUX: 1024 px


def patch_size(ckpt: Checkpoint) -> int:
    """What latent sides must be multiples of: a DiT's patch, 1 for a UNet."""
    return int(ckpt.denoiser_config.get("patch_size", 1)) if ckpt.denoiser == "transformer" else 1


def unet_factor(ckpt: Checkpoint) -> int:
    """How many times the UNet halves the latents, as a factor (1 for a DiT)."""
    if ckpt.denoiser == "transformer":
        return 1
    return 2 ** (len(ckpt.denoiser_config.get("block_out_channels", [0] * 4)) - 1)


def trace_size(ckpt: Checkpoint) -> int:
    """A latent size the UNet cannot halve evenly, so tracing records the explicit upsample sizes and the
    graph works at every latent size, not only at multiples of unet_factor."""
    s, f = latent_size(ckpt), unet_factor(ckpt)
    return s + max(f // 2, 1) if f > 1 else s


def trace_sides(ckpt: Checkpoint) -> tuple[int, int]:
    """(height, width) of the latents a graph is traced at: trace_size square for a UNet; for a DiT a patch wider
    than high, so that dynamo keeps its height and width apart (equal sides would make them one symbol)."""
    size = trace_size(ckpt)
    return (size, size + patch_size(ckpt)) if ckpt.denoiser == "transformer" else (size, size)


def vae_scale_factor(ckpt: Checkpoint) -> int:
    from diffrt.runtime.package import vae_scale_factor as of_config

    return of_config(ckpt.vae_config)


def example_inputs(name: str, ckpt: Checkpoint, batch: int, height: int, width: int,
                   gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random inputs for component `name` at a latent size (height, width)."""
    channels = int(ckpt.denoiser_config.get("in_channels", 4))
    if name.startswith("text_encoder"):
        config = ckpt.text_config(name)
        vocab = int(config.get("vocab_size", 49408))
        length = int(config.get("max_position_embeddings", 77))  # T5 (relative positions) takes any length: 77 here
        return (torch.randint(0, vocab, (batch, length), generator=gen, dtype=torch.int64),)
    if name == "transformer" and ckpt.family == "flux":
        return flux_inputs(ckpt, batch, height, width, gen)
    if name == "transformer":
        config = ckpt.denoiser_config
        return (torch.randn(batch, channels, height, width, generator=gen),
                torch.randint(0, 1000, (batch,), generator=gen).float(),
                torch.randn(batch, 77 * 2, int(config["joint_attention_dim"]), generator=gen),
                torch.randn(batch, int(config["pooled_projection_dim"]), generator=gen))
    if name == "unet" or name.startswith(CONTROL):
        hidden = int(ckpt.denoiser_config.get("cross_attention_dim", 768))
        length = int(ckpt.text_config("text_encoder").get("max_position_embeddings", 77))
        inputs = (torch.randn(batch, channels, height, width, generator=gen),
                  torch.randint(0, 1000, (batch,), generator=gen).float(),
                  torch.randn(batch, length, hidden, generator=gen))
        if name.startswith(CONTROL):  # the ControlNet's own sample is latents alone (an inpainting UNet's are 9 channels)
            f = vae_scale_factor(ckpt)
            inputs = (torch.randn(batch, int(ckpt.configs[name].get("in_channels", 4)), height, width, generator=gen),
                      *inputs[1:], torch.rand(batch, 3, height * f, width * f, generator=gen))
        if ckpt.family == "sdxl":
            pooled = int(ckpt.text_config("text_encoder_2").get("projection_dim", 1280))
            sizes = torch.randint(256, 1536, (batch, 6), generator=gen).float() * torch.tensor([1, 1, 0.1, 0.1, 1, 1])
            inputs = (*inputs, torch.randn(batch, pooled, generator=gen), sizes.round())
        if name == "unet" and ckpt.control_inputs:
            inputs = (*inputs, *residual_inputs(ckpt.denoiser_config, batch, height, width, gen))
        return inputs
    if name == "vae_decoder":
        return (torch.randn(batch, int(ckpt.vae_config.get("latent_channels", 4)), height, width, generator=gen),)
    f = vae_scale_factor(ckpt)
    return (torch.rand(batch, 3, height * f, width * f, generator=gen) * 2 - 1,)


def flux_inputs(ckpt: Checkpoint, batch: int, height: int, width: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """FLUX's transformer inputs for latents of height x width: their 2x2-packed tokens, 77 text tokens, the pooled
    embedding, a sigma, the tokens' position ids, and a guidance scale where the model takes one."""
    from diffrt.runtime.families.flux import image_ids

    config = ckpt.denoiser_config
    tokens, text = (height // 2) * (width // 2), 77
    inputs = (torch.randn(batch, tokens, int(config["in_channels"]), generator=gen),
              torch.randn(batch, text, int(config["joint_attention_dim"]), generator=gen),
              torch.randn(batch, int(config["pooled_projection_dim"]), generator=gen), torch.rand(batch, generator=gen),
              torch.from_numpy(image_ids(height, width)), torch.zeros(text, 3))
    return (*inputs, torch.rand(batch, generator=gen) * 5) if config.get("guidance_embeds") else inputs


def effective_opset(opset: int, exporter: str) -> int:
    """The dynamo exporter writes opset 18 natively; converting it down to 17 breaks its Split nodes."""
    return max(opset, 18) if exporter in ("dynamo", "streamed") else opset


def export_component(name: str, module: torch.nn.Module, ckpt: Checkpoint, folder: Path, opset: int, exporter: str,
                     attention: str = "mha") -> tuple[Path, str]:
    """Write folder/model.onnx and its weights in model.onnx_data; returns it and the attention form
    written ("mha": onnxruntime's fused MultiHeadAttention, "plain": MatMul/Softmax (always so in the text encoder),
    "none": no attention layers)."""
    opset = effective_opset(opset, exporter)
    import onnx

    from .attention import DOMAIN, use_fused_attention

    folder.mkdir(parents=True, exist_ok=True)
    spec = spec_for(name, ckpt)
    gen = torch.Generator().manual_seed(0)
    # the dynamo exporter specialises batch 1, so it is traced at batch 2 (see ../shared/FACTS.md)
    example = example_inputs(name, ckpt, 2, *trace_sides(ckpt), gen)
    path = folder / "model.onnx"
    traced = wrapped(name, module, ckpt)
    # SD's UNet and VAE attention processors become fused nodes; text encoders and DiTs (joint attention) stay plain
    fused = attention == "mha" and (name in ("unet", "vae_decoder", "vae_encoder") or name.startswith(CONTROL)) and \
        use_fused_attention(module)
    with torch.no_grad(), warnings.catch_warnings(), exportable():
        warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes: the check below is what counts
        torch.onnx.export(traced, example, str(path), input_names=list(spec.inputs), output_names=list(spec.outputs),
                          dynamic_axes={**spec.inputs, **spec.outputs}, opset_version=opset, do_constant_folding=True,
                          dynamo=exporter == "dynamo", verbose=False,
                          custom_opsets={DOMAIN: 1} if fused else None)
    # weights always go to model.onnx_data: past 2 GB protobuf needs it, and below it OpenVINO maps the file (then
    # diffrt hands those pages back after compiling) where it would copy weights held inside model.onnx for good
    extra = [p for p in folder.iterdir() if p.name != "model.onnx"]
    model = onnx.load(str(path))
    for p in extra:
        p.unlink()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=EXTERNAL_DATA)
    if exporter == "dynamo":
        _check_io_names(path, spec)
    has_attention = name.startswith("text_encoder") or bool(getattr(module, "attn_processors", None))
    return path, "mha" if fused else "plain" if has_attention else "none"


def cropped_pos_embed(self, height, width):
    """diffusers' PatchEmbed.cropped_pos_embed (SD3's centred crop of its position table) as a gather of the same
    rows and columns: dynamo writes the slice's bounds one row off for an odd patch count (5 rows come out 6)."""
    m = self.pos_embed_max_size
    h, w = height // self.patch_size, width // self.patch_size
    grid = self.pos_embed.reshape(m, m, -1)
    rows = torch.arange(h, device=grid.device) + (m - h) // 2
    cols = torch.arange(w, device=grid.device) + (m - w) // 2
    return grid.index_select(0, rows).index_select(1, cols).reshape(1, h * w, grid.shape[-1])


@contextmanager
def exportable():
    """diffusers code an exporter gets wrong, replaced by equal code for the export's duration."""
    from diffusers.models.embeddings import PatchEmbed

    original = PatchEmbed.cropped_pos_embed
    PatchEmbed.cropped_pos_embed = cropped_pos_embed
    try:
        yield
    finally:
        PatchEmbed.cropped_pos_embed = original


def meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """The same architecture with no weights (the meta device): tracing it costs no memory for the weights."""
    with torch.device("meta"):
        if hasattr(module, "from_config"):  # diffusers
            return type(module).from_config(module.config).eval()
        return type(module)(module.config).eval()  # transformers


def export_streamed(name: str, module: torch.nn.Module, ckpt: Checkpoint, folder: Path, opset: int,
                    weights=None, widen: bool = False, fold: bool = False) -> Path:
    """dynamo export of a large model without a copy of its weights: the graph is traced on a weightless copy, then
    each initializer is filled, by name, and written to model.onnx_data one by one: from the loaded module's tensors,
    or (weights: a stream_weights.FileWeights, module then weightless itself) read from the checkpoint's files as it
    is written, in the dtype the file stores (16-bit weights stay 16-bit, behind a Cast to float32; widen: written as
    float32). The graph is left unoptimized (onnxruntime and TensorRT fold its weight transposes and casts at load)."""
    import onnx_ir as ir

    from .stream_weights import ModuleWeights

    folder.mkdir(parents=True, exist_ok=True)
    spec = spec_for(name, ckpt)
    example = tuple(t.to("meta") for t in example_inputs(name, ckpt, 2, *trace_sides(ckpt), torch.Generator().manual_seed(0)))
    traced = module if weights is not None else meta_copy(module)
    with torch.no_grad(), warnings.catch_warnings(), exportable():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapped(name, traced, ckpt), example, None, input_names=list(spec.inputs),
                                    output_names=list(spec.outputs), dynamic_axes={**spec.inputs, **spec.outputs},
                                    opset_version=effective_opset(opset, "dynamo"), dynamo=True, optimize=False,
                                    verbose=False)
    fill_initializers(program.model.graph, weights if weights is not None else ModuleWeights(module), widen, fold)
    path = folder / "model.onnx"
    ir.save(program.model, path, external_data=EXTERNAL_DATA)
    _check_io_names(path, spec)
    return path


TRANSPOSED = "__transposed"  # an initializer holding a checkpoint weight transposed (what a Linear's MatMul takes)
STORED = {"F16": ("FLOAT16", "__fp16"), "BF16": ("BFLOAT16", "__bf16")}  # 16-bit storage: onnx dtype, name suffix


def fill_initializers(graph, weights, widen: bool = False, fold: bool = False) -> None:
    """Each initializer of a weightless graph read lazily from weights (by its parameter name, `model.` dropped),
    as the checkpoint holds it (a Linear's weight [out, in], which dynamo's unoptimized graph transposes for its
    MatMul: the layout linear_layout.py explains), or with fold a 2-D weight that only a Transpose reads stored
    transposed instead (NAME__transposed: for a graph LoRAs change, since onnxruntime would fold the Transpose from
    the file, out of a LoRA override's reach); a 16-bit weight is stored as such (NAME__fp16 / __bf16) behind a Cast
    to float32, or with widen as its float32 value (twice the file; OpenVINO's CPU plugin then holds the compiled
    model without the float32 copies of the folded Casts it keeps beside it: SD3.5-medium's MMDiT 7.6 GB against
    15.6)."""
    import onnx_ir as ir

    transposed = fold_weight_transposes(graph, weights) if fold else {}
    missing = []
    first = next(iter(graph), None)
    for key, value in list(graph.initializers.items()):
        param, flip = transposed.get(key, (key.removeprefix("model."), False))
        if param not in weights:
            if getattr(getattr(value.const_value, "raw", None), "is_meta", False) or value.const_value is None:
                missing.append(key)
            continue
        stored = None if widen else STORED.get(weights.dtype(param))
        dtype = getattr(ir.DataType, stored[0]) if stored else value.dtype
        read = (lambda p=param, f=flip, k=key, w=widen: ir_of(widened(weights.tensor(p)) if w else weights.tensor(p), f, k))
        if stored is None:
            value.const_value = ir.LazyTensor(read, dtype, value.shape, name=key)
            continue
        half = ir.Value(name=key + stored[1], shape=value.shape, type=ir.TensorType(dtype))
        half.const_value = ir.LazyTensor(read, dtype, value.shape, name=half.name)
        graph.register_initializer(half)
        cast = ir.Node("", "Cast", [half], [ir.AttrInt64("to", value.dtype)], num_outputs=1, name=key + "__cast")
        graph.initializers.pop(key)
        value.replace_all_uses_with(cast.outputs[0])
        cast.outputs[0].name = key
        graph.insert_before(first, cast) if first is not None else graph.append(cast)
    if missing:
        raise RuntimeError(f"streamed export: initializers {missing[:5]} are not weights of the model")


def widened(tensor: torch.Tensor) -> torch.Tensor:
    """A 16-bit float tensor as float32 (others as they are)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def ir_of(tensor: torch.Tensor, flip: bool, name: str):
    from .stream_weights import ir_tensor

    return ir_tensor(tensor.T if flip else tensor, name)


def fold_weight_transposes(graph, weights) -> dict[str, tuple[str, bool]]:
    """Replace each Transpose of a 2-D weight by an initializer NAME__transposed for the weight stored transposed;
    returns {initializer: (parameter, transposed)} for those, which fill_initializers reads."""
    import onnx_ir as ir

    folded = {}
    for node in list(graph):
        source = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        perm = node.attributes.get("perm")
        if (source is None or not source.is_initializer() or source.name.removeprefix("model.") not in weights
                or len(source.uses()) != 1 or len(source.shape) != 2
                or (perm is not None and list(perm.as_ints()) != [1, 0])):
            continue
        value = ir.Value(name=source.name + TRANSPOSED, shape=ir.Shape(list(source.shape)[::-1]), type=source.type)
        param = source.name.removeprefix("model.")
        value.const_value = ir.LazyTensor(lambda p=param, k=value.name: ir_of(weights.tensor(p), True, k), source.dtype,
                                          value.shape, name=value.name)  # fill_initializers may store it 16-bit
        graph.register_initializer(value)
        node.outputs[0].replace_all_uses_with(value)
        graph.remove(node, safe=True)
        graph.initializers.pop(source.name)
        folded[value.name] = (param, True)
    return folded


def _check_io_names(path: Path, spec: ComponentSpec) -> None:
    """Fail loudly if an exporter named the graph's inputs or outputs otherwise than the spec."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = list(spec.inputs) + list(spec.outputs)
    current = [i.name for i in model.graph.input] + [o.name for o in model.graph.output]
    if current == names:
        return
    raise RuntimeError(f"dynamo export of {path.parent.name} has I/O {current}, expected {names}")
