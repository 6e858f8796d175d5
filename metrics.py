"""Numbers for a set of images: Inception score and FID (the paper's Fig. 6), the MNIST digit
classifier's scores, nearest training images, and a checkpoint's test loss per level. One table of
scorers (SCORERS); each makes a callable from batches of uint8 images to a flat dict of named numbers.

    python metrics.py --images my_samples/ --dataset cifar10                     # IS and FID of a folder of images
    python metrics.py --images samples.npz --metrics classifier --data-root .mnist   # digit scores of an .npz
    python metrics.py --images runs/eval/mnist_checkpoint/steplr2e-05_T100_seed0_0123456789 --metrics classifier

--images: a folder of images, an .npz of uint8 (N, H, W, C) or (N, C, H, W) under 'images' or 'arr_0'
(EDM's), or sample.py's shards. IS (10 splits) and FID use torch-fidelity's port of the paper's TF
Inception, against cached training-set statistics. MNIST, where Inception knows nothing of digits, gets
the digit classifier's IS, confident share and Frechet distance to held-out real digits.
"""
import startup  # noqa: F401  (first: a signal during the imports is one line and status 130)
import functools
import glob
import math
import os
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import common
import data
import figures
import health
import sample
import utils

#----------------------------------------------------------------------------
# Defaults.

IS_SPLITS = 10                    # the Inception score's splits (OpenAI's protocol): it needs this many samples
FEATURES = 2048                   # Inception pool features: the size of a reference mu and sigma
KEPT = 10_000                     # pool features kept of each side for KID and precision / recall: the first
CLASSIFIER_CACHE = "runs/mnist_classifier"   # where the digit classifier's weights are kept
HOLD_OUT = 5                      # every 5th training digit is held out from the classifier (20%)
PROBE = 500                       # held-out digits kept apart as the ceiling's samples
EPOCHS = 4                        # the classifier's training: Adam, batch 128, lr 1e-3
CONFIDENT = 0.9                   # a digit counts as confidently classified above this max p(y|x)
SEED = 0                          # the classifier's training, and the per-level loss's noise

#----------------------------------------------------------------------------
# Inception features, the Inception score and FID.

def fid(mu1, sigma1, mu2, sigma2, feats1=None):
    """The Frechet distance ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussians of features (TTUR's
    formula): FID on Inception pool features, the digit FD on the classifier's. tr (S1 S2)^(1/2) is the sum of the
    square roots of S1 S2's eigenvalues; with S1 = B B^T they are those of the symmetric matrix B^T S2 B: two
    symmetric eigensolves in place of torch-fidelity's general eigvals of a 2048 x 2048 product (the same value,
    about 3x faster), B = U diag(l)^(1/2) over S1's eigenvalues l > 0. Given feats1, the n < D features S1 was
    computed from, B = C^T / (n - 1)^(1/2) of the centred features: one n x n eigensolve, none of D x D."""
    def nonzero(e):        # a singular matrix's zero eigenvalues come out as round-off, ~1e-16 of the largest;
        return e > max(e.max(), 0) * len(e) * np.finfo(np.float64).eps    # their square roots (1e-8) would add up
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2))
    if feats1 is not None and 1 < len(feats1) < len(mu1):
        c = np.asarray(feats1, dtype=np.float64)
        b = (c - c.mean(0)).T / np.sqrt(len(c) - 1)
    else:
        l, u = np.linalg.eigh(sigma1)
        b = u[:, nonzero(l)] * np.sqrt(l[nonzero(l)])
    e = np.linalg.eigvalsh(b.T @ sigma2 @ b)
    roots = np.sqrt(e[nonzero(e)]).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * roots)


def kid(gen, ref, subsets=100, subset_size=1000):
    """The kernel inception distance (Binkowski et al. 2018) of two feature sets (N, D): the unbiased MMD^2 with
    the cubic kernel (x . y / D + 1)^3, mean and standard deviation over `subsets` random subsets of
    min(subset_size, both counts) each (torch-fidelity's definition, defaults and seed). Unbiased at any count:
    about 0 for two samples of one distribution, where the Frechet distance is not."""
    from torch_fidelity.metric_kid import kid_features_to_metric
    m = kid_features_to_metric(torch.as_tensor(gen, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64),
                               kid_subsets=subsets, kid_subset_size=min(subset_size, len(gen), len(ref)), verbose=False)
    return m["kernel_inception_distance_mean"], m["kernel_inception_distance_std"]


