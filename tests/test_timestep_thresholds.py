"""Timestep-aware thresholds (``threshold_groups`` K): a (K, C) threshold table per site, the row of each
sample's group picked from its diffusion timestep, in the QCFS and spiking networks, both execution modes,
save/load, threshold guidance, energy accounting and the ONNX graphs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIGS, make_inputs, make_unet, relative_error
from spiking_diffusers import QCFSUNet2DModel, SpikingUNet2DModel, convert, quantize
from spiking_diffusers.converter.thresholds import collect_group_site_inputs, percentile_threshold
from spiking_diffusers.converter.timestep_groups import timestep_groups
from spiking_diffusers.energy.accounting import OperationCounter
from spiking_diffusers.pipelines.threshold_guidance import scaled_thresholds

TIMESTEPS = torch.tensor([5, 300, 600, 900])
"""Two samples in each group of K = 2 over the 1000 timesteps of the schedule."""


def inputs(unet, batch: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    cfg = unet.config
    return torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=generator).to(unet.dtype)


@pytest.fixture(scope="module")
def unet():
    return make_unet(TINY_CONFIGS["attention"])


@pytest.fixture(scope="module")
def unet32():
    """For save / load round trips: diffusers loads weights in float32."""
    return make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)


def tables_like(qnet: QCFSUNet2DModel, groups: int, scales: list[float] | None = None) -> QCFSUNet2DModel:
    """A K = ``groups`` copy of the K = 1 ``qnet`` whose row g holds its thresholds times ``scales[g]``."""
    config = dict(qnet.config, threshold_groups=groups)
    grouped = QCFSUNet2DModel.from_config(config).to(qnet.dtype)
    scales = scales or [1.0] * groups
    state = {
        key: torch.stack([value * scale for scale in scales]) if key.endswith("threshold") else value
        for key, value in qnet.unet.state_dict().items()
    }
    grouped.unet.load_state_dict(state)
    return grouped.eval()


def run(model, sample, timestep, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(sample, timestep, **kwargs).sample


@pytest.mark.parametrize("residual_spikes", [False, True])
@pytest.mark.parametrize("per_channel", [True, False])
def test_two_groups_holding_the_same_thresholds_are_the_single_threshold_model_exactly(
    unet, residual_spikes, per_channel
):
    single = quantize(unet, levels=4, per_channel=per_channel, residual_spikes=residual_spikes, num_samples=4)
    double = tables_like(single, 2)
    assert all(table.shape[0] == 2 for table in double.thresholds().values())
    sample = inputs(unet)
    assert torch.equal(run(double, sample, TIMESTEPS), run(single, sample, TIMESTEPS))
    for execution in ("batched", "stepwise"):
        snn_single = convert(single, timesteps=3, execution=execution, neuron="signed_if")
        snn_double = convert(double, timesteps=3, execution=execution, neuron="signed_if")
        assert snn_double.config.threshold_groups == 2
        assert torch.equal(run(snn_double, sample, TIMESTEPS), run(snn_single, sample, TIMESTEPS))


def test_single_group_models_keep_their_threshold_vectors(unet):
    qnet = quantize(unet, levels=4, per_channel=True, num_samples=4)
    assert qnet.config.threshold_groups == 1
    assert all(value.dim() == 1 for value in qnet.thresholds().values())
    explicit = quantize(unet, levels=4, per_channel=True, num_samples=4, threshold_groups=1)
    sample = inputs(unet)
    assert torch.equal(run(explicit, sample, TIMESTEPS), run(qnet, sample, TIMESTEPS))


@pytest.mark.parametrize("kind", ["qcfs", "batched", "stepwise"])
def test_a_batch_mixing_groups_is_each_group_run_on_its_own_with_its_thresholds(unet, kind):
    single = quantize(unet, levels=4, per_channel=True, residual_spikes=True, num_samples=4)
    grouped, first_row = tables_like(single, 2, [1.0, 0.6]), tables_like(single, 2, [1.0, 1.0])
    if kind != "qcfs":
        grouped, first_row = (convert(model, timesteps=3, execution=kind) for model in (grouped, first_row))
    sample = inputs(unet)
    mixed = run(grouped, sample, TIMESTEPS)
    assert torch.allclose(mixed[:2], run(grouped, sample[:2], TIMESTEPS[:2]), rtol=0, atol=1e-12)
    assert torch.allclose(mixed[2:], run(grouped, sample[2:], TIMESTEPS[2:]), rtol=0, atol=1e-12)
    # group 0 samples use row 0, group 1 samples row 1: only the latter differ from a model with row 0 everywhere
    reference = run(first_row, sample, TIMESTEPS)
    assert torch.allclose(mixed[:2], reference[:2], rtol=0, atol=1e-12)
    assert relative_error(mixed[2:], reference[2:]) > 1e-3
    # one timestep for the whole batch is the same as that timestep per sample
    assert torch.allclose(run(grouped, sample, 900), run(grouped, sample, torch.full((4,), 900)), rtol=0, atol=1e-12)


def test_groups_split_the_schedule_into_equal_ranges():
    t = torch.tensor([0, 249, 250, 499, 500, 999, 1500])
    assert timestep_groups(t, 7, 4, 1000, t.device).tolist() == [0, 0, 1, 1, 2, 3, 3]
    assert timestep_groups(torch.tensor(600.5), 3, 2, 1000, torch.device("cpu")).tolist() == [1, 1, 1]
    assert timestep_groups(7, 2, 8, 8, torch.device("cpu")).tolist() == [7, 7]


@pytest.mark.parametrize("name", ["attention", "scale_shift", "skip_fourier"])
def test_batched_equals_stepwise_with_groups(name):
    """scale_shift keeps its time-embedding sites analog QCFS units inside the SNN: they see T x B samples too."""
    unet = make_unet(TINY_CONFIGS[name])
    snn = convert(quantize(unet, levels=4, per_channel=True, num_samples=8, threshold_groups=3), timesteps=4)
    sample, _, kwargs = make_inputs(unet, batch=4)
    batched = run(snn, sample, TIMESTEPS, **kwargs)
    snn.set_execution("stepwise")
    assert torch.allclose(run(snn, sample, TIMESTEPS, **kwargs), batched, rtol=0, atol=1e-10)


def test_the_spiking_pipeline_samples_with_groups_and_guidance(unet32):
    from diffusers import DDIMScheduler

    from spiking_diffusers import SpikingDiffusionPipeline

    snn = convert(quantize(unet32, levels=2, num_samples=4, threshold_groups=4), timesteps=2)
    pipe = SpikingDiffusionPipeline(unet=snn, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def sample(**kwargs):
        generator = torch.Generator().manual_seed(0)
        return pipe(batch_size=2, num_inference_steps=3, generator=generator, output_type="np", **kwargs).images

    default = sample()
    assert np.isfinite(default).all() and np.array_equal(sample(threshold_scale=1.0), default)
    assert not np.array_equal(sample(threshold_scale=0.8), default)


def test_thresholds_are_initialised_per_group_from_the_inputs_in_its_range(unet):
    qnet = quantize(unet, levels=4, per_channel=False, init="percentile", num_samples=16, threshold_groups=2)
    from spiking_diffusers.converter.probes import noised_probe_batches

    probes = noised_probe_batches(qnet.config.unet_config, num_samples=16)
    by_group = collect_group_site_inputs(qnet, [(x.double(), t, kw) for x, t, kw in probes])
    differ = 0
    for name, table in qnet.thresholds().items():
        for group in range(2):
            expected = percentile_threshold(by_group[group][name], 99.9)
            assert torch.allclose(table[group].float(), expected, rtol=1e-6), name
        differ += not torch.allclose(table[0], table[1])
    assert differ > len(qnet.thresholds()) // 2  # activation ranges change along the trajectory


def test_save_load_round_trip_and_conversion_back(unet32, tmp_path):
    unet = unet32
    qnet = tables_like(quantize(unet, levels=4, per_channel=True, num_samples=4), 2, [1.0, 0.7])
    sample = inputs(unet)
    qnet.save_pretrained(tmp_path / "qcfs")
    loaded = QCFSUNet2DModel.from_pretrained(tmp_path / "qcfs")
    assert loaded.config.threshold_groups == 2
    assert torch.equal(run(loaded, sample, TIMESTEPS), run(qnet, sample, TIMESTEPS))
    snn = convert(qnet, timesteps=3)
    snn.save_pretrained(tmp_path / "snn")
    reloaded = SpikingUNet2DModel.from_pretrained(tmp_path / "snn")
    assert reloaded.config.threshold_groups == 2
    assert torch.equal(run(reloaded, sample, TIMESTEPS), run(snn, sample, TIMESTEPS))
    back = snn.to_qcfs()
    assert back.config.threshold_groups == 2
    assert all(torch.equal(back.thresholds()[k], v) for k, v in qnet.thresholds().items())


@pytest.mark.parametrize("cls", [QCFSUNet2DModel, SpikingUNet2DModel])
def test_a_model_saved_before_threshold_groups_loads_as_one_group(unet32, tmp_path, cls):
    unet = unet32
    qnet = quantize(unet, levels=4, per_channel=True, num_samples=4)
    model = qnet if cls is QCFSUNet2DModel else convert(qnet, timesteps=2)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["threshold_groups"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = cls.from_pretrained(tmp_path)
    assert loaded.config.threshold_groups == 1
    assert all(value.dim() == 1 for value in loaded.thresholds().values())
    sample = inputs(unet)
    assert torch.equal(run(loaded, sample, TIMESTEPS), run(model, sample, TIMESTEPS))


def test_threshold_guidance_still_moves_the_spike_count(unet):
    snn = convert(quantize(unet, levels=4, per_channel=True, num_samples=8, threshold_groups=2), timesteps=4)
    sample = inputs(unet)

    def spikes(scale: float) -> int:
        with scaled_thresholds(snn, scale), OperationCounter(snn) as counter, torch.no_grad():
            snn(sample, TIMESTEPS)
        return sum(site.spikes for site in counter.accounting.sites.values())

    low, default, high = spikes(0.9), spikes(1.0), spikes(1.1)
    assert low > default > high


def test_energy_accounting_counts_the_same_spikes_in_both_modes(unet):
    snn = convert(
        quantize(unet, levels=4, per_channel=True, num_samples=8, threshold_groups=2, residual_spikes=True), timesteps=3
    )
    sample = inputs(unet)
    counts = {}
    for execution in ("batched", "stepwise"):
        snn.set_execution(execution)
        with OperationCounter(snn) as counter, torch.no_grad():
            snn(sample, TIMESTEPS)
        counts[execution] = {name: site.spikes for name, site in counter.accounting.sites.items()}
    assert counts["batched"] == counts["stepwise"] and sum(counts["batched"].values()) > 0


def test_bad_threshold_groups_are_errors_naming_the_argument(unet):
    with pytest.raises(ValueError, match=r"threshold_groups must be in the range 1<=x<=64, got 0"):
        quantize(unet, levels=4, threshold_groups=0)
    with pytest.raises(ValueError, match=r"threshold_groups must be in the range 1<=x<=64, got 65"):
        quantize(unet, levels=4, threshold_groups=65)
    with pytest.raises(TypeError, match="threshold_groups must be an int"):
        quantize(unet, levels=4, threshold_groups=2.0)
    short = make_unet(dict(TINY_CONFIGS["attention"], num_train_timesteps=8))
    with pytest.raises(ValueError, match="threshold_groups must be at most the 8 diffusion timesteps"):
        quantize(short, levels=4, threshold_groups=16)
    qnet = quantize(unet, levels=4, num_samples=4, threshold_groups=2)
    with pytest.raises(
        ValueError, match="threshold_groups=3 does not match the QCFS model, which has threshold_groups=2"
    ):
        convert(qnet, timesteps=2, threshold_groups=3)
    assert convert(qnet, timesteps=2, threshold_groups=2).config.threshold_groups == 2
    with pytest.raises(ValueError, match="threshold_form='unit' needs one threshold per site"):
        convert(qnet, timesteps=2, threshold_form="unit")
    from spiking_diffusers.evaluation.variants import VariantError, prepare_variants

    with pytest.raises(VariantError, match="threshold_groups=1 does not match the QCFSUNet2DModel"):
        prepare_variants(qnet, unet, [2], threshold_groups=1)
    with pytest.raises(RuntimeError, match="called without the samples' groups"):
        qnet.unet(inputs(unet), TIMESTEPS)  # the inner UNet alone does not know the groups


def test_onnx_graphs_take_the_group_from_the_timestep(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from spiking_diffusers.export import export_qcfs, export_snn, export_step
    from spiking_diffusers.export.onnx_export import TOLERANCE, random_inputs

    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    qnet = tables_like(quantize(unet, levels=4, num_samples=2), 2, [1.0, 0.6])
    snn = convert(qnet, timesteps=3)
    assert export_qcfs(qnet, tmp_path / "qcfs.onnx").passed
    assert export_snn(snn, tmp_path / "snn.onnx").max_abs_error <= TOLERANCE
    check, initial = export_step(snn, tmp_path / "step.onnx")
    assert check.passed
    # one initial row per group; a runtime gives each sample the row of its timestep's group
    session = onnxruntime.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    sample, _ = random_inputs(snn, 4, seed=5)
    timestep = TIMESTEPS
    rows = timestep_groups(timestep, 4, 2, 1000, timestep.device).numpy()
    state = {name: value if name == "step" else value[rows] for name, value in initial.items()}
    assert all(value.shape[0] == 2 for name, value in initial.items() if name != "step")
    outputs = []
    for _ in range(3):
        names = [o.name for o in session.get_outputs()]
        feeds = {"sample": sample.numpy(), "timestep": timestep.numpy(), **state}
        results = dict(zip(names, session.run(None, feeds), strict=True))
        outputs.append(results["output"])
        state = {name: results[f"next.{name}"] for name in state}
    with torch.no_grad():
        reference = snn(sample, timestep).sample.numpy()
    assert np.abs(np.mean(outputs, axis=0) - reference).max() <= TOLERANCE


def test_calibration_with_two_groups_trains_tables_and_reports_them(tmp_path):
    from diffusers import DDPMScheduler

    from spiking_diffusers.calibration.calibrate import CalibrationConfig, calibrate
    from spiking_diffusers.calibration.distill import DistillSettings
    from spiking_diffusers.calibration.report import PLOT_FILE, REPORT_FILE, write_calibration_report

    config = CalibrationConfig(
        timesteps=2,
        threshold_groups=2,
        num_samples=16,
        sampler_steps=2,
        stats_batches=1,
        distill=DistillSettings(steps=4, batch_size=4),
        snn=DistillSettings(steps=2, batch_size=4, lr=1e-4),
        cache_dir=str(tmp_path / "cache"),
    )
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    result = calibrate(unet, dict(DDPMScheduler(num_train_timesteps=1000).config), config, progress=False)
    assert result.qnet.config.threshold_groups == 2
    assert result.report["settings"]["threshold_groups"] == 2
    site = result.report["sites"]["down_blocks.0.resnets.0.act1"]
    for stage in ("before", "after"):
        assert len(site[stage]["threshold"]) == 2 and len(site[stage]["threshold_group_means"]) == 2
        assert 0 <= site[stage]["clipped_fraction"] <= 1 and site[stage]["quantization_mse"] > 0
    assert site["before"]["threshold"][0] != site["before"]["threshold"][1]  # initialised per group
    write_calibration_report(result.report, tmp_path)
    assert (tmp_path / PLOT_FILE).stat().st_size > 0 and json.loads((tmp_path / REPORT_FILE).read_text())
    snn = convert(result.qnet, timesteps=2)
    assert snn.config.threshold_groups == 2
    with pytest.raises(ValueError, match=r"threshold_groups must be in the range 1<=x<=64, got 0"):
        CalibrationConfig(threshold_groups=0).validate()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """A tiny ANN (google layout), one with an 8-step schedule, and a K = 2 QCFS model of the first."""
    from diffusers import DDPMScheduler

    root = tmp_path_factory.mktemp("tdt-models")
    unet = make_unet(TINY_CONFIGS["attention"], dtype=torch.float32)
    unet.save_pretrained(root / "ann")
    DDPMScheduler().save_pretrained(root / "ann")
    short = make_unet(dict(TINY_CONFIGS["attention"], num_train_timesteps=8), dtype=torch.float32)
    short.save_pretrained(root / "short")
    DDPMScheduler(num_train_timesteps=8).save_pretrained(root / "short")
    quantize(unet, levels=2, num_samples=2, threshold_groups=2).save_pretrained(root / "qcfs2")
    return {"ann": root / "ann", "short": root / "short", "qcfs2": root / "qcfs2", "root": root}


def invoke(command, *args):
    from click.testing import CliRunner

    return CliRunner().invoke(command.main, [str(arg) for arg in args])


def test_sdm_convert_takes_k_for_an_ann_and_from_a_qcfs_model(saved, tmp_path):
    from spiking_diffusers.commands import convert as convert_command

    out = tmp_path / "ann-k2"
    result = invoke(
        convert_command, "--model", saved["ann"], "--timesteps", 2, "--threshold-groups", 2, "--no-calibrate",
        "--output", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2 timestep threshold groups" in result.output
    assert json.loads((out / "conversion.json").read_text())["settings"]["threshold_groups"] == 2
    assert SpikingUNet2DModel.from_pretrained(out / "unet").config.threshold_groups == 2
    result = invoke(convert_command, "--model", saved["qcfs2"], "--timesteps", 2, "--output", tmp_path / "q")
    assert result.exit_code == 0, result.output
    assert SpikingUNet2DModel.from_pretrained(tmp_path / "q" / "unet").config.threshold_groups == 2


@pytest.mark.parametrize(
    ("command", "model", "args", "message"),
    [
        ("convert", "ann", ["--threshold-groups", "0"], "'--threshold-groups': 0 is not in the range 1<=x<=64"),
        ("convert", "ann", ["--threshold-groups", "65"], "'--threshold-groups': 65 is not in the range 1<=x<=64"),
        ("convert", "ann", ["--threshold-groups", "two"], "'--threshold-groups': 'two' is not a valid integer"),
        ("convert", "short", ["--threshold-groups", "16"], "--threshold-groups must be at most the 8 diffusion"),
        ("convert", "qcfs2", ["--threshold-groups", "3"], "pass --threshold-groups 2"),
        ("convert", "qcfs2", ["--threshold-form", "unit"], "--threshold-form unit needs one threshold per site"),
        ("calibrate", "ann", ["--threshold-groups", "65"], "'--threshold-groups': 65 is not in the range 1<=x<=64"),
        (
            "calibrate",
            "short",
            ["--threshold-groups", "9", "--sampler-steps", "2"],
            "--threshold-groups must be at most the 8 diffusion",
        ),
        ("evaluate", "qcfs2", ["--threshold-groups", "1"], "pass --threshold-groups 2"),
    ],
)
def test_a_threshold_group_setting_that_does_not_fit_is_a_usage_error(saved, tmp_path, command, model, args, message):
    import importlib

    module = importlib.import_module(f"spiking_diffusers.commands.{command}")
    out = tmp_path / "out"
    result = invoke(module, "--model", saved[model], *args, "--output", out)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not out.exists()


def test_sdm_calibrate_with_two_groups_writes_a_k2_model(saved, tmp_path):
    from spiking_diffusers.commands import calibrate as calibrate_command

    out = tmp_path / "cal"
    result = invoke(
        calibrate_command, "--model", saved["ann"], "--timesteps", 2, "--threshold-groups", 2, "--num-samples", 8,
        "--sampler-steps", 2, "--distill-steps", 2, "--batch-size", 4, "--snn-steps", 1, "--snn-batch-size", 4,
        "--set-size", 64, "--cache-dir", tmp_path / "cache", "--output", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert QCFSUNet2DModel.from_pretrained(out / "unet").config.threshold_groups == 2
    assert json.loads((out / "calibration_report.json").read_text())["settings"]["threshold_groups"] == 2
