"""The sampler health report: per noise level, how the samples stand at its end (score norm, pixels outside
[0, 1], pixels beyond 3 sigma_i of it), gathered by a sampler callback, stored per sample in sample.py's shards
and summed over any n. Saturation (pixels far outside the data range) names the level where a sampler goes wrong.
"""
import math

import numpy as np
import torch

PROCESS_ROWS = 8         # samples shown in process.png
SATURATED = 0.01         # warn when over 1% of pixels lie beyond 3 sigma_i of [0, 1] (0.13% for a right sample)


class Health:
    """A sampler callback keeping, per sample and level, the statistics at the level's end (its last call),
    and the first PROCESS_ROWS states at each level's end (for process.png), with no host sync."""

    def __init__(self, sigmas, batch, device, keep_states):
        self.sigmas, self.keep = [float(s) for s in sigmas], keep_states
        self.stats = torch.zeros(3, batch, len(sigmas), device=device)     # (statistic, sample, level)
        self.states = {}

    def __call__(self, level, step, x, score):
        m = 3 * self.sigmas[level]       # a sample of level i is data + N(0, sigma_i^2): beyond 3 sigma_i is off
        self.stats[0, :, level] = score.flatten(1).norm(dim=1)
        self.stats[1, :, level] = ((x < 0) | (x > 1)).flatten(1).float().mean(1)
        self.stats[2, :, level] = ((x < -m) | (x > 1 + m)).flatten(1).float().mean(1)
        if self.keep:
            self.states[level] = x[:PROCESS_ROWS].clone()


def health_means(covered):
    """Per level, over the shards sample.covering lists (the samples of [0, n) once each), the means of
    Health's three statistics; and the number of samples that were not finite."""
    sums, count, non_finite = 0, 0, 0
    for a, b, path, first in covered:
        with np.load(path) as f:                # per sample: exactly the samples of [0, n)
            sums = sums + f["health"][:, first:first + b - a].sum(1)
            non_finite += int(f["non_finite_each"][first:first + b - a].sum())
            count += b - a
    return [*(sums / count), non_finite]


def health_report(sigmas, score_norm, out_share, far_share, dim):
    """Rows per level, and the first level where samples saturate (None when none does). Pixels just outside
    [0, 1] are normal (dark MNIST background plus the level's noise); more than 3 sigma_i outside it are not."""
    rows = [dict(level=i + 1, sigma=float(s), mean_score_norm=float(g),
                 sigma_times_norm_over_sqrt_d=float(s * g / math.sqrt(dim)), share_outside_01=float(o),
                 share_beyond_3_sigma=float(f))
            for i, (s, g, o, f) in enumerate(zip(sigmas, score_norm, out_share, far_share))]
    bad = next((r["level"] for r in rows if r["share_beyond_3_sigma"] > SATURATED), None)
    return rows, bad


def shown_levels(L, rows=20):
    """About `rows` of L levels, evenly spaced, the first and the last included (0-based)."""
    every = math.ceil(L / rows)
    return [i for i in range(L) if i % every == 0 or i == L - 1]


def remedy(name, s_churn=0.0):
    """What to try when samples saturate or blow up: the setting that drives them there (Langevin's step size,
    Heun's churn), else another sampler (a deterministic solver only follows the score: more training fixes it)."""
    fix = "a smaller --step-lr" if name == "als" else "a smaller --s-churn" if s_churn else None
    return f"try {fix} or another sampler" if fix else "try another sampler or a longer-trained network"


def print_health(rows, bad, non_finite, n, title, fix):
    print(f"sampler health ({title}), at the end of each level:")
    print(f"  {'level':>5} {'sigma':>8} {'mean |s|':>10} {'sigma|s|/sqrt(D)':>16} {'outside [0,1]':>14} "
          f"{'> 3 sigma out':>14}")
    for r in (rows[i] for i in shown_levels(len(rows))):
        print("  {level:>5} {sigma:8.4f} {mean_score_norm:10.4g} {sigma_times_norm_over_sqrt_d:16.3f} "
              "{share_outside_01:14.2%} {share_beyond_3_sigma:14.2%}".format(**r))
    if bad:
        r = rows[bad - 1]
        print(f"WARNING: samples saturate from level {bad} (sigma {r['sigma']:.4g}) on: {r['share_beyond_3_sigma']:.1%}"
              f" of pixels lie more than 3 sigma outside [0, 1] at its end; {fix}")
    if non_finite:
        print(f"WARNING: {non_finite} of {n} samples became NaN or infinite (stored as black where NaN); {fix}")
