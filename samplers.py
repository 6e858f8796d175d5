"""The sampler family beyond the paper: every way this project turns a model into images, one call each,
    sampler(model, x, sigmas, *, randn_like, callback, **settings) -> x,
model(x, sigma) -> score with one float sigma per image (common.ScoreModel), and one table, SAMPLERS,
naming each with the network evaluations (NFE) it spends. The paper's annealed Langevin dynamics
(Algorithm 1, common.py); reverse diffusion (the ancestral sampler of Song et al. 2021); EDM's Heun
sampler (Karras et al. 2022, Algorithm 2) and DPM-Solver++(2M) (Lu et al. 2022) on EDM's schedule.
Schedules apart from samplers, as k-diffusion. Module level imports: torch, the standard library and
common.py (the paper).
"""
import inspect
import math
from typing import Callable, NamedTuple

import torch

from common import STEPS_EACH, STEP_LR, annealed_langevin_dynamics, auto_step_lr, geometric_sigmas

#----------------------------------------------------------------------------
# Sampler schedules (apart from samplers, as k-diffusion).

def karras_sigmas(n, sigma_min, sigma_max, rho=7.0):
    """EDM's time steps (Karras et al. 2022, eq. 5), then 0:
        sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i = 0, ..., n-1.
    rho = 7 spends the steps where the ODE curves most, at small sigma. Returns n + 1 values."""
    if n < 1 or not sigma_max >= sigma_min > 0:
        raise ValueError(f"karras_sigmas needs n >= 1 and sigma_max >= sigma_min > 0, "
                         f"got {n}, {sigma_min}, {sigma_max}")
    i = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    s = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)]).float()


def trained_subset(trained, n):
    """n of the trained levels, evenly spaced in index, the first and the last included: where a
    norm-conditioned network can step when a sampler wants n levels (EDM's round_sigma, exactly)."""
    L = len(trained)
    if not 1 <= n <= L:
        raise ValueError(f"{n} levels asked of a network that knows {L}")
    return trained[[round(k * (L - 1) / max(n - 1, 1)) for k in range(n)]] if n > 1 else trained[-1:]


def evaluate(model, x, sigma):
    """(score, denoised) at the float `sigma` from one evaluation: the model's own pair
    (common.ScoreModel.evaluate), or for a plain callable model(x, sigma) -> score, D = x + sigma^2 s."""
    level = x.new_full((len(x),), sigma)            # made on x's device: no blocking copy from the host
    if hasattr(model, "evaluate"):
        return model.evaluate(x, level)
    score = model(x, level)
    return score, x + sigma ** 2 * score

#----------------------------------------------------------------------------
# Samplers: one family with one call (the module's docstring); x the start, U(0, 1) images (the
# paper's); callback(i, step, x, score) after each update. Each runs without autograd and keeps no
# trajectory: memory O(batch). SAMPLERS (below them) names each with the network evaluations it spends.

@torch.no_grad()
def reverse_diffusion(model, x, sigmas, *, randn_like=torch.randn_like, callback=None):
    """Ancestral sampling down the noise levels, one network evaluation per level: the reverse
    diffusion predictor of Song et al. (2021, "Score-Based Generative Modeling through SDEs",
    eq. 47) for NCSN's perturbations (their VE SDE). From x + sigma_1 z:
        x <- x + (sigma_i^2 - sigma_{i+1}^2) s(x, i) + sqrt(sigma_i^2 - sigma_{i+1}^2) z,
    with sigma_{L+1} = 0 at the last level, where the step is the denoising step x + sigma_L^2 s
    without noise. With an exact score each step takes data + N(0, sigma_i^2) to data +
    N(0, sigma_{i+1}^2); there is no step size to tune. Network evaluations: L.
    """
    sigmas = [float(s) for s in sigmas]
    x = x + sigmas[0] * randn_like(x)
    for i, sigma in enumerate(sigmas):
        score = model(x, x.new_full((len(x),), sigma))
        d = sigma ** 2 - (sigmas[i + 1] ** 2 if i + 1 < len(sigmas) else 0.0)
        x = x + d * score + (math.sqrt(d) * randn_like(x) if i + 1 < len(sigmas) else 0.0)
        if callback is not None:
            callback(i, 0, x, score)
    return x


