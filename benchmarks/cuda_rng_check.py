"""Record torch.randn on CUDA generators and compare diffrt's numpy copy (runtime/rng.py) with it, on a GPU machine.

    python -m diffrt.benchmarks.cuda_rng_check [--out DIR]

For several seeds and shapes (SD 1.5 and SDXL latents, a draw larger than the GPU's resident threads), and two
draws in a row from one generator (a sampler's noise after the latents), prints the largest difference and writes
the recorded values' first and last entries to DIR/cuda_randn.json, so a machine without a GPU can test against them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SHAPES = [(1, 4, 64, 64), (1, 4, 128, 128), (2, 4, 96, 64), (3,), (1, 64, 2048)]
SEEDS = [0, 1, 42, 1234, 2**32 + 7]


def record(torch, seed: int, shape: tuple[int, ...], threads: int) -> dict:
    from diffrt.runtime.rng import TorchCUDA

    gen, ours = torch.Generator("cuda").manual_seed(seed), TorchCUDA(seed, threads=threads)
    rows = []
    for draw in range(2):
        want = torch.randn(shape, generator=gen, device="cuda").cpu().numpy()
        got = ours.standard_normal(shape)
        rows.append({"draw": draw, "max_abs_diff": float(np.abs(got - want).max()),
                     "head": want.reshape(-1)[:4].tolist(), "tail": want.reshape(-1)[-4:].tolist()})
    return {"seed": seed, "shape": list(shape), "draws": rows}


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    props = torch.cuda.get_device_properties(0)
    threads = props.multi_processor_count * props.max_threads_per_multi_processor
    results = [record(torch, seed, shape, threads) for seed in SEEDS for shape in SHAPES]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda_randn.json").write_text(json.dumps({"gpu": props.name, "resident_threads": threads,
                                                          "torch": torch.__version__, "results": results}, indent=1))
    worst = max(d["max_abs_diff"] for r in results for d in r["draws"])
    print(f"{props.name}: {len(results) * 2} draws, largest |numpy - torch| {worst:.2e}")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
