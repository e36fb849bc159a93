"""The quality-energy price list: every configuration worth choosing, and the frontier as ``pareto.png``.

Each configuration is a row of ``benchmarks/low_t.py`` (calibrated with the recipe it names, converted,
sampled from the same noise as the ANN, counted by the energy accounting, with every spike sent and with
delta spikes: a row counted both ways appears twice, the default is the delta-spikes twin of the ``default``
row); this script runs the rows it is
asked for (``--rows``) and/or reads rows already measured (``--reuse`` JSON files written by
``low_t.py --output``), prints the price list sorted by energy with the Pareto-optimal rows marked, and plots
FD ratio (y) against SNN / ANN energy (x), the frontier joined and labelled, the default's point named.

    OMP_NUM_THREADS=2 python benchmarks/pareto.py --reuse outputs/bench/low_t_shipped.json --plot docs/pareto.png
"""

from __future__ import annotations

import json
from pathlib import Path

import click

DEFAULT_ROW = "default+delta"


def with_delta_rows(rows: list[dict]) -> list[dict]:
    """Each row, and after each row counted both ways (``low_t.py`` rows since delta spikes) its delta-spikes
    twin: the same samples, the energy and spike-driven share counted with delta spikes."""
    out = []
    for row in rows:
        out.append(row)
        if row.get("energy_ratio_delta") is not None:
            out.append(
                dict(
                    row,
                    row=f"{row['row']}+delta",
                    recipe=f"{row['recipe']}, delta spikes",
                    energy_ratio=row["energy_ratio_delta"],
                    spike_driven_fraction=row["spike_driven_fraction_delta"],
                    energy_ratio_delta=None,
                )
            )
    return out


def frontier(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both energy and FD ratio, by increasing energy."""
    best = []
    for row in sorted(rows, key=lambda r: (r["energy_ratio"], r["fd_ratio"])):
        if not best or row["fd_ratio"] < best[-1]["fd_ratio"]:
            best.append(row)
    return best


def markdown(rows: list[dict]) -> str:
    optimal = {id(row) for row in frontier(rows)}
    lines = [
        "| configuration | T (mean) | FD ratio | split ratio mean +- std | PSNR dB | spike-driven | SNN/ANN energy "
        "| frontier |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["energy_ratio"]):
        split = f"{r['fd_ratio_split_mean']:.2f} +- {r['fd_ratio_split_std']:.2f}" if r["fd_ratio_split_mean"] else "-"
        lines.append(
            f"| {r['recipe']} | {r['T']} ({r['mean_T']:.1f}) | {r['fd_ratio']:.2f} | {split} | {r['psnr']:.1f} "
            f"| {r['spike_driven_fraction']:.1%} | {r['energy_ratio']:.2f} | {'yes' if id(r) in optimal else ''} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """FD ratio against energy ratio, one point per configuration, the frontier joined, the default named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 4.8))
    best = frontier(rows)
    # Only the frontier and the default are labelled, by number, with the key in a list: names next to the
    # points would overlap where many configurations share an FD ratio.
    labelled = [r for r in sorted(rows, key=lambda r: r["energy_ratio"]) if r in best or r["row"] == DEFAULT_ROW]
    for r in rows:
        is_default = r["row"] == DEFAULT_ROW
        ax.errorbar(
            r["energy_ratio"],
            r["fd_ratio"],
            yerr=r["fd_ratio_split_std"] or 0.0,
            fmt="*" if is_default else "o",
            markersize=11 if is_default else 5,
            color="tab:red" if is_default else "tab:blue",
            capsize=2,
        )
    key = []
    for number, r in enumerate(labelled, 1):
        offset = (4, 6) if number % 2 else (4, -12)
        ax.annotate(
            str(number), (r["energy_ratio"], r["fd_ratio"]), fontsize=8, xytext=offset, textcoords="offset points"
        )
        default = " = the default" if r["row"] == DEFAULT_ROW else ""
        key.append(f"{number}: {r['recipe']} (T={r['T']}){default}")
    ax.text(
        0.98,
        0.97,
        "\n".join(key),
        transform=ax.transAxes,
        fontsize=6.5,
        va="top",
        ha="right",
        bbox=dict(boxstyle="round", facecolor="white", edgecolor="0.8"),
    )
    ax.plot([r["energy_ratio"] for r in best], [r["fd_ratio"] for r in best], "--", color="gray", lw=1)
    ax.axvline(1.0, color="black", lw=0.6, ls=":")
    ax.axvline(0.5, color="tab:green", lw=0.6, ls=":")  # the energy target of issue 13
    ax.axhline(1.0, color="black", lw=0.6, ls=":")
    ax.set_xlabel("SNN / ANN energy per denoising step")
    ax.set_ylabel("FD ratio to the ANN (lower is better)")
    ax.set_title(
        "Quality-energy price list (shipped digits DDPM, DDIM-20); labelled: the frontier and the default", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


@click.command(context_settings={"show_default": True})
@click.option("--reuse", multiple=True, type=click.Path(exists=True, dir_okay=False), help="low_t.py JSON rows.")
@click.option("--rows", default="", help="low_t.py rows to measure now (e.g. residual,default@8).")
@click.option("--model", default=None, help="ANN directory for --rows (default: the shipped digits DDPM).")
@click.option("-T", "--spike-steps", "timesteps", default=4)
@click.option("--num-images", default=1000)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default="pareto.png")
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="Also write all rows as JSON here.")
def main(reuse, rows, model, timesteps, num_images, plot_path, output) -> None:
    """Measure (or read) the configurations, print the price list and draw the frontier."""
    measured = [row for path in reuse for row in json.loads(Path(path).read_text())]
    keys = [key.strip() for key in rows.split(",") if key.strip()]
    if keys:
        import low_t
        from spiking_diffusers.loading import load_model

        loaded = load_model(model, "cpu")
        options = dict(num_images=num_images, fd_splits=4, steps=20, seed=0, progress=False, save_dir=None)
        for key in keys:
            measured.append(low_t.run_row(key, low_t.recipe_for(key), loaded, timesteps, "4,12x2", options)[0])
    if not measured:
        raise click.UsageError("Nothing to show: pass --rows to measure and/or --reuse JSON files.")
    measured = with_delta_rows(measured)
    click.echo(markdown(measured))
    plot(measured, plot_path)
    if output:
        Path(output).write_text(json.dumps(measured, indent=2) + "\n")


if __name__ == "__main__":
    main()
