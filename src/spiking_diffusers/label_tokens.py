"""``LabelTokens``: class labels as the ``encoder_hidden_states`` of a cross-attention UNet.

A label-conditional ``UNet2DConditionModel`` needs no text encoder: one learned token per class, plus a null
token (index ``num_classes``) that stands for "no label" and makes classifier-free guidance possible. It is a
pipeline component like a text encoder, saved with ``save_pretrained`` next to the UNet; calibration uses it
too (to sample the model and to condition its inputs), so it sits at the bottom of the layer cake.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class LabelTokens(ModelMixin, ConfigMixin):
    """One learned ``(tokens, dim)`` embedding per class label, and a null one at index ``num_classes``."""

    @register_to_config
    def __init__(self, num_classes: int = 10, dim: int = 32, tokens: int = 1):
        super().__init__()
        self.embedding = nn.Embedding(num_classes + 1, tokens * dim)

    @property
    def null_label(self) -> int:
        """The index of the null (unconditional) token."""
        return int(self.config.num_classes)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """``(B,)`` labels in ``0..num_classes`` (the last is the null label) -> ``(B, tokens, dim)``."""
        if not torch.is_tensor(labels) or labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(f"class_labels must be a 1-d integer tensor, got {labels!r}.")
        if labels.numel() and (labels.min() < 0 or labels.max() > self.null_label):
            raise ValueError(
                f"class_labels must lie in 0..{self.null_label - 1} ({self.config.num_classes} classes; "
                f"{self.null_label} is the null label), got {labels.min().item()}..{labels.max().item()}."
            )
        config = self.config
        return self.embedding(labels.to(self.embedding.weight.device)).reshape(-1, config.tokens, config.dim)

    def unconditional(self, batch: int) -> torch.Tensor:
        """The null tokens for ``batch`` samples (the unconditional branch of classifier-free guidance)."""
        return self(torch.full((batch,), self.null_label, dtype=torch.long))
