"""The fidelity check of ``sdm-convert``: how far the QCFS and the spiking noise predictions are from the
original's at a few points of the schedule, on fixed smooth inputs (no data needed)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from ..converter import QCFSUNet2DModel, SpikingUNet2DModel
from ..converter.building import spatial_size
from ..converter.probes import conditioning_kwargs
from ..errors import check_finite
from .noise_prediction import relative_error

FIDELITY_FRACTIONS = (0.05, 0.25, 0.5, 0.75, 0.95)
"""Where the fidelity check probes the schedule: t = 50, 250, 500, 750, 950 of 1000 training steps."""


@torch.no_grad()
def fidelity_check(
    snn: SpikingUNet2DModel,
    qnet: QCFSUNet2DModel,
    scheduler_config: dict[str, Any],
    ann: UNet2DModel | None = None,
    num_samples: int = 4,
    seed: int = 0,
    progress: bool = True,
    conditions: dict[str, torch.Tensor] | None = None,
) -> list[dict[str, float]]:
    """Relative error ``||eps - eps_ann|| / ||eps_ann||`` of the QCFS and the spiking noise prediction.

    The inputs are ``num_samples`` fixed-seed images (smooth random patterns in [-1, 1]) noised by the
    model's own schedule at the :data:`FIDELITY_FRACTIONS` of its training steps. The reference is
    ``ann``, or, when the original is not at hand (a calibrated QCFS model), ``qnet`` with its original
    activations (``as_ann``). A conditional UNet gets ``conditions`` (keyword tensors, one row per sample;
    e.g. a label-conditional model's label tokens), else random class labels / ``encoder_hidden_states``.
    """
    param = next(snn.parameters())
    config = qnet.config.unet_config
    noise_schedule = DDPMScheduler.from_config(scheduler_config)
    train_steps = noise_schedule.config.num_train_timesteps
    generator = torch.Generator().manual_seed(seed)
    height, width = spatial_size(config.get("sample_size") or 32)
    coarse = torch.rand(
        num_samples, config["in_channels"], max(height // 4, 1), max(width // 4, 1), generator=generator
    )
    x0 = torch.nn.functional.interpolate(coarse * 2 - 1, size=(height, width), mode="bilinear", align_corners=False)
    noise = torch.randn(x0.shape, generator=generator)
    random_conditions = conditioning_kwargs(config, num_samples, generator)  # drawn always: same noise either way
    kwargs = {
        key: value.to(param.device, param.dtype) if value.is_floating_point() else value.to(param.device)
        for key, value in (random_conditions if conditions is None else conditions).items()
    }

    rows = []
    for fraction in tqdm(FIDELITY_FRACTIONS, desc="fidelity check", disable=not progress, leave=False):
        t = torch.full((num_samples,), min(round(fraction * train_steps), train_steps - 1), dtype=torch.long)
        sample = noise_schedule.add_noise(x0, noise, t).to(param.device, param.dtype)
        t = t.to(param.device)
        if ann is not None:
            reference = ann(sample, t, **kwargs).sample
        else:
            with qnet.as_ann():
                reference = qnet(sample, t, **kwargs).sample
        outputs = {
            "original": reference,
            "QCFS": qnet(sample, t, **kwargs).sample,
            "spiking": snn(sample, t, **kwargs).sample,
        }
        for name, output in outputs.items():
            check_finite(
                output,
                f"The {name} network's noise prediction at t = {int(t[0])}",
                "its weights or thresholds overflow; check the model.",
            )
        rows.append(
            {
                "t": int(t[0]),
                "qcfs_vs_ann": relative_error(outputs["QCFS"], reference),
                "snn_vs_ann": relative_error(outputs["spiking"], reference),
            }
        )
    return rows
