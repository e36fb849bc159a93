"""QCFS quantization of diffusers UNets and their conversion into integrate-and-fire spiking networks."""

from .convert import convert
from .models import QCFSUNet2DConditionModel, QCFSUNet2DModel, SpikingUNet2DConditionModel, SpikingUNet2DModel
from .neurons import IFNeuron
from .qcfs import QCFSActivation, qcfs
from .quantize import quantize
from .support import UnsupportedModuleError
from .temporal import TemporalOp

__all__ = [
    "IFNeuron",
    "QCFSActivation",
    "QCFSUNet2DConditionModel",
    "QCFSUNet2DModel",
    "SpikingUNet2DConditionModel",
    "SpikingUNet2DModel",
    "TemporalOp",
    "UnsupportedModuleError",
    "convert",
    "qcfs",
    "quantize",
]
