"""The paper's inpainting figure: annealed Langevin dynamics fills the occluded part of real
images (the paper's Algorithm 2; the official anneal_Langevin_dynamics_inpainting).

    python inpaint.py --checkpoint runs/mnist/checkpoint.pt      # right half of 8 test digits, 8 completions each
    python inpaint.py --checkpoint C --mask centre --n-images 4 --completions 10
    python inpaint.py --checkpoint C --mask random --fraction 0.8        # 80% of the pixels to fill
    python inpaint.py --checkpoint C --mask holes.png --images my_folder # white pixels of holes.png are filled
    python inpaint.py --checkpoint runs/mnist/checkpoint.pt --classifier --n-images 100 --completions 4

At each level the known pixels are the image plus that level's noise and the others follow the Langevin
update (common.annealed_langevin_inpainting; samplers.SAMPLERS's call has no known pixels: docs/samplers.md),
with the checkpoint's sampler settings (any recipe) unless --steps-each / --step-lr say otherwise. Completion
j of image i is seeded by (--seed, i, j), whatever --batch-size; each image's are written as made, in a folder
named after a fingerprint of the weights, settings, mask and images: a rerun makes only the missing ones.
Writes inpainting.png, completions.npz, png/ (--png), metrics.json (--classifier, MNIST: how often the
classifier gives a completion the original's label, against filling with noise or the mean image).
"""
import startup  # noqa: F401  (first: a signal during the imports is one line and status 130)
import argparse
import os

import numpy as np
import torch
from tqdm import tqdm

import checkpoints
import common
import data
import figures
import samplers
import metrics
import sample
import utils

#----------------------------------------------------------------------------
# Defaults: the paper's figure (the right half occluded; a row of completions per image).

OUT = "runs/inpaint"     # <OUT>/<checkpoint name>/<mask>_<fingerprint>/
N_IMAGES = 8             # images of the test split (the first ones), or of --images
COMPLETIONS = 8          # completions per image
MASK = "right"           # right (the paper's), centre, random, or a mask image
FRACTION = 0.5           # --mask random: share of the pixels to fill
BATCH_SIZE = 64          # completions sampled at once
SEED = 0


