"""Writing a calibration's report: the JSON and a PNG with the per-site thresholds and the loss curves."""

from __future__ import annotations

import json
from pathlib import Path

REPORT_FILE = "calibration_report.json"
PLOT_FILE = "calibration.png"
MAX_GROUP_LINES = 8
"""Timestep groups up to which the plot draws each group's mean threshold per site as a line of its own."""


def write_calibration_report(report: dict, directory: str | Path) -> None:
    """Write ``report`` as :data:`REPORT_FILE` and its plot as :data:`PLOT_FILE` into ``directory``."""
    directory = Path(directory)
    (directory / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    plot_calibration(report, directory / PLOT_FILE)


def plot_calibration(report: dict, path: str | Path) -> None:
    """Thresholds per site (mean with per-channel range, before and after), the loss curves, and the
    noise-prediction error sweep before and after (when the report has one). With timestep-aware thresholds
    the range spans every group's and channel's, and each group's mean after calibration is a line of its own
    (up to :data:`MAX_GROUP_LINES` groups)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["sites"])
    sweep = report.get("noise_prediction_sweep") or {}
    rows = 3 if "after" in sweep else 2
    fig, axes = plt.subplots(rows, 1, figsize=(max(8, len(names) * 0.22), 4 * rows), constrained_layout=True)
    ax_sites, ax_loss = axes[0], axes[1]
    for stage, color in (("before", "tab:gray"), ("after", "tab:blue")):
        means = [report["sites"][n][stage]["threshold_mean"] for n in names]
        ax_sites.plot(range(len(names)), means, "o-", color=color, label=f"lambda {stage}", markersize=3)
        values = [_flat(report["sites"][n][stage]["threshold"]) for n in names]
        if len(values[0]) > 1:
            ax_sites.fill_between(
                range(len(names)), [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.15
            )
    group_means = [report["sites"][n]["after"].get("threshold_group_means") for n in names]
    if group_means[0] and len(group_means[0]) <= MAX_GROUP_LINES:
        colors = plt.get_cmap("viridis")
        for group in range(len(group_means[0])):
            ax_sites.plot(
                range(len(names)),
                [means[group] for means in group_means],
                "-",
                color=colors(group / max(1, len(group_means[0]) - 1)),
                linewidth=0.7,
                label=f"lambda after, timestep group {group}",
            )
    ax_sites.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax_sites.set_ylabel("threshold lambda\n(per-channel / per-group range shaded)")
    ax_sites.set_yscale("log")
    ax_sites.legend()
    offset = 0
    for phase, losses in report["loss_curves"].items():
        ax_loss.plot(range(offset, offset + len(losses)), losses, label=phase, linewidth=0.8)
        offset += len(losses)
    ax_loss.set_xlabel("training step")
    ax_loss.set_ylabel("noise-prediction MSE vs the original")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    if rows == 3:
        ax_sweep = axes[2]
        T = report["settings"]["timesteps"]
        for stage, style in (("before", "--"), ("after", "-")):
            for model, color in (("qcfs", "tab:orange"), ("snn", "tab:blue")):
                label = f"{'QCFS' if model == 'qcfs' else f'SNN T={T}'} {stage}"
                ax_sweep.plot(sweep["timesteps"], sweep[stage][model], style, color=color, marker="o", label=label)
        ax_sweep.set_xscale("log")
        ax_sweep.set_xlabel("diffusion timestep t")
        ax_sweep.set_ylabel("relative noise-prediction error\n||eps - eps_ann|| / ||eps_ann||")
        ax_sweep.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _flat(threshold: float | list) -> list[float]:
    """A site's threshold(s) as a flat list: one value, a vector per channel, or a table per group and channel."""
    if not isinstance(threshold, list):
        return [threshold]
    return [value for item in threshold for value in _flat(item)]
