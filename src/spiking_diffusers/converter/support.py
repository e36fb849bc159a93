"""What the converter supports, and the checks that refuse everything else by name.

Two checks run on every model before quantization. The structural check walks the module tree: every
module must have a handler in the block registry (:mod:`~spiking_diffusers.converter.blocks`): linear per
sample (convolutions, linear layers, resampling), a handled non-linear op (GroupNorm, attention), or a
known block whose activation call sites the handler lists. The functional check runs one forward pass and intercepts
every call of a non-linear torch function: one made outside a handled op means a block computes an
activation that no unit can replace (e.g. ``F.silu`` called inside a forward), and is reported.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import blocks  # noqa: F401  (registers the handlers of the diffusers blocks)
from .qcfs import QCFSActivation
from .registry import UnsupportedModuleError, handler_for, has_role, registered
from .sites import CallSiteRouter, iter_site_specs

__all__ = ["UnsupportedModuleError", "check_functional_activations", "check_structure", "supported_summary"]


# Functions that are not linear in their input. A call outside a handled op is an unconvertible activation.
_NONLINEAR_FUNCTIONS = {
    F.silu, F.gelu, F.mish, F.relu, F.relu6, F.elu, F.selu, F.celu, F.leaky_relu, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.logsigmoid, F.tanhshrink, F.sigmoid, F.tanh,
    F.softmax, F.log_softmax, F.scaled_dot_product_attention, F.group_norm, F.layer_norm, F.batch_norm,
    F.instance_norm, F.glu, torch.sigmoid, torch.tanh, torch.softmax, torch.relu, torch.erf,
    torch.Tensor.sigmoid, torch.Tensor.tanh, torch.Tensor.softmax, torch.Tensor.relu, torch.Tensor.erf,
}  # fmt: skip


def supported_summary() -> str:
    """A one-line list of the supported block types, for error messages."""
    return ", ".join(sorted(cls.__name__ for cls in registered("block")))


def check_structure(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModuleError` naming the first module the converter cannot handle."""
    if not has_role(model, "model"):
        supported = ", ".join(cls.__name__ for cls in registered("model"))
        raise UnsupportedModuleError(
            f"Only diffusers {supported} are supported, got {type(model).__name__}. Subclasses with their own "
            "forward and other architectures are not."
        )
    call_sites = {f"{parent}.{spec.activation}".lstrip(".") for parent, _, spec in iter_site_specs(model)}
    handled_inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in handled_inside):
            continue
        if isinstance(module, (QCFSActivation, CallSiteRouter)):
            handled_inside.append(name)
            continue
        handler = handler_for(module)
        if handler is None:
            raise UnsupportedModuleError(
                f"Module `{name}` ({type(module).__name__}) is not supported by the spiking converter. "
                f"Supported blocks: {supported_summary()}."
            )
        if handler.check is not None:
            handler.check(name, module)
        if handler.role == "nonlinear":
            handled_inside.append(name)
        elif handler.role == "activation" and name not in call_sites:
            parent_name = name.rsplit(".", 1)[0] if "." in name else ""
            raise UnsupportedModuleError(
                f"Activation `{name}` ({type(module).__name__}) in {type(model.get_submodule(parent_name)).__name__}"
                " is not a known call site; the converter will not leave it analog silently."
            )


class _FunctionalActivationProbe(TorchFunctionMode):
    """Records non-linear torch functions called outside the ops that are allowed to call them."""

    def __init__(self, stack: list[tuple[str, nn.Module]]):
        super().__init__()
        self.stack = stack
        self.violations: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _NONLINEAR_FUNCTIONS and not self._inside_handled_op():
            where = self.stack[-1][0] if self.stack else "<model>"
            self.violations.append((where or "<model>", getattr(func, "__name__", str(func))))
        return func(*args, **(kwargs or {}))

    def _inside_handled_op(self) -> bool:
        return any(has_role(module, "nonlinear") or isinstance(module, QCFSActivation) for _, module in self.stack)


def _push(stack: list, name: str, module: nn.Module) -> None:
    stack.append((name, module))


def _pop(stack: list) -> None:
    stack.pop()


@contextlib.contextmanager
def _module_stack(model: nn.Module):
    stack: list[tuple[str, nn.Module]] = []
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: _push(stack, name, m)))
        handles.append(module.register_forward_hook(lambda m, a, o: _pop(stack)))
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def check_functional_activations(model: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, **kwargs) -> None:
    """Run one forward and raise if a non-linear function is called where no unit can replace it."""
    with _module_stack(model) as stack, torch.no_grad():
        probe = _FunctionalActivationProbe(stack)
        with probe:
            model(sample, timestep, **kwargs)
    if probe.violations:
        where, func = probe.violations[0]
        more = f" (and {len(probe.violations) - 1} more calls)" if len(probe.violations) > 1 else ""
        raise UnsupportedModuleError(
            f"Module `{where}` calls the non-linear function `{func}` directly{more}; it cannot be "
            "replaced by a QCFS unit or spiking neuron, so the model cannot be converted."
        )
