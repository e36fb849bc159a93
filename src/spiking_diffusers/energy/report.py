"""The energy report: per-layer work of the SNN beside the ANN, totals per denoising step and per image.

Energy follows the 45 nm model all SNN papers use: ``E = e_MAC * MACs + e_AC * ACs`` with 4.6 pJ per MAC
and 0.9 pJ per AC by default. Every count is normalised to one UNet evaluation (one denoising step, all T
time steps of the SNN) on one image; per-image totals multiply by the UNet evaluations the sampler made
per image. Under a T schedule (T per denoising step) the SNN's figures per denoising step are means over the
steps of the run, and ``mean_timesteps`` is the mean T they cost; the ANN makes one forward per denoising step
whatever T, so the SNN / ANN ratio compares the run's mean SNN step with one ANN forward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .accounting import COMPENSATION_OPS, GROUPNORM_OPS, SOFTMAX_OPS, Accounting

OP_CLASSES = (
    "AC: spike-driven conv / linear",
    "MAC: conv / linear on real inputs",
    "MAC: attention products + softmax",
    "MAC: GroupNorm + compensation",
)
"""The four kinds of work the energy breakdown is split into."""


@dataclass(frozen=True)
class EnergyModel:
    """Energy per operation, in picojoules (defaults: 45 nm CMOS, Horowitz 2014)."""

    mac_pj: float = 4.6
    ac_pj: float = 0.9

    def energy_pj(self, macs: float, acs: float) -> float:
        """Energy in pJ of ``macs`` multiply-accumulates and ``acs`` accumulates."""
        return self.mac_pj * macs + self.ac_pj * acs


@dataclass
class LayerRow:
    """One operation of one module, per denoising step per image; ``ann_macs`` is the ANN's count for the
    same operation (0 where the ANN has none, e.g. compensation)."""

    name: str
    op: str
    spike_driven: bool
    firing_rate: float | None
    acs: float
    macs: float
    ann_macs: float
    energy_pj: float
    ann_energy_pj: float

    @property
    def op_class(self) -> str:
        """Which of the :data:`OP_CLASSES` this row's work belongs to."""
        if self.spike_driven:
            return OP_CLASSES[0]
        if self.op in ("attention matmul", "softmax"):
            return OP_CLASSES[2]
        if self.op in ("groupnorm", "compensation"):
            return OP_CLASSES[3]
        return OP_CLASSES[1]


