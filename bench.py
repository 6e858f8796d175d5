"""Speed and memory of NCSN training and sampling, for the MNIST and CIFAR-10 networks.

    python bench.py                                   # both networks, fp32, --device auto
    python bench.py --amp bf16 --channels-last        # options, to compare with the plain run
    python bench.py --official ../ncsn                # side by side with ermongroup/ncsn's network (a checkout)
    python bench.py --device cuda --batch-size 128 --compile --json runs/bench/h100.json
    python bench.py --configs mnist --arch refinenet ncsnpp --ngf 32      # the two networks at one width

Times the training loop's own step (train.train_step: DSM, SSM or EDM's loss, backward, Adam) on a fixed synthetic
batch and one Langevin step, each the median of --repeats runs after --warmup untimed ones (CUDA
synchronised around each). Peak memory: the CUDA allocator's, or on the CPU the process's peak resident
size (reset before each measurement). FLOPs: torch's flop counter.
"""
import startup  # noqa: F401  (first: a signal during the imports is one line and status 130)
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

import checkpoints
import common
import data
import losses
import sample
import samplers
import train
import utils

#----------------------------------------------------------------------------
# Defaults.

BATCH_SIZE = None     # None: 128 (the paper's) on CUDA, 16 on the CPU
WARMUP = 2            # untimed steps first (allocator, cuDNN autotuning, compilation)
REPEATS = 5           # timed steps; the median is reported


def build(config, impl, args, device):
    """The checkpoint record (checkpoints.Checkpoint) of the network to time, on `device` in training mode:
    --checkpoint's (its conditioning and levels), the paper's RefineNet for the data set, NCSN++ as `--recipe edm
    --arch ncsnpp` trains it (EDM's Denoiser, continuous conditioning), or the official network."""
    spec, L = data.DATASETS[config], common.NUM_LEVELS
    channels, size = spec["channels"], spec["image_size"]
    ngf = args.ngf or (spec["ngf"] if impl != "ncsnpp" else train.NCSNPP["ngf"])
    levels = dict(dataset=config, sigma_begin=common.SIGMA_BEGIN, sigma_end=common.SIGMA_END, num_levels=L)
    if args.checkpoint:
        ck = checkpoints.load(args.checkpoint)
    elif impl == "refinenet":
        ck = checkpoints.record(common.RefineNet(channels, ngf, L, size), levels, "bench")
    elif impl == "ncsnpp":
        shape = {k: train.NCSNPP[k] if getattr(args, k) is None else getattr(args, k)
                 for k in ("channel_mult", "num_blocks", "dropout")}
        net = checkpoints.build_network(dict(arch="ncsnpp", in_channels=channels, image_size=size, ngf=ngf, **shape,
                                             num_classes=L, conditioning="continuous"), sigma_data=0.5, data_mean=0.5)
        ck = checkpoints.record(net, dict(levels, recipe="edm", sampler="heun"), "bench")
    else:   # the official network, imported from a checkout of ermongroup/ncsn
        sys.path.insert(0, args.official)
        from models.cond_refinenet_dilated import CondRefineNetDilated
        net = CondRefineNetDilated(SimpleNamespace(data=SimpleNamespace(logit_transform=False, channels=channels,
                                                                        image_size=size),
                                                   model=SimpleNamespace(ngf=ngf, num_classes=L)))
        net.model_args = dict(in_channels=channels, ngf=ngf, num_classes=L, image_size=size)
        ck = checkpoints.record(net, levels, "bench")
    ck.model = ck.model.train().to(device, memory_format=torch.channels_last if args.channels_last else None)
    ck.model.strict = False         # it is given trained levels only: time the network, not a host sync
    return ck


