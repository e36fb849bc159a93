"""Conditional UNets (UNet2DConditionModel): transformer blocks with LayerNorm, self- and cross-attention and
GEGLU / GELU feed-forwards, class labels; fidelity, execution modes, save/load, the stock Stable Diffusion
pipeline, and the errors for inputs the models refuse."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
)
from diffusers.models.attention import FeedForward

from conftest import CROSS, TINY_CONFIGS, make_conditional, make_unet, relative_error, tiny_text_encoder, tiny_vae
from spiking_diffusers import (
    CalibrationConfig,
    LabelTokens,
    QCFSUNet2DConditionModel,
    SpikingDiffusionPipeline,
    SpikingUNet2DConditionModel,
    SpikingUNet2DModel,
    UnsupportedModuleError,
    calibrate,
    convert,
    quantize,
)
from spiking_diffusers.calibration.conditioning import label_conditioning
from spiking_diffusers.calibration.data import CalibrationSet
from spiking_diffusers.calibration.distill import DistillSettings
from spiking_diffusers.converter.building import swap_replaced_modules
from spiking_diffusers.converter.gated import GatedGELU, GateProduct, ProjectedGELU
from spiking_diffusers.converter.neurons import IFNeuron
from spiking_diffusers.converter.residual_spikes import input_encoders
from spiking_diffusers.converter.sites import iter_site_specs
from spiking_diffusers.converter.temporal import TemporalOp
from spiking_diffusers.energy.accounting import GROUPNORM_OPS, OperationCounter
from spiking_diffusers.energy.measure import count_forward
from spiking_diffusers.errors import InputError


def inputs(unet, batch: int = 2, tokens: int = 5, seed: int = 0) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    dtype = next(unet.parameters()).dtype
    sample = torch.randn(batch, 4, 8, 8, generator=generator).to(dtype)
    context = torch.randn(batch, tokens, CROSS, generator=generator).to(dtype)
    return sample, torch.tensor([10, 600][:batch]), context


def run(model, unet, **extra) -> torch.Tensor:
    sample, timestep, context = inputs(unet)
    with torch.no_grad():
        return model(sample, timestep, context, **extra).sample


def test_every_feed_forward_gelu_is_a_call_site_and_the_ann_mode_is_the_original():
    unet = make_conditional()
    qnet = quantize(unet, levels=4, per_channel=True)
    assert isinstance(qnet, QCFSUNet2DConditionModel)
    ff = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0"
    assert isinstance(qnet.unet.get_submodule(ff), GatedGELU)
    gate = qnet.sites()[f"{ff}.act"]
    inner = unet.get_submodule(ff).proj.out_features // 2
    assert gate.channels_last and gate.threshold.shape == (inner,) and gate.threshold.std() > 0
    with qnet.as_ann():
        assert torch.equal(run(qnet, unet), run(unet, unet))
    assert relative_error(run(qnet, unet), run(unet, unet)) > 1e-3


def test_gelu_feed_forward_is_swapped_for_an_equal_module_with_a_call_site():
    ff = FeedForward(16, activation_fn="gelu").double()
    swapped = copy.deepcopy(ff)
    swap_replaced_modules(swapped)
    assert isinstance(swapped.net[0], ProjectedGELU) and swapped.state_dict().keys() == ff.state_dict().keys()
    assert [spec.name for _, _, spec in iter_site_specs(swapped)] == ["act"]
    tokens = torch.randn(2, 5, 16, dtype=torch.float64)
    assert torch.equal(swapped(tokens), ff(tokens))


def test_snn_approaches_qcfs_as_T_equals_L_grows():
    unet = make_conditional()
    errors = []
    for steps in (4, 16, 64):
        qnet = quantize(unet, levels=steps)
        errors.append(relative_error(run(convert(qnet, spike_steps=steps), unet), run(qnet, unet)))
    assert errors[0] > errors[1] > errors[2], errors


@pytest.mark.parametrize("neuron", ["if", "signed_if"])
def test_batched_equals_stepwise_with_class_labels(neuron):
    unet = make_conditional(num_class_embeds=3)
    snn = convert(quantize(unet, levels=4, per_channel=True), spike_steps=5, neuron=neuron)
    labels = torch.tensor([0, 2])
    batched = run(snn, unet, class_labels=labels)
    snn.set_execution("stepwise")
    assert torch.allclose(run(snn, unet, class_labels=labels), batched, atol=1e-10)
    assert not torch.allclose(run(snn, unet, class_labels=torch.tensor([1, 1])), batched)


def test_layer_norm_attention_and_gate_product_are_compensated_and_gates_spike():
    snn = convert(quantize(make_conditional(), levels=4), spike_steps=2)
    assert isinstance(snn, SpikingUNet2DConditionModel)
    wrapped = {type(m.op).__name__ for m in snn.unet.modules() if isinstance(m, TemporalOp)}
    assert {"LayerNorm", "Attention", "GateProduct", "GroupNorm"} <= wrapped
    assert all(isinstance(m.product, TemporalOp) for m in snn.unet.modules() if isinstance(m, GatedGELU))
    assert all(isinstance(unit, IFNeuron) for unit in snn.sites().values())
    cross = [m.op for m in snn.unet.modules() if isinstance(m, TemporalOp) and getattr(m.op, "is_cross_attention", 0)]
    assert cross, "cross-attention runs as a compensated op"


def test_gate_product_compensation_is_exact_in_the_mean():
    product = TemporalOp(GateProduct(3))
    steps = torch.randn(4, 2, 5, 6, dtype=torch.float64)
    product.begin(4, "stepwise")
    total = sum(product(steps[t]) for t in range(4))
    mean = steps.mean(0)
    assert torch.allclose(total / 4, mean[..., :3] * mean[..., 3:], atol=1e-12)


def test_save_and_load_round_trip_is_exact(tmp_path):
    unet = make_conditional(dtype=torch.float32)
    qnet = quantize(unet, levels=4, per_channel=True)
    snn = convert(qnet, spike_steps=3, burst=2)
    qnet.save_pretrained(tmp_path / "qcfs")
    snn.save_pretrained(tmp_path / "snn")
    loaded_q = QCFSUNet2DConditionModel.from_pretrained(tmp_path / "qcfs")
    loaded = SpikingUNet2DConditionModel.from_pretrained(tmp_path / "snn")
    assert loaded.config.cross_attention_dim == CROSS and loaded.config.burst == 2
    assert torch.equal(run(loaded_q, unet), run(qnet, unet))
    assert torch.equal(run(loaded, unet), run(snn, unet))
    assert torch.equal(run(snn.to_qcfs(), unet), run(qnet, unet))


def test_stock_stable_diffusion_pipeline_samples_with_the_spiking_unet_and_reloads(tmp_path):
    text_encoder, tokenizer = tiny_text_encoder(tmp_path)
    vae = tiny_vae()
    snn = convert(quantize(make_conditional(dtype=torch.float32), levels=4), spike_steps=4)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=snn, scheduler=DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)

    def sample(pipeline, guidance):
        generator = torch.Generator().manual_seed(0)
        prompts = ["a digit", "zero"]
        return pipeline(prompts, num_inference_steps=3, guidance_scale=guidance, generator=generator, output_type="np")

    guided = sample(pipe, 3.0).images
    assert guided.shape == (2, 8, 8, 3) and guided.std() > 0.01
    assert not np.allclose(sample(pipe, 1.0).images, guided)  # classifier-free guidance changes the samples

    pipe.save_pretrained(tmp_path / "pipeline")
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert isinstance(reloaded.unet, SpikingUNet2DConditionModel)
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(sample(reloaded, 3.0).images, guided)


# --- what the models refuse ---------------------------------------------------------------------------


def test_missing_or_misshapen_conditioning_is_named():
    unet = make_conditional()
    for model in (quantize(unet, levels=4), convert(quantize(unet, levels=4), spike_steps=2)):
        sample, timestep, context = inputs(unet)
        with pytest.raises(TypeError, match="encoder_hidden_states must be a tensor"):
            model(sample, timestep, None)
        with pytest.raises(ValueError, match=rf"encoder_hidden_states must have shape \(2, tokens, {CROSS}\)"):
            model(sample, timestep, context[..., :5])
        with pytest.raises(ValueError, match="down_block_additional_residuals"):
            model(sample, timestep, context, down_block_additional_residuals=(sample,))


def test_class_labels_out_of_range_or_missing_are_named():
    unet = make_conditional(num_class_embeds=3)
    model = convert(quantize(unet, levels=4), spike_steps=2)
    sample, timestep, context = inputs(unet)
    with pytest.raises(ValueError, match=r"class_labels must lie in 0\.\.2"):
        model(sample, timestep, context, class_labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="pass class_labels"):
        model(sample, timestep, context)


def test_options_that_need_a_weight_layer_after_every_site_are_refused():
    unet = make_conditional()
    qnet = quantize(unet, levels=4)
    with pytest.raises(ValueError, match=r"threshold_form='unit'.*ff"):
        convert(qnet, spike_steps=2, threshold_form="unit")
    with pytest.raises(ValueError, match=r"offsets=True.*ff"):
        quantize(unet, levels=4, offsets=True)


def test_residual_spikes_feed_every_transformer_projection_spikes():
    unet = make_conditional()
    qnet = quantize(unet, levels=8, residual_spikes=True)
    with qnet.as_ann():  # the split attention and the encoded layers compute the original exactly
        assert torch.equal(run(qnet, unet), run(unet, unet))
    encoders = set(input_encoders(qnet.unet))
    block = "down_blocks.0.attentions.0"
    for layer in ("proj_in", "proj_out", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2"):
        assert f"{block}.{layer}.encoder" in encoders
    for attn in ("attn1", "attn2"):
        assert {f"{block}.transformer_blocks.0.{attn}.{side}_encoder" for side in ("input", "output")} <= encoders
    snn = convert(qnet, spike_steps=8)
    batched = run(snn, unet)
    snn.set_execution("stepwise")
    assert torch.equal(run(snn, unet), batched)
    errors = []  # the SNN tends to its QCFS network as T = L grows, as without residual spikes
    for steps in (4, 64):
        qnet = quantize(unet, levels=steps, residual_spikes=True)
        errors.append(relative_error(run(convert(qnet, spike_steps=steps), unet), run(qnet, unet)))
    assert errors[1] < 0.2 < errors[0]
    with_spikes, without = count_forward(snn), count_forward(convert(quantize(unet, levels=8), spike_steps=8))
    assert with_spikes.macs < 0.5 * without.macs  # the projections read spikes: accumulates, not MACs


def test_from_qcfs_picks_the_class_of_the_qcfs_model():
    qnet = quantize(make_conditional(), levels=4)
    assert isinstance(SpikingUNet2DModel.from_qcfs(qnet, spike_steps=2), SpikingUNet2DConditionModel)
    unconditional = quantize(make_unet(TINY_CONFIGS["attention"]), levels=4)
    with pytest.raises(TypeError, match=r"SpikingUNet2DConditionModel\.from_qcfs takes a UNet2DConditionModel"):
        SpikingUNet2DConditionModel.from_qcfs(unconditional, spike_steps=2)


def test_unsupported_transformer_pieces_are_named():
    unet = make_conditional(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"))
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    block.ff = type(block.ff)(block.ff.net[0].proj.in_features, activation_fn="geglu-approximate").double()
    with pytest.raises(UnsupportedModuleError, match="ApproximateGELU"):
        quantize(unet, levels=4)


def test_energy_counts_layer_norm_and_the_gate_product_in_ann_and_snn_alike():
    unet = make_conditional(dtype=torch.float32)
    snn = convert(quantize(unet, levels=4), spike_steps=3)
    counts = {}
    for name, model in (("ann", unet), ("snn", snn)):
        with OperationCounter(model) as counter:
            run(model, unet)
        counts[name] = {}
        for layer in counter.accounting.layers.values():
            counts[name][layer.op] = counts[name].get(layer.op, 0) + layer.macs
    # Transformer blocks (batch 2): three at 8x8 with 16 channels (down block 0, up block 1 x 2), one at 4x4 with
    # 32 (mid); GEGLU's inner width is 4 x the channels, and each block has three LayerNorms.
    gate = 2 * (3 * 64 * (4 * 16) + 16 * (4 * 32))
    norms = GROUPNORM_OPS * 2 * 3 * (3 * 64 * 16 + 16 * 32)
    assert counts["ann"]["gate product"] == gate and counts["ann"]["layernorm"] == norms
    # the SNN runs them on the running means at each of T = 3 steps (plus the compensation, counted apart)
    assert counts["snn"]["gate product"] == 3 * gate and counts["snn"]["layernorm"] == 3 * norms


# --- sampling with class labels and classifier-free guidance ----------------------------------------------


def _label_pipeline(model, seed: int = 0) -> SpikingDiffusionPipeline:
    torch.manual_seed(seed)
    tokens = LabelTokens(num_classes=3, dim=CROSS, tokens=2)
    pipe = SpikingDiffusionPipeline(unet=model, scheduler=DDIMScheduler(), label_tokens=tokens)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generators(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(i) for i in range(n)]


def test_label_pipeline_guides_and_keeps_images_independent_of_the_batch(tmp_path):
    unet = make_conditional(dtype=torch.float32)
    pipe = _label_pipeline(convert(quantize(unet, levels=4), spike_steps=2))
    labels = torch.tensor([0, 1, 2])
    kwargs = dict(num_inference_steps=3, output_type="np", class_labels=labels, guidance_scale=3.0)
    guided = pipe(batch_size=3, generator=_generators(3), **kwargs).images
    alone = pipe(batch_size=1, generator=_generators(3)[2:], **{**kwargs, "class_labels": labels[2:]}).images
    np.testing.assert_allclose(alone[0], guided[2], atol=1e-5)
    plain = pipe(batch_size=3, generator=_generators(3), **{**kwargs, "guidance_scale": 1.0}).images
    assert not np.allclose(plain, guided)
    other = pipe(batch_size=3, generator=_generators(3), **{**kwargs, "class_labels": labels.flip(0)}).images
    assert not np.allclose(other[0], guided[0])

    pipe.save_pretrained(tmp_path / "pipe")
    reloaded = SpikingDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(reloaded.label_tokens, LabelTokens)
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(reloaded(batch_size=3, generator=_generators(3), **kwargs).images, guided)


def test_conditioning_mistakes_are_named():
    unet = make_conditional(dtype=torch.float32)
    pipe = _label_pipeline(unet)
    run_ = dict(batch_size=2, num_inference_steps=2, output_type="np")
    with pytest.raises(ValueError, match="pass encoder_hidden_states, or class_labels"):
        pipe(**run_)
    with pytest.raises(ValueError, match=r"class_labels must lie in 0\.\.2"):
        pipe(**run_, class_labels=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="one label per image"):
        pipe(**run_, class_labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="guidance_scale must be a number"):
        pipe(**run_, class_labels=torch.tensor([0, 1]), guidance_scale=-1)
    unconditional = SpikingDiffusionPipeline(
        unet=make_unet(TINY_CONFIGS["attention"], dtype=torch.float32), scheduler=DDIMScheduler()
    )
    with pytest.raises(ValueError, match=r"guidance_scale .* needs a cross-attention UNet"):
        unconditional(**run_, guidance_scale=3.0)


# --- calibration with conditioning ----------------------------------------------------------------------


def _calibration_config(tmp_path, **overrides) -> CalibrationConfig:
    settings = dict(
        timesteps=2, num_samples=6, sampler_steps=2, stats_batches=1, set_size=32, sweep_images=3,
        distill=DistillSettings(steps=4, batch_size=4), snn=DistillSettings(steps=2, batch_size=4, lr=1e-4),
        cache_dir=str(tmp_path),
    )  # fmt: skip
    settings.update(overrides)
    return CalibrationConfig(**settings)


def _conditional_unet_and_tokens():
    unet = make_conditional(dtype=torch.float32, sample_size=8)
    torch.manual_seed(1)
    return unet, LabelTokens(num_classes=3, dim=CROSS)


def test_calibration_conditions_every_input_on_its_label_or_the_null_token(tmp_path):
    unet, tokens = _conditional_unet_and_tokens()
    conditioning = label_conditioning(unet, tokens)
    x0 = torch.randn(6, 4, 8, 8)
    calibration_set = CalibrationSet.draw(x0, DDPMScheduler(), 400, torch.Generator().manual_seed(0), conditioning)
    context = calibration_set.conditions["encoder_hidden_states"]
    null = tokens.unconditional(1)
    is_null = (context == null).all(-1).all(-1)
    assert 0.4 < is_null.float().mean() < 0.6  # half the inputs: the unconditional branch of guidance
    # the others carry their image's label: image i of the pool has label i % 3
    pool = conditioning.pool_labels(len(x0))
    labels = {tuple(row.flatten().tolist()) for row in context[~is_null]}
    assert labels == {tuple(tokens(pool[i : i + 1]).flatten().tolist()) for i in range(3)}


def test_calibrate_a_cross_attention_unet_with_its_label_tokens(tmp_path):
    unet, tokens = _conditional_unet_and_tokens()
    config = _calibration_config(tmp_path)
    result = calibrate(unet, dict(DDPMScheduler().config), config, progress=False, label_tokens=tokens)
    assert isinstance(result.qnet, QCFSUNet2DConditionModel)
    sweep = result.report["noise_prediction_sweep"]
    assert len(sweep["after"]["qcfs"]) == len(sweep["timesteps"])
    again = calibrate(unet, dict(DDPMScheduler().config), config, progress=False, label_tokens=tokens)
    first, second = result.qnet.state_dict(), again.qnet.state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)  # bit-identical for the same seed
    residual = calibrate(
        unet, dict(DDPMScheduler().config), dataclasses.replace(config, residual_spikes=True), progress=False,
        label_tokens=tokens,
    ).qnet  # fmt: skip
    assert residual.config.residual_spikes and len(input_encoders(residual.unet)) > 0
    with pytest.raises(InputError, match="needs its LabelTokens"):
        calibrate(unet, dict(DDPMScheduler().config), config, progress=False)
    with pytest.raises(InputError, match="label_tokens apply to cross-attention UNets"):
        calibrate(make_unet(TINY_CONFIGS["attention"]), dict(DDPMScheduler().config), config, label_tokens=tokens)


def test_onnx_graphs_take_encoder_hidden_states(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from spiking_diffusers.export.onnx_export import export_qcfs, export_snn, export_step

    qnet = quantize(make_conditional(dtype=torch.float32), levels=4)
    snn = convert(qnet, spike_steps=2)
    checks = [export_qcfs(qnet, tmp_path / "qcfs.onnx"), export_snn(snn, tmp_path / "snn.onnx")]
    assert checks[0].status in ("ok", "float32-sensitive") and not checks[1].failed
    names = [graph_input.name for graph_input in onnx.load(tmp_path / "snn.onnx").graph.input]
    assert names == ["sample", "timestep", "encoder_hidden_states"]
    with pytest.raises(ValueError, match="single-step graph of a conditional UNet"):
        export_step(snn, tmp_path / "step.onnx")
