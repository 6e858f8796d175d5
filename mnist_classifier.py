"""A small MNIST classifier, trained once and cached, that puts numbers on digit samples.

    python mnist_classifier.py --data-root .mnist          # train (or load) it; print the ceiling and floor
    python evaluate.py --checkpoint runs/mnist/checkpoint.pt --metrics classifier --data-root .mnist

The paper reports no numbers for MNIST, and the Inception network knows nothing of digits, so
samples of MNIST checkpoints are scored by this classifier (evaluate.py --metrics classifier):
the classifier Inception score exp E_x KL(p(y|x) || p(y)) (at most 10), the share of samples
classified with confidence above CONFIDENT, the class histogram, and the Frechet distance in its
128 penultimate features to held-out real digits. It trains on the training split under
--data-root except every HOLD_OUT-th image; those held-out digits are its test set, the
reference of the Frechet distance (all but the first PROBE, or half if fewer) and the ceiling's
samples (the others). The weights are cached under --cache in a file named after a digest of the training
digits, so other data never reuses them.
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import utils

#----------------------------------------------------------------------------
# Defaults.

CACHE = "runs/mnist_classifier"   # where the trained weights are kept
HOLD_OUT = 5                      # every 5th training digit is held out (20%)
PROBE = 500                       # held-out digits kept apart as the ceiling's samples
EPOCHS = 4                        # Adam, batch 128, lr 1e-3
CONFIDENT = 0.9                   # a sample counts as confidently classified above this max p(y|x)
SEED = 0


class DigitNet(nn.Module):
    """Two 3x3 convolutions, max pooling, two linear layers (PyTorch's MNIST example); returns
    (logits, the 128 penultimate features)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3), nn.Conv2d(32, 64, 3)
        self.fc1, self.fc2 = nn.Linear(64 * 12 * 12, 128), nn.Linear(128, 10)

    def forward(self, x):                                            # x: (N, 1, 28, 28) in [0, 1]
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x - 0.1307)))), 2)
        feats = F.relu(self.fc1(F.dropout(h.flatten(1), 0.25, self.training)))
        return self.fc2(F.dropout(feats, 0.5, self.training)), feats


def split(images, labels):
    """(train images, train labels, held-out images, held-out labels): every HOLD_OUT-th is held out."""
    held = torch.arange(len(images)) % HOLD_OUT == 0
    return images[~held], labels[~held], images[held], labels[held]


def mnist_with_labels(data_root):
    """uint8 digits (N, 1, 28, 28) and labels of torchvision's MNIST training split under data_root."""
    import torchvision
    utils.load_images("mnist", True, data_root, folder_flag=None)     # downloads, or says what is missing
    data = torchvision.datasets.MNIST(data_root, train=True, download=False)
    return data.data[:, None].contiguous(), data.targets.clone()


def train_classifier(images, labels, device, epochs=EPOCHS, seed=SEED):
    """Adam on cross-entropy, batches of 128, dropout on; returns the network in eval mode."""
    torch.manual_seed(seed)
    net, g = DigitNet().to(device), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for epoch in range(epochs):
        for idx in torch.randperm(len(images), generator=g).split(128):
            logits, _ = net(images[idx].to(device).float() / 255)
            loss = F.cross_entropy(logits, labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def predict(net, images, device, batch_size=500):
    """(p(y|x) (N, 10), features (N, 128)), float64 on the CPU, of uint8 digits."""
    probs, feats = [], []
    for i in range(0, len(images), batch_size):
        logits, f = net(images[i:i + batch_size].to(device).float() / 255)
        probs.append(logits.double().softmax(1).cpu()), feats.append(f.double().cpu())
    return torch.cat(probs), torch.cat(feats)


def load_or_train(data_root, device, cache=CACHE):
    """(classifier, held-out digits, held-out labels, its held-out accuracy), trained once per set of training digits."""
    images, labels = mnist_with_labels(data_root)
    tr_x, tr_y, ho_x, ho_y = split(images, labels)
    key = utils.digest(tr_x, tr_y, HOLD_OUT, EPOCHS, SEED)[:16]
    path = os.path.join(cache, f"classifier_{len(tr_x)}_{key}.pt")
    net = DigitNet()
    if os.path.exists(path):
        net.load_state_dict(common.read_checkpoint(path)["model"])
        net = net.to(device).eval()
    else:
        print(f"training the MNIST classifier on {len(tr_x):,} digits ({EPOCHS} epochs), once: cached as {path}")
        net = train_classifier(tr_x, tr_y, device)
        utils.atomic_save(dict(model=net.state_dict(), train_digits=len(tr_x)), path)
    accuracy = (predict(net, ho_x, device)[0].argmax(1) == ho_y).double().mean().item()
    return net, ho_x, ho_y, accuracy


class DigitScorer:
    """Scores uint8 MNIST digits with the classifier: the classifier Inception score
    exp E KL(p(y|x) || p(y)) (one split, at most 10), the share classified with p > CONFIDENT, the
    class histogram, and the Frechet distance in its 128 features to held-out real digits (those
    it never trained on, less the first PROBE, kept as `held_out` for the ceiling)."""

    def __init__(self, data_root, device, cache=CACHE):
        self.device = device
        self.net, held, _, self.accuracy = load_or_train(data_root, device, cache)
        k = min(PROBE, len(held) // 2)
        self.held_out = held[:k]
        feats = predict(self.net, held[k:], device)[1].numpy()
        self.mu, self.sigma = feats.mean(0), np.cov(feats, rowvar=False)

    def __call__(self, images):
        probs, feats = predict(self.net, images, self.device)
        py = probs.mean(0, keepdim=True)
        kl = (probs * (probs.clamp_min(1e-30).log() - py.clamp_min(1e-30).log())).sum(1).mean()
        f = feats.numpy()
        return dict(classifier_is=kl.exp().item(), confident_share=(probs.max(1).values > CONFIDENT).double().mean().item(),
                    class_histogram=torch.bincount(probs.argmax(1), minlength=10).tolist(),
                    frechet_distance=float(utils.frechet_distance(f.mean(0), np.cov(f, rowvar=False), self.mu, self.sigma)), n=len(images))


def main(argv=None):
    p = utils.arg_parser(__doc__)
    p.add_argument("--data-root", default=utils.DATA_ROOT, help="torchvision data folder holding MNIST")
    p.add_argument("--cache", default=CACHE, help="folder of the cached weights")
    p.add_argument("--n", type=utils.positive_int, default=100, help="samples in the ceiling and floor rows")
    p.add_argument("--device", type=utils.device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    device = utils.get_device(args.device)
    try:
        scorer = DigitScorer(args.data_root, device, args.cache)
    except utils.DataError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"held-out accuracy {scorer.accuracy:.4f}; {len(scorer.held_out)} held-out digits kept for the ceiling")
    if args.n > len(scorer.held_out):
        p.error(f"--n is at most {len(scorer.held_out)}, the held-out digits kept for the ceiling")
    rows = {"real held-out digits (ceiling)": scorer.held_out[:args.n],
            "uniform noise (floor)": torch.randint(0, 256, (args.n, 1, 28, 28), dtype=torch.uint8,
                                                   generator=torch.Generator().manual_seed(SEED))}
    results = {name: scorer(images) for name, images in rows.items()}
    for name, m in results.items():
        print(f"{name:<32} classifier IS {m['classifier_is']:.2f}  confident {m['confident_share']:.2f}  "
              f"Frechet distance {m['frechet_distance']:.2f}  classes {m['class_histogram']}")
    return results


if __name__ == "__main__":
    main()
