"""ONNX export of QCFS and spiking UNets, and the functional single-time-step form stateful runtimes need."""

from .onnx_export import OPSET, TOLERANCE, ExportCheck, export_qcfs, export_snn, export_step
from .stepping import SpikingStep

__all__ = ["OPSET", "TOLERANCE", "ExportCheck", "SpikingStep", "export_qcfs", "export_snn", "export_step"]