def make_mask(kind, size, fraction=FRACTION, seed=SEED):
    """Bool (size, size), True where pixels are known: 'right' hides the right half, 'centre' a
    centre square of half the side, 'random' a seeded `fraction` of the pixels; any other value is
    a mask image whose white (>= 128) pixels are to be filled, resized to the images (nearest)."""
    if kind == "right":
        return torch.arange(size).expand(size, size) < size // 2
    if kind == "centre":
        inside = (torch.arange(size) >= size // 4) & (torch.arange(size) < size // 4 + size // 2)
        return ~(inside[:, None] & inside)
    if kind == "random":
        return torch.rand(size, size, generator=torch.Generator().manual_seed(seed)) >= fraction
    from PIL import Image
    try:
        with Image.open(kind) as img:
            grey = data.to_8bit(img, 1).resize((size, size), Image.NEAREST)
    except Exception as e:
        raise data.DataError(f"--mask {kind}: not right, centre, random or a readable mask image "
                             f"({utils.first_line(e)})") from None
    return torch.from_numpy(np.asarray(grey) < 128)


@torch.no_grad()
def inpaint(model, images, known, settings, seed, batch_size, device, folder, rank=0, world=1, done=None):
    """Completions of each image (uint8 (N, C, H, W)) where `known` is False; image i's are written
    to image_<i>.npz as soon as they are made, and an existing file is not made again. Of `world`
    processes, rank r makes the r-th of every `world` batches of the images missing from `done` (done_images,
    listed by every rank before any writes). Returns {i: completions} of what this process made or found."""
    sigmas, K = torch.tensor(settings["sigmas"], device=device), settings["completions"]
    per_batch = max(1, batch_size // K)
    done = done_images(folder, len(images), settings["fingerprint"]) if done is None else dict(done)
    todo = [i for i in range(len(images)) if i not in done]
    bar = tqdm(total=len(images), initial=len(images) - len(todo), desc="inpainting", unit="img", dynamic_ncols=True,
               disable=rank > 0)
    for b in range(rank * per_batch, len(todo), per_batch * world):
        idx = todo[b:b + per_batch]
        x_known = (images[idx].to(device).float() / 255).repeat_interleave(K, 0)       # (len(idx) K, C, H, W)
        noise = utils.SampleNoise([(seed, i, j) for i in idx for j in range(K)], device)
        x0 = noise.rand(*x_known.shape[1:])
        x = common.annealed_langevin_inpainting(model, x0, x_known, known.to(device), sigmas,
                                                  randn_like=noise.randn_like, steps_each=settings["steps_each"],
                                                  step_lr=settings["step_lr"])
        out = (torch.nan_to_num(x).clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().view(len(idx), K, *x.shape[1:])
        for i, completions in zip(idx, out):
            with utils.atomic_path(image_path(folder, i)) as tmp:
                np.savez(tmp, completions=completions.numpy(), fingerprint=np.array(settings["fingerprint"]))
            done[i] = completions.numpy()
        bar.update(min(len(idx) * world, bar.total - bar.n))             # the others make as many meanwhile
    bar.close()
    return done


def image_path(folder, i):
    return os.path.join(folder, f"image_{i:05d}.npz")


def done_images(folder, n, fp):
    """{i: completions} of the images [0, n) whose files hold this run's completions; a damaged file is set aside
    (stored), a file of another run refused."""
    found = {i: stored(image_path(folder, i), fp) for i in range(n) if os.path.exists(image_path(folder, i))}
    return {i: c for i, c in found.items() if c is not None}


def stored(path, fp):
    """The completions an earlier run stored in `path`: refused when they are of another run (its
    fingerprint), None (and the file set aside) when the file is damaged."""
    f = utils.whole_or_none(utils.read_npz, path)
    if f is None:
        return None
    if str(f.get("fingerprint")) != fp or "completions" not in f:
        raise data.DataError(f"{path} holds completions of other weights, images, mask or settings; "
                             "delete it or use another --out")
    return f["completions"]


def label_agreement(images, known, completions, data_root, device, cache, seed=SEED):
    """How often the MNIST classifier gives the completions (and two baselines: the unknown pixels
    as uniform noise, as the mean training image) the label it gives the original."""
    net = metrics.load_or_train(data_root, device, cache)[0]
    mean_image = (data.load_images("mnist", True, data_root).float().mean(0) + 0.5).to(torch.uint8)
    label = lambda x: metrics.predict(net, x, device)[0].argmax(1)
    want = label(images)
    noise = torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    filled = {"completions": completions.flatten(0, 1), "noise": torch.where(known, images, noise),
              "mean image": torch.where(known, images, mean_image.expand_as(images))}
    K = completions.shape[1]
    return {name: (label(x) == (want.repeat_interleave(K) if name == "completions" else want)).double().mean().item()
            for name, x in filled.items()}


def write_outputs(args, folder, images, known, completions, device):
    """inpainting.png (a row per image: the occluded input, its completions, the original), completions.npz,
    png/ (--png); returns what metrics.json says of them (--classifier: their and two baselines' label agreement)."""
    occluded = torch.where(known, images.float() / 255, torch.full_like(images.float(), 0.5))     # unknown: grey
    rows = torch.cat([occluded[:, None], completions.float() / 255, images[:, None].float() / 255], 1)  # (N, K + 2)
    figures.save_image_grid(os.path.join(folder, "inpainting.png"), rows.flatten(0, 1), nrow=rows.shape[1])
    with utils.atomic_path(os.path.join(folder, "completions.npz")) as tmp:
        np.savez(tmp, completions=completions.numpy(), originals=images.numpy(), known=known.numpy())
    if args.png:
        for (i, j) in np.ndindex(*completions.shape[:2]):
            png = os.path.join(folder, "png", f"{i:05d}_{j:02d}.png")
            figures.save_image_grid(png, completions[i, j:j + 1] / 255, 1)
    result = dict(mask=args.mask, share_to_fill=(~known).float().mean().item(), n_images=len(images), folder=folder)
    if args.classifier:
        agreed = label_agreement(images, known, completions, args.data_root, device, args.classifier_cache, args.seed)
        print("the classifier gives the original's label to: " + ", ".join(f"{k} {v:.1%}" for k, v in agreed.items()))
        result["label_agreement"] = agreed
    return result


@utils.command()
def main(argv=None):
    p = utils.arg_parser(__doc__)
    p.add_argument("--checkpoint", help="a checkpoint of any recipe, or an official one (default: the newest "
                                        f"training run's under {checkpoints.RUNS}/)")
    p.add_argument("--images", help="a folder of images (default: the test split of the checkpoint's data set)")
    p.add_argument("--data-root", default=data.DATA_ROOT, help="torchvision data folder")
    p.add_argument("--mask", default=MASK, help="right, centre, random, or a mask image (white = fill)")
    p.add_argument("--fraction", type=utils.positive_float, default=FRACTION,
                   help="--mask random: share of pixels to fill")
    p.add_argument("--n-images", type=utils.positive_int, default=N_IMAGES, help="images to complete")
    p.add_argument("--completions", type=utils.positive_int, default=COMPLETIONS, help="completions per image")
    p.add_argument("--steps-each", type=utils.positive_int, help="steps per level (default: the checkpoint's)")
    p.add_argument("--step-lr", type=utils.number_or_auto(utils.positive_float),
                   help="step_lr, or auto (technique 4) (default: the checkpoint's)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, help="EMA weights (default: if present)")
    p.add_argument("--batch-size", type=utils.positive_int, default=BATCH_SIZE, help="completions sampled at once")
    p.add_argument("--seed", type=utils.seed, default=SEED, help="completion j of image i is seeded by (seed, i, j)")
    p.add_argument("--classifier", action="store_true", help="MNIST: label agreement of completions and baselines")
    p.add_argument("--classifier-cache", default=metrics.CLASSIFIER_CACHE,
                   help="folder of the MNIST classifier's weights")
    p.add_argument("--png", action="store_true", help="also write every completion as a PNG file")
    p.add_argument("--out", help=f"output folder (default {OUT}/<checkpoint name>)")
    p.add_argument("--device", type=utils.device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    if args.fraction >= 1:
        p.error(f"--fraction is the share of pixels to fill, below 1; got {args.fraction}")
    utils.quiet_other_ranks()
    args.checkpoint = sample.default_checkpoint(p) if args.checkpoint is None else args.checkpoint
    rank, world, device = utils.dist_init(args.device)      # torchrun: the missing images split across processes
    ck = checkpoints.load(args.checkpoint, map_location=device, ema=args.ema)
    spec = data.spec(ck.dataset, args.checkpoint)
    if args.classifier and ck.dataset != "mnist":
        raise data.DataError("--classifier scores MNIST digits only; drop it for other data sets")
    def load():
        return (data.load_image_folder(args.images, spec["channels"], spec["image_size"], flag="--images", resize=False)
                if args.images else data.load_images(ck.dataset, False, args.data_root, folder_flag="--images"))
    images = utils.collective(load, rank, world, device)       # rank 0 first: it downloads what is missing
    images = (load() if rank else images)[:args.n_images]
    known = make_mask(args.mask, spec["image_size"], args.fraction, args.seed)
    T, step_lr = samplers.sampler_defaults(ck, steps_each=args.steps_each, step_lr=args.step_lr)
    settings = dict(sigmas=ck.sigmas.tolist(), steps_each=T, step_lr=step_lr, completions=args.completions,
                    seed=args.seed)
    settings["fingerprint"] = utils.digest(ck.model.net.state_dict(), known, images, sorted(settings.items()))
    mask_name = os.path.splitext(os.path.basename(args.mask))[0]
    out = args.out or os.path.join(OUT, utils.checkpoint_name(args.checkpoint))
    folder = os.path.join(out, f"{mask_name}_T{T}_seed{args.seed}_{settings['fingerprint'][:10]}")
    cache = args.classifier and metrics.check_classifier_cache(args.classifier_cache)
    if problem := cache or utils.check_out(folder):
        p.error(problem)
    print(f"{len(images)} images x {args.completions} completions, mask {args.mask} ({(~known).float().mean():.0%} "
          f"of the pixels to fill), {len(settings['sigmas'])} levels x T = {T}, step_lr {step_lr:.3g}")
    listing = lambda: done_images(folder, len(images), settings["fingerprint"])   # sets a damaged file aside
    def finish(_):
        done = listing()                                # every rank's completions, from the files
        if missing := [i for i in range(len(images)) if i not in done]:
            raise data.DataError(f"{folder}: image {missing[0]}'s completions are missing after inpainting (a "
                                 "file removed meanwhile?); run the same command again to make them")
        completions = torch.stack([torch.from_numpy(done[i]) for i in range(len(images))])
        result = write_outputs(args, folder, images, known, completions, device)
        result.update(checkpoint=args.checkpoint, dataset=ck.dataset, settings=settings)
        utils.save_json(result, os.path.join(folder, "metrics.json"))
        print(f"wrote {folder}/inpainting.png, completions.npz, metrics.json")
        return result
    result = utils.shared_folder(folder, rank, world, device, listing, listing,
                                 lambda done: inpaint(ck.model, images, known, settings, args.seed, args.batch_size,
                                                      device, folder, rank, world, done), finish)
    if world > 1:
        utils.dist_exit(0)
    return result


if __name__ == "__main__":
    main()