def measure(fn, device, warmup, repeats):
    """(median seconds of `repeats` calls of fn after `warmup` untimed ones, the peak memory in MiB over them)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:   # Linux: "5" resets the peak resident size
            f.write("5")
    sync, times = torch.cuda.synchronize if cuda else (lambda: None), []
    for _ in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times[warmup:])
    if cuda:
        return seconds, torch.cuda.max_memory_allocated(device) / 2 ** 20
    with open("/proc/self/status") as f:
        return seconds, next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def flops(fn):
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    except RuntimeError:        # the counter's hooks cannot follow autograd.grad (SSM's second pass)
        return None
    return counter.get_total_flops()


def sampler_rows(ck, x, device, amp):
    """Per sampler of samplers.SAMPLERS: its default setting's NFE for this network (the checkpoint's own sampler:
    its recipe's --nfe), and seconds per image: its first 2 levels (T = 1) timed per network evaluation, x NFE."""
    rows = {}
    for name, spec in samplers.SAMPLERS.items():
        try:
            default = sample.sampler_settings(name, ck, 0, ck.nfe if name == ck.sampler else None)
        except sample.Inapplicable:
            continue
        levels = torch.tensor(default.sigmas[:2], device=device)
        kwargs = {k: (1 if k == "steps_each" else v) for k, v in default.kwargs.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            t = measure(lambda: spec.run(ck.model, x, levels, **kwargs), device, 1, 3)[0] / spec.nfe(2, **kwargs)
        rows[name] = dict(nfe=default.nfe, seconds_per_image=t * default.nfe / len(x))
    return rows


def bench_one(config, impl, args, device):
    torch.manual_seed(0)
    B, ck = args.batch_size, build(config, impl, args, device)
    model = ck.model
    compiled = torch.compile(model) if args.compile else model
    opt = torch.optim.Adam(model.net.parameters(), lr=1e-3)
    x, sigmas = torch.rand(B, *ck.shape, device=device), ck.sigmas.to(device)
    name = args.objective or ("edm" if ck.model.predicts_denoised else "dsm")
    objective = losses.OBJECTIVES[name]                 # at its defaults
    step = lambda m: train.train_step(m, opt, x, losses.step_draws(0, 0, x.shape, sigmas, objective.needs),
                                      objective.loss, amp=args.amp == "bf16")      # the draws, loss, backward, Adam
    def sample_step():   # one network evaluation and one Langevin update
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            common.annealed_langevin_dynamics(compiled, x, ck.sigmas[:1], steps_each=1)
    t_train, peak_train = measure(lambda: step(compiled), device, args.warmup, args.repeats)
    t_sample, peak_sample = measure(sample_step, device, args.warmup, args.repeats)
    # counted on the plain network: the flop counter does not see inside compiled code
    train_flops = flops(lambda: step(model))
    forward_flops = flops(torch.no_grad()(lambda: model(x, sigmas[:1].expand(len(x)))))
    return dict(config=config, impl=impl, params=sum(p.numel() for p in model.net.parameters()), device=str(device),
                batch_size=B, amp=args.amp, objective=name, channels_last=args.channels_last,
                compile=args.compile, train_images_per_s=B / t_train, sample_images_per_s_per_nfe=B / t_sample,
                train_step_s=t_train, sample_step_s=t_sample, forward_gflop_per_image=forward_flops / B / 1e9,
                train_gflop_per_image=train_flops and train_flops / B / 1e9,
                train_gflops_per_s=train_flops and train_flops / t_train / 1e9,
                peak_train_mib=peak_train, peak_sample_mib=peak_sample,
                samplers=sampler_rows(ck, x, device, args.amp) if impl != "official" else {})


def print_rows(rows, args, device):
    """The table of bench_one's rows, and each sampler's cost."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {device} ({where}), "
          f"batch {args.batch_size}, amp {args.amp}, channels_last {args.channels_last}, compile {args.compile}")
    print(f"{'data set':<9} {'network':<9} {'train img/s':>11} {'sample img/s/NFE':>16} {'GFLOP/img':>9} "
          f"{'GFLOP/s':>8} "
          f"{'peak train MiB':>14} {'peak sample MiB':>15}")
    for r in rows:
        print(f"{r['config']:<9} {r['impl']:<9} {r['train_images_per_s']:>11.2f} "
              f"{r['sample_images_per_s_per_nfe']:>16.2f} "
              f"{r['train_gflop_per_image'] or float('nan'):>9.1f} {r['train_gflops_per_s'] or float('nan'):>8.1f} "
              f"{r['peak_train_mib']:>14.0f} {r['peak_sample_mib']:>15.0f}")
    for r in rows:
        if r["samplers"]:
            print(f"{r['config']} {r['impl']}: each sampler's default setting, seconds per image (measured per NFE, "
                  f"batch {r['batch_size']}): " + ", ".join(f"{k} {v['nfe']} NFE {v['seconds_per_image']:.3g} s"
                                                       for k, v in r["samplers"].items()))


@utils.command()
def main(argv=None):
    p = utils.arg_parser(__doc__)
    p.add_argument("--configs", nargs="+", choices=list(data.DATASETS), default=["mnist", "cifar10"],
                   help="networks to measure (the paper's for each data set)")
    p.add_argument("--batch-size", type=utils.positive_int, default=BATCH_SIZE,
                   help="images per step (default: 128 CUDA, 16 CPU)")
    p.add_argument("--device", type=utils.device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=["none", "bf16"], default="none", help="bf16 autocast for the forward pass")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--official", default=None, help="a checkout of ermongroup/ncsn: also measure its network")
    p.add_argument("--checkpoint", help="time this checkpoint's network instead (its conditioning and levels)")
    p.add_argument("--arch", nargs="+", choices=list(checkpoints.ARCHS), default=["refinenet"],
                   help="networks: refinenet (the paper's), ncsnpp (NCSN++ as --recipe edm --arch ncsnpp trains it)")
    p.add_argument("--ngf", type=utils.positive_int, default=None,
                   help="width (default: the data set's for RefineNet, train.NCSNPP's for NCSN++)")
    p.add_argument("--channel-mult", type=utils.positive_int, nargs="+", default=None,
                   help="ncsnpp: channels per resolution, times --ngf (default: train.NCSNPP's)")
    p.add_argument("--num-blocks", type=utils.positive_int, default=None, help="ncsnpp: blocks per resolution")
    p.add_argument("--dropout", type=utils.rate, default=None, help="ncsnpp: dropout rate")
    p.add_argument("--objective", choices=list(losses.OBJECTIVES), default=None,
                   help="training loss (default: dsm, or edm for a denoiser); edm needs continuous conditioning")
    p.add_argument("--warmup", type=utils.positive_int, default=WARMUP, help="untimed steps")
    p.add_argument("--repeats", type=utils.positive_int, default=REPEATS, help="timed steps (median reported)")
    p.add_argument("--threads", type=utils.positive_int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    device = utils.get_device(args.device)
    if args.json and (problem := utils.check_file_out(args.json)):
        p.error(problem)
    if args.official and not os.path.isfile(os.path.join(args.official, "models", "cond_refinenet_dilated.py")):
        p.error(f"--official {args.official}: no models/cond_refinenet_dilated.py (a checkout of ermongroup/ncsn)")
    if args.checkpoint:
        if args.official:
            p.error("--checkpoint and --official: time one or the other")
        try:
            args.configs = [checkpoints.load(args.checkpoint).dataset]
            data.spec(args.configs[0], args.checkpoint)
        except utils.UserError as e:
            p.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch_size = args.batch_size or (128 if device.type == "cuda" else 16)
    if args.amp == "bf16" and (slow := utils.slow_bf16(device)):
        print(slow, file=sys.stderr)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    impls = ["refinenet", "official"] if args.official else ["checkpoint"] if args.checkpoint else args.arch
    rows = [bench_one(c, impl, args, device) for c in args.configs for impl in impls]
    print_rows(rows, args, device)
    if args.json:
        utils.save_json(dict(torch=torch.__version__, rows=rows), args.json)
    return rows


if __name__ == "__main__":
    main()
