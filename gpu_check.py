"""Everything this project runs on a GPU, in one command: the CUDA tests (tests/test_cuda.py: training with bf16
autocast, --compile, channels_last and pinned loading, resume, sampling, evaluation, --device auto) and bench.py's
GPU figures (both networks, batch 128, fp32 and bf16, with and without --compile), into one JSON. Planned for
under 8 minutes on one H100 or H200 (docs/speed.md).

    python gpu_check.py                                  # writes runs/gpu_check/gpu_check.json
    python gpu_check.py --out /scratch/gpu_check --skip-bench

Without a GPU it stops in one line: the CUDA tests would all be skipped and bench.py would time the CPU.
"""
import startup  # noqa: F401  (first: a signal during the imports is one line and status 130)
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import torch

import bench
import utils

OUT = "runs/gpu_check"
BENCH = [(arch, config, amp, compiled)            # (network, data set, --amp, --compile): docs/speed.md's table
         for arch in ("refinenet", "ncsnpp") for config, compiles in (("mnist", (False, True)), ("cifar10", (False,)))
         for amp in ("none", "bf16") for compiled in compiles]


def run_tests(out):
    """pytest -m cuda on tests/test_cuda.py in a child process; {passed, failed, skipped, seconds, failures}."""
    xml = os.path.abspath(os.path.join(out, "cuda_tests.xml"))      # the child runs in the repository root
    if os.path.exists(xml):
        os.remove(xml)                                  # an earlier run's report is never read as this one's
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           os.path.join("tests", "test_cuda.py"), f"--junitxml={xml}"],
                          cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True)
    print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n")
    cases = ET.parse(xml).getroot().iter("testcase") if os.path.exists(xml) else []
    result = dict(passed=0, failed=0, skipped=0, failures={})
    for case in cases:
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        kind = "failed" if bad is not None else "skipped" if case.find("skipped") is not None else "passed"
        result[kind] += 1
        if bad is not None:
            result["failures"][case.get("name")] = (bad.get("message") or "")[:500]
    return dict(result, returncode=proc.returncode, seconds=round(time.time() - t0, 1))


def run_bench(out):
    """bench.py for every BENCH row (MNIST digits at batch 128 for both networks; CIFAR-10 without --compile)."""
    rows = []
    for arch, config, amp, compiled in BENCH:
        args = ["--device", "cuda", "--configs", config, "--arch", arch, "--batch-size", "128", "--amp", amp,
                "--warmup", "3" if compiled else "2", "--repeats", "10"] + (["--compile"] if compiled else [])
        t0 = time.time()
        try:
            [row] = bench.main(args)
            rows.append(dict(row, seconds=round(time.time() - t0, 1)))
        except (Exception, SystemExit) as e:               # one configuration failing does not lose the others
            if isinstance(e, SystemExit) and e.code == utils.EXIT_INTERRUPTED:
                raise                                   # Ctrl-C or a pre-emption stops the whole check
            rows.append(dict(config=config, impl=arch, amp=amp, compile=compiled, error=utils.first_line(e)[:300]))
        print(f"bench {arch} {config} amp {amp} compile {compiled}: {time.time() - t0:.0f} s", flush=True)
    return rows


@utils.command()
def main(argv=None):
    p = utils.arg_parser(__doc__)
    p.add_argument("--out", default=OUT, help="folder of gpu_check.json and the tests' report")
    p.add_argument("--skip-bench", action="store_true", help="the CUDA tests alone")
    p.add_argument("--skip-tests", action="store_true", help="bench.py's figures alone")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise utils.UserError("no CUDA GPU here (torch.cuda.is_available() is False): gpu_check.py is for a GPU "
                              "machine; the CPU tests are `python -m pytest`")
    if problem := utils.check_out(args.out):
        p.error(problem)
    t0 = time.time()
    report = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda)
    if not args.skip_tests:
        report["tests"] = run_tests(args.out)
        utils.save_json(report, os.path.join(args.out, "gpu_check.json"))       # kept if the bench is cut short
    if not args.skip_bench:
        report["bench"] = run_bench(args.out)
    report["seconds"] = round(time.time() - t0, 1)
    utils.save_json(report, os.path.join(args.out, "gpu_check.json"))
    print(f"wrote {os.path.join(args.out, 'gpu_check.json')} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