@torch.no_grad()
def heun(model, x, sigmas, *, randn_like=torch.randn_like, callback=None,
         s_churn=0.0, s_min=0.0, s_max=math.inf, s_noise=1.0):
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2; s_churn = 0 is their Algorithm 1,
    Heun's method on the probability-flow ODE dx/dsigma = -sigma s(x, sigma)). From x + t_0 z, for
    t_0 > ... > t_{N-1} = sigmas and t_N = 0:
        gamma_i = min(s_churn / N, sqrt(2) - 1) if s_min <= t_i <= s_max else 0
        t^_i = (1 + gamma_i) t_i;  x^ = x + sqrt(t^_i^2 - t_i^2) s_noise z         # churn: add noise
        d = -t^_i s(x^, t^_i);  x' = x^ + (t_{i+1} - t^_i) d                        # Euler step
        x = x^ + (t_{i+1} - t^_i) (d + d') / 2,  d' = -t_{i+1} s(x', t_{i+1})       # 2nd order, if t_{i+1} > 0
    The last step, to sigma = 0, stays an Euler step (EDM's). Network evaluations: 2N - 1. With
    churn the network is evaluated at t^_i, which only a network that takes any sigma knows.
    """
    sigmas = [float(s) for s in sigmas] + [0.0]
    N = len(sigmas) - 1
    x = x + sigmas[0] * randn_like(x)
    for i in range(N):
        t, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / N, math.sqrt(2) - 1) if s_min <= t <= s_max else 0.0
        t_hat = t * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(t_hat ** 2 - t ** 2) * s_noise * randn_like(x)
        score = model(x, x.new_full((len(x),), t_hat))
        d = -t_hat * score
        x_next = x + (t_next - t_hat) * d
        if t_next > 0:
            d_next = -t_next * model(x_next, x.new_full((len(x),), t_next))
            x_next = x + (t_next - t_hat) * (0.5 * d + 0.5 * d_next)
        x = x_next
        if callback is not None:
            callback(i, 0, x, score)
    return x


@torch.no_grad()
def dpmpp_2m(model, x, sigmas, *, randn_like=torch.randn_like, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2): the multistep
    second-order solver of the probability-flow ODE in data prediction, D(x; sigma) (the model's
    own, `evaluate`), and lambda = -log sigma (NCSN's VE perturbations: alpha = 1). From x + t_0 z, with
    h_i = lambda_{i+1} - lambda_i, r_i = h_{i-1} / h_i, t_N = 0:
        D' = (1 + 1/(2 r_i)) D_i - 1/(2 r_i) D_{i-1}            (D' = D_i at the first and last step)
        x <- (t_{i+1} / t_i) x - (exp(-h_i) - 1) D'             (= D' when t_{i+1} = 0)
    Network evaluations: N, one per step.
    """
    sigmas = [float(s) for s in sigmas] + [0.0]
    x = x + sigmas[0] * randn_like(x)
    old = None
    for i in range(len(sigmas) - 1):
        t, t_next = sigmas[i], sigmas[i + 1]
        score, denoised = evaluate(model, x, t)
        if t_next == 0:
            x = denoised
        else:
            h = math.log(t / t_next)
            d = denoised
            if old is not None:
                r = math.log(sigmas[i - 1] / t) / h
                d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old
            x = (t_next / t) * x - math.expm1(-h) * d
        old = denoised
        if callback is not None:
            callback(i, 0, x, score)
    return x


def settings(run):
    """{keyword: default} of the settings a sampler function takes beyond the family's call: its
    keyword-only arguments. They are the flags of sample.py and evaluate.py and the keys of a
    setting's fingerprint."""
    return {k: p.default for k, p in inspect.signature(run).parameters.items()
            if p.kind == p.KEYWORD_ONLY and k not in ("randn_like", "callback")}


class Sampler(NamedTuple):
    """A SAMPLERS entry: the function; nfe(n, **settings), its network evaluations per sample on n
    levels; plan(entry, ck, nfe, sigma_max, settings) -> (levels, settings), what an evaluation
    budget buys on a checkpoint (Refused where it cannot run); the settings that also take the
    word 'auto' (an NCSNv2 technique chooses the value)."""
    run: Callable
    nfe: Callable
    plan: Callable
    auto: tuple = ()


class Refused(ValueError):
    """A plan that cannot run on a checkpoint; the message completes "<checkpoint>: --sampler <name> ..."."""


def _sigma_max_refused(ck, sigma_max):
    return Refused(f"with --sigma-max {sigma_max:g}: it needs --sampler heun, dpmpp2m or ancestral on a scale- or "
                   f"continuous-conditioned network, and a value above its sigma_L {ck.sigma_end:g}")


def langevin_plan(entry, ck, nfe, sigma_max, given):
    """Annealed Langevin dynamics: T steps on each trained level, the checkpoint's recipe's T, step_lr
    and denoising step unless given; an nfe budget sets T (sampler_defaults)."""
    if sigma_max is not None:
        raise _sigma_max_refused(ck, sigma_max)
    denoise = ck.settings.get("denoise", False) if given.get("denoise") is None else given["denoise"]
    T, step_lr = sampler_defaults(ck, nfe, given.get("steps_each"), given.get("step_lr"), denoise)
    return ck.sigmas, dict(given, steps_each=T, step_lr=step_lr, denoise=denoise)


def levels_bought(schedule):
    """The plan of a sampler of one or two evaluations a level: an nfe budget buys as many levels as it
    pays for (all the trained ones without a budget), on schedule(n, sigma_min, sigma_max) for a
    network that takes any sigma, else on n of its trained levels (trained_subset; a budget above them
    buys them all; no churn there)."""
    def plan(entry, ck, nfe, sigma_max, given):
        defaults = settings(entry.run)
        given = {k: v for k, v in given.items() if v != defaults[k]}    # a default given is the default's setting
        n = max([k for k in range(1, nfe + 1) if entry.nfe(k, **given) <= nfe] or [1]) if nfe else len(ck.sigmas)
        if sigma_max is not None and (not ck.any_sigma or sigma_max <= ck.sigma_end):
            raise _sigma_max_refused(ck, sigma_max)
        if not ck.any_sigma and given.get("s_churn"):
            raise Refused(f"with churn needs a scale-conditioned network (--recipe ncsnv2); this one knows its "
                          f"{len(ck.sigmas)} levels only")
        n = n if ck.any_sigma else min(n, len(ck.sigmas))
        levels = (schedule(n, ck.sigma_end, sigma_max or ck.sigma_begin) if ck.any_sigma
                  else trained_subset(ck.sigmas, n))
        return levels, given
    return plan


geometric = lambda n, lo, hi: geometric_sigmas(hi, lo, n) if n > 1 else torch.tensor([lo])    # the paper's spacing
karras = lambda n, lo, hi: karras_sigmas(n, lo, hi)[:-1]                                       # EDM's, without the 0

SAMPLERS = {  # name: the sampler, what it spends, what a budget buys
    "als": Sampler(annealed_langevin_dynamics, lambda n, steps_each=STEPS_EACH, denoise=False, **_:
                   n * steps_each + bool(denoise), langevin_plan, auto=("step_lr",)),
    "ancestral": Sampler(reverse_diffusion, lambda n, **_: n, levels_bought(geometric)),
    "heun": Sampler(heun, lambda n, **_: 2 * n - 1, levels_bought(karras)),
    "dpmpp2m": Sampler(dpmpp_2m, lambda n, **_: n, levels_bought(karras)),
}

#----------------------------------------------------------------------------
# The paper's sampler settings for a checkpoint.

def sampler_defaults(ck, nfe=None, steps_each=None, step_lr=None, denoise=False):
    """(T, step_lr) of annealed Langevin dynamics for a checkpoint (checkpoints.Checkpoint): its
    recipe's unless given. An nfe budget sets T = (nfe - denoise) // L; step_lr 'auto' is technique
    4's for T, as is the default when the checkpoint's own step_lr was technique 4's for its T."""
    levels = ck.levels
    trained_T = ck.settings.get("steps_each", STEPS_EACH)
    T = max(1, (nfe - denoise) // levels[2]) if nfe else steps_each or trained_T
    if step_lr is None:
        step_lr = ck.settings.get("step_lr", STEP_LR)
        step_lr = "auto" if math.isclose(step_lr, auto_step_lr(*levels, trained_T), rel_tol=1e-9) else step_lr
    return T, auto_step_lr(*levels, T) if step_lr == "auto" else step_lr
