"""onnxruntime's CUDA-only contrib ops written out on the CPU, so a CUDA-fused graph can be checked against its plain one.

onnx's reference evaluator runs the fused graph with these kernels for the com.microsoft ops, written from the
ops' schemas (onnxruntime's ContribOperators): NhwcConv (NHWC input and output, weights M x kH x kW x C/group),
GroupNorm and SkipGroupNorm (channels_last, optional SiLU), BiasSplitGelu, Gelu, BiasGelu, BiasAdd,
SkipLayerNormalization and MultiHeadAttention (separate query, key and value); and MatMul. They compute in float32
and return the input's dtype, as the CUDA kernels accumulate in float32, and refuse what those kernels refuse
(BiasAdd and BiasSplitGelu take Stable Diffusion's channel counts only, GroupNorm float32 gamma and beta in NHWC and
an even number of channels per group), so the CPU check fails where the GPU would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx.reference.op_run import OpRun

CUDA_SIZES = {"BiasSplitGelu": (2560, 5120, 10240), "BiasAdd": (320, 640, 1280)}  # the last dims their kernels take


class CudaKernelRefusal(ValueError):
    """The graph asks a CUDA-only op for something its CUDA kernel refuses (it would fail on the GPU too)."""


def _f32(*arrays):
    return [None if a is None else np.asarray(a, dtype=np.float32) for a in arrays]


def _group_norm(x: np.ndarray, gamma, beta, epsilon: float, groups: int, activation: int) -> np.ndarray:
    """Group normalization of the NHWC x over its channel groups, then SiLU when activation is 1."""
    n, h, w, c = x.shape
    g = x.reshape(n, h * w, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    y = ((g - mean) / np.sqrt(var + epsilon)).reshape(n, h, w, c) * gamma + beta
    return y / (1.0 + np.exp(-y)) if activation == 1 else y


def _cuda_group_norm_inputs(gamma, beta, channels_last: int, groups: int) -> None:
    if not channels_last:
        raise CudaKernelRefusal("GroupNorm: only the channels_last layout is supported")
    if (gamma.shape[0] // groups) % 2:
        raise CudaKernelRefusal(f"GroupNorm: {gamma.shape[0] // groups} channel(s) per group; its CUDA kernel reads "
                                "channels in pairs from one group")
    if gamma.dtype != np.float32 or beta.dtype != np.float32:
        raise CudaKernelRefusal("GroupNorm only supports gamma and beta in float type")


def _last_dim(op: str, x: np.ndarray) -> None:
    if x.shape[-1] not in CUDA_SIZES[op]:
        raise CudaKernelRefusal(f"{op}: last dimension {x.shape[-1]} is not one of {CUDA_SIZES[op]}")


class GroupNorm(OpRun):
    op_domain = "com.microsoft"

    def _run(self, x, gamma, beta, epsilon=1e-5, groups=None, activation=0, channels_last=1):
        _cuda_group_norm_inputs(gamma, beta, channels_last, groups)
        return (_group_norm(*_f32(x, gamma, beta), epsilon, groups, activation).astype(x.dtype),)


class SkipGroupNorm(OpRun):
    op_domain = "com.microsoft"

    def _run(self, x, gamma, beta, skip, bias=None, epsilon=1e-5, groups=None, activation=0, channels_last=1):
        _cuda_group_norm_inputs(gamma, beta, channels_last, groups)
        n, c = x.shape[0], x.shape[3]
        if skip.shape != x.shape and skip.shape not in ((n, c), (n, 1, 1, c)):
            raise CudaKernelRefusal(f"SkipGroupNorm: skip of shape {skip.shape} for input {x.shape}")
        xf, gf, bf, sf, biasf = _f32(x, gamma, beta, skip, bias)
        s = xf + sf.reshape(n, 1, 1, c) if sf.ndim == 2 else xf + sf
        s = s if biasf is None else s + biasf
        return _group_norm(s, gf, bf, epsilon, groups, activation).astype(x.dtype), s.astype(x.dtype)


class NhwcConv(OpRun):
    op_domain = "com.microsoft"

    def _run(self, x, w, b=None, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None, strides=None):
        import torch

        if auto_pad not in ("NOTSET", b"NOTSET"):
            raise NotImplementedError(f"NhwcConv with auto_pad {auto_pad!r}")
        pads = pads or [0, 0, 0, 0]
        xt = torch.from_numpy(np.array(np.transpose(x, (0, 3, 1, 2)), dtype=np.float32))
        xt = torch.nn.functional.pad(xt, (pads[1], pads[3], pads[0], pads[2]))
        wt = torch.from_numpy(np.array(np.transpose(w, (0, 3, 1, 2)), dtype=np.float32))
        bt = None if b is None else torch.from_numpy(np.array(b, dtype=np.float32))
        y = torch.nn.functional.conv2d(xt, wt, bt, stride=tuple(strides or (1, 1)), dilation=tuple(dilations or (1, 1)),
                                       groups=group)
        return (y.numpy().transpose(0, 2, 3, 1).astype(x.dtype),)


def _gelu(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU of a float32 array."""
    import torch

    return torch.nn.functional.gelu(torch.from_numpy(np.ascontiguousarray(x))).numpy()


