"""Output distillation: the QCFS (or spiking) student learns to reproduce the original UNet's noise
prediction on calibration inputs, optionally matching every block's output on the way."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..converter.qcfs import MIN_THRESHOLD
from .data import NoisedBatches

TRAIN_OPTIONS = ("weights", "thresholds", "tsm")


@dataclass
class DistillSettings:
    """One distillation phase. ``train``: "weights" (everything), "thresholds", or "tsm" (only the temporal
    factors of a spiking student); temporal factors, where the student has them, always train at ``tsm_lr``.
    """

    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3
    threshold_lr: float | None = None
    train: str = "weights"
    block_loss_weight: float = 0.0
    grad_clip: float = 1.0
    warmup_fraction: float = 0.05
    tsm_lr: float = 1e-2


@dataclass
class DistillHistory:
    """Loss per step (output loss, and total loss including block terms)."""

    output_loss: list[float] = field(default_factory=list)
    total_loss: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0


def _block_modules(unet: nn.Module) -> list[nn.Module]:
    blocks = list(unet.down_blocks)
    if unet.mid_block is not None:
        blocks.append(unet.mid_block)
    return blocks + list(unet.up_blocks)


@contextlib.contextmanager
def record_block_outputs(unet: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the hidden-state output of every down, mid and up block during a forward."""
    outputs: list[torch.Tensor] = []

    def hook(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [block.register_forward_hook(hook) for block in _block_modules(unet)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _maybe_record(unet: nn.Module, enabled: bool):
    return record_block_outputs(unet) if enabled else contextlib.nullcontext([])


def _trainable_groups(student: nn.Module, settings: DistillSettings) -> list[dict]:
    """Parameter groups with their own learning rates; thresholds come first (they are clamped after steps)."""
    thresholds, factors, weights = [], [], []
    for name, param in student.named_parameters():
        if name.endswith("threshold"):
            thresholds.append(param)
        elif name.endswith("temporal_factors"):
            factors.append(param)
        else:
            weights.append(param)
    if settings.train not in TRAIN_OPTIONS:
        raise ValueError(f"Unknown train option {settings.train!r}; choose one of {', '.join(TRAIN_OPTIONS)}.")
    groups = [{"params": [] if settings.train == "tsm" else thresholds, "lr": settings.threshold_lr or settings.lr}]
    if factors:
        groups.append({"params": factors, "lr": settings.tsm_lr})
    if settings.train == "weights":
        groups.append({"params": weights, "lr": settings.lr})
    for param in student.parameters():
        param.requires_grad_(False)
    for group in groups:
        for param in group["params"]:
            param.requires_grad_(True)
    return groups


def _lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _normalised_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if prediction.shape[0] != target.shape[0]:  # a spiking student's block output holds all T steps
        prediction = prediction.unflatten(0, (-1, target.shape[0])).mean(0)
    return (prediction - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-8)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: NoisedBatches,
    settings: DistillSettings,
    description: str = "distill",
    progress: bool = True,
    student_unet: Callable[[nn.Module], nn.Module] = lambda model: model.unet,
) -> DistillHistory:
    """Train ``student`` (a QCFS or spiking model) to match ``teacher`` (the original UNet) in place.

    The loss is the MSE of the noise prediction, plus ``block_loss_weight`` times the mean normalised MSE
    of every block's output. AdamW with warm-up and cosine decay, gradient clipping; thresholds are kept
    positive after every step. Deterministic for a given state of ``data``'s generator.
    """
    import time

    start = time.perf_counter()
    groups = _trainable_groups(student, settings)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    history = DistillHistory()
    teacher.eval()
    student.eval()  # no dropout: the student must match the deterministic teacher
    use_blocks = settings.block_loss_weight > 0
    device = next(student.parameters()).device
    bar = tqdm(range(settings.steps), desc=description, disable=not progress)
    for step in bar:
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * _lr_factor(step, settings.steps, settings.warmup_fraction)
        x_t, timesteps = data.sample(settings.batch_size)
        x_t, timesteps = x_t.to(device), timesteps.to(device)
        with torch.no_grad(), _maybe_record(teacher, use_blocks) as teacher_blocks:
            target = teacher(x_t, timesteps).sample
        with _maybe_record(student_unet(student), use_blocks) as blocks:
            prediction = student(x_t, timesteps).sample
        output_loss = nn.functional.mse_loss(prediction, target)
        loss = output_loss
        if use_blocks:
            block_terms = [_normalised_mse(p, t) for p, t in zip(blocks, teacher_blocks, strict=True)]
            loss = loss + settings.block_loss_weight * torch.stack(block_terms).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], settings.grad_clip)
        optimizer.step()
        with torch.no_grad():
            for param in groups[0]["params"]:
                param.clamp_(min=MIN_THRESHOLD)
        history.output_loss.append(output_loss.item())
        history.total_loss.append(loss.item())
        bar.set_postfix(loss=f"{output_loss.item():.4f}")
    for param in student.parameters():
        param.requires_grad_(False)
    history.wall_time_s = time.perf_counter() - start
    return history