def precision_recall(gen, ref, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019) of generated features against reference ones:
    precision, the share of generated features within some reference feature's distance to its k-th nearest
    reference neighbour (are the samples good); recall, the same with the roles swapped (do they cover the data).
    torch-fidelity's, k = 3."""
    from torch_fidelity.metric_prc import prc_features_to_metric
    m = prc_features_to_metric(torch.as_tensor(gen, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64),
                               prc_neighborhood=k, verbose=False)
    return m["precision"], m["recall"]


def kid_precision_recall(gen, ref):
    """{kid, kid_std, precision, recall} of generated against reference features (None where too few: precision
    and recall need k + 1 = 4 of each)."""
    kid_mean, kid_std = kid(gen, ref)
    precision, recall = precision_recall(gen, ref) if min(len(gen), len(ref)) > 3 else (None, None)
    return dict(kid=kid_mean, kid_std=kid_std, precision=precision, recall=recall)


@functools.lru_cache(maxsize=2)
def inception(weights, device):
    """torch-fidelity's TF-Inception port; `weights` None downloads the released file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    if weights is not None:
        checkpoints.read_checkpoint(weights)          # weights_only=True first: refuse a file that carries code
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=weights)
    except Exception as e:
        if weights is not None:
            raise checkpoints.CheckpointError(f"{weights}: not torch-fidelity Inception weights "
                                              f"({utils.first_line(e)[:100]})")
        raise data.DataError(f"could not download the Inception weights ({utils.first_line(e)[:80]}); pass "
                             "--inception-weights weights-inception-2015-12-05-6726825d.pth (torch-fidelity v0.2.0)")
    return net.to(device)


def batched(run, images, batch_size):
    """run(batch) over `images` in batches; each of its outputs concatenated, float64 on the CPU."""
    outs = [[o.double().cpu() for o in run(images[i:i + batch_size])] for i in range(0, len(images), batch_size)]
    return tuple(torch.cat(o) for o in zip(*outs))


@torch.no_grad()
def features(net, images, device, batch_size=100):
    """Pool features (N, 2048) and unbiased logits (N, 1008), float64, of uint8 images (N, C, H, W)."""
    return batched(lambda x: net(x.to(device).expand(-1, 3, -1, -1)), images, batch_size)   # MNIST: 1 -> 3 channels


@torch.no_grad()
def streamed_stats(net, batches, device, keep=KEPT):
    """mu, sigma of the pool features, all logits, and the first `keep` pool features (float32), over uint8
    batches. Float64 sums of features and their outer products (EDM's fid.py): memory is one batch, 2048^2 and
    the kept features, whatever the number of images."""
    n, s1, s2, logits, kept = 0, 0, 0, [], []
    for images in batches:
        pool, l = features(net, images, device)
        n, s1, s2 = n + len(pool), s1 + pool.sum(0), s2 + pool.T @ pool
        logits.append(l.float())
        kept.append(pool[:max(0, keep - sum(map(len, kept)))].float())
    mu = s1 / n
    sigma = (s2 - n * torch.outer(mu, mu)) / (n - 1)
    return mu.numpy(), sigma.numpy(), torch.cat(logits).double(), torch.cat(kept).numpy()


def inception_score(logits, splits=IS_SPLITS):
    """exp E_x KL(p(y|x) || p(y)) per split (OpenAI's), via torch-fidelity; returns (mean, std), or (None, None)
    for fewer images than splits (an empty split has no score: torch-fidelity's mean would be NaN)."""
    if len(logits) < splits:
        return None, None
    from torch_fidelity.metric_isc import isc_features_to_metric
    m = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=2020)
    return m["inception_score_mean"], m["inception_score_std"]

#----------------------------------------------------------------------------
# Reference statistics, cached under a key of what they were computed from.

def read_stats(path):
    """(mu, sigma, features or None) of a statistics .npz, refused in one line unless mu and sigma are finite
    2048-feature arrays; `features`, the first KEPT images' pool features, where a computed reference stored them."""
    try:
        f = utils.read_npz(path, ["mu", "sigma", "features"])
    except utils.Damaged as e:
        raise data.DataError(f"--ref {e}: not a readable .npz of statistics; give one an earlier run wrote (or "
                             "EDM's fid.py ref), or a folder of images") from None
    if "mu" not in f or "sigma" not in f:
        raise data.DataError(f"--ref {path}: needs arrays 'mu' and 'sigma' (as written by an earlier run)")
    mu, sigma = f["mu"], f["sigma"]
    if mu.shape != (FEATURES,) or sigma.shape != (FEATURES, FEATURES):
        raise data.DataError(f"--ref {path}: mu has shape {mu.shape} and sigma {sigma.shape}; Inception statistics "
                             f"are ({FEATURES},) and ({FEATURES}, {FEATURES})")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise data.DataError(f"--ref {path}: mu or sigma holds NaN or infinite values")
    feats = f.get("features")
    if feats is not None and (feats.ndim != 2 or feats.shape[1] != FEATURES or not np.isfinite(feats).all()):
        raise data.DataError(f"--ref {path}: 'features' has shape {feats.shape} or non-finite values; a computed "
                             f"reference stores finite (N, {FEATURES}) pool features")
    return mu, sigma, feats


def reference_stats(opts, dataset, net, device):
    """(mu, sigma, features, label) of --ref: a stats .npz (features None unless it has them), a folder of images,
    or the training set. Computed ones are cached in --ref-cache, their first KEPT features too, under a key of the
    images' bytes, the weights and the feature path (resize, channels)."""
    spec = data.DATASETS[dataset]
    if opts.ref and opts.ref.endswith(".npz"):
        return (*read_stats(opts.ref), f"statistics {opts.ref}")
    if opts.ref:
        images = data.load_image_folder(opts.ref, spec["channels"], spec["image_size"], flag="--ref", resize=False)
        label = f"folder {opts.ref}"
    else:
        images = data.load_images(dataset, True, opts.data_root, folder_flag="--ref")
        label = f"{dataset} training set" + (", digits repeated to 3 channels" if spec["channels"] == 1 else "")
    import torch_fidelity
    path = (f"inception-v3-compat 299 bilinear, torch-fidelity {torch_fidelity.__version__}, "
            f"channels {spec['channels']}->3, first {KEPT} features kept")
    key = utils.digest(images, utils.digest(net.state_dict()), path)[:16]
    cache = os.path.join(opts.ref_cache, f"{'folder' if opts.ref else dataset}_{len(images)}_{key}.npz")
    if os.path.exists(cache):
        print(f"reference statistics of the {label}: {cache} (cached; key of images, weights and feature path)")
        return (*read_stats(cache), label)
    print(f"reference statistics of the {label}: {len(images)} images, computed once")
    mu, sigma, _, feats = streamed_stats(net, [images[i:i + 1000] for i in range(0, len(images), 1000)], device)
    with utils.atomic_path(cache) as tmp:
        np.savez(tmp, mu=mu, sigma=sigma, features=feats)
    print(f"saved them as {cache} (reused while the images and weights are the same)")
    return mu, sigma, feats, label


def inception_scorer(opts, dataset, device):
    """IS (3-channel images only), FID, and KID, precision and recall on the first KEPT features of each side
    (where the reference has features: not a statistics .npz of mu and sigma alone) against reference_stats, over
    batches of uint8 images."""
    net = inception(opts.inception_weights, device)
    mu_ref, sigma_ref, feats_ref, label = reference_stats(opts, dataset, net, device)
    def score(batches):
        mu, sigma, logits, feats = streamed_stats(net, batches, device)
        rgb = data.DATASETS[dataset]["channels"] == 3
        is_mean, is_std = inception_score(logits) if rgb else (None, None)
        every = feats if len(feats) == len(logits) else None           # all the samples' features: fid's n < D route
        out = dict(inception_score_mean=is_mean, inception_score_std=is_std,
                   fid=fid(mu, sigma, mu_ref, sigma_ref, every), fid_reference=label,
                   **(kid_precision_recall(feats, feats_ref) if feats_ref is not None else {}))
        if not rgb:
            return dict(out, note=f"the paper reports no Inception score or FID for MNIST; FID against {label}")
        return out if is_mean is not None else dict(out, note=f"no Inception score: its {IS_SPLITS} splits need at "
                                                              f"least {IS_SPLITS} samples, got {len(logits)}")
    return score

#----------------------------------------------------------------------------
# The MNIST digit classifier (PyTorch's MNIST example network), trained once and cached.

class DigitNet(nn.Module):
    """Two 3x3 convolutions, max pooling, two linear layers; returns (logits, the 128 penultimate features)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3), nn.Conv2d(32, 64, 3)
        self.fc1, self.fc2 = nn.Linear(64 * 12 * 12, 128), nn.Linear(128, 10)

    def forward(self, x):                                            # x: (N, 1, 28, 28) in [0, 1]
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x - 0.1307)))), 2)
        feats = F.relu(self.fc1(F.dropout(h.flatten(1), 0.25, self.training)))
        return self.fc2(F.dropout(feats, 0.5, self.training)), feats


def train_classifier(images, labels, device):
    """Adam on cross-entropy, batches of 128, dropout on; returns the network in eval mode."""
    torch.manual_seed(SEED)
    net, g = DigitNet().to(device), torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(images), generator=g).split(128):
            loss = F.cross_entropy(net(images[idx].to(device).float() / 255)[0], labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def predict(net, images, device, batch_size=500):
    """(p(y|x) (N, 10), features (N, 128)), float64 on the CPU, of uint8 digits."""
    logits, feats = batched(lambda x: net(x.to(device).float() / 255), images, batch_size)
    return logits.softmax(1), feats


def check_classifier_cache(cache, flag="--classifier-cache"):
    """None when the classifier's cache folder holds weights to read, or can be written once they are trained;
    else why not, in one line (checked before the training and the sampling, not after)."""
    return None if glob.glob(os.path.join(glob.escape(cache), "classifier_*.pt")) else utils.check_out(cache, flag)


def load_or_train(data_root, device, cache=CLASSIFIER_CACHE):
    """(classifier, held-out digits, held-out labels, its held-out accuracy) on MNIST's training split less
    every HOLD_OUT-th digit; trained once and cached under a digest of those training digits."""
    import torchvision
    images = data.load_images("mnist", True, data_root)      # (N, 1, 28, 28); downloads, or says what is missing
    labels = torchvision.datasets.MNIST(data_root, train=True, download=False).targets
    held = torch.arange(len(images)) % HOLD_OUT == 0
    tr_x, tr_y, ho_x, ho_y = images[~held], labels[~held], images[held], labels[held]
    path = os.path.join(cache, f"classifier_{len(tr_x)}_{utils.digest(tr_x, tr_y, HOLD_OUT, EPOCHS, SEED)[:16]}.pt")
    if os.path.exists(path):
        net = DigitNet().to(device).eval()
        net.load_state_dict(checkpoints.read_checkpoint(path)["model"])
    else:
        print(f"training the MNIST classifier on {len(tr_x):,} digits ({EPOCHS} epochs), once: cached as {path}")
        net = train_classifier(tr_x, tr_y, device)
        checkpoints.write_checkpoint(dict(model=net.state_dict(), train_digits=len(tr_x)), path)
    accuracy = (predict(net, ho_x, device)[0].argmax(1) == ho_y).double().mean().item()
    return net, ho_x, ho_y, accuracy


class DigitScorer:
    """The classifier Inception score exp E KL(p(y|x) || p(y)) (one split, at most 10), the share with
    p > CONFIDENT, the class histogram, and the Frechet distance in its 128 features to held-out digits
    (never trained on), less the first PROBE, kept as `held_out` for the ceiling."""

    def __init__(self, opts, dataset, device):
        if dataset != "mnist":
            raise data.DataError("--metrics classifier scores MNIST digits only; drop it for other data sets")
        self.device = device
        self.net, held, _, self.accuracy = load_or_train(opts.data_root, device, opts.classifier_cache)
        k = min(PROBE, len(held) // 2)
        self.held_out = held[:k]
        self.feats = predict(self.net, held[k:], device)[1].numpy()
        self.mu, self.sigma = self.feats.mean(0), np.cov(self.feats, rowvar=False)

    def __call__(self, batches):
        images = torch.cat(list(batches))
        if len(images) < 2:
            raise data.DataError(f"the classifier's Frechet distance needs at least 2 images; got {len(images)}")
        probs, feats = predict(self.net, images, self.device)
        py = probs.mean(0, keepdim=True)
        kl = (probs * (probs.clamp_min(1e-30).log() - py.clamp_min(1e-30).log())).sum(1).mean()
        f = feats.numpy()
        fd = fid(f.mean(0), np.cov(f, rowvar=False), self.mu, self.sigma, f)
        return dict(classifier_is=kl.exp().item(),
                    confident_share=(probs.max(1).values > CONFIDENT).double().mean().item(),
                    class_histogram=torch.bincount(probs.argmax(1), minlength=10).tolist(), frechet_distance=float(fd),
                    **{f"classifier_{k}": v for k, v in kid_precision_recall(f, self.feats).items()})

#----------------------------------------------------------------------------
# The table of scorers: adding a metric is one maker here and one entry.

class Scorer(NamedTuple):
    """make(opts, dataset, device) -> score(batches of uint8 images) -> {name: number}; columns: the
    table's (header, format of a result) pairs it adds; `sweep`: the keys sweep.png plots."""
    make: Callable
    columns: tuple
    sweep: tuple


def _number(key, spread=None, decimals=2):
    """A table cell: result[key] (+- result[spread]) to `decimals`, '-' when absent."""
    def cell(r):
        if r.get(key) is None:
            return "-"
        return f"{r[key]:.{decimals}f}" + (f" +- {r[spread]:.{decimals}f}" if r.get(spread) is not None else "")
    return cell


SCORERS = {
    "inception": Scorer(inception_scorer,
                        (("Inception score", _number("inception_score_mean", spread="inception_score_std")),
                         ("FID", _number("fid")), ("KID", _number("kid", "kid_std", 4)),
                         ("precision", _number("precision")), ("recall", _number("recall"))),
                        ("fid", "inception_score_mean")),
    "classifier": Scorer(DigitScorer,
                         (("digit IS", _number("classifier_is")), ("confident", _number("confident_share")),
                          ("digit FD", _number("frechet_distance")),
                          ("digit KID", _number("classifier_kid", "classifier_kid_std", 4)),
                          ("digit precision", _number("classifier_precision")),
                          ("digit recall", _number("classifier_recall"))),
                         ("classifier_is", "frechet_distance")),
}
NAMES = {"fid": "FID", "inception_score_mean": "Inception score",         # sweep.png's titles
         "classifier_is": "classifier Inception score (max 10)",
         "frechet_distance": "Frechet distance, classifier features"}

#----------------------------------------------------------------------------
# Pictures and losses that are no scores: nearest training images, the test loss per level.

@torch.no_grad()
def nearest_neighbours(samples, train_images, k, embed, chunk=1000):
    """Indices (G, k) of the k training images nearest to each sample, by L2 distance between
    embed(images) (pixels, or Inception features), streamed over the training set in chunks."""
    q = embed(samples)
    best_d = torch.full((len(q), 0), math.inf, dtype=q.dtype)
    best_i = torch.zeros((len(q), 0), dtype=torch.long)
    for lo in range(0, len(train_images), chunk):
        d = torch.cdist(q, embed(train_images[lo:lo + chunk]))
        d, i = torch.cat([best_d, d], 1), torch.cat([best_i, torch.arange(lo, lo + d.shape[1]).expand(len(q), -1)], 1)
        best_d, order = d.topk(min(k, d.shape[1]), dim=1, largest=False)
        best_i = i.gather(1, order)
    return best_i


def save_nearest(path, samples, train_images, k, inception_net=None, device="cpu"):
    """A row per sample: it, then its k nearest training images in pixels (and in the Inception network's
    pool features, if given): a memorisation check, as NCSNv2's."""
    pixels = lambda x: x.flatten(1).double()
    rows = [samples[:, None], train_images[nearest_neighbours(samples, train_images, k, pixels)]]
    if inception_net is not None:
        embed = lambda x: features(inception_net, x, device)[0]
        rows.append(train_images[nearest_neighbours(samples, train_images, k, embed)])
    grid = torch.cat(rows, 1)                                     # (G, 1 + k (+ k), C, H, W)
    figures.save_image_grid(path, grid.flatten(0, 1).float() / 255, nrow=grid.shape[1])


@torch.no_grad()
def level_losses(ck, images, batch_size, device, at=None):
    """{1-based level: test DSM loss} (eq. 5, lambda = sigma^2) on uint8 `images` at about 20 training levels,
    or {sigma: loss} at the levels `at` (known_levels), with one seeded noise z for all: the network's fit per
    level, apart from any sampler. A perfect score's loss is the level's irreducible part, not 0, so compare
    checkpoints level by level (`at` puts different ladders on the same levels)."""
    shown = health.shown_levels(len(ck.sigmas))
    keys = [i + 1 for i in shown] if at is None else known_levels(ck, at)
    sigmas = ck.sigmas[shown] if at is None else torch.tensor(keys)
    x_all = images.float() / 255
    z_all = torch.randn(x_all.shape, generator=torch.Generator().manual_seed(utils.stable_seed(SEED, -2)))
    model, losses = ck.model.to(device), {}
    for key, sigma in zip(keys, sigmas.tolist()):
        total = 0.0
        for x, z in zip(x_all.to(device).split(batch_size), z_all.to(device).split(batch_size)):
            total += common.dsm_loss(model, x, x.new_full((len(x),), sigma), z).sum().item()
        losses[key] = total / len(x_all)
    model.cpu()
    print(f"test DSM loss per {'training ' if at is None else ''}level ({ck.path}, "
          f"{'EMA' if ck.ema else 'raw'} weights, {len(x_all)} held-out images, the same noise at every level):")
    print("  " + "  ".join((f"{k:>2} {float(s):.3g}: " if at is None else f"{k:.3g}: ") + f"{v:.4g}"
                           for (k, v), s in zip(losses.items(), sigmas)))
    return losses


def known_levels(ck, at):
    """The levels of `at` the network can be scored at: all for one that takes any sigma, a
    norm-conditioned one's trained levels only (common.LEVEL_MATCH); none is an error."""
    if ck.any_sigma:
        return list(at)
    distance = ck.model.distance(torch.tensor(at, dtype=torch.float64)).values
    known = [s for s, d in zip(at, distance) if d <= common.LEVEL_MATCH]
    if not known:
        raise data.DataError(f"{ck.path}: none of --level-sigmas is a trained level of this norm-conditioned network "
                             f"(it knows {', '.join(f'{float(s):.4g}' for s in ck.sigmas)})")
    return known

#----------------------------------------------------------------------------
# The command line: score any set of images.

def add_flags(p, images=False):
    """The scoring flags, shared with evaluate.py (which takes its images from the samples)."""
    if images:
        p.add_argument("--images", required=True, help="a folder of images or of sample.py's shards, or a uint8 .npz")
        p.add_argument("--dataset", choices=list(data.DATASETS), default="mnist",
                       help="whose reference and image size (channels, size) to use")
    p.add_argument("--metrics", nargs="+", choices=[*SCORERS, "none"], default=["inception"],
                   help="inception: IS and FID (the paper's); classifier: the digit classifier's scores; none")
    p.add_argument("--ref", help="FID reference: a folder of images or a stats .npz (default: the training set)")
    p.add_argument("--ref-cache", help="folder of cached reference statistics (default: <out>/ref_stats)")
    p.add_argument("--inception-weights", help="torch-fidelity Inception weights file (default: download)")
    p.add_argument("--classifier-cache", default=CLASSIFIER_CACHE, help="folder of the digit classifier's weights")
    p.add_argument("--data-root", default=data.DATA_ROOT, help="torchvision data folder")


def check_flags(p, args, out):
    """Refuse a bad --ref or unwritable cache before any work; fill the cache folder's default."""
    args.metrics = [] if "none" in args.metrics else args.metrics
    if args.ref and args.ref.endswith(".npz"):
        try:
            read_stats(args.ref)
        except data.DataError as err:
            p.error(str(err))
    if args.ref_cache and (problem := utils.check_out(args.ref_cache, "--ref-cache")):
        p.error(problem)
    if "classifier" in args.metrics and (problem := check_classifier_cache(args.classifier_cache)):
        p.error(problem)
    args.ref_cache = args.ref_cache or os.path.join(out, "ref_stats")


def read_images(path, dataset):
    """uint8 (N, C, H, W) of --images: an .npz (data.image_array's dtypes and layouts), a folder of sample.py's
    shards (read as sample.py reads them), or a folder of images."""
    spec = data.DATASETS[dataset]
    if path.endswith(".npz"):
        try:
            with np.load(path) as f:
                a = f["images"] if "images" in f else f["arr_0"]
        except Exception as e:
            raise data.DataError(f"--images {path}: not an .npz of images under 'images' or 'arr_0' "
                                 f"({utils.first_line(e)[:80]})") from None
        return data.image_array(a, f"--images {path}", spec["channels"], spec["image_size"])
    if os.path.isfile(os.path.join(path, "samples.json")):
        return data.image_array(sample.read_folder(path, "--images").numpy(), f"--images {path}",
                                spec["channels"], spec["image_size"])
    return data.load_image_folder(path, spec["channels"], spec["image_size"], flag="--images", resize=False)


@utils.command()
def main(argv=None):
    p = utils.arg_parser(__doc__)
    add_flags(p, images=True)
    p.add_argument("--device", type=utils.device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args(argv)
    check_flags(p, args, "runs/metrics")
    if args.json and (problem := utils.check_file_out(args.json)):
        p.error(problem)                                # before the scoring, not after it
    device = utils.get_device(args.device)
    images = read_images(args.images, args.dataset)
    results = dict(images=args.images, n=len(images))
    for name in args.metrics:
        results.update(SCORERS[name].make(args, args.dataset, device)([images]))
    for k, v in results.items():
        print(f"{k:<22} {v}")
    if args.json:
        utils.save_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
