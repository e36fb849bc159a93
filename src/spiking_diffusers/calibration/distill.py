"""Output distillation: the QCFS (or spiking) student learns to reproduce the original UNet's noise
prediction on calibration inputs, optionally matching every block's output on the way.

The inputs come from a :class:`~spiking_diffusers.calibration.data.CalibrationSet` whose teacher outputs were
computed once: then a step runs only the student (forward and backward), which is most of what it cost before
(the teacher's forward was about a quarter of a step). Block matching needs the teacher's intermediate outputs
too, and runs the teacher on each batch for them. A :class:`~spiking_diffusers.calibration.data.NoisedBatches`
(fresh noise at every step) or an unlabelled set makes the teacher run at every step, as before.

A phase can hand its complete state to a checkpoint every few steps (:class:`DistillState`) and continue
from one bit for bit, and it trains data-parallel when several processes run it (see
:mod:`spiking_diffusers.distributed`): each process takes its share of every batch, and the gradients are
summed over processes before the optimizer step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..converter.probes import move_kwargs
from ..converter.qcfs import MIN_THRESHOLD
from ..errors import NonFiniteError
from .data import CalibrationSet, NoisedBatches

TRAIN_OPTIONS = ("weights", "thresholds", "tsm")
FUSED_ADAM_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel


@dataclass
class DistillSettings:
    """One distillation phase. ``train``: "weights" (everything), "thresholds", or "tsm" (only the temporal
    factors of a spiking student); temporal factors, where the student has them, always train at ``tsm_lr``.
    Input shifts and output offsets (``offsets``), where the student has them, train with the thresholds, at
    their learning rate, but are not clamped.
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


@dataclass
class DistillState:
    """A phase after ``step`` completed steps: all it needs to continue exactly as if never stopped (the
    learning-rate schedule is a function of the step)."""

    step: int
    student: dict[str, torch.Tensor]
    optimizer: dict
    generator: torch.Tensor
    """State of the calibration data's generator (``NoisedBatches.generator``)."""
    rng: torch.Tensor
    """State of torch's global CPU generator."""
    history: DistillHistory


class PhaseCheckpoint(Protocol):
    """Receives a phase's state: after every step for which ``due`` is true, and after the last step.

    The tensors of the state are the live ones; ``save`` must write or copy them before it returns.
    """

    def due(self, steps_done: int) -> bool: ...

    def save(self, state: DistillState) -> None: ...


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
    thresholds, offsets, factors, weights = [], [], [], []
    for name, param in student.named_parameters():
        if name.endswith("threshold"):
            thresholds.append(param)
        elif name.endswith((".input_shift", ".output_offset")):
            offsets.append(param)
        elif name.endswith("temporal_factors"):
            factors.append(param)
        else:
            weights.append(param)
    if settings.train not in TRAIN_OPTIONS:
        raise ValueError(f"Unknown train option {settings.train!r}; choose one of {', '.join(TRAIN_OPTIONS)}.")
    groups = [{"params": [] if settings.train == "tsm" else thresholds, "lr": settings.threshold_lr or settings.lr}]
    if offsets and settings.train != "tsm":
        groups.append({"params": offsets, "lr": settings.threshold_lr or settings.lr})
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


def _block_loss(blocks: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], fraction: float) -> torch.Tensor:
    """Mean over blocks of ``mean((p - t)^2) / mean(t^2)``, both means over the whole batch: this process's
    ``fraction`` of the numerator, and the denominator summed over processes (plain means in one process)."""
    scales = torch.stack([target.pow(2).mean() for target in targets]) * fraction
    distributed.all_reduce_sum([scales])
    terms = []
    for prediction, target, scale in zip(blocks, targets, scales, strict=True):
        if prediction.shape[0] != target.shape[0]:  # a spiking student's block output holds all T steps
            prediction = prediction.unflatten(0, (-1, target.shape[0])).mean(0)
        terms.append((prediction - target).pow(2).mean() * fraction / scale.clamp_min(1e-8))
    return torch.stack(terms).mean()


def _sum_gradients(params: Sequence[nn.Parameter]) -> None:
    """Sum the gradients over processes (nothing to do in one process)."""
    if distributed.world_size() == 1:
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    distributed.all_reduce_sum([param.grad for param in params])


def _restore(
    state: DistillState, student: nn.Module, optimizer: torch.optim.Optimizer, data: CalibrationSet | NoisedBatches
) -> DistillHistory:
    """Put the student, optimizer and generators back in ``state``; a copy of its loss history."""
    student.load_state_dict(state.student)
    optimizer.load_state_dict(state.optimizer)
    data.generator.set_state(state.generator)
    torch.set_rng_state(state.rng)
    history = state.history
    return DistillHistory(list(history.output_loss), list(history.total_loss), history.wall_time_s)


