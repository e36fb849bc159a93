"""The block registry, the user's choice of spiking sites, and SNN-aware training in both execution modes."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

from conftest import TINY_CONFIGS, make_inputs, make_unet
from spiking_diffusers import SpikingUNet2DModel, UnsupportedModuleError, convert, quantize
from spiking_diffusers.converter.neurons import IFNeuron
from spiking_diffusers.converter.qcfs import QCFSActivation
from spiking_diffusers.converter.registry import BLOCK_HANDLERS, SiteSpec, register_block


class GatedResnet(ResnetBlock2D):
    """A user's block: a ResNet block with its own type (exact types are registered, not subclasses)."""


def _with_user_block():
    unet = make_unet(TINY_CONFIGS["attention"])
    block = unet.down_blocks[0].resnets[0]
    block.__class__ = GatedResnet
    return unet


def test_a_new_block_type_is_one_handler():
    unet = _with_user_block()
    with pytest.raises(UnsupportedModuleError, match=r"down_blocks\.0\.resnets\.0.*GatedResnet"):
        quantize(unet, levels=4)

    def gated_sites(block: GatedResnet) -> list[SiteSpec]:
        return [
            SiteSpec("act1", "nonlinearity", "conv1", "norm1", "spatial"),
            SiteSpec("temb_act", "nonlinearity", "time_emb_proj", None, "temb"),
            SiteSpec("act2", "nonlinearity", "conv2", "norm2", "spatial"),
        ]

    register_block(GatedResnet, "block", sites=gated_sites)
    try:
        qnet = quantize(unet, levels=4)
        assert {f"down_blocks.0.resnets.0.{name}" for name in ("act1", "temb_act", "act2")} <= set(qnet.sites())
        # the handler lists the same sites as ResnetBlock2D's, so the network converts exactly like the stock one
        stock = convert(quantize(make_unet(TINY_CONFIGS["attention"]), levels=4), timesteps=4)
        sample, timestep, kwargs = make_inputs(unet)
        with torch.no_grad():
            out = convert(qnet, timesteps=4)(sample, timestep, **kwargs).sample
            assert torch.equal(out, stock(sample, timestep, **kwargs).sample)
    finally:
        BLOCK_HANDLERS.pop(GatedResnet)


def test_register_block_refuses_an_unknown_role():
    with pytest.raises(ValueError, match="role"):
        register_block(GatedResnet, "magic")
    assert GatedResnet not in BLOCK_HANDLERS


def test_filter_fn_keeps_the_chosen_sites_analog_and_the_choice_is_saved(tmp_path):
    unet = make_unet(TINY_CONFIGS["attention"])
    qnet = quantize(unet, levels=4)
    seen = []

    def spike_outside_up_blocks(site) -> bool:
        seen.append(site)
        return not site.name.startswith("up_blocks.")

    snn = convert(qnet, timesteps=4, filter_fn=spike_outside_up_blocks)
    assert {site.name for site in seen} == set(qnet.sites())
    assert {site.block for site in seen} >= {"ResnetBlock2D", "TimestepEmbedding", "UNet2DModel"}
    for name, unit in snn.sites().items():
        expected = QCFSActivation if name.startswith("up_blocks.") else IFNeuron
        assert type(unit) is expected, name
    assert snn.config.analog_sites and all(name.startswith("up_blocks.") for name in snn.config.analog_sites)

    sample, timestep, _ = make_inputs(unet)
    snn.save_pretrained(tmp_path)
    loaded = SpikingUNet2DModel.from_pretrained(tmp_path, torch_dtype=torch.float64)
    assert isinstance(loaded.sites()["up_blocks.0.resnets.0.act1"], QCFSActivation)
    with torch.no_grad():
        assert torch.equal(loaded(sample, timestep).sample, snn(sample, timestep).sample)
        # the analog sites are what makes it differ from the all-spiking network
        assert not torch.equal(convert(qnet, timesteps=4)(sample, timestep).sample, snn(sample, timestep).sample)


def test_analog_sites_that_do_not_exist_are_named():
    qnet = quantize(make_unet(TINY_CONFIGS["attention"]), levels=2)
    config = dict(qnet.config)
    with pytest.raises(ValueError, match=r"up_blocks\.9\.nothing"):
        SpikingUNet2DModel(
            unet_config=config["unet_config"], levels=2, timesteps=2, analog_sites=["up_blocks.9.nothing"]
        )


def test_stepwise_execution_trains_the_weights():
    """Step-wise execution used to detach the neuron input, so only thresholds trained; now every weight gets
    the straight-through gradient. It judges the window on each step's input (batched mode: on the mean over
    T), so the two agree exactly for a constant input and only roughly in a network."""
    current = torch.linspace(-0.5, 1.5, 41, dtype=torch.float64).reshape(1, -1, 1, 1)
    grads = {}
    for execution in ("batched", "stepwise"):
        neuron = IFNeuron(41, per_channel=True).double()
        weight = torch.ones_like(current, requires_grad=True)
        neuron.begin(4, execution)
        if execution == "batched":
            out = neuron((weight * current).repeat(4, 1, 1, 1))
        else:
            out = torch.cat([neuron(weight * current) for _ in range(4)])
        out.sum().backward()
        grads[execution] = weight.grad
    inside = ((current > 0) & (current < 1)).double()
    assert torch.equal(grads["stepwise"], grads["batched"]) and torch.equal(grads["batched"], 4 * current * inside)

    unet = make_unet(TINY_CONFIGS["attention"])
    sample, timestep, kwargs = make_inputs(unet)
    conv = {}
    for execution in ("batched", "stepwise"):
        snn = convert(quantize(unet, levels=4), timesteps=4, execution=execution).train()
        snn(sample, timestep, **kwargs).sample.square().mean().backward()
        conv[execution] = snn.unet.conv_in.weight.grad.flatten()
    assert conv["stepwise"].abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(conv["stepwise"], conv["batched"], dim=0) > 0.5
