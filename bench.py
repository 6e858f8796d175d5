"""Speed and memory of NCSN training and sampling, for the MNIST and CIFAR-10 networks.

    python bench.py                                   # both networks, fp32, --device auto
    python bench.py --amp bf16 --channels-last        # options, to compare with the plain run
    python bench.py --official ../ncsn                # side by side with ermongroup/ncsn's network (a checkout)
    python bench.py --device cuda --batch-size 128 --compile --json runs/bench/h100.json

Times the training loop's own step (train.train_step: the DSM or SSM loss of losses.OBJECTIVES,
backward, Adam) on a fixed synthetic batch, and one sampler step (a network evaluation and the Langevin
update), each the median of --repeats runs after --warmup untimed ones (CUDA is synchronised
around each; the CPU needs no sync). Peak memory: the CUDA allocator's peak, or on the CPU the
process's peak resident memory (reset before each measurement). FLOPs: torch's flop counter.
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
    """The checkpoint record (checkpoints.Checkpoint) of the network to time: a checkpoint's
    (--checkpoint: its conditioning and levels), the paper's for the data set, or the official
    implementation's, on `device` in training mode."""
    spec = data.DATASETS[config]                  # the paper's network for the data set
    channels, size, ngf = spec["channels"], spec["image_size"], spec["ngf"]
    levels = dict(dataset=config, sigma_begin=common.SIGMA_BEGIN, sigma_end=common.SIGMA_END,
                  num_levels=common.NUM_LEVELS)
    if args.checkpoint:
        ck = checkpoints.load(args.checkpoint)
    elif impl == "ours":
        ck = checkpoints.record(common.RefineNet(channels, ngf, common.NUM_LEVELS, size), levels, "bench")
    else:   # the official network, imported from a checkout of ermongroup/ncsn
        sys.path.insert(0, args.official)
        from models.cond_refinenet_dilated import CondRefineNetDilated
        net = CondRefineNetDilated(SimpleNamespace(data=SimpleNamespace(logit_transform=False, channels=channels,
                                                                        image_size=size),
                                                   model=SimpleNamespace(ngf=ngf, num_classes=common.NUM_LEVELS)))
        net.model_args = dict(in_channels=channels, ngf=ngf, num_classes=common.NUM_LEVELS, image_size=size)
        ck = checkpoints.record(net, levels, "bench")
    ck.model = ck.model.train().to(device, memory_format=torch.channels_last if args.channels_last else None)
    ck.model.strict = False         # it is given trained levels only: time the network, not a host sync
    return ck


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:   # Linux: "5" resets the peak resident size
            f.write("5")


def read_peak_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def median_seconds(fn, device, warmup, repeats):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flops(fn):
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    except RuntimeError:        # the counter's hooks cannot follow autograd.grad (SSM's second pass)
        return None
    return counter.get_total_flops()