@dataclass
class EnergyReport:
    """SNN against ANN, per denoising step per image unless a name says otherwise. ``timesteps`` is the T of
    the run, or the text form of its T schedule (``"4,16x3"``); ``mean_timesteps`` the mean T per denoising
    step (T itself without a schedule). ``delta_spikes``: the spike-driven layers were counted with delta
    spikes (changes from the previous UNet evaluation)."""

    rows: list[LayerRow]
    site_rates: dict[str, float]
    timesteps: int | str
    unet_evaluations_per_image: float
    energy_model: EnergyModel
    mean_timesteps: float | None = None
    delta_spikes: bool = False

    def __post_init__(self) -> None:
        if self.mean_timesteps is None:
            self.mean_timesteps = float(self.timesteps)

    @property
    def snn_acs(self) -> float:
        return sum(row.acs for row in self.rows)

    @property
    def snn_macs(self) -> float:
        return sum(row.macs for row in self.rows)

    @property
    def ann_macs(self) -> float:
        return sum(row.ann_macs for row in self.rows)

    @property
    def snn_energy_pj(self) -> float:
        return self.energy_model.energy_pj(self.snn_macs, self.snn_acs)

    @property
    def ann_energy_pj(self) -> float:
        return self.energy_model.energy_pj(self.ann_macs, 0)

    @property
    def energy_ratio(self) -> float:
        """SNN energy / ANN energy."""
        return self.snn_energy_pj / self.ann_energy_pj

    @property
    def spike_driven_fraction(self) -> float:
        """ACs / (ACs + MACs) over every counted operation: the share of the SNN's work driven by spikes."""
        total = self.snn_acs + self.snn_macs
        return self.snn_acs / total if total else 0.0

    @property
    def weight_layer_spike_fraction(self) -> float:
        """The same share over the weight layers alone (convolutions and linear layers)."""
        weight_macs = sum(row.macs for row in self.rows if row.op_class == OP_CLASSES[1])
        total = self.snn_acs + weight_macs
        return self.snn_acs / total if total else 0.0

    @property
    def mean_firing_rate(self) -> float:
        """Spikes per neuron per time step, averaged over the inputs of the spike-driven layers."""
        rates = [row.firing_rate for row in self.rows if row.firing_rate is not None]
        return sum(rates) / len(rates) if rates else 0.0

    def breakdown_pj(self) -> dict[str, tuple[float, float]]:
        """Energy per operation class: ``{class: (snn_pj, ann_pj)}``."""
        parts = {name: [0.0, 0.0] for name in OP_CLASSES}
        for row in self.rows:
            parts[row.op_class][0] += row.energy_pj
            ann_class = OP_CLASSES[1] if row.op_class == OP_CLASSES[0] else row.op_class
            parts[ann_class][1] += row.ann_energy_pj
        return {name: (snn, ann) for name, (snn, ann) in parts.items()}

    def totals(self) -> dict[str, float]:
        """The totals per denoising step and per image, the SNN / ANN ratio and the spike-driven shares."""
        per_image = self.unet_evaluations_per_image
        return {
            "timesteps": self.timesteps,
            "mean_timesteps_per_step": self.mean_timesteps,
            "unet_evaluations_per_image": per_image,
            "snn_acs_per_step": self.snn_acs,
            "snn_macs_per_step": self.snn_macs,
            "ann_macs_per_step": self.ann_macs,
            "snn_energy_mj_per_step": self.snn_energy_pj * 1e-9,
            "ann_energy_mj_per_step": self.ann_energy_pj * 1e-9,
            "snn_energy_mj_per_image": self.snn_energy_pj * per_image * 1e-9,
            "ann_energy_mj_per_image": self.ann_energy_pj * per_image * 1e-9,
            "energy_ratio_snn_over_ann": self.energy_ratio,
            "spike_driven_fraction": self.spike_driven_fraction,
            "weight_layer_spike_driven_fraction": self.weight_layer_spike_fraction,
            "mean_input_firing_rate": self.mean_firing_rate,
            "delta_spikes": self.delta_spikes,
        }

    def to_dict(self) -> dict:
        """Everything in the report as JSON-able data (the content of ``energy.json`` beside its settings)."""
        return {
            "totals": self.totals(),
            "energy_model_pj": asdict(self.energy_model),
            "mac_equivalents_per_element": {
                "groupnorm": GROUPNORM_OPS,
                "softmax": SOFTMAX_OPS,
                "compensation": COMPENSATION_OPS,
            },
            "breakdown_mj_per_step": {
                name: {"snn": snn * 1e-9, "ann": ann * 1e-9} for name, (snn, ann) in self.breakdown_pj().items()
            },
            "site_firing_rates": self.site_rates,
            "layers": [asdict(row) | {"op_class": row.op_class} for row in self.rows],
        }


def build_report(
    snn: Accounting,
    ann: Accounting,
    timesteps: int | str,
    num_images: int,
    energy_model: EnergyModel | None = None,
    mean_timesteps: float | None = None,
    delta_spikes: bool = False,
) -> EnergyReport:
    """Join the SNN's and the ANN's counts layer by layer, normalised per UNet evaluation per image.

    ``snn`` is measured over a sampling run of ``num_images`` images, ``ann`` over any forward passes (its
    MACs do not depend on the input). ``timesteps`` is the run's T or T schedule (text form), and
    ``mean_timesteps`` its mean T per UNet evaluation (default: ``timesteps``, which must then be an int).
    Each side is divided by its own number of UNet forwards on one sample, never by T: an SNN evaluation
    holds all its T time steps, and the ANN makes one forward per denoising step whatever the schedule.
    """
    energy_model = energy_model or EnergyModel()
    snn_per, ann_per = 1 / snn.sample_forwards, 1 / ann.sample_forwards
    keys = list(snn.layers) + [key for key in ann.layers if key not in snn.layers]
    rows = []
    for key in keys:
        layer, ann_layer = snn.layers.get(key), ann.layers.get(key)
        acs = layer.acs * snn_per if layer else 0.0
        macs = layer.macs * snn_per if layer else 0.0
        ann_macs = ann_layer.macs * ann_per if ann_layer else 0.0
        rows.append(
            LayerRow(
                name=key[0],
                op=key[1],
                spike_driven=bool(layer and layer.spike_driven),
                firing_rate=layer.firing_rate if layer else None,
                acs=acs,
                macs=macs,
                ann_macs=ann_macs,
                energy_pj=energy_model.energy_pj(macs, acs),
                ann_energy_pj=energy_model.energy_pj(ann_macs, 0),
            )
        )
    return EnergyReport(
        rows=rows,
        site_rates={name: rate.firing_rate for name, rate in snn.sites.items()},
        timesteps=timesteps,
        unet_evaluations_per_image=snn.sample_forwards / num_images,
        energy_model=energy_model,
        mean_timesteps=mean_timesteps,
        delta_spikes=delta_spikes,
    )


