"""Forward time and peak memory of the ANN, the QCFS network and the SNN on the ddpm-cifar10-32 layout.

Random weights (the architecture is what costs), CPU, batch 4. Times are the best of ``--repeats`` runs,
all measured in this one run so the ratios are comparable. Peak memory is measured in a fresh process
per configuration: the high-water resident set during one forward, minus the resident set just before it
(so the weights, common to all, are excluded and reported once); glibc is told to serve large blocks
from mmap so that freed tensors leave the resident set at once.

    python benchmarks/conversion_speed.py [--batch 4] [--timesteps 4 8 16] [--repeats 3]
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

import click
import torch
from diffusers import UNet2DModel

from spiking_diffusers import convert, quantize
from spiking_diffusers.architectures import DDPM_CIFAR10_32


def build(kind: str, timesteps: int, execution: str):
    torch.manual_seed(0)
    unet = UNet2DModel(**DDPM_CIFAR10_32).eval()
    if kind == "ann":
        return unet
    qnet = quantize(unet, levels=max(timesteps, 1), num_samples=2)
    if kind == "qcfs":
        return qnet
    execution, _, nonlinear_mode = execution.partition("-")
    return convert(qnet, timesteps=timesteps, execution=execution, nonlinear_mode=nonlinear_mode or "compensated")


def best_time(model, sample, timestep, repeats: int) -> float:
    with torch.inference_mode():
        model(sample, timestep)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(sample, timestep)
            times.append(time.perf_counter() - start)
    return min(times)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def measure_memory(kind: str, timesteps: int, execution: str, batch: int) -> dict:
    """Run in a child process: peak extra resident memory of one forward, in MiB.

    A warm-up forward first takes the one-off allocations (kernel caches, allocator pools) out of the
    figure; then the high-water mark is reset (``/proc/self/clear_refs``) and one forward is measured.
    """
    model = build(kind, timesteps, execution)
    sample, timestep = torch.randn(batch, 3, 32, 32), torch.tensor([500] * batch)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    with torch.inference_mode():
        model(sample, timestep)
        gc.collect()
        before = _status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        model(sample, timestep)
    return {"extra_mb": _status_mb("VmHWM") - before, "weights_mb": weights}


def memory_in_child(kind: str, timesteps: int, execution: str, batch: int) -> dict:
    args = [sys.executable, __file__, "--child", json.dumps([kind, timesteps, execution, batch])]
    # Large blocks straight from mmap and returned on free: the resident set then follows live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(args, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


@click.command()
@click.option("--batch", default=4, show_default=True)
@click.option("--timesteps", "timesteps_list", multiple=True, type=int, default=(4, 8, 16), show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--child", default=None, hidden=True)
def main(batch: int, timesteps_list: tuple[int, ...], repeats: int, child: str | None) -> None:
    if child is not None:
        print(json.dumps(measure_memory(*json.loads(child))))
        return
    sample, timestep = torch.randn(batch, 3, 32, 32), torch.tensor([500] * batch)
    ann_time = best_time(build("ann", 1, "batched"), sample, timestep, repeats)
    qcfs_time = best_time(build("qcfs", 8, "batched"), sample, timestep, repeats)
    ann_mem = memory_in_child("ann", 1, "batched", batch)
    print(f"ddpm-cifar10-32 layout, random weights, CPU ({torch.get_num_threads()} threads), batch {batch}")
    print(f"weights: {ann_mem['weights_mb']:.0f} MiB")
    print()
    weights = ann_mem["weights_mb"]
    ann_total = weights + ann_mem["extra_mb"]
    print("| model | T | time (s) | time / (T x ANN) | peak extra memory (MiB) | peak with weights (MiB) | vs ANN |")
    print("|---|---|---|---|---|---|---|")
    print(f"| ANN | - | {ann_time:.3f} | 1.00 | {ann_mem['extra_mb']:.0f} | {ann_total:.0f} | 1.00 |")
    print(f"| QCFS (L = 8) | - | {qcfs_time:.3f} | {qcfs_time / ann_time:.2f} | - | - | - |")
    for steps in timesteps_list:
        for execution, label in (("batched", "batched"), ("stepwise", "step-wise"), ("stepwise-per_step", None)):
            if label is None:
                if steps != timesteps_list[-1]:
                    continue
                label = "step-wise, per-step GN/attention"
            snn_time = best_time(build("snn", steps, execution), sample, timestep, repeats)
            mem = memory_in_child("snn", steps, execution, batch)
            total = weights + mem["extra_mb"]
            print(
                f"| SNN {label} | {steps} | {snn_time:.3f} | {snn_time / (steps * ann_time):.2f} "
                f"| {mem['extra_mb']:.0f} | {total:.0f} | {total / ann_total:.2f} |"
            )


if __name__ == "__main__":
    main()
