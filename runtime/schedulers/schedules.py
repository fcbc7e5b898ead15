"""Noise schedules shared by the samplers: betas, timestep spacings, sigmas (float32 where diffusers is)."""

from __future__ import annotations

import math

import numpy as np


def linspace32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32), bit for bit: float32 ends and step, filled from both ends."""
    a, b = np.float32(start), np.float32(end)
    step = np.float32((b - a) / np.float32(max(n - 1, 1)))
    i = np.arange(n)
    return np.where(i < n / 2, np.float64(a) + i * np.float64(step), np.float64(b) - (n - 1 - i) * np.float64(step)).astype(np.float32)


def betas(config: dict) -> np.ndarray:
    """Training betas from a diffusers scheduler config, as float32."""
    n = config["num_train_timesteps"]
    if config.get("trained_betas") is not None:
        b = np.asarray(config["trained_betas"], np.float32)
    elif config["beta_schedule"] == "linear":
        b = linspace32(config["beta_start"], config["beta_end"], n)
    elif config["beta_schedule"] == "scaled_linear":
        b = linspace32(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n) ** 2
    elif config["beta_schedule"] == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        b = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], np.float32)
    else:
        raise ValueError(f"beta_schedule {config['beta_schedule']!r} is not supported; use linear, scaled_linear or squaredcos_cap_v2")
    if config.get("rescale_betas_zero_snr"):
        b = rescale_zero_terminal_snr(b)
    return b


def rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023)."""
    root = np.sqrt(np.cumprod((1.0 - b).astype(np.float64)).astype(np.float32))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    bar = root**2
    alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return (1 - alphas).astype(np.float32)


def alphas_cumprod(config: dict) -> np.ndarray:
    """Cumulative alphas as float32, accumulated in float64 as torch does on the CPU."""
    return np.cumprod((1.0 - betas(config)).astype(np.float64)).astype(np.float32)


def alphas_with_final(config: dict) -> tuple[np.ndarray, np.float32]:
    """Cumulative alphas and the one used past the last step (1, or alpha_bar_0, by set_alpha_to_one)."""
    acp = alphas_cumprod(config)
    return acp, np.float32(1.0) if config["set_alpha_to_one"] else acp[0]


def spaced_timesteps(config: dict, n: int, dtype=np.int64, last: int | None = None) -> np.ndarray:
    """Descending timesteps for n steps by the config's timestep_spacing (leading / trailing / linspace), over the
    training timesteps below `last` (default: all of them)."""
    total = config["num_train_timesteps"]
    last = total if last is None else last
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        if dtype == np.int64:
            return np.linspace(0, last - 1, n).round()[::-1].astype(np.int64)
        return np.linspace(0, last - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (last // n)).round()[::-1].astype(dtype) + config["steps_offset"]
    if spacing == "trailing":
        return np.arange(last, 0, -total / n).round().astype(dtype) - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not supported; use leading, trailing or linspace")


def train_sigmas(acp: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar) / alpha_bar) for every training timestep (float32)."""
    return ((1 - acp) / acp) ** 0.5


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) sigmas, descending."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


SPREAD = {"use_karras_sigmas": False, "use_exponential_sigmas": False}  # the config keys of spread_sigmas


def spreads(config: dict) -> bool:
    """Whether the config asks for sigmas spread between the schedule's ends (Karras', or evenly in log sigma:
    exponential, and DPM-Solver's Lu lambdas, which are the same sigmas)."""
    return any(config.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas"))


def spread_sigmas(config: dict, sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min: Karras' where asked (first, as diffusers), else evenly spaced in
    log sigma."""
    if config.get("use_karras_sigmas"):
        return karras_sigmas(sigma_min, sigma_max, n)
    if config.get("use_lu_lambdas"):  # the same spacing, from log sigmas taken in float32 as diffusers takes them
        ends = np.log(np.array([sigma_max, sigma_min], np.float32))
        return np.exp(np.linspace(float(ends[0]), float(ends[1]), n))
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolated in log-sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def sigma_schedule(config: dict, acp: np.ndarray, n: int, round_karras: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The k-diffusion schedule (Euler, Heun, LMS, DPM2): n sigmas down the spaced timesteps, or Karras' (exponential)
    sigmas between the same ends (or the config's sigma_min / sigma_max) with their fractional timesteps (Karras'
    rounded where round_karras)."""
    sigmas = train_sigmas(acp)
    timesteps = spaced_timesteps(config, n, np.float32)
    sched = np.interp(timesteps, np.arange(len(sigmas)), sigmas)
    if spreads(config):
        lo = config["sigma_min"] if config.get("sigma_min") is not None else float(sched[-1])
        hi = config["sigma_max"] if config.get("sigma_max") is not None else float(sched[0])
        sched = spread_sigmas(config, lo, hi, n)
        timesteps = sigma_to_t(sched, np.log(sigmas))
        if round_karras and config.get("use_karras_sigmas"):
            timesteps = timesteps.round()
    return sched, timesteps.astype(np.float32)


def multistep_timesteps(config: dict, n: int, last: int | None = None) -> np.ndarray:
    """The multistep solvers' timesteps (DPM-Solver, UniPC, DEIS): trailing as usual; linspace and leading space
    n + 1 points and drop the last."""
    if config["timestep_spacing"] == "trailing":
        return spaced_timesteps(config, n, last=last)
    return spaced_timesteps(config, n + 1, last=last)[:-1]


def multistep_spread(config: dict, acp: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Karras' (exponential) sigmas over the whole training range (or the config's bounds) and their fractional
    timesteps, as the multistep solvers take them."""
    sigmas = train_sigmas(acp)
    lo = config["sigma_min"] if config.get("sigma_min") is not None else float(sigmas[0])
    hi = config["sigma_max"] if config.get("sigma_max") is not None else float(sigmas[-1])
    sched = spread_sigmas(config, lo, hi, n)
    timesteps = sigma_to_t(sched, np.log(sigmas))
    return sched, timesteps


def multistep_sigmas(config: dict, acp: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, float]:
    """UniPC's and DEIS's schedule: (sigmas, int timesteps, the smallest sigma a sigma_min end stops at), Karras'
    (rounded timesteps), exponential (truncated, as diffusers casts them) or the spaced one."""
    sigmas = train_sigmas(acp)
    if spreads(config):
        sched, timesteps = multistep_spread(config, acp, n)
        timesteps = timesteps.round() if config.get("use_karras_sigmas") else timesteps
        return sched, timesteps.astype(np.int64), float(sched[-1])
    timesteps = multistep_timesteps(config, n)
    return np.interp(timesteps, np.arange(len(sigmas)), sigmas), timesteps.astype(np.int64), float(sigmas[0])


def alpha_sigma(sigma):
    """(alpha_t, sigma_t) of the DDPM sample for a k-diffusion sigma: alpha = 1 / sqrt(sigma^2 + 1)."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def doubled(a: np.ndarray) -> np.ndarray:
    """A per-step array laid out for a two-evaluation sampler (Heun, DPM2): the first entry once, every later one
    twice, the last again."""
    return np.concatenate([a[:1], np.repeat(a[1:], 2), a[-1:]])


def first_index(timesteps: np.ndarray) -> int:
    """Where a sigma schedule starts: the second match when the first timestep repeats, as diffusers does."""
    matches = np.nonzero(timesteps == timesteps[0])[0]
    return int(matches[1] if len(matches) > 1 else matches[0])
