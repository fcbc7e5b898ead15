"""Random number sources in numpy that draw what torch draws: `torch.randn(shape, generator=g)` for a CPU generator
(mt19937 and torch's Box-Muller) and for a CUDA generator (Philox4x32-10 and curand's Box-Muller, laid out as torch's
kernel lays out its threads), so a seed copied from diffusers or AUTOMATIC1111 gives their starting noise here."""

from __future__ import annotations

import numpy as np

RNGS = ("numpy", "torch-cpu", "torch-cuda")
MASK32 = np.uint64(0xFFFFFFFF)
PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
CUDA_BLOCK = 256  # torch's threads per block for its random kernels; each thread makes 4 values a round
TWO_PI32 = np.float32(2 * np.pi)


class TorchCPU:
    """torch.Generator("cpu").manual_seed(seed): float32 draws within 4 ulp of torch's (its vectorized log, sin and
    cos differ from numpy's in the last bits), draws of fewer than 16 values bit for bit."""

    def __init__(self, seed: int) -> None:
        self.state = np.random.RandomState(seed & 0xFFFFFFFF)  # torch seeds mt19937 with the seed's low 32 bits
        self.cached: float | None = None  # the second value of a scalar Box-Muller pair, as torch keeps it

    def _raw(self, n: int) -> np.ndarray:
        return self.state.randint(0, 2**32, size=n, dtype=np.uint64)

    def _uniform24(self, n: int) -> np.ndarray:
        return (self._raw(n) & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(2.0**-24)

    def standard_normal(self, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        n = int(np.prod(shape))
        values = self._scalar_normals(n) if n < 16 else self._normal_fill(n)
        return values.reshape(shape).astype(dtype)

    def _normal_fill(self, n: int) -> np.ndarray:
        """torch's normal_fill: n uniforms, turned 16 at a time (8 pairs) into normals; a ragged end redraws 16."""
        data = self._uniform24(n)
        blocks = data[: n - n % 16].reshape(-1, 16)
        out = np.concatenate([box_muller16(blocks).reshape(-1), np.zeros(n % 16, np.float32)])
        if n % 16:
            out[n - 16:] = box_muller16(self._uniform24(16)[None])[0]
        return out

    def _scalar_normals(self, n: int) -> np.ndarray:
        """torch's normal_distribution<double>: 53-bit uniforms, cos of each pair returned, sin kept for the next."""
        out = []
        for _ in range(n):
            if self.cached is not None:
                out.append(self.cached)
                self.cached = None
                continue
            hi1, lo1, hi2, lo2 = (int(v) for v in self._raw(4))
            u1, u2 = ((((hi << 32) | lo) & ((1 << 53) - 1)) * 2.0**-53 for hi, lo in ((hi1, lo1), (hi2, lo2)))
            radius, theta = np.sqrt(-2.0 * np.log1p(-u2)), 2.0 * np.pi * u1
            self.cached = radius * np.sin(theta)
            out.append(radius * np.cos(theta))
        return np.array(out, np.float32)


def box_muller16(u: np.ndarray) -> np.ndarray:
    """Rows of 16 uniforms to 16 normals, in float32 as torch's vectorized kernel: cos into the first 8, sin the last."""
    radius = np.sqrt(np.float32(-2.0) * np.log(np.float32(1.0) - u[:, :8]))
    theta = TWO_PI32 * u[:, 8:]
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1).astype(np.float32)


def philox4x32_10(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32 with 10 rounds (Salmon et al. 2011) on (4, n) uint32 counters under one 64-bit key."""
    c0, c1, c2, c3 = (counter[i].astype(np.uint64) for i in range(4))
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0, p1 = PHILOX_M[0] * c0, PHILOX_M[1] * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & MASK32
        k0, k1 = (k0 + np.uint64(PHILOX_W[0])) & MASK32, (k1 + np.uint64(PHILOX_W[1])) & MASK32
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


class TorchCUDA:
    """torch.Generator("cuda").manual_seed(seed): each value comes from the Philox block (counter = draw offset +
    round, thread index) of the thread torch's kernel gives it, one of that block's four normals. Torch caps its grid
    at the GPU's resident threads (SMs x 2048 on most GPUs), so a draw larger than that depends on the GPU: give
    `threads` for it; by default every value has its own thread, which SD latents fit on GPUs with 32 SMs or more."""

    def __init__(self, seed: int, threads: int | None = None) -> None:
        self.key = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
        self.threads = threads
        self.offset = 0  # Philox counter increments used so far (torch's philox offset / 4)

    def standard_normal(self, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        n = int(np.prod(shape))
        blocks = -(-n // CUDA_BLOCK)
        stride = CUDA_BLOCK * (blocks if self.threads is None else min(blocks, self.threads // CUDA_BLOCK))
        e = np.arange(n, dtype=np.int64)
        rounds, within = np.divmod(e, 4 * stride)
        lane, thread = np.divmod(within, stride)
        counter = np.zeros((4, n), np.uint32)
        counter[0] = self.offset + rounds
        counter[2] = thread
        bits = philox4x32_10(counter, self.key)
        self.offset += int((n - 1) // (4 * stride) + 1)
        pair = lane // 2  # curand_normal4: Box-Muller of (x, y) gives values 0, 1; of (z, w) values 2, 3
        u = bits[2 * pair, e].astype(np.float32) * np.float32(2.0**-32) + np.float32(2.0**-33)
        v = bits[2 * pair + 1, e].astype(np.float32) * np.float32(2.0**-32 * 2 * np.pi) + np.float32(2.0**-33 * 2 * np.pi)
        radius = np.sqrt(np.float32(-2.0) * np.log(u))
        return np.where(lane % 2 == 0, radius * np.sin(v), radius * np.cos(v)).reshape(shape).astype(dtype)


def source(kind: str, seed: int):
    """A generator of kind numpy, torch-cpu or torch-cuda with standard_normal(shape, dtype)."""
    if kind == "torch-cpu":
        return TorchCPU(seed)
    if kind == "torch-cuda":
        return TorchCUDA(seed)
    return np.random.default_rng(seed)
