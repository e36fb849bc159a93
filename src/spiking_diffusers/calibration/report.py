"""Writing a calibration's report: the JSON and a PNG with the per-site thresholds and the loss curves."""

from __future__ import annotations

import json
from pathlib import Path

REPORT_FILE = "calibration_report.json"
PLOT_FILE = "calibration.png"


def write_calibration_report(report: dict, directory: str | Path) -> None:
    """Write ``report`` as :data:`REPORT_FILE` and its plot as :data:`PLOT_FILE` into ``directory``."""
    directory = Path(directory)
    (directory / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    plot_calibration(report, directory / PLOT_FILE)


def plot_calibration(report: dict, path: str | Path) -> None:
    """Thresholds per site (mean with per-channel range, before and after), the loss curves, and the
    noise-prediction error sweep before and after (when the report has one)."""
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
        values = [report["sites"][n][stage]["threshold"] for n in names]
        if isinstance(values[0], list):
            ax_sites.fill_between(
                range(len(names)), [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.15
            )
    ax_sites.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax_sites.set_ylabel("threshold lambda\n(per-channel range shaded)")
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