def sampler_rows(ck, B, device, amp):
    """Per sampler of samplers.SAMPLERS: its default setting's NFE for this network (the checkpoint's
    own sampler: at its recipe's --nfe), and seconds per image: a run of the setting's first 2
    levels (T = 1) timed per network evaluation, times its NFE."""
    rows = {}
    x = torch.rand(B, *ck.shape, device=device)
    for name, spec in samplers.SAMPLERS.items():
        try:
            default = sample.sampler_settings(name, ck, 0, ck.nfe if name == ck.sampler else None)
        except sample.Inapplicable:
            continue
        levels = torch.tensor(default.sigmas[:2], device=device)
        kwargs = {k: (1 if k == "steps_each" else v) for k, v in default.kwargs.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            t = median_seconds(lambda: spec.run(ck.model, x, levels, **kwargs), device, 1, 3) / spec.nfe(2, **kwargs)
        rows[name] = dict(nfe=default.nfe, seconds_per_image=t * default.nfe / B)
    return rows


def bench_one(config, impl, args, device):
    torch.manual_seed(0)
    B = args.batch_size
    ck = build(config, impl, args, device)
    net, model = ck.model.net, ck.model
    params = sum(p.numel() for p in net.parameters())
    compiled = torch.compile(model) if args.compile else model
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.rand(B, *ck.shape, device=device)
    loss = losses.OBJECTIVES[args.objective].loss      # dsm or ssm, at its defaults
    sigmas, needs = ck.sigmas.to(device), losses.OBJECTIVES[args.objective].needs
    step = lambda m: train.train_step(m, opt, x, losses.step_draws(0, 0, x.shape, sigmas, needs), loss,
                                      amp=args.amp == "bf16")                # the draws, loss, backward, Adam
    forward = lambda: model(x, sigmas[:1].expand(len(x)))
    def sample_step():   # one network evaluation and one Langevin update
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            common.annealed_langevin_dynamics(compiled, x, ck.sigmas[:1], steps_each=1)

    reset_peak(device)
    t_train = median_seconds(lambda: step(compiled), device, args.warmup, args.repeats)
    peak_train = read_peak_mib(device)
    reset_peak(device)
    t_sample = median_seconds(sample_step, device, args.warmup, args.repeats)
    peak_sample = read_peak_mib(device)
    # counted on the plain network: the flop counter does not see inside compiled code
    train_flops, forward_flops = flops(lambda: step(model)), flops(lambda: torch.no_grad()(forward)())
    costs = sampler_rows(ck, B, device, args.amp) if impl == "ours" else {}
    return dict(config=config, impl=impl, params=params, device=str(device), batch_size=B, amp=args.amp,
                objective=args.objective, channels_last=args.channels_last, compile=args.compile,
                train_images_per_s=B / t_train, sample_images_per_s_per_nfe=B / t_sample, train_step_s=t_train,
                sample_step_s=t_sample, train_gflop_per_image=train_flops and train_flops / B / 1e9,
                forward_gflop_per_image=forward_flops / B / 1e9,
                train_gflops_per_s=train_flops and train_flops / t_train / 1e9,
                peak_train_mib=peak_train, peak_sample_mib=peak_sample, samplers=costs)


def print_rows(rows, args, device):
    """The table of bench_one's rows, and each sampler's cost."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {device} ({where}), "
          f"batch {args.batch_size}, amp {args.amp}, channels_last {args.channels_last}, compile {args.compile}")
    print(f"{'network':<9} {'impl':<9} {'train img/s':>11} {'sample img/s/NFE':>16} {'GFLOP/img':>9} {'GFLOP/s':>8} "
          f"{'peak train MiB':>14} {'peak sample MiB':>15}")
    for r in rows:
        print(f"{r['config']:<9} {r['impl']:<9} {r['train_images_per_s']:>11.2f} "
              f"{r['sample_images_per_s_per_nfe']:>16.2f} "
              f"{r['train_gflop_per_image'] or float('nan'):>9.1f} {r['train_gflops_per_s'] or float('nan'):>8.1f} "
              f"{r['peak_train_mib']:>14.0f} {r['peak_sample_mib']:>15.0f}")
    for r in rows:
        if r["samplers"]:
            print(f"{r['config']}: each sampler's default setting, seconds per image (measured per NFE, batch "
                  f"{r['batch_size']}): " + ", ".join(f"{k} {v['nfe']} NFE {v['seconds_per_image']:.3g} s"
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
    p.add_argument("--checkpoint", default=None,
                   help="time this checkpoint's network instead (its conditioning and levels)")
    p.add_argument("--objective", choices=["dsm", "ssm"], default="dsm",
                   help="training loss: annealed DSM or sliced SM")
    p.add_argument("--warmup", type=utils.positive_int, default=WARMUP, help="untimed steps")
    p.add_argument("--repeats", type=utils.positive_int, default=REPEATS, help="timed steps (median reported)")
    p.add_argument("--threads", type=utils.positive_int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    device = utils.get_device(args.device)
    if args.json and os.path.isdir(args.json):
        p.error(f"--json {args.json} is a folder; give a file name, e.g. {os.path.join(args.json, 'bench.json')}")
    if args.json and (problem := utils.check_out(os.path.dirname(os.path.abspath(args.json)), "--json's folder")):
        p.error(problem)
    if args.official and not os.path.isfile(os.path.join(args.official, "models", "cond_refinenet_dilated.py")):
        p.error(f"--official {args.official}: no models/cond_refinenet_dilated.py there "
                "(a checkout of ermongroup/ncsn)")
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
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    impls = ["ours", "official"] if args.official else ["ours"]
    rows = [bench_one(c, impl, args, device) for c in args.configs for impl in impls]
    print_rows(rows, args, device)
    if args.json:
        utils.save_json(dict(torch=torch.__version__, rows=rows), args.json)
    return rows


if __name__ == "__main__":
    main()
