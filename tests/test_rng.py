"""Seeds that reproduce other tools: numpy draws of what torch.randn draws on CPU and CUDA generators."""

from __future__ import annotations

import numpy as np
import pytest

from diffrt.runtime.rng import TorchCPU, TorchCUDA, philox4x32_10

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, 2**63 - 1])
def test_torch_cpu_draws(seed):
    """A run of draws from one generator, as a pipeline makes them (latents, then a sampler's noise): sizes under 16
    (torch's scalar path, with its cached second value) bit for bit, the rest within 4 ulp (measured over 40 seeds of
    65,536 values: 86 % bit for bit, at most 4 ulp, 4.8e-7)."""
    theirs, ours = torch.Generator().manual_seed(seed), TorchCPU(seed)
    for shape in [(3,), (1, 4, 8, 8), (5,), (1, 4, 12, 20), (2, 4, 64, 64), (17,), (1,), (1, 4, 64, 64)]:
        want = torch.randn(shape, generator=theirs).numpy()
        got = ours.standard_normal(shape)
        assert got.shape == want.shape and got.dtype == np.float32
        if want.size < 16:
            assert np.array_equal(got, want), shape
        else:
            ulps = np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32)).max()
            assert ulps <= 4 and np.abs(got - want).max() <= 5e-7, (shape, ulps)


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10 (its tests/kat_vectors)."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, want in cases:
        assert philox4x32_10(np.array(counter, np.uint32)[:, None], key)[:, 0].tolist() == list(want)


def test_torch_cuda_draws_match_published_values():
    """torch.randn on CUDA generators as printed in PyTorch's issue tracker (four decimals):
    #79496 (seed 10, 3 values), #158398 (seed 42, shape [1, 64, 2048]) and #143086 (seed 1, 9,483,264 values, whose
    tail differs between an H100 and an A100 because torch caps its grid at the GPU's resident threads)."""
    assert np.allclose(TorchCUDA(10).standard_normal((3,)), [-0.1029, 1.6810, -0.2708], atol=6e-5)
    big = TorchCUDA(42).standard_normal((1, 64, 2048))
    assert np.allclose(big[0, 0, :3], [0.1940, 2.1614, -0.1721], atol=6e-5)
    assert np.allclose(big[0, 0, -3:], [1.4540, -2.7733, -0.8932], atol=6e-5)
    assert np.allclose(big[0, 1, :3], [-0.4574, 0.8063, 0.1580], atol=6e-5)
    n = 49 * 12 * 112 * 144
    for sms, tail in ((132, [-0.6970, -0.7780, 0.3267]), (108, [0.1549, -0.6797, -0.1656])):  # H100, A100
        draw = TorchCUDA(1, threads=sms * 2048).standard_normal((1, n))[0]
        assert np.allclose(draw[:3], [-0.2963, 2.6764, -0.1408], atol=6e-5)
        assert np.allclose(draw[-3:], tail, atol=6e-5), sms


def test_torch_cuda_consecutive_draws_move_the_offset():
    """Each draw starts where torch's Philox offset leaves it (4 per draw of one round): a second draw is not the
    first again, and a fresh generator repeats the first."""
    g = TorchCUDA(3)
    first, second = g.standard_normal((1, 4, 8, 8)), g.standard_normal((1, 4, 8, 8))
    assert not np.allclose(first, second) and g.offset == 2
    assert np.array_equal(TorchCUDA(3).standard_normal((1, 4, 8, 8)), first)
    assert abs(float(np.concatenate([first, second]).std()) - 1) < 0.1
