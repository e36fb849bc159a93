"""The three files of an evaluation: ``report.json``, ``report.md`` (markdown tables) and ``grid.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
GRID_PNG = "grid.png"


def write_report(report: dict, samples: dict[str, torch.Tensor], directory: str | Path, grid_rows: int = 8) -> None:
    """Write the report as JSON and markdown, and a grid of the first ``grid_rows`` samples per network."""
    directory = Path(directory)
    (directory / REPORT_JSON).write_text(json.dumps(_finite_or_none(report), indent=2, allow_nan=False) + "\n")
    (directory / REPORT_MD).write_text(markdown_report(report))
    save_grid(samples, directory / GRID_PNG, rows=grid_rows)


def _finite_or_none(value):
    """JSON has no inf or NaN (PSNR of identical images is inf): they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    return "-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(report: dict) -> str:
    """The main table: one row per network."""
    splits = report["settings"]["fd_splits"]
    split_cols = f" | FD, {splits} splits | FD / ANN, {splits} splits" if splits > 1 else ""
    rows = report["variants"]
    guided = any(row.get("guidance_scale") is not None for row in rows)
    judged = any(row.get("conditional_accuracy") is not None for row in rows)
    lines = [
        "| network | L | T | mean T" + (" | guidance" if guided else "")
        + f" | FD | FD / ANN{split_cols} | PSNR vs ANN (dB)"
        + (" | cond. accuracy | accuracy / ANN" if judged else "") + " | noise-pred. rel. error | s / image |",
        "|---|---|---|---" + ("|---" if guided else "") + "|---|---" + ("|---|---" if splits > 1 else "") + "|---"
        + ("|---|---" if judged else "") + "|---|---|",
    ]  # fmt: skip
    for row in rows:
        mean_t = row.get("mean_timesteps")
        cells = [row["name"], str(row["levels"] or "-"), str(row["timesteps"] or "-")]
        cells.append("-" if mean_t is None else f"{mean_t:g}")
        if guided:
            cells.append(f"{row['guidance_scale']:g}")
        cells += [_fmt(row["fd"]), _fmt(row["fd_ratio"])]
        if splits > 1:
            cells += [
                _pm(row["fd_split_mean"], row["fd_split_std"]),
                _pm(row["fd_ratio_split_mean"], row["fd_ratio_split_std"]),
            ]
        cells.append(_pm(row["psnr_mean"], row["psnr_std"], 1))
        if judged:
            cells += [_fmt(row.get("conditional_accuracy"), 3), _fmt(row.get("accuracy_ratio"), 3)]
        cells.append(_fmt(row["noise_error_mean"], 3))
        cells.append(f"{row['seconds_per_image']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def noise_error_table(report: dict) -> str:
    """Relative noise-prediction error against the ANN, one column per diffusion timestep."""
    timesteps = report["noise_timesteps"]
    lines = ["| network | " + " | ".join(f"t={t}" for t in timesteps) + " |", "|---" * (len(timesteps) + 1) + "|"]
    first_guidance = report["variants"][0].get("guidance_scale")
    for row in report["variants"]:  # guidance changes sampling, not the sweep: the first scale's rows suffice
        if row["noise_error"] is not None and row.get("guidance_scale") == first_guidance:
            lines.append(f"| {row['network']} | " + " | ".join(f"{e:.3f}" for e in row["noise_error"]) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(report: dict) -> str:
    """Settings, the main table, the noise-error table and any warnings, as markdown."""
    s = report["settings"]
    header = [
        "# Sample quality: ANN vs QCFS vs SNN",
        "",
        f"- samples: {s['num_images']} per network, {s['scheduler']} with {s['steps']} steps, seed {s['seed']}, "
        "the same initial noise and per-image generators for every network",
        f"- Fréchet distance: {s['feature_extractor']}, against {s['real_reference']} ({s['real_reference_images']} "
        "images)",
        f"- noise-prediction error: ||eps - eps_ANN|| / ||eps_ANN|| on {s['noise_images']} noised real images "
        "per timestep; the table gives its mean over timesteps",
        "- mean T: simulation time steps per denoising step (what energy and latency pay); a T schedule such as "
        "4,16x3 gives the last 3 steps T = 16 and the others T = 4",
        "",
    ]
    body = [
        markdown_table(report),
        "Noise-prediction relative error by diffusion timestep:",
        "",
        noise_error_table(report),
    ]
    notes = [f"> {w}" for w in report["warnings"]]
    return "\n".join(header + body + notes) + ("\n" if notes else "")


def save_grid(samples: dict[str, torch.Tensor], path: str | Path, rows: int = 8) -> None:
    """A PNG with one column per network and one row per noise: the same row shares its initial noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(samples)
    rows = max(1, min(rows, min(len(v) for v in samples.values())))
    fig, axes = plt.subplots(
        rows, len(names), figsize=(1.1 * len(names), 1.1 * rows + 0.3), squeeze=False, gridspec_kw={"wspace": 0.08}
    )
    for col, name in enumerate(names):
        axes[0, col].set_title(name, fontsize=7)
        for row in range(rows):
            image = ((samples[name][row].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
            axis = axes[row, col]
            if image.shape[-1] == 1:  # dark strokes on white, like the training script's grid
                axis.imshow(image[..., 0], cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            else:
                axis.imshow(image, interpolation="nearest")
            axis.set_axis_off()
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
