"""Offsets: a learned input shift and output offset per activation unit, ``qcfs(z - shift) + offset``, and how
the spiking network carries them (a bias current of the neuron, a bias map of the consumer layer)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMScheduler

from conftest import TINY_CONFIGS, make_conditional, make_inputs, make_unet, relative_error
from spiking_diffusers import QCFSUNet2DModel, SpikingUNet2DModel, convert, quantize
from spiking_diffusers.calibration.calibrate import CalibrationConfig, calibrate, resolve_offsets
from spiking_diffusers.calibration.distill import DistillSettings, _trainable_groups
from spiking_diffusers.commands import calibrate as calibrate_command
from spiking_diffusers.commands import convert as convert_command
from spiking_diffusers.converter.blocks import OUTPUT_SITE
from spiking_diffusers.converter.neurons import IFNeuron
from spiking_diffusers.converter.offsets import ConsumerOffset
from spiking_diffusers.converter.qcfs import QCFSActivation, broadcast_channels, qcfs
from spiking_diffusers.converter.thresholds import mse_threshold, offset_fit
from spiking_diffusers.energy.accounting import OperationCounter
from spiking_diffusers.export import SpikingStep, export_qcfs, export_snn, export_step

CONSUMERS = {"conv1", "conv2", "conv_out", "time_emb_proj", "linear_2", "skip_conv"}


def run(model, unet, **extra):
    sample, timestep, kwargs = make_inputs(unet)
    with torch.no_grad():
        return model(sample, timestep, **kwargs, **extra).sample


def randomise_offsets(qnet: QCFSUNet2DModel, seed: int = 0) -> None:
    """Give every unit a random shift and a random negative offset (calibration would learn some)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for unit in qnet.sites().values():
            for param, scale in ((unit.input_shift, 0.2), (unit.output_offset, -0.3)):
                param.copy_(torch.rand(param.shape, generator=generator, dtype=param.dtype) * scale)


def offset_qnet(name: str = "attention", levels: int = 4, dtype=torch.float64, **options) -> QCFSUNet2DModel:
    unet = make_unet(TINY_CONFIGS[name], dtype=dtype)
    qnet = quantize(unet, levels=levels, offsets=True, per_channel=True, **options)
    randomise_offsets(qnet)
    return unet, qnet


def consumer_hooks(unet: torch.nn.Module) -> list[ConsumerOffset]:
    return [
        hook for module in unet.modules() for hook in module._forward_hooks.values() if isinstance(hook, ConsumerOffset)
    ]


