"""NCSN++ (ncsnpp.py): shapes at every image size, per-image conditioning, the parameter count against
a formula written here from the architecture's description, bitwise determinism, the contract."""
import os

import numpy as np
import pytest
import torch

import checkpoints
import common
import ncsnpp


def small(size=28, channels=1, **kw):
    args = dict(ngf=8, channel_mult=(1, 2, 2), num_blocks=1, dropout=0.0)
    return ncsnpp.NCSNpp(channels, size, **{**args, **kw})


@pytest.mark.parametrize("size,channels,mult", [(28, 1, (1, 2, 2)), (32, 3, (1, 2, 2)), (64, 3, (1, 2, 2, 2))])
@pytest.mark.parametrize("conditioning", ["continuous", "scale"])
def test_output_shape_at_each_image_size(size, channels, mult, conditioning):
    torch.manual_seed(0)
    net = small(size, channels, channel_mult=mult, conditioning=conditioning)
    x = torch.rand(2, channels, size, size)
    out = net(x, torch.tensor([0.5, 2.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="divisible by 4"):
        small(30)
    with pytest.raises(ValueError, match="takes any sigma"):
        small(conditioning="norm")


def test_output_depends_on_each_images_own_sigma():
    torch.manual_seed(0)
    net = small()
    with torch.no_grad():                          # a trained network's last layers are not near zero
        net.end_conv.weight.normal_(0, 0.1)
        for blk in [b for stage in [*net.enc, *net.dec] for b in stage]:
            blk.conv1.weight.normal_(0, 0.1)
    x = torch.rand(1, 1, 28, 28).expand(2, -1, -1, -1)
    a = net(x, torch.tensor([0.1, 0.1]))
    b = net(x, torch.tensor([0.1, 0.9]))
    assert torch.equal(a[0], b[0])                 # image 0's sigma did not change: nor did its output
    assert (a[1] - b[1]).abs().max() > 1e-3        # image 1's did


def conv(ci, co, k):
    return ci * co * k * k + co


def block(ci, co, emb, resample=False, attention=False):
    """Parameters of one residual block: two GroupNorms, two 3x3 convs, the embedding's linear map, a
    1x1 skip where channels or resolution change; attention adds a GroupNorm, qkv and a projection."""
    n = 2 * ci + conv(ci, co, 3) + emb * co + co + 2 * co + conv(co, co, 3)
    n += conv(ci, co, 1) if ci != co or resample else 0
    return n + (2 * co + conv(co, 3 * co, 1) + conv(co, co, 1) if attention else 0)


def formula(c_in, size, ngf, mult, blocks, attn):
    """NCSN++'s parameter count, from the description: noise MLP (2 ngf -> 4 ngf -> 4 ngf), the first
    conv, per resolution a down block and the image's 3x3 path (after the first) and `blocks` blocks;
    the decoder two blocks at the lowest resolution or an up block, then blocks + 1 blocks taking
    one skip each; the final GroupNorm and conv."""
    emb = 4 * ngf
    n = (2 * ngf * emb + emb) + (emb * emb + emb) + conv(c_in, ngf, 3)
    c, c_aux, skips = ngf, c_in, [ngf]
    for level, m in enumerate(mult):
        if level:
            n += block(c, c, emb, resample=True) + conv(c_aux, c, 3)
            c_aux = c
            skips.append(c)
        for _ in range(blocks):
            n += block(c, ngf * m, emb, attention=(size >> level) in attn)
            c = ngf * m
            skips.append(c)
    for level in reversed(range(len(mult))):
        n += block(c, c, emb, attention=True) + block(c, c, emb) if level == len(mult) - 1 else \
            block(c, c, emb, resample=True)
        for i in range(blocks + 1):
            n += block(c + skips.pop(), ngf * mult[level], emb,
                       attention=i == blocks and (size >> level) in attn)
            c = ngf * mult[level]
    return n + 2 * c + conv(c, c_in, 3)


@pytest.mark.parametrize("c_in,size,ngf,mult,blocks,attn", [
    (1, 28, 16, (1, 2, 2), 2, [14]), (3, 32, 32, (2, 2, 2), 1, [16, 8]), (3, 64, 8, (1, 2, 2, 2), 1, [8])])
def test_parameter_count_matches_the_formula(c_in, size, ngf, mult, blocks, attn):
    net = ncsnpp.NCSNpp(c_in, size, ngf, mult, blocks, attn)
    assert sum(p.numel() for p in net.parameters()) == formula(c_in, size, ngf, mult, blocks, attn)


def test_bitwise_deterministic():
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        net = small(dropout=0.1).train()
        x = torch.rand(3, 1, 28, 28)
        outs.append(net(x, torch.tensor([0.1, 0.5, 1.0])))
    assert torch.equal(*outs)


def test_behind_the_contract_any_sigma():
    torch.manual_seed(0)
    sigmas = common.geometric_sigmas()
    model = common.ScoreModel(small(conditioning="scale", sigmas=sigmas), sigmas)
    assert model.any_sigma and not model.predicts_denoised
    x = torch.rand(2, 1, 28, 28)
    score, denoised = model.evaluate(x, 0.123)                    # not a trained level: taken
    assert torch.allclose(denoised, x + 0.123 ** 2 * score)


#----------------------------------------------------------------------------
# --arch ncsnpp through every script (command-line tests).

NET = ["--arch", "ncsnpp", "--ngf", "8", "--num-blocks", "1", "--num-workers", "0", "--n-samples", "2",
       "--device", "cpu", "--batch-size", "8"]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.cli
def test_edm_train_resume_is_bitwise_the_straight_run_and_every_script_loads_it(mnist_root, tmp_path):
    import evaluate
    import inpaint
    import sample
    import train_mnist
    base = ["--data-root", mnist_root, "--recipe", "edm", *NET, "--dropout", "0.1", "--nfe", "3"]
    train_mnist.main([*base, "--out", str(tmp_path / "straight"), "--iters", "4"])
    train_mnist.main([*base, "--out", str(tmp_path / "resumed"), "--iters", "2"])
    train_mnist.main([*base, "--out", str(tmp_path / "resumed"), "--iters", "4", "--resume"])
    a, b = weights(tmp_path / "straight" / "checkpoint.pt"), weights(tmp_path / "resumed" / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)              # dropout's draws, the EMA and Adam continue exactly
    path = str(tmp_path / "resumed" / "checkpoint.pt")
    ck = checkpoints.load(path)                   # no flags: the record says NCSN++
    assert ck.model_args["arch"] == "ncsnpp" and ck.model_args["channel_mult"] == [1, 2, 2] and ck.ema
    assert ck.any_sigma and ck.model.predicts_denoised and ck.sampler == "heun"
    [s] = sample.main(["--checkpoint", path, "--n", "2", "--nfe", "3", "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert s["nfe"] == 3 and s["non_finite_samples"] == 0
    [e] = evaluate.main(["--checkpoint", path, "--n", "2", "--sampler", "dpmpp2m", "--nfe", "4", "--metrics", "none",
                         "--out", str(tmp_path / "e"), "--device", "cpu"])
    assert e["nfe"] == 4
    m = inpaint.main(["--checkpoint", path, "--data-root", mnist_root, "--n-images", "2", "--completions", "1",
                      "--mask", "centre", "--out", str(tmp_path / "i"), "--device", "cpu"])
    done = np.load(os.path.join(m["folder"], "completions.npz"))["completions"]
    assert done.shape == (2, 1, 1, 28, 28) and np.isfinite(done).all()


@pytest.mark.cli
def test_ncsnv2_recipe_trains_it_scale_conditioned_and_the_paper_recipe_refuses_it(mnist_root, tmp_path, capsys):
    import train_mnist
    train_mnist.main(["--data-root", mnist_root, "--recipe", "ncsnv2", *NET, "--num-levels", "5", "--iters", "1",
                      "--out", str(tmp_path / "v2")])
    ck = checkpoints.load(str(tmp_path / "v2" / "checkpoint.pt"))
    assert ck.model_args["conditioning"] == "scale" and ck.any_sigma and not ck.model.predicts_denoised
    assert torch.equal(ck.model.net.sigmas, ck.sigmas)          # the levels it was trained on, recorded
    with pytest.raises(SystemExit) as e:
        train_mnist.main(["--data-root", mnist_root, *NET, "--iters", "1", "--out", str(tmp_path / "paper")])
    assert e.value.code == 2 and "--recipe ncsnv2 or edm" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train_mnist.main(["--data-root", mnist_root, "--dropout", "0.2", "--iters", "1", "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and "setting of --arch ncsnpp" in capsys.readouterr().err


@pytest.mark.cli
def test_bench_times_it(tmp_path):
    import bench
    [row] = bench.main(["--configs", "mnist", "--arch", "ncsnpp", "--ngf", "8", "--num-blocks", "1", "--batch-size",
                        "2", "--warmup", "1", "--repeats", "1", "--device", "cpu"])
    net = ncsnpp.NCSNpp(1, 28, 8, (1, 2, 2), 1)
    assert row["impl"] == "ncsnpp" and row["objective"] == "edm" and row["train_images_per_s"] > 0
    assert row["params"] == sum(p.numel() for p in net.parameters())
    assert row["samplers"]["heun"]["nfe"] == 19


@pytest.mark.cli
def test_torchrun_two_processes_equal_one_and_bf16_trains(mnist_root, tmp_path):
    import subprocess
    import sys
    import train_mnist
    from conftest import ROOT
    base = ["--data-root", mnist_root, "--recipe", "edm", *NET, "--dropout", "0", "--iters", "2", "--nfe", "3"]
    train_mnist.main([*base, "--out", str(tmp_path / "one")])
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train.py", "--dataset", "mnist", *base, "--out", str(tmp_path / "two")], cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    a, b = weights(tmp_path / "one" / "checkpoint.pt"), weights(tmp_path / "two" / "checkpoint.pt")
    # the two ranks' all-reduce sums the gradient in another order: float32 rounding, which Adam's normalisation
    # enlarges where a gradient is near its eps (on one CPU a weight moved 1.1e-5). A wrong split of
    # the batch moves most weights by about the learning rate.
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diff.max() < 1e-4 and (diff > 1e-6).float().mean() < 1e-3
    train_mnist.main([*base, "--out", str(tmp_path / "bf16"), "--amp", "bf16"])
    c = weights(tmp_path / "bf16" / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in c.values()) and any(not torch.equal(a[k], c[k]) for k in a)


def test_bench_takes_a_zero_dropout_against_a_nonzero_default(monkeypatch):
    import types
    import bench
    import train
    monkeypatch.setitem(train.NCSNPP, "dropout", 0.1)
    args = types.SimpleNamespace(ngf=4, channel_mult=None, num_blocks=1, dropout=0.0, checkpoint=None,
                                 channels_last=False)
    assert bench.build("mnist", "ncsnpp", args, torch.device("cpu")).model_args["dropout"] == 0.0   # given: kept
    args.dropout = None
    assert bench.build("mnist", "ncsnpp", args, torch.device("cpu")).model_args["dropout"] == 0.1   # the default
