"""Data parallelism over the processes of ``accelerate launch`` (or ``torchrun``); a no-op in one process.

Two patterns cover every command that scales out:

- **Sampling** splits the images into whole batches and deals the batches round-robin to the processes
  (:func:`my_batches`); each image keeps its own generator, and each batch holds the same images as in a
  one-process run, so the gathered result (:func:`gather_batches`) is bit-identical to one process's
  whatever the number of processes (on CPU; batch composition is what float results depend on).
- **Training** (calibration) gives each process a contiguous share of every batch (:func:`batch_share`);
  losses are scaled so that their sum over processes is the whole batch's mean, and the gradients are
  summed with one all-reduce (:func:`all_reduce_sum`). The update equals the one-process update up to the
  order of float additions.

The process group is set up by ``accelerate.PartialState`` (gloo on CPU, NCCL on GPUs), and only when
the launcher started more than one process (``WORLD_SIZE`` > 1), so a plain run never touches it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch


def launched() -> bool:
    """Whether this process is one of several started by ``accelerate launch`` / ``torchrun``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@functools.cache
def _state():
    from accelerate import PartialState

    # Without an accelerator, ``cpu=True`` makes accelerate set up gloo from the launcher's environment.
    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return PartialState(cpu=not has_accelerator)


def rank() -> int:
    """This process's index (0 in a plain run)."""
    return _state().process_index if launched() else 0


def world_size() -> int:
    """The number of processes (1 in a plain run)."""
    return _state().num_processes if launched() else 1


def is_main_process() -> bool:
    """Whether this process writes outputs and prints (the only process of a plain run)."""
    return rank() == 0


def device() -> torch.device | None:
    """The device the launcher gave this process, or ``None`` in a plain run."""
    return _state().device if launched() else None


def my_batches(num_items: int, batch_size: int) -> list[range]:
    """This process's batches of item indices: batch ``b`` of ``range(num_items)`` goes to process ``b % P``."""
    batches = [range(start, min(start + batch_size, num_items)) for start in range(0, num_items, batch_size)]
    return batches[rank() :: world_size()]


def gather_batches(outputs: Sequence[torch.Tensor], num_items: int, batch_size: int) -> torch.Tensor:
    """Every process's :func:`my_batches` outputs (CPU tensors, one per batch), in item order, on every process."""
    if world_size() == 1:
        return torch.cat(list(outputs))
    gathered: list[list[torch.Tensor] | None] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, [output.cpu() for output in outputs])
    num_batches = -(-num_items // batch_size)
    ordered = [gathered[b % world_size()][b // world_size()] for b in range(num_batches)]
    return torch.cat(ordered)


def batch_share(batch_size: int) -> slice:
    """This process's contiguous share of a batch of ``batch_size`` (shares differ by one item at most)."""
    size, index = world_size(), rank()
    if batch_size < size:
        raise ValueError(f"A batch of {batch_size} cannot be shared by {size} processes; use a batch size >= {size}.")
    return slice(index * batch_size // size, (index + 1) * batch_size // size)


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum ``tensors`` over all processes, in place, with one collective (nothing in a plain run)."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    torch.distributed.all_reduce(flat)
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()
