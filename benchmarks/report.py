"""A benchmark result as a markdown table and a PNG plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.1f}"


def markdown(result: dict[str, Any]) -> str:
    s, m, summary = result["settings"], result["machine"], result["summary"]
    lines = [f"# diffrt benchmark, {result['date']}", "",
             f"Machine: {m['cpu']} ({', '.join(m.get('isa') or []) or 'no AVX2/AVX-512/AMX'}), {m['cores']} cores, "
             f"GPU: {m['gpu'] or 'none'}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), "",
             f"Model {s['model']} on {s['backend']} ({s.get('precision', 'fp32')}), {s['width']}x{s['height']}, {s['steps']} "
             f"steps, {s['scheduler']}, guidance {s['guidance_scale']}, {s['runs']} runs after {s['warmup']} warm-up, "
             "interleaved" + "".join(f"; {b} on {p['device']} in {p['dtype']}" for b, p in s.get("baselines", {}).items()), "",
             "## End to end (ms)", "", "| impl / batch | p50 | p90 | p99 | mean | min | images/s | PSNR vs exact (dB) |",
             "|---|---|---|---|---|---|---|---|"]
    for key, e in summary["e2e"].items():
        lines.append(f"| {key} | {_ms(e['p50'])} | {_ms(e['p90'])} | {_ms(e['p99'])} | {_ms(e['mean'])} | {_ms(e['min'])} | "
                     f"{e['images_per_s']:.2f} | {_number(e.get('psnr_vs_exact'), 1)} |")
    lines += ["", "## Where the time goes (mean ms per image generation)", ""]
    for key, st in summary["stages"].items():
        parts = ", ".join(f"{k} {_ms(v)}" for k, v in st["mean_seconds"].items())
        extra = ""
        if "scheduler_step_share_of_unet_call" in st:
            extra = f"; scheduler step + loop = {st['scheduler_step_share_of_unet_call']:.2%} of one UNet call"
        calls = f" ({st['unet_calls_per_run']} UNet calls a run)" if st.get("unet_calls_per_run") else ""
        lines.append(f"- {key}: {parts}; one UNet call {_ms(st['unet_call'])}{calls}{extra}")
    if summary["load"] or summary["cold_start"]:
        lines += ["", "## Start-up", ""] + startup_table(summary)
    if summary["ratios"]:
        lines += ["", "## Ratios", ""] + [f"- {k}: {v:.2f}" for k, v in summary["ratios"].items()]
    return "\n".join(lines) + "\n"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def startup_table(summary: dict[str, Any]) -> list[str]:
    """Package load, cold start and peak RSS per implementation; GPU memory where a GPU was measured."""
    gpu = any(c.get("gpu_memory_mb") is not None for c in summary["cold_start"].values())
    head = ["impl", "package load (s)", "cold start to first image (s)", "peak RSS (MB)"]
    head += ["GPU memory held after the first image (MB)"] if gpu else []
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for impl in sorted(set(summary["load"]) | set(summary["cold_start"])):
        cold = summary["cold_start"].get(impl, {})
        cells = [impl, _number(summary["load"].get(impl, {}).get("seconds"), 2), _number(cold.get("seconds"), 2),
                 _number(cold.get("peak_rss_mb"), 0)] + ([_number(cold.get("gpu_memory_mb"), 0)] if gpu else [])
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    keys = list(summary["stages"])
    names = sorted({n for k in keys for n in summary["stages"][k]["mean_seconds"]})
    bottom = [0.0] * len(keys)
    for name in names:
        values = [max(summary["stages"][k]["mean_seconds"].get(name, 0.0), 0.0) * 1000 for k in keys]
        left.bar(keys, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    left.set_ylabel("ms per generation")
    left.set_title("per stage (mean)")
    left.legend(fontsize=7)
    samples = [[r["seconds"] * 1000 for r in result["records"]
                if r["kind"] == "e2e" and f"{r['impl']}/b{r['batch']}" == k] for k in keys]
    right.boxplot(samples, tick_labels=keys)
    right.set_ylabel("ms end to end")
    right.set_title("latency distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
