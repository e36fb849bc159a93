"""The two figures of ``sdm-energy``: firing rate per neuron layer, and SNN vs ANN energy by kind of work."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt

from .report import OP_CLASSES, EnergyReport, t_description

_COLOURS = ("tab:green", "tab:red", "tab:orange", "tab:purple")


def plot_firing_rates(report: EnergyReport, path: str | Path) -> None:
    """Horizontal bars: spikes per neuron per time step of every neuron layer, in network order."""
    names = list(report.site_rates)
    rates = [report.site_rates[name] for name in names]
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.18 * len(names)))
    ax.barh(range(len(names)), rates, color="tab:blue")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("firing rate (spikes per neuron per time step)")
    ax.set_title(f"Firing rate per neuron layer ({t_description(report)}, mean over a sampling run)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_energy_breakdown(report: EnergyReport, path: str | Path) -> None:
    """Stacked bars of the energy per denoising step and image, split into AC energy and MAC energy by kind."""
    parts = report.breakdown_pj()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    bottoms = [0.0, 0.0]
    for name, colour in zip(OP_CLASSES, _COLOURS, strict=True):
        values = [part * 1e-9 for part in parts[name]]
        ax.bar(["SNN", "ANN"], values, bottom=bottoms, label=name, color=colour)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    ax.set_ylabel("energy per denoising step per image (mJ)")
    ax.set_title(
        f"{t_description(report)}: SNN / ANN = {report.energy_ratio:.2f}, "
        f"{report.spike_driven_fraction:.0%} of operations spike-driven",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