def _draw(
    data: CalibrationSet | NoisedBatches, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """A batch ``(x_t, t, target, kwargs)``; ``target`` is ``None`` where the teacher must compute it, ``kwargs``
    the inputs' conditioning."""
    if isinstance(data, CalibrationSet):
        return data.sample(batch_size)
    x_t, timesteps, kwargs = data.sample(batch_size)
    return x_t, timesteps, None, kwargs


def make_optimizer(groups: list[dict], device: torch.device) -> torch.optim.AdamW:
    """AdamW without weight decay over ``groups``, fused where torch has the kernel: it updates each tensor in
    one pass, which on the digits DDPMs' 272 small tensors costs a tenth of the per-tensor loop, about 6 % of a
    distillation step on a CPU."""
    return torch.optim.AdamW(groups, weight_decay=0.0, fused=device.type in FUSED_ADAM_DEVICES)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: CalibrationSet | NoisedBatches,
    settings: DistillSettings,
    description: str = "distill",
    progress: bool = True,
    checkpoint: PhaseCheckpoint | None = None,
    resume: DistillState | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> DistillHistory:
    """Train ``student`` (a QCFS or spiking model) to match ``teacher`` (the original UNet) in place.

    The loss is the MSE of the noise prediction, plus ``block_loss_weight`` times the mean normalised MSE
    of every block's output. AdamW with warm-up and cosine decay, gradient clipping; thresholds are kept
    positive after every step. Deterministic for a given state of ``data``'s generator; a labelled
    :class:`CalibrationSet` gives the same result as one whose teacher outputs are recomputed at every step
    (to float rounding: see ``tests/test_calibration.py``). ``checkpoint`` receives the state to continue
    from (see :class:`PhaseCheckpoint`); ``resume`` continues from one. ``on_step(steps_done, loss)`` is
    called after every step (the whole calibration's progress bar); with it, this phase shows no bar of its own.
    """
    start = time.perf_counter()
    groups = _trainable_groups(student, settings)
    params = [param for group in groups for param in group["params"]]
    device = next(student.parameters()).device
    optimizer = make_optimizer(groups, device)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    history = DistillHistory() if resume is None else _restore(resume, student, optimizer, data)
    elapsed_before = history.wall_time_s
    teacher.eval()
    student.eval()  # no dropout: the student must match the deterministic teacher
    use_blocks = settings.block_loss_weight > 0
    share = distributed.batch_share(settings.batch_size)
    fraction = (share.stop - share.start) / settings.batch_size  # 1 in one process
    first = resume.step if resume is not None else 0
    bar = tqdm(
        range(first, settings.steps),
        desc=description,
        initial=first,
        total=settings.steps,
        disable=not progress or on_step is not None,
    )
    for step in bar:
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * _lr_factor(step, settings.steps, settings.warmup_fraction)
        x_t, timesteps, target, kwargs = _draw(data, settings.batch_size)  # the whole batch, in every process
        x_t, timesteps = x_t[share].to(device), timesteps[share].to(device)
        kwargs = move_kwargs({key: value[share] for key, value in kwargs.items()}, x_t)
        if target is not None:
            target = target[share].to(device)
        if target is None or use_blocks:  # the teacher runs only for what the set does not hold
            with torch.no_grad(), _maybe_record(teacher, use_blocks) as teacher_blocks:
                output = teacher(x_t, timesteps, **kwargs).sample
            target = output if target is None else target
        with _maybe_record(student.unet, use_blocks) as blocks:
            prediction = student(x_t, timesteps, **kwargs).sample
        # This process's part of the whole batch's loss: the parts (and their gradients) sum to the whole.
        output_loss = nn.functional.mse_loss(prediction, target) * fraction
        loss = output_loss
        if use_blocks:
            loss = loss + settings.block_loss_weight * _block_loss(blocks, teacher_blocks, fraction)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _sum_gradients(params)
        losses = torch.stack([output_loss.detach(), loss.detach()])
        distributed.all_reduce_sum([losses])
        output_value, total_value = losses.tolist()
        if not math.isfinite(total_value):
            raise NonFiniteError(
                f"{description}: the loss is not finite at step {step + 1}; the original model's output overflows "
                "or the learning rate is too high (lower it)."
            )
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
        with torch.no_grad():
            for param in groups[0]["params"]:
                param.clamp_(min=MIN_THRESHOLD)
        history.output_loss.append(output_value)
        history.total_loss.append(total_value)
        bar.set_postfix(loss=f"{output_value:.4f}")
        if on_step is not None:
            on_step(step + 1, output_value)
        if checkpoint is not None and (checkpoint.due(step + 1) or step + 1 == settings.steps):
            history.wall_time_s = elapsed_before + time.perf_counter() - start
            state = DistillState(
                step + 1, student.state_dict(), optimizer.state_dict(), data.generator.get_state(),
                torch.get_rng_state(), history,
            )  # fmt: skip
            checkpoint.save(state)
    for param in student.parameters():
        param.requires_grad_(False)
    history.wall_time_s = elapsed_before + time.perf_counter() - start
    return history
