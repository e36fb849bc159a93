"""Calibration of class-label conditional UNets: which label each calibration input carries.

The calibration images of a conditional UNet are its own samples, drawn label by label (``0, 1, ..., 0, ...``).
Every noised input built from an image carries that image's label, except that a cross-attention UNet with
``LabelTokens`` gets the null label on a :data:`NULL_SHARE` of its inputs: classifier-free guidance runs the
unconditional branch at every denoising step, as often as the conditional one, so distillation sees both
as often. A class-embedding ``UNet2DModel`` (``num_class_embeds``) takes the labels as ``class_labels``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from ..label_tokens import LabelTokens

NULL_SHARE = 0.5
"""Share of a guided UNet's calibration inputs that carry the null label (see the module docstring)."""


@dataclass(frozen=True)
class LabelConditioning:
    """How class labels reach the UNet (``encode``: labels to forward keyword arguments) and which label,
    if any, is the null (unconditional) one; ``fingerprint`` identifies the encoding for caches."""

    num_classes: int
    encode: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    null_label: int | None
    fingerprint: str

    def pool_labels(self, count: int) -> torch.Tensor:
        """The labels of ``count`` calibration images, sampled label by label."""
        return torch.arange(count) % self.num_classes

    def input_labels(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``labels`` with a :data:`NULL_SHARE` of them (drawn with ``generator``) set to the null label."""
        if self.null_label is None:
            return labels
        dropped = torch.rand(len(labels), generator=generator) < NULL_SHARE
        return labels.masked_fill(dropped, self.null_label)

    @torch.no_grad()
    def kwargs(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The UNet's conditioning keyword arguments for ``labels`` (one per input)."""
        return self.encode(labels)


def label_conditioning(unet: nn.Module, label_tokens: LabelTokens | None) -> LabelConditioning | None:
    """The conditioning calibration gives ``unet``'s inputs (``None`` for an unconditional UNet); an
    :class:`~spiking_diffusers.errors.InputError` for a conditional UNet it cannot condition."""
    config = unet.config
    width = config.get("cross_attention_dim")
    if width is not None:
        if label_tokens is None:
            raise InputError(
                f"{type(unet).__name__} is a cross-attention UNet: calibrating it needs its LabelTokens "
                "(label_tokens=); text-conditioned UNets (prompts) cannot be calibrated yet."
            )
        if label_tokens.config.dim != width:
            raise InputError(
                f"label_tokens have width {label_tokens.config.dim}, but the UNet's cross_attention_dim is {width}."
            )
        digest = hashlib.sha256()
        for tensor in label_tokens.state_dict().values():
            digest.update(tensor.detach().float().cpu().numpy().tobytes())

        def encode(labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"encoder_hidden_states": label_tokens(labels)}

        return LabelConditioning(
            label_tokens.config.num_classes, encode, label_tokens.null_label, f"tokens-{digest.hexdigest()[:12]}"
        )
    if label_tokens is not None:
        raise InputError(f"label_tokens apply to cross-attention UNets; {type(unet).__name__} has none.")
    embed_type, num_classes = config.get("class_embed_type"), config.get("num_class_embeds")
    if embed_type is None and num_classes:
        return LabelConditioning(int(num_classes), lambda labels: {"class_labels": labels}, None, "class-labels")
    if embed_type is not None:
        raise InputError(f"Calibrating a UNet with class_embed_type={embed_type!r} is not supported.")
    return None