def format_table(report: EnergyReport, max_rows: int = 40) -> str:
    """The per-layer table as text; beyond ``max_rows`` only the costliest rows (in network order) are kept."""
    keep = {id(row) for row in sorted(report.rows, key=lambda r: -r.energy_pj)[:max_rows]}
    rows = [row for row in report.rows if id(row) in keep]
    hidden = [row for row in report.rows if id(row) not in keep]
    width = max(len(row.name) for row in rows)
    lines = [
        f"{'layer':<{width}}  {'op':<16} {'input':<6} {'rate':>6} {'ACs (M)':>9} {'MACs (M)':>9} "
        f"{'E SNN (uJ)':>10} {'E ANN (uJ)':>10}"
    ]
    for row in rows:
        rate = f"{row.firing_rate:.3f}" if row.firing_rate is not None else "-"
        lines.append(
            f"{row.name:<{width}}  {row.op:<16} {'spikes' if row.spike_driven else 'real':<6} {rate:>6} "
            f"{row.acs / 1e6:>9.3f} {row.macs / 1e6:>9.3f} {row.energy_pj / 1e6:>10.3f} "
            f"{row.ann_energy_pj / 1e6:>10.3f}"
        )
    if hidden:
        share = sum(row.energy_pj for row in hidden) / report.snn_energy_pj
        lines.append(f"... {len(hidden)} cheaper rows not shown ({share:.1%} of the SNN's energy; all in energy.json)")
    return "\n".join(lines)


def format_summary(report: EnergyReport) -> str:
    """Totals, with the spike-driven share of the work first."""
    t = report.totals()
    coding = (
        "delta spikes (changes from the previous UNet evaluation; each layer keeps its T input currents)"
        if report.delta_spikes
        else "every spike sent as fired"
    )
    return "\n".join(
        [
            f"Spike-driven share of operations: {t['spike_driven_fraction']:.1%} of ACs + MACs "
            f"({t['weight_layer_spike_driven_fraction']:.1%} of conv / linear work)",
            f"Spikes counted: {coding}",
            f"Mean input firing rate of spike-driven layers: {t['mean_input_firing_rate']:.3f} spikes / neuron / step",
            f"Per denoising step ({t_description(report)}): SNN {t['snn_acs_per_step'] / 1e6:.2f} M ACs + "
            f"{t['snn_macs_per_step'] / 1e6:.2f} M MACs = {t['snn_energy_mj_per_step']:.4f} mJ; "
            f"ANN {t['ann_macs_per_step'] / 1e6:.2f} M MACs = {t['ann_energy_mj_per_step']:.4f} mJ",
            f"Per image ({t['unet_evaluations_per_image']:g} UNet evaluations): "
            f"SNN {t['snn_energy_mj_per_image']:.3f} mJ, ANN {t['ann_energy_mj_per_image']:.3f} mJ",
            f"SNN / ANN energy: {t['energy_ratio_snn_over_ann']:.2f}",
        ]
    )


def t_description(report: EnergyReport) -> str:
    """``T = 4``, or ``T = 4,16x3, mean T = 5.8`` under a T schedule."""
    if isinstance(report.timesteps, int) and report.mean_timesteps == report.timesteps:
        return f"T = {report.timesteps}"
    return f"T = {report.timesteps}, mean T = {report.mean_timesteps:.4g}"
