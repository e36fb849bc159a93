"""Conditional accuracy: does a conditional model draw the class it is asked for?

The share of samples that the shipped digit classifier assigns to their requested label. It is the
class-conditional counterpart of the Fréchet distance: a spiking network can keep the FD of its ANN and still
draw the wrong digit for a label, which only this catches.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..digits import SHIPPED_CLASSIFIER_PATH, DigitClassifier


class ConditionalAccuracy:
    """The shipped digit classifier as a judge of labelled 1x16x16 samples in ``[-1, 1]``."""

    def __init__(self, path: str | Path = SHIPPED_CLASSIFIER_PATH) -> None:
        self.classifier = DigitClassifier.from_pretrained(path).requires_grad_(False).eval()
        config = self.classifier.config
        self.num_classes = int(config["num_classes"])
        self.input_shape = (int(config["in_channels"]), int(config["image_size"]), int(config["image_size"]))

    def applies(self, image_shape: tuple[int, ...], num_classes: int) -> bool:
        """Whether the classifier can judge ``(C, H, W)`` images of a model with ``num_classes`` labels."""
        return tuple(image_shape) == self.input_shape and num_classes == self.num_classes

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """The share of ``images`` whose predicted class is their label in ``labels``."""
        if images.shape[1:] != self.input_shape or len(images) != len(labels):
            raise ValueError(
                f"expected one label per {'x'.join(map(str, self.input_shape))} image, got images "
                f"{tuple(images.shape)} and {len(labels)} labels."
            )
        predicted = self.classifier.predict_proba(images.float().cpu()).argmax(-1)
        return float((predicted == labels.cpu()).float().mean())
