"""The training objectives (EDM's training/loss.py): each one small callable,
    loss(model, x, draws, **options) -> per-image losses,
model behind the contract model(x, sigma) (common.ScoreModel), x the images in [0, 1], `draws` the
random draws of the batch (step_draws), and one table entry, OBJECTIVES, naming the draws it needs
beyond each image's sigma and noise and the TrainConfig fields it takes as keywords. The loop
(train.py) averages the losses. Every draw is fixed by (seed, step): the same whatever the number of
processes, accumulation steps or restarts.
"""
from typing import Callable, NamedTuple

import torch

import common
import edm
import utils

P_MEAN, P_STD = -1.2, 1.2   # EDM's ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1)

#----------------------------------------------------------------------------
# The draws of a batch.

def level_probs(sigmas, dist, p_mean=P_MEAN, p_std=P_STD):
    """Each level's probability in a training draw: None for uniform (the paper's); for lognormal,
    the N(p_mean, p_std^2) density of ln sigma (EDM's P_mean, P_std), which needs no Jacobian because
    the levels are evenly spaced in ln sigma. It puts the training where samples take shape
    (sigma 0.1 to 1 on [0, 1] images) rather than on technique 1's sigma 1 to 16."""
    if dist == "uniform":
        return None
    p = torch.exp(-0.5 * ((torch.log(sigmas.double()) - p_mean) / p_std) ** 2)
    return (p / p.sum()).float()


def step_draws(seed, step, shape, sigmas, needs=(), probs=None, stream=0):
    """The random draws of a global batch of `shape` at `step`, fixed by (seed, step, stream) through
    utils.stable_seed, the same whatever the number of processes, accumulation steps or restarts: a
    dict of 'sigma' (B,) (one of the levels `sigmas` each: uniform, or with level_probs' `probs`),
    'u' (dequantisation noise), 'noise' z, 'flip' (B,) and the objective's `needs`: 'vectors'
    (shaped like the images: ssm's projections) or 'normal' (B,: edm's N(0, 1) per image)."""
    device = sigmas.device
    g = torch.Generator(device=device).manual_seed(utils.stable_seed(seed, step, stream))
    labels = (torch.randint(len(sigmas), (shape[0],), generator=g, device=device) if probs is None  # one level each
              else torch.multinomial(probs.to(device), shape[0], replacement=True, generator=g))
    out = dict(sigma=sigmas[labels], u=torch.rand(shape, generator=g, device=device),
               noise=torch.randn(shape, generator=g, device=device),
               flip=torch.rand(shape[0], generator=g, device=device) < 0.5)
    for name in needs:
        out[name] = torch.randn(shape if name == "vectors" else shape[:1], generator=g, device=device)
    return out

#----------------------------------------------------------------------------
# Objectives (EDM's loss.py): loss(model, x, draws, **options) -> per-image losses, model behind the
# contract model(x, sigma); `draws` as step_draws makes them; `needs` the draws beyond sigma and noise;
# `options` the TrainConfig fields passed to it as keywords.

def dsm(model, x, draws, anneal_power=2.0):
    """Annealed DSM (eq. 5-6): the level drawn per image, lambda = sigma^anneal_power."""
    return common.dsm_loss(model, x, draws["sigma"], draws["noise"], anneal_power)


def ssm(model, x, draws):
    """Annealed sliced score matching (SSM-VR per level, weighted by sigma^2)."""
    return common.annealed_ssm_loss(model, x, draws["sigma"], draws["noise"], draws["vectors"])


def edm_objective(model, x, draws, p_mean=P_MEAN, p_std=P_STD, sigma_data=0.5):
    """EDM's loss at ln sigma = p_mean + p_std n, n ~ N(0, 1): any sigma, not the levels."""
    return edm.edm_loss(model, x, torch.exp(p_mean + p_std * draws["normal"]), sigma_data, draws["noise"])


class Objective(NamedTuple):
    loss: Callable
    needs: tuple = ()
    options: tuple = ()


OBJECTIVES = {
    "dsm": Objective(dsm, (), ("anneal_power",)),
    "ssm": Objective(ssm, ("vectors",)),
    "edm": Objective(edm_objective, ("normal",), ("p_mean", "p_std", "sigma_data")),
}
