"""Feature extractors for the Fréchet distance: the shipped digit classifier, and Inception-v3 for true FID.

Both take images in ``[-1, 1]`` (the range diffusion models sample in), shape ``(N, C, H, W)``, and return
``(N, num_features)``. They carry the two attributes the Fréchet metric relies on:

- ``num_features``: torchmetrics reads it instead of probing the module with a dummy ``3x299x299`` uint8
  image, which the digit classifier could not take;
- ``fingerprint``: a short hash of the weights, so cached reference statistics belong to one extractor.

An optional ``single_thread = True`` asks :func:`.frechet.extract_features` to run the extractor on one
thread, so that its float32 sums add in the same order whatever the thread count (the digit classifier does).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch
from torch import nn

from ..digits import SHIPPED_CLASSIFIER_PATH, DigitClassifier


class FeatureExtractorError(ValueError):
    """The images do not fit the feature extractor, or the extractor cannot be built; the message says why."""


def _state_fingerprint(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class DigitFeatures(nn.Module):
    """The shipped digit classifier's 128 penultimate features, for 1-channel 16x16 images in ``[-1, 1]``.

    A 16x16 digit carries too little for Inception features to mean much; a classifier trained on these
    very digits (held-out accuracy in its ``training.json``) measures whether samples look like digits.
    """

    def __init__(self, path: str | Path = SHIPPED_CLASSIFIER_PATH) -> None:
        super().__init__()
        self.classifier = DigitClassifier.from_pretrained(path).requires_grad_(False)
        self.num_features: int = self.classifier.feature_dim
        # Small enough to run on one thread: the Fréchet distance then does not depend on the thread count.
        self.single_thread: bool = True
        self.fingerprint: str = "digits-" + _state_fingerprint(self.classifier)
        config = self.classifier.config
        self.input_shape: tuple[int, int, int] = (config["in_channels"], config["image_size"], config["image_size"])

    def train(self, mode: bool = True) -> DigitFeatures:
        """Stay in eval mode (dropout off) whatever the caller asks: features must be deterministic."""
        return super().train(False)

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise :class:`FeatureExtractorError` unless images of ``(C, H, W)`` ``shape`` fit the classifier."""
        if tuple(shape) != self.input_shape:
            want = "x".join(map(str, self.input_shape))
            raise FeatureExtractorError(
                f"The digit-classifier Fréchet distance needs {want} images; these are {'x'.join(map(str, shape))}. "
                "Pass --inception-weights PATH (and --real-images DIR) for FID with Inception features."
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.check_shape(tuple(images.shape[1:]))
        return self.classifier.features(images.float())


class InceptionFeatures(nn.Module):
    """Inception-v3 pool features (2048) as in the standard FID, from a local weights file.

    The network is torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's TensorFlow-compatible port), so
    the numbers are those of ``FrechetInceptionDistance(feature=2048)``. The weights file is torch-fidelity's
    ``weights-inception-2015-12-05-6726825d.pth``; it is read from ``weights_path``, never downloaded.
    Images in ``[-1, 1]`` become uint8 RGB (grayscale is repeated over three channels); the network resizes
    them to 299x299 itself.
    """

    def __init__(self, weights_path: str | Path) -> None:
        super().__init__()
        weights_path = Path(weights_path)
        if not weights_path.is_file():
            raise FeatureExtractorError(f"Inception weights file not found: {weights_path}.")
        if importlib.util.find_spec("torch_fidelity") is None:
            raise FeatureExtractorError(
                "FID with Inception features needs torch-fidelity, which torchmetrics uses for the network: "
                "pip install torch-fidelity"
            )
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.inception = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights_path)
        )
        self.num_features: int = 2048
        self.fingerprint: str = "inception-" + _file_fingerprint(weights_path)

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise :class:`FeatureExtractorError` unless the images are grayscale or RGB."""
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise FeatureExtractorError(f"Inception features need 1- or 3-channel images; got shape {tuple(shape)}.")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.check_shape(tuple(images.shape[1:]))
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        return self.inception(pixels)


def _file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