class BiasSplitGelu(OpRun):
    op_domain = "com.microsoft"

    def _run(self, x, bias):
        _last_dim("BiasSplitGelu", x)
        left, right = np.split(_f32(x)[0] + _f32(bias)[0], 2, axis=-1)
        return ((left * _gelu(right)).astype(x.dtype),)


class Gelu(OpRun):
    op_domain = "com.microsoft"

    def _run(self, x, approximate="none"):  # onnx's own Gelu's attribute, which the evaluator fills in by name
        return (_gelu(_f32(x)[0]).astype(x.dtype),)


class BiasGelu(OpRun):
    op_domain = "com.microsoft"

    def _run(self, x, bias):
        return (_gelu(_f32(x)[0] + _f32(bias)[0]).astype(x.dtype),)


class BiasAdd(OpRun):
    op_domain = "com.microsoft"

    def _run(self, x, bias, skip):
        _last_dim("BiasAdd", x)
        xf, bf, sf = _f32(x, bias, skip)
        return ((xf + bf + sf).astype(x.dtype),)


class SkipLayerNormalization(OpRun):
    op_domain = "com.microsoft"

    def _run(self, x, skip, gamma, beta=None, bias=None, epsilon=1e-12):
        xf, sf, gf, bf, biasf = _f32(x, skip, gamma, beta, bias)
        s = xf + sf + (0 if biasf is None else biasf)
        mean = s.mean(axis=-1, keepdims=True)
        inv_std = 1.0 / np.sqrt(s.var(axis=-1, keepdims=True) + epsilon)
        y = (s - mean) * inv_std * gf + (0 if bf is None else bf)
        return y.astype(x.dtype), mean, inv_std, s.astype(x.dtype)


class MultiHeadAttention(OpRun):
    op_domain = "com.microsoft"

    def _run(self, query, key=None, value=None, *rest, num_heads=None, scale=0.0, mask_filter_value=None, unidirectional=0):
        if key is None or value is None or query.ndim != 3 or key.ndim != 3 or any(r is not None for r in rest):
            raise NotImplementedError("MultiHeadAttention other than separate 3-d query, key and value")
        q, k, v = _f32(query, key, value)
        b, s, d = q.shape
        heads = lambda t: t.reshape(b, t.shape[1], num_heads, d // num_heads).transpose(0, 2, 1, 3)  # noqa: E731
        logits = heads(q) @ heads(k).transpose(0, 1, 3, 2) * (scale or 1.0 / np.sqrt(d // num_heads))
        weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        out = (weights @ heads(v)).transpose(0, 2, 1, 3).reshape(b, s, d)
        return (out.astype(query.dtype),)


class MatMul(OpRun):
    """ONNX's MatMul with float16 operands multiplied in float32 (numpy has no fast float16 product; GPUs accumulate
    float16 in float32 too)."""

    op_domain = ""

    def _run(self, a, b):
        return (np.matmul(*_f32(a, b)).astype(np.result_type(a, b)),)


CONTRIB_OPS = [GroupNorm, SkipGroupNorm, NhwcConv, BiasSplitGelu, Gelu, BiasGelu, BiasAdd, SkipLayerNormalization,
               MultiHeadAttention, MatMul]


def run_reference(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of the ONNX graph at path for feeds, run by onnx's reference evaluator with the contrib ops above."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(path))
    for i, node in enumerate(model.graph.node):  # the evaluator would store unnamed outputs under "", the name it
        node.output[:] = [o or f"unused.{i}.{j}" for j, o in enumerate(node.output)]  # also reads for absent inputs
    return ReferenceEvaluator(model, new_ops=CONTRIB_OPS).run(None, feeds)
