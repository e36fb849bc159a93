"""Forward time and peak memory of the ANN, the QCFS network and the SNN on the ddpm-cifar10-32 layout.

Random weights (the architecture is what costs), CPU, batch 4. Times are the best of ``--repeats`` runs,
all measured in this one run so the ratios are comparable. Peak memory is measured in a fresh process
per configuration: the high-water resident set during one forward, minus the resident set just before it
(so the weights, common to all, are excluded and reported once).

    python benchmarks/conversion_speed.py [--batch 4] [--timesteps 4 8 16] [--repeats 3]
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time

import click
import torch
from diffusers import UNet2DModel

from spiking_diffusers import convert, quantize

CIFAR10_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    norm_num_groups=32,
    attention_head_dim=None,
)


def build(kind: str, timesteps: int, execution: str):
    torch.manual_seed(0)
    unet = UNet2DModel(**CIFAR10_CONFIG).eval()
    if kind == "ann":
        return unet
    qnet = quantize(unet, levels=max(timesteps, 1), num_samples=2)
    if kind == "qcfs":
        return qnet
    return convert(qnet, timesteps=timesteps, execution=execution)


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
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
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
    print("| model | T | time (s) | time / (T x ANN) | peak extra memory (MiB) | memory / ANN |")
    print("|---|---|---|---|---|---|")
    print(f"| ANN | - | {ann_time:.3f} | 1.00 | {ann_mem['extra_mb']:.0f} | 1.00 |")
    print(f"| QCFS | - | {qcfs_time:.3f} | {qcfs_time / ann_time:.2f} | - | - |")
    for steps in timesteps_list:
        for execution in ("batched", "stepwise"):
            snn_time = best_time(build("snn", steps, execution), sample, timestep, repeats)
            mem = memory_in_child("snn", steps, execution, batch)
            print(
                f"| SNN {execution} | {steps} | {snn_time:.3f} | {snn_time / (steps * ann_time):.2f} "
                f"| {mem['extra_mb']:.0f} | {mem['extra_mb'] / ann_mem['extra_mb']:.2f} |"
            )


if __name__ == "__main__":
    main()
