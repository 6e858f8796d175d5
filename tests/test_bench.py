"""bench.py and bf16 autocast: the figures it reports, and bf16 losses close to fp32."""
import json
import os

import pytest
import torch

import bench
import checkpoints
import common
from conftest import DATA

FAST = ["--device", "cpu"]


def conv_flops(net, x, labels):
    """The analytic forward FLOPs of net's convolutions per image: 2 C_in K^2 C_out H_out W_out each."""
    total = []
    hooks = [m.register_forward_hook(lambda m, i, o: total.append(2 * m.in_channels // m.groups * m.kernel_size[0]
                                                                  * m.kernel_size[1] * o[0].numel()))
             for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        net(x, labels)
    for h in hooks:
        h.remove()
    return sum(total)


def test_bench_reports_flops_that_match_the_analytic_count(tmp_path):
    out = tmp_path / "bench.json"
    [row] = bench.main(["--configs", "mnist", "--batch-size", "2", "--warmup", "1", "--repeats", "1", "--device", "cpu",
                        "--json", str(out)])
    net = common.RefineNet(1, 64, 10, 28)
    analytic = conv_flops(net, torch.rand(1, 1, 28, 28), torch.zeros(1, dtype=torch.long)) / 1e9
    assert row["params"] == sum(p.numel() for p in net.parameters()) == 7_638_657
    # the forward pass is its convolutions (3.8 GFLOP an image); training adds the backward pass, twice the
    # forward except for the first convolution, whose input needs no gradient
    assert row["forward_gflop_per_image"] == pytest.approx(analytic, rel=1e-6) and 3.7 < analytic < 3.9
    assert 2.95 * analytic < row["train_gflop_per_image"] <= 3 * analytic
    # each sampler's default setting: its NFE, and seconds per image that grow with it
    s = row["samplers"]
    assert {k: v["nfe"] for k, v in s.items()} == {"als": 1000, "ancestral": 10, "heun": 19, "dpmpp2m": 10}
    assert s["als"]["seconds_per_image"] > 20 * s["heun"]["seconds_per_image"] > 20 * s["dpmpp2m"]["seconds_per_image"]
    assert json.loads(out.read_text())["rows"][0]["train_step_s"] == pytest.approx(row["train_step_s"])


def test_bench_refuses_a_folder_without_the_official_network(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--official", str(tmp_path)])
    assert "cond_refinenet_dilated.py" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["mnist", "cifar"])
def test_bf16_loss_stays_within_a_few_percent_of_fp32(name, official_reference):
    ref = official_reference[name]
    model = checkpoints.load(os.path.join(DATA, f"official_{name}_ngf4.pth")).model
    net, sigmas = model.net, official_reference["sigmas"]
    torch.manual_seed(0)
    x = ref["x"].repeat(8, 1, 1, 1)
    labels, noise = torch.randint(0, 10, (len(x),)), torch.randn_like(x)
    fp32 = common.dsm_loss(model, x, sigmas[labels], noise).mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = common.dsm_loss(model, x, sigmas[labels], noise).mean()
    assert bf16.dtype == torch.float32                            # the loss itself is reduced in fp32
    assert abs(bf16.item() - fp32.item()) / fp32.item() < 0.03
    assert bf16.item() != fp32.item()                             # autocast did change the arithmetic
    # the network's output itself, which the loss at initialisation hardly weighs
    with torch.no_grad():
        s32 = net(x, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s16 = net(x, labels).float()
    assert 0 < (s16 - s32).norm() / s32.norm() < 0.06          # measured: 3.2% (MNIST), 1.6% (CIFAR-10)


def test_bench_refuses_a_json_path_it_cannot_write_before_measuring(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        bench.main(["--json", str(tmp_path / "file" / "out.json"), "--device", "cpu"])
    assert "is a file, not a folder" in capsys.readouterr().err


def test_bench_times_the_ssm_objective(tmp_path):
    base = ["--configs", "mnist", "--batch-size", "2", "--warmup", "1", "--repeats", "1", "--ngf", "8", *FAST]
    [dsm], [ssm] = bench.main(base), bench.main([*base, "--objective", "ssm"])
    assert ssm["objective"] == "ssm" and ssm["train_images_per_s"] > 0 and ssm["train_gflop_per_image"] is None
    assert dsm["train_gflop_per_image"] > 2.5 * dsm["forward_gflop_per_image"] > 0      # backward ~ 2 forwards


def test_bench_counts_a_checkpoint_s_own_sampler_setting(tmp_path):
    """--checkpoint: Langevin's default is the checkpoint's recipe's (T = 5 and a denoising step on its 6
    levels: 31 NFE), not the paper's T = 100; its own sampler (here heun) at the recipe's --nfe."""
    levels = common.geometric_sigmas(4.0, 0.01, 6)
    net = common.RefineNet(1, 4, num_classes=6, image_size=28, conditioning="scale", sigmas=levels)
    config = dict(dataset="mnist", sigma_begin=4.0, sigma_end=0.01, num_levels=6, steps_each=5, step_lr=1e-5,
                  denoise=True, sampler="heun", nfe=7, s_churn=10.0)
    path = tmp_path / "checkpoint.pt"
    checkpoints.write_checkpoint(dict(model=net.state_dict(), model_args=net.model_args, config=config), path)
    [row] = bench.main(["--checkpoint", str(path), "--batch-size", "1", "--repeats", "1", "--warmup", "1",
                        "--device", "cpu"])
    assert row["samplers"]["als"]["nfe"] == 5 * 6 + 1 and row["samplers"]["heun"]["nfe"] == 7
    assert row["samplers"]["dpmpp2m"]["nfe"] == 6                       # the others: their own default
