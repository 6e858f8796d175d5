"""EDM's preconditioning and loss (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Sec. 5 and Table 1) around the paper's RefineNet with continuous conditioning
(common.RefineNet(conditioning='continuous')): the Denoiser D(x; sigma) and its loss. The Denoiser
predicts D itself; common.ScoreModel puts it behind the contract model(x, sigma) -> score.
"""
import torch
import torch.nn as nn


def edm_coefficients(sigma, sigma_data):
    """(c_skip, c_out, c_in, c_noise) of EDM's Table 1 for sigmas of any shape."""
    sd2 = torch.as_tensor(sigma_data).to(sigma) ** 2
    return sd2 / (sigma ** 2 + sd2), sigma * sd2.sqrt() / (sigma ** 2 + sd2).sqrt(), \
        1 / (sigma ** 2 + sd2).sqrt(), sigma.log() / 4


class Denoiser(nn.Module):
    """EDM's preconditioning around a continuous RefineNet F, for images in [0, 1] centred on the
    training set's mean pixel mu:
        D(x; sigma) = mu + c_skip (x - mu) + c_out F(c_in (x - mu); c_noise),
        c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
        c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4,
    sd = sigma_data, the training pixels' standard deviation (EDM: 0.5 for [-1, 1] images; mu = 0
    there). F sees unit-variance inputs and has a unit-variance target at every sigma. forward(x,
    sigma) takes one float sigma per image and returns D; `sigmas` records the training levels."""

    conditioning = "continuous"
    predicts = "denoised"           # common.ScoreModel: the score is (D - x) / sigma^2

    def __init__(self, net, sigma_data, data_mean, sigmas):
        super().__init__()
        self.net = net
        self.register_buffer("sigma_data", torch.tensor(float(sigma_data)))
        self.register_buffer("data_mean", torch.tensor(float(data_mean)))
        self.register_buffer("sigmas", torch.as_tensor(sigmas, dtype=torch.float32).clone())

    @property
    def model_args(self):
        return self.net.model_args

    def forward(self, x, sigma):
        sigma = sigma.to(x.dtype)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        view = lambda c: c.view(-1, *[1] * (x.dim() - 1))
        centred = x - self.data_mean.to(x.dtype)
        return self.data_mean + view(c_skip) * centred + view(c_out) * self.net(view(c_in) * centred, c_noise)


def edm_loss(model, x, sigma, sigma_data, noise=None):
    """EDM's loss (eq. 8 with Table 1's lambda), per image:
        lambda(sigma) || D(x + sigma n; sigma) - x ||^2,  lambda = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2,
    summed over pixels (so it equals || F - F_target ||^2, a unit-variance target at every sigma).
    model: behind the contract (common.ScoreModel); sigma (B,) is drawn by the caller: EDM's
    ln sigma ~ N(P_mean, P_std^2)."""
    noise = torch.randn_like(x) if noise is None else noise
    s = sigma.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
    weight = 1 / edm_coefficients(s, sigma_data)[1] ** 2
    return (weight * (model(x + s * noise, sigma, denoised=True) - x) ** 2).flatten(1).sum(1)