def test_unit_with_offsets_follows_its_formula_and_its_ann_mode_is_the_activation():
    unit = QCFSActivation(torch.nn.SiLU(), 3, levels=4, per_channel=True, offsets=True).double()
    with torch.no_grad():
        unit.threshold.copy_(torch.tensor([1.0, 2.0, 0.5]))
        unit.input_shift.copy_(torch.tensor([-0.2, 0.1, -0.3]))
        unit.output_offset.copy_(torch.tensor([-0.25, 0.0, -0.1]))
    z = torch.randn(5, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    out = unit(z)
    shift, offset = (broadcast_channels(p, z) for p in (unit.input_shift, unit.output_offset))
    assert torch.equal(out, qcfs(z - shift, unit.threshold, 4) + offset)
    assert out.min() < 0  # it reaches below 0 where SiLU does
    out.sum().backward()
    # the offset gets one per output element; the shift the negative of the input's straight-through gradient
    assert torch.allclose(unit.output_offset.grad, torch.full((3,), 5.0 * 16, dtype=torch.float64))
    assert torch.allclose(unit.input_shift.grad, -z.grad.sum((0, 2, 3)))
    unit.mode = "ann"
    assert torch.equal(unit(z), torch.nn.functional.silu(z))


def test_off_adds_no_parameters_and_zero_offsets_change_nothing():
    unet = make_unet(TINY_CONFIGS["attention"])
    plain = quantize(unet, levels=4)
    assert plain.config.offsets is False
    assert not any(k.endswith(("input_shift", "output_offset")) for k in convert(plain, 4).state_dict())
    with_offsets = quantize(unet, levels=4, offsets=True, init=None)
    with_offsets.load_state_dict(plain.state_dict(), strict=False)  # the same thresholds, offsets still 0
    assert torch.equal(run(with_offsets, unet), run(plain, unet))
    for options in ({}, {"execution": "stepwise"}, {"threshold_form": "unit"}):
        assert torch.equal(run(convert(with_offsets, 4, **options), unet), run(convert(plain, 4, **options), unet))
    with with_offsets.as_ann():
        assert torch.equal(run(with_offsets, unet), run(unet, unet))


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_snn_approaches_the_qcfs_net_with_offsets_as_T_equals_L_grows(name):
    unet = make_unet(TINY_CONFIGS[name])
    errors = []
    for steps in (4, 16, 64):
        qnet = quantize(unet, levels=steps, offsets=True, init="mse")
        snn = convert(qnet, timesteps=steps)
        errors.append(relative_error(run(snn, unet), run(qnet, unet)))
    assert errors[0] > errors[1] > errors[2], errors
    offsets = torch.cat([unit.output_offset for unit in qnet.sites().values()])
    assert offsets.min() < -0.1 and (offsets <= 0).all()  # the MSE init reaches into the negative lobe


def test_first_layer_at_T_equals_L_reproduces_the_qcfs_consumer_exactly_borders_included():
    """The first ResNet's act1 reads GroupNorm(conv_in(x)), constant over time: at T = L its neuron reproduces
    the QCFS unit exactly, so conv1 of the SNN (mean over T) must equal conv1 of the QCFS net, whose input
    carries the offset, at every pixel: the bias map is exact at the zero-padded borders."""
    unet, qnet = offset_qnet(levels=4)
    snn = convert(qnet, timesteps=4)
    outputs = {}
    for key, model in (("qcfs", qnet), ("snn", snn)):
        conv = model.unet.down_blocks[0].resnets[0].conv1
        handle = conv.register_forward_hook(lambda m, a, out, key=key: outputs.setdefault(key, out))
        run(model, unet)
        handle.remove()
    spiking = outputs["snn"].unflatten(0, (4, -1)).mean(0)
    assert torch.allclose(spiking, outputs["qcfs"], atol=1e-12, rtol=0)
    # the constant really differs at the borders: a bias of W.sum() * offset everywhere would be wrong there
    (bias,) = [hook._cache[1] for hook in consumer_hooks(snn.unet.down_blocks[0].resnets[0].conv1)]
    assert (bias[..., 0, :] - bias[..., 3, :]).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_consumer_bias_map_equals_adding_the_offset_to_the_layer_input(name):
    """Against a reference that feeds ``spikes + offset`` to every consumer (real values: not spike-driven),
    through the ResNet up/down-sampling (average, nearest, FIR) where there is one."""
    unet, qnet = offset_qnet(name)
    snn = convert(qnet, timesteps=3)
    reference = copy.deepcopy(snn)
    for module in reference.unet.modules():
        for key in [k for k, hook in module._forward_hooks.items() if isinstance(hook, ConsumerOffset)]:
            del module._forward_hooks[key]
        if isinstance(module, IFNeuron):
            module.register_forward_hook(lambda n, a, out: out + broadcast_channels(n.output_offset, out))
    assert consumer_hooks(snn.unet) and not consumer_hooks(reference.unet)
    assert torch.allclose(run(snn, unet), run(reference, unet), atol=1e-10, rtol=0)


def test_consumers_stay_spike_driven_and_the_offsets_cost_no_counted_work():
    unet, qnet = offset_qnet()
    snn = convert(qnet, timesteps=2)
    plain = convert(quantize(unet, levels=4, per_channel=True), timesteps=2)
    counts = {}
    for key, model in (("offsets", snn), ("plain", plain)):
        sample, timestep, _ = make_inputs(unet)
        with torch.no_grad(), OperationCounter(model) as counter:
            model(sample, timestep)
        counts[key] = counter.accounting
    layers = counts["offsets"].layers
    consumers = [layer for (name, _), layer in layers.items() if name.rsplit(".", 1)[-1] in CONSUMERS]
    assert len(consumers) == len([s for s in snn.sites() if s]) and all(layer.acs > 0 for layer in consumers)
    assert all(layer.spike_driven and layer.macs == 0 for layer in consumers)
    assert counts["offsets"].macs == counts["plain"].macs


@pytest.mark.parametrize("name", ["attention", "resnet_resample", "skip_fourier"])
def test_stepwise_equals_batched_and_unit_form_equals_lambda_form(name):
    unet, qnet = offset_qnet(name)
    batched = convert(qnet, timesteps=3)
    reference = run(batched, unet)
    for options in ({"execution": "stepwise"}, {"threshold_form": "unit"}, {"threshold_form": "unit", "burst": 2}):
        other = convert(qnet, timesteps=3, **options)
        expected = reference if "burst" not in options else run(convert(qnet, timesteps=3, burst=2), unet)
        assert torch.allclose(run(other, unet), expected, atol=1e-9), options
    # lambda folding leaves the consumers' constants as they were
    unit = convert(qnet, timesteps=3, threshold_form="unit")
    run(unit, unet)
    for lam_hook, unit_hook in zip(consumer_hooks(batched.unet), consumer_hooks(unit.unet), strict=True):
        assert torch.allclose(lam_hook._cache[1], unit_hook._cache[1], atol=1e-12)
    assert any(not torch.allclose(n.output_offset, m.output_offset) for n, m in zip(
        batched.neurons().values(), unit.neurons().values(), strict=True))  # fmt: skip


def test_threshold_guidance_and_analog_sites_keep_the_offsets():
    unet, qnet = offset_qnet("scale_shift")  # its time embedding stays analog: QCFS units with the offset inline
    snn = convert(qnet, timesteps=4)
    assert not isinstance(snn.sites()["time_embedding.act"], IFNeuron)
    analog = convert(qnet, timesteps=4, filter_fn=lambda site: site.name != OUTPUT_SITE)
    assert relative_error(run(analog, unet), run(snn, unet)) < 0.5
    from spiking_diffusers.pipelines.threshold_guidance import scaled_thresholds

    with scaled_thresholds(snn, 0.99):
        guided = run(snn, unet)
    assert not torch.equal(guided, run(snn, unet))


def test_save_load_round_trip_and_older_models_without_the_key(tmp_path):
    unet, qnet = offset_qnet()
    qnet.save_pretrained(tmp_path / "qcfs")
    loaded = QCFSUNet2DModel.from_pretrained(tmp_path / "qcfs", torch_dtype=torch.float64)
    assert loaded.config.offsets and torch.equal(run(loaded, unet), run(qnet, unet))
    snn = convert(qnet, timesteps=4)
    snn.save_pretrained(tmp_path / "snn")
    loaded_snn = SpikingUNet2DModel.from_pretrained(tmp_path / "snn", torch_dtype=torch.float64)
    assert torch.equal(run(loaded_snn, unet), run(snn, unet))
    assert torch.equal(run(snn.to_qcfs(), unet), run(qnet, unet))
    # a model saved before the option existed has no "offsets" in its config: it loads without offsets
    plain = quantize(unet, levels=4)
    plain.save_pretrained(tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    config = json.loads(config_file.read_text())
    del config["offsets"]
    config_file.write_text(json.dumps(config))
    old = QCFSUNet2DModel.from_pretrained(tmp_path / "old", torch_dtype=torch.float64)
    assert old.config.offsets is False and torch.equal(run(old, unet), run(plain, unet))


def test_step_graph_and_onnx_export_carry_the_offsets(tmp_path):
    _, qnet = offset_qnet(dtype=torch.float32)
    snn = convert(qnet, timesteps=4)
    assert export_qcfs(qnet, tmp_path / "qcfs.onnx").passed
    unrolled = export_snn(snn, tmp_path / "snn.onnx")
    assert unrolled.max_abs_error <= 1e-4
    assert export_step(snn, tmp_path / "step.onnx")[0].passed
    stepwise = convert(offset_qnet()[1], timesteps=4, execution="stepwise")
    sample, timestep, _ = make_inputs(stepwise.unet)
    step = SpikingStep(stepwise)
    with torch.no_grad():
        state = step.initial_state(sample, timestep)
        outputs = []
        for _ in range(4):
            out, *state = step(sample, timestep, *state)
            outputs.append(out)
        assert relative_error(torch.stack(outputs).mean(0), stepwise(sample, timestep).sample) < 1e-12


def test_mse_init_fits_offset_and_lambda_together():
    z = torch.randn(4, 2000, generator=torch.Generator().manual_seed(0)) * 2
    silu = torch.nn.SiLU()
    unit = QCFSActivation(silu, 4, levels=4, per_channel=True, offsets=True)
    lam, offset = offset_fit(z, unit, "mse", 99.9, per_channel=True)
    assert (offset < -0.1).all() and (offset >= -0.2785).all()
    error = (qcfs(z.t() - offset, lam, 4) + offset - silu(z.t())).pow(2).mean(0)
    plain_lam = mse_threshold(z, silu, 4, per_channel=True)
    plain_error = (qcfs(z.t(), plain_lam, 4) - silu(z.t())).pow(2).mean(0)
    assert (error < plain_error).all()
    lam, offset = offset_fit(z, unit, "percentile", 99.9, per_channel=False)
    assert offset.item() == pytest.approx(silu(z).min().item())  # the lowest SiLU value the site sees
    relu = QCFSActivation(torch.nn.ReLU(), 4, levels=4, offsets=True)
    assert offset_fit(z, relu, "mse", 99.9, per_channel=False)[1].item() == 0  # nothing below 0 to reach


def test_offsets_train_with_the_thresholds_not_in_tsm_only_runs():
    _, qnet = offset_qnet(dtype=torch.float32)
    offsets = {id(p) for n, p in qnet.named_parameters() if n.endswith(("input_shift", "output_offset"))}
    for train, expected in (("weights", True), ("thresholds", True), ("tsm", False)):
        groups = _trainable_groups(qnet, DistillSettings(train=train))
        trained = {id(p) for group in groups for p in group["params"]}
        assert (offsets <= trained) is expected and (offsets & trained == set()) is not expected
        assert all(id(p) not in offsets for p in groups[0]["params"])  # not with the clamped thresholds


def test_tiny_calibration_learns_non_zero_offsets(tmp_path):
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    settings = dict(
        timesteps=2,
        num_samples=16,
        sampler_steps=2,
        stats_batches=1,
        set_size=64,
        offsets=True,
        cache_dir=str(tmp_path),
        residual_spikes=False,  # the activation sites only: encoders have no offsets
    )
    scheduler_config = dict(DDPMScheduler(num_train_timesteps=1000).config)
    init_only = calibrate(
        unet,
        scheduler_config,
        CalibrationConfig(**settings, distill=DistillSettings(steps=0), snn=DistillSettings(steps=0)),
        progress=False,
    )
    trained = calibrate(
        unet,
        scheduler_config,
        CalibrationConfig(
            **settings, distill=DistillSettings(steps=4, batch_size=4), snn=DistillSettings(steps=2, batch_size=4)
        ),
        progress=False,
    )
    assert trained.qnet.config.offsets and trained.report["settings"]["offsets"]
    site = trained.report["sites"]["down_blocks.0.resnets.0.act1"]
    assert {"offset", "shift"} <= set(site["after"]) and site["before"]["offset"] != site["after"]["offset"]
    before, after = init_only.qnet.sites(), trained.qnet.sites()
    for name in before:
        assert (after[name].output_offset != 0).any()
        assert not torch.equal(before[name].output_offset, after[name].output_offset), name
        assert not torch.equal(before[name].input_shift, after[name].input_shift), name
    again = calibrate(
        unet,
        scheduler_config,
        CalibrationConfig(
            **settings, distill=DistillSettings(steps=4, batch_size=4), snn=DistillSettings(steps=2, batch_size=4)
        ),
        progress=False,
    )
    states = trained.qnet.state_dict(), again.qnet.state_dict()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # same seed, same bits


def test_sdm_convert_and_sdm_calibrate_options(tmp_path):
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    unet.save_pretrained(tmp_path / "ann")
    out = tmp_path / "snn"
    result = CliRunner().invoke(
        convert_command.main,
        ["--model", str(tmp_path / "ann"), "-T", "2", "--no-calibrate", "--offsets", "--output", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert ", offsets" in result.output and "Output offsets: min -" in result.output
    report = json.loads((out / "conversion.json").read_text())
    assert report["settings"]["offsets"] and report["summary"]["offsets"]["offset_min"] < 0
    assert SpikingUNet2DModel.from_pretrained(out, subfolder="unet").config.offsets

    quantize(unet, levels=2).save_pretrained(tmp_path / "qcfs")
    refused = CliRunner().invoke(
        convert_command.main, ["--model", str(tmp_path / "qcfs"), "--offsets", "--output", str(tmp_path / "x")]
    )
    assert refused.exit_code == 2 and "without offsets" in refused.output

    for flags, expected in ((["--offsets"], True), (["--no-offsets"], False), ([], None)):
        context = calibrate_command.main.make_context("sdm-calibrate", ["--output", "o", *flags])
        options = {k: v for k, v in context.params.items() if k not in ("model", "output", "overwrite", "device")}
        options = {k: v for k, v in options.items() if k not in ("checkpoint_every", "resume")}
        assert calibrate_command.build_config(**options).offsets is expected  # None: resolved per model
    assert calibrate_command.DEFAULTS.offsets is None


@pytest.mark.parametrize(
    "requested, groups, conditional, expected",
    [(None, 1, False, True), (None, 4, False, False), (None, 1, True, False), (False, 1, False, False)],
)
def test_offsets_are_on_by_default_where_supported(requested, groups, conditional, expected):
    """A UNet2DModel with one threshold group gets offsets unless told otherwise; a cross-attention UNet (its
    feed-forward sites feed no weight layer) and timestep-aware thresholds do not."""
    unet = make_conditional() if conditional else make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    assert resolve_offsets(requested, unet, groups) is expected
