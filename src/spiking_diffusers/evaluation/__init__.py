"""Sample-quality evaluation of the ANN, its QCFS network and its spiking network from the same noise."""

from .report import GRID_PNG, REPORT_JSON, REPORT_MD, markdown_report, write_report
from .run import EvaluationConfig, EvaluationResult, evaluate
from .sampling import image_generators, sample_variant
from .variants import Variant, VariantError, prepare_variants

__all__ = [
    "GRID_PNG",
    "REPORT_JSON",
    "REPORT_MD",
    "EvaluationConfig",
    "EvaluationResult",
    "Variant",
    "VariantError",
    "evaluate",
    "image_generators",
    "markdown_report",
    "prepare_variants",
    "sample_variant",
    "write_report",
]
