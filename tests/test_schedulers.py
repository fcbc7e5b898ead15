"""Each numpy scheduler against its diffusers twin over whole trajectories, same model outputs fed to both."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from diffrt.runtime.schedulers import CLASSES, SHORT_NAMES, make_scheduler, samplers_for, scheduler_names

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from conftest import sampler_params, shared_noise  # noqa: E402

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
STEPS = (1, 2, 4, 10, 25, 50)
# compare(): differences in units of float32 rounding noise (diffusers' float32 trajectory against the same steps in
# float64); both sides' float32 results lie a few such units from the exact one, and error carried over steps grows
TOLERANCE = 32
REL_TOLERANCE = 1e-5  # direct comparisons of steps whose operands are of the result's size: about 84 float32 epsilons


def fake_model(sample: np.ndarray, t: float) -> np.ndarray:
    """A smooth, timestep-dependent stand-in for a UNet; both sides see the same output."""
    return (0.3 * sample + np.sin(sample * 1.7 + float(t) * 0.01)).astype(np.float32)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy's divide/overflow warnings would reach users' terminals
@pytest.mark.parametrize("name", sampler_params(samplers_for(flow=False)))
def test_scheduler_trajectories_match_diffusers(name):
    checked = 0
    for spacing, offset, prediction, steps in itertools.product(("leading", "trailing", "linspace"), (0, 1),
                                                                ("epsilon", "v_prediction"), STEPS):
        config = {**SD_BETAS, "timestep_spacing": spacing, "steps_offset": offset, "prediction_type": prediction,
                  "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True}
        worst = compare(name, config, steps)
        if worst is None:
            continue
        assert worst <= TOLERANCE, f"{name} {spacing} offset={offset} {prediction} steps={steps}: {worst:.1f} noise units"
        checked += 1
    assert checked >= 60


def compare(name: str, config: dict, steps: int, seed: int = 0) -> float | None:
    """Largest per-step difference between diffrt's and diffusers' trajectories (the scaled model input and the
    step's result), in units of the float32 rounding noise at that step: how far diffusers' own float32 result lies
    from the same steps taken in float64 (at least one float32 epsilon of the result's scale). A step from sigma 14.6
    to 0.03 cancels numbers far larger than its result, and kernels differ per CPU in operation order and FMA, so
    float32 results agree only to that noise. None where both refuse the setting."""
    ours = make_scheduler(name, config)
    cls, overrides = SHORT_NAMES[name]
    theirs, exact = (diffusers_scheduler(cls.class_name, {**config, **overrides}) for _ in range(2))
    failures = 0
    for sched in (ours, theirs, exact):
        try:
            sched.set_timesteps(steps)
        except (ValueError, IndexError):
            failures += 1
    if failures:
        assert failures == 3, f"{name} steps={steps}: only one side refused the setting"
        return None
    np.testing.assert_allclose(ours.timesteps, reference_timesteps(name, theirs), rtol=1e-6, atol=1e-4)
    start = np.random.default_rng(seed).standard_normal((2, 4, 8, 8)).astype(np.float32)
    x_ours, gen, outs, pairs = start * np.float32(ours.init_noise_sigma), np.random.default_rng(seed + 1), [], []
    x_theirs = torch.from_numpy(start) * theirs.init_noise_sigma
    with shared_noise(seed + 1):
        for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps):
            scaled = ours.scale_model_input(x_ours)
            pairs.append((scaled, theirs.scale_model_input(x_theirs, t_theirs).numpy()))
            outs.append(fake_model(scaled, t_ours))
            x_ours = ours.step(outs[-1], x_ours, gen)
            x_theirs = theirs.step(torch.from_numpy(outs[-1]), t_theirs, x_theirs, **step_options(ours)).prev_sample
            pairs.append((x_ours, x_theirs.numpy()))
    exact_tables(name, exact)
    x_exact, noise = torch.from_numpy(start).double() * exact.init_noise_sigma, []
    with shared_noise(seed + 1):
        for out, t in zip(outs, exact.timesteps):
            noise.append(exact.scale_model_input(x_exact, t).numpy())
            x_exact = exact.step(torch.from_numpy(out).double(), t, x_exact, **step_options(ours)).prev_sample
            noise.append(x_exact.numpy())
    return max(in_noise_units(got, ref, float64) for (got, ref), float64 in zip(pairs, noise))


PROTOTYPES: dict[tuple[str, str], object] = {}


def diffusers_scheduler(class_name: str, config: dict):
    """A fresh diffusers scheduler, copied from one built once per class and config (building one sets a schedule
    over every training timestep: 0.4 s for KDPM2, which each config's six step counts would otherwise pay)."""
    import copy
    import json

    key = (class_name, json.dumps(config, sort_keys=True, default=str))
    if key not in PROTOTYPES:
        PROTOTYPES[key] = getattr(diffusers, class_name).from_config(config)
    return copy.deepcopy(PROTOTYPES[key])


def dpm2_a_tables(theirs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DPM2 a's sigma_up, sigma_down and midpoint sigmas from diffusers' own sigmas by its own formulas, in float64:
    in float32 its sigma_down = sqrt(next^2 - up^2) cancels nearly every digit near sigma 0, which leaves sigma_down
    and the midpoint (and its timestep: 0.0096 on some CPUs, 0 on others and in exact arithmetic) to rounding."""
    sigmas = np.concatenate([theirs.sigmas[:1].numpy(), theirs.sigmas[1:-1:2].numpy()]).astype(np.float64)
    following = np.append(sigmas[1:], 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        up = (following**2 * (sigmas**2 - following**2) / sigmas**2) ** 0.5
        down = np.nan_to_num((following**2 - up**2) ** 0.5)
        down[-1] = 0.0
        mids = np.exp(np.log(sigmas) + (np.log(down) - np.log(sigmas)) * 0.5)
    mids[-2:] = 0.0
    return up, down, mids


def reference_timesteps(name: str, theirs) -> np.ndarray:
    """diffusers' timesteps, DPM2 a's midpoints from its float64 tables."""
    timesteps = theirs.timesteps.numpy().astype(np.float64)
    if name.startswith("dpm2_a"):
        timesteps[1::2] = [theirs._sigma_to_t(m, theirs.log_sigmas.numpy()) for m in dpm2_a_tables(theirs)[2][:-2]]
    return timesteps


def exact_tables(name: str, exact) -> None:
    """The float64 run's DPM2 a tables taken in float64 too, so its distance from float32 counts their rounding."""
    if name.startswith("dpm2_a"):
        doubled = [torch.from_numpy(np.concatenate([t[:1], t[1:].repeat(2), t[-1:]])) for t in dpm2_a_tables(exact)]
        exact.sigmas_up, exact.sigmas_down, exact.sigmas_interpol = doubled


def in_noise_units(got: np.ndarray, ref: np.ndarray, float64: np.ndarray) -> float:
    """|got - ref| over ref's own rounding noise (|ref - float64|, at least an epsilon of ref's scale); inf where
    either side is not finite (Python's max would otherwise drop a NaN)."""
    if not (np.isfinite(got).all() and np.isfinite(ref).all()):
        return float("inf")
    scale = max(float(np.abs(ref).max()), 1e-6)
    noise = max(float(np.abs(ref - float64).max()), float(np.finfo(np.float32).eps) * scale)
    return float(np.abs(got - ref).max()) / noise


def step_options(ours) -> dict:
    """What diffusers' step needs told that diffrt's sampler carries itself (TCD's gamma)."""
    return {"eta": ours.eta} if hasattr(ours, "eta") else {}


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """Largest difference relative to the reference's largest value; inf where either side is not finite (Python's
    max would otherwise drop a NaN)."""
    if not (np.isfinite(got).all() and np.isfinite(ref).all()):
        return float("inf")
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6))


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_other_schedules(name):
    """Linear and cosine betas, and zero-terminal-SNR rescaling (Euler's first sigma is then 4096 and its first step
    cancels two numbers of that size: the noise units of compare() take that in)."""
    for extra in ({"beta_schedule": "linear"}, {"beta_schedule": "squaredcos_cap_v2"},
                  {**SD_BETAS, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}):
        for steps in (4, 25):
            worst = compare(name, {"prediction_type": "v_prediction", **extra}, steps)
            assert worst is not None and worst <= TOLERANCE, (extra, steps, worst)


def test_pndm_runge_kutta_warmup():
    """PNDM as SD 1.x ships it (skip_prk_steps false): Runge-Kutta warm-up, then PLMS."""
    for steps in (4, 10, 50):
        worst = compare("pndm", {**SD_BETAS, "steps_offset": 1}, steps)
        assert worst is not None and worst <= TOLERANCE, (steps, worst)


@pytest.mark.parametrize("name, config", [
    ("euler", {"use_karras_sigmas": True}),
    ("euler", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
    ("euler", {"final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", {"solver_order": 1}),
    ("dpmpp_2m", {"euler_at_final": True}),
    ("dpmpp_2m", {"prediction_type": "sample"}),
    ("dpmpp_2m_karras", {"lower_order_final": False}),
    ("ddim", {"prediction_type": "sample"}),
])
def test_scheduler_branches_match_diffusers(name, config):
    """Options the main matrix leaves at their defaults: Karras sigmas (with bounds), final sigma, DPM++ order 1,
    euler_at_final, lower_order_final and x0 ('sample') prediction."""
    for steps in (4, 10, 25):
        worst = compare(name, {**SD_BETAS, **config}, steps)
        assert worst is not None and worst <= TOLERANCE, (name, config, steps, worst)


VARIANTS = [
    *[("unipc", {"solver_type": "bh2", "solver_order": order}) for order in (1, 2, 3)],
    # bh1's and the noise parametrization's last step to sigma 0 are NaN in diffusers
    # (test_unipc_last_step_to_zero_where_diffusers_fails), so their parity is over a sigma_min end
    *[("unipc", {"solver_type": kind, "solver_order": order, "predict_x0": x0, "final_sigmas_type": "sigma_min"})
      for kind in ("bh1", "bh2") for order in (1, 2, 3) for x0 in (True, False) if kind == "bh1" or not x0],
    ("unipc", {"solver_order": 3, "use_karras_sigmas": True}),
    ("unipc", {"solver_order": 3, "final_sigmas_type": "sigma_min", "disable_corrector": [0, 2]}),
    ("unipc", {"solver_order": 3, "lower_order_final": False, "prediction_type": "sample", "final_sigmas_type": "sigma_min"}),
    *[("deis", {"solver_order": order}) for order in (1, 2, 3)],
    ("deis", {"solver_order": 3, "use_karras_sigmas": True}),
    ("deis", {"solver_order": 3, "lower_order_final": False}),
    ("dpmpp_2m_sde", {"solver_type": "heun"}),
    ("dpmpp_2m_sde", {"prediction_type": "sample"}),
    ("ddpm", {"variance_type": "fixed_small_log"}),
    ("ddpm", {"variance_type": "fixed_large", "clip_sample": False}),
    ("heun", {"prediction_type": "sample"}),
    ("heun", {"clip_sample": True, "clip_sample_range": 0.5}),
    ("lms", {"prediction_type": "sample"}),
    ("euler_karras", {"timestep_spacing": "trailing"}),
    *[(name, {"use_exponential_sigmas": True}) for name in ("euler", "heun", "lms", "dpm2", "dpm2_a", "dpmpp_2m",
                                                             "dpmpp_2m_sde", "unipc", "deis")],
    ("euler", {"use_exponential_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
    ("unipc", {"use_exponential_sigmas": True, "solver_order": 3}),
    ("dpmpp_2m", {"use_lu_lambdas": True}), ("dpmpp_2m_sde", {"use_lu_lambdas": True}),
    ("dpmpp_2m", {"use_lu_lambdas": True, "beta_schedule": "squaredcos_cap_v2"}),
]


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("name, config", VARIANTS, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in c.items())}" for n, c in VARIANTS])
def test_sampler_variants_match_diffusers(name, config):
    """UniPC's two B(h) of orders 1-3 in both parametrizations, DEIS's orders, DPM++ 2M SDE's Heun form, DDPM's
    variances, Karras and exponential sigmas and x0 prediction where the samplers offer them."""
    for steps in (3, 10, 25):
        worst = compare(name, {**SD_BETAS, **config}, steps)
        assert worst is not None and worst <= TOLERANCE, (name, config, steps, worst)


@pytest.mark.parametrize("config", [{"solver_type": "bh1"}, {"predict_x0": False},
                                    {"solver_order": 3, "lower_order_final": False}])
def test_unipc_last_step_to_zero_where_diffusers_fails(config):
    """Three UniPC settings end in NaN (bh1: B(h) = h is infinite at sigma 0; the noise parametrization: 0 * inf) or a
    singular solve (order 3 without lower_order_final) in diffusers' last step to sigma 0; diffrt's last step gives
    that step's limit, the model's x0 prediction, and it matches diffusers on every step before it."""
    config = {**SD_BETAS, **config}
    ours = make_scheduler("unipc", config)
    theirs = diffusers.UniPCMultistepScheduler.from_config(config)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    x_theirs = torch.from_numpy(x)
    for i, t in enumerate(ours.timesteps):
        out = fake_model(x, t)
        before, x = x, ours.step(out, x)
        if i < 9:
            x_theirs = theirs.step(torch.from_numpy(out), theirs.timesteps[i], x_theirs).prev_sample
            assert rel_err(x, x_theirs.numpy()) <= REL_TOLERANCE
    assert not np.isfinite(theirs.step(torch.from_numpy(out), theirs.timesteps[9], x_theirs).prev_sample.numpy()).all() \
        if config.get("lower_order_final", True) else True
    acp = ours.alphas_cumprod[int(t)]
    np.testing.assert_allclose(x, (before - (1 - acp) ** 0.5 * out) / acp**0.5, rtol=1e-5, atol=1e-5)


def test_tcd_deterministic_at_eta_zero(monkeypatch):
    from diffrt.runtime.schedulers.tcd import TCD
    monkeypatch.setattr(TCD, "eta", 0.0)
    worst = compare("tcd", SD_BETAS, 4)
    assert worst is not None and worst <= TOLERANCE


def test_ddim_clip_sample():
    worst = compare("ddim", {"clip_sample": True, "clip_sample_range": 0.5}, 10)
    assert worst is not None and worst <= TOLERANCE


def test_a_karras_name_means_karras_sigmas_over_an_exponential_config():
    """euler_karras on a config that asks for exponential sigmas runs what diffusers' Euler with Karras sigmas runs."""
    ours = make_scheduler("euler_karras", {**SD_BETAS, "use_exponential_sigmas": True})
    theirs = diffusers.EulerDiscreteScheduler.from_config({**SD_BETAS, "use_karras_sigmas": True})
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=1e-5)


def test_a1111_sampler_and_schedule_type():
    from diffrt.runtime.schedulers import a1111_scheduler

    assert a1111_scheduler("DPM++ 2M", "Karras") == "dpmpp_2m_karras"
    assert a1111_scheduler("DPM++ 2M SDE", "exponential") == "dpmpp_2m_sde_exponential"
    assert a1111_scheduler("DPM++ 2M Karras", "Automatic") == "dpmpp_2m_karras"  # the legacy combined name kept
    assert a1111_scheduler("Euler Karras", "Exponential") == "euler_exponential"
    assert a1111_scheduler("Euler a", None) == "Euler a" and a1111_scheduler(None, "euler") == "euler"
    assert a1111_scheduler(None, "Automatic") is None
    for sampler, schedule, message in (("Euler a", "Karras", "no Karras schedule"), ("Euler", "SGM Uniform", "unknown schedule"),
                                       (None, "Karras", "needs a sampler_name")):
        with pytest.raises(ValueError, match=message):
            a1111_scheduler(sampler, schedule)


def test_names_and_unknown_keys():
    config = {**SD_BETAS, "_class_name": "PNDMScheduler", "some_future_key": 3, "skip_prk_steps": True}
    assert type(make_scheduler(None, config)).__name__ == "PNDM"
    flow = {"flow_euler", "FlowMatchEulerDiscreteScheduler", "Flow Euler"}  # every spelling of the flow sampler
    for name in scheduler_names():
        if name in flow:
            with pytest.raises(ValueError, match="cannot sample a discrete-time model"):
                make_scheduler(name, config)
        else:
            make_scheduler(name, config)
    assert make_scheduler("dpmpp_2m_karras", config).config["use_karras_sigmas"] is True
    assert set(CLASSES) >= {"DDIMScheduler", "PNDMScheduler", "LCMScheduler"}
    with pytest.raises(ValueError, match="unknown scheduler 'dpmpp_3m'.*ddim"):
        make_scheduler("dpmpp_3m", config)
    with pytest.raises(ValueError, match="thresholding"):
        make_scheduler("ddim", {"thresholding": True})


def test_ancestral_noise_comes_from_the_generator():
    config = {**SD_BETAS}
    runs = []
    for seed in (5, 5, 6):
        s = make_scheduler("euler_a", config)
        s.set_timesteps(4)
        x = np.ones((1, 4, 8, 8), np.float32)
        gen = np.random.default_rng(seed)
        for t in s.timesteps:
            x = s.step(fake_model(s.scale_model_input(x), t), x, gen)
        runs.append(x)
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])


@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m", "lcm", "ddim"])
def test_sampler_begun_part_way(name):
    """A sampler begun part-way down its schedule (what img2img does) follows diffusers' trajectory from that step
    (set_begin_index there): the sampler owns its place in the loop, and moves one step on per call."""
    config = {**SD_BETAS, "clip_sample": False}
    ours = make_scheduler(name, config)
    cls, overrides = SHORT_NAMES[name]
    theirs = getattr(diffusers, cls.class_name).from_config({**config, **overrides})
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    ours.begin(4)
    if hasattr(theirs, "set_begin_index"):
        theirs.set_begin_index(4)
    x = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    x_theirs, gen = torch.from_numpy(x), np.random.default_rng(4)
    with shared_noise(4):
        for t_ours, t_theirs in zip(ours.timesteps[4:], theirs.timesteps[4:]):
            scaled = ours.scale_model_input(x)
            assert rel_err(scaled, theirs.scale_model_input(x_theirs, t_theirs).numpy()) <= REL_TOLERANCE
            out = fake_model(scaled, t_ours)
            x = ours.step(out, x, gen)
            x_theirs = theirs.step(torch.from_numpy(out), t_theirs, x_theirs).prev_sample
            assert rel_err(x, x_theirs.numpy()) <= REL_TOLERANCE
    assert ours.index == 10
