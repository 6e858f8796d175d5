"""Same numbers as the official implementation (ermongroup/ncsn) on its own checkpoint files."""
import os

import pytest
import torch

import checkpoints
import common
from conftest import DATA


@pytest.mark.parametrize("name", ["mnist", "cifar"])
def test_official_checkpoint_reproduces_reference_scores(name, official_reference):
    ref = official_reference[name]
    ck = checkpoints.load(os.path.join(DATA, f"official_{name}_ngf4.pth"))
    assert ck.format == "official"
    assert ck.model_args == dict(in_channels=ref["channels"], ngf=ref["ngf"], num_classes=10,
                                 image_size=ref["image_size"], conditioning="norm")
    assert not ck.model.training
    with torch.no_grad():
        score = ck.model(ref["x"], ck.sigmas[ref["labels"]])         # the contract: sigma i means label i
    assert score.shape == ref["score"].shape
    assert (score - ref["score"]).abs().max().item() < 1e-4
    assert ref["score"].abs().max() > 0.1                         # the reference is not trivial


@pytest.mark.parametrize("name", ["mnist", "cifar"])
def test_dsm_loss_reproduces_reference_losses(name, official_reference):
    ref = official_reference[name]
    model = checkpoints.load(os.path.join(DATA, f"official_{name}_ngf4.pth")).model
    sigmas = common.geometric_sigmas(1.0, 0.01, 10)
    assert torch.equal(sigmas, official_reference["sigmas"])
    with torch.no_grad():
        loss = common.dsm_loss(model, ref["x"], sigmas[ref["labels"]], ref["dsm_noise"], anneal_power=2.0).mean()
    assert abs(loss.item() - ref["dsm_loss"].item()) / ref["dsm_loss"].item() < 1e-5


def test_official_key_mapping_covers_every_tensor():
    state = torch.load(os.path.join(DATA, "official_mnist_ngf4.pth"), weights_only=True)[0]
    mapped = checkpoints.official_to_ours(state)
    ours = common.RefineNet(1, 4).state_dict()
    assert set(mapped) == set(ours)
    assert mapped["refine1.adapt_convs.0.norms.3.embed.weight"] is state["module.refine1.adapt_convs.0.2_2_norm.embed.weight"]
    assert mapped["refine4.output_convs.convs.5.weight"] is state["module.refine4.output_convs.3_2_conv.weight"]
