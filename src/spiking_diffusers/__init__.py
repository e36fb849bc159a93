"""spiking-diffusers: pretrained diffusers UNets as QCFS-quantized and integrate-and-fire spiking networks."""

from .calibration import CalibrationConfig, calibrate
from .converter import (
    QCFSUNet2DConditionModel,
    QCFSUNet2DModel,
    SpikingUNet2DConditionModel,
    SpikingUNet2DModel,
    UnsupportedModuleError,
    convert,
    quantize,
)
from .label_tokens import LabelTokens
from .pipelines import SpikingDiffusionPipeline

__version__ = "0.1.0"

__all__ = [
    "CalibrationConfig",
    "LabelTokens",
    "QCFSUNet2DConditionModel",
    "QCFSUNet2DModel",
    "SpikingDiffusionPipeline",
    "SpikingUNet2DConditionModel",
    "SpikingUNet2DModel",
    "UnsupportedModuleError",
    "calibrate",
    "convert",
    "quantize",
]
