"""spiking-diffusers: pretrained diffusers UNets as QCFS-quantized and integrate-and-fire spiking networks."""

from .converter import (
    QCFSUNet2DModel,
    SpikingUNet2DModel,
    UnsupportedModuleError,
    convert,
    quantize,
)

__version__ = "0.1.0"

__all__ = ["QCFSUNet2DModel", "SpikingUNet2DModel", "UnsupportedModuleError", "convert", "quantize"]
