"""The small real data set and models that ship with the package.

Everything here runs offline. The data are scikit-learn's 8x8 handwritten digits
(1797 images, bundled with scikit-learn), upsampled to 16x16. Two trained assets
ship inside the package (built by ``scripts/train_digits.py``):

- :data:`SHIPPED_MODEL_PATH`: a diffusers ``DDPMPipeline`` directory holding a small
  unconditional ``UNet2DModel`` (SiLU, GroupNorm, attention) trained on the digits,
  loadable with ``diffusers.DiffusionPipeline.from_pretrained(SHIPPED_MODEL_PATH)``.
- :data:`SHIPPED_CLASSIFIER_PATH`: a :class:`DigitClassifier` whose penultimate
  features serve as the feature extractor for an offline Fréchet distance.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ASSETS_DIR",
    "SHIPPED_CLASSIFIER_PATH",
    "SHIPPED_CONDITIONAL_PATH",
    "SHIPPED_MODEL_PATH",
    "DigitClassifier",
    "load_digit_dataset",
    "load_digit_images",
    "split_indices",
]

ASSETS_DIR: Path = Path(__file__).resolve().parent / "assets"
"""Folder of the assets shipped inside the package."""

# Plain strings, not Paths: diffusers' ``from_pretrained`` accepts only ``str``.
SHIPPED_MODEL_PATH: str = str(ASSETS_DIR / "digits-ddpm")
"""The shipped ``DDPMPipeline`` directory (16x16, 1 channel, 1000-step DDPM scheduler)."""

SHIPPED_CONDITIONAL_PATH: str = str(ASSETS_DIR / "digits-conditional")
"""The shipped label-conditional ``SpikingDiffusionPipeline`` directory (a ``UNet2DConditionModel`` and its
``LabelTokens``; 16x16, 1 channel, classifier-free guidance against the null token)."""

SHIPPED_CLASSIFIER_PATH: str = str(ASSETS_DIR / "digits-classifier")
"""The shipped :class:`DigitClassifier` directory (``config.json`` + ``model.safetensors``)."""

Split = Literal["all", "train", "test"]

TEST_FRACTION: float = 0.2
"""Fraction of each class held out in the ``"test"`` split."""

_CONFIG_NAME = "config.json"
_WEIGHTS_NAME = "model.safetensors"


def _load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The digits data set comes from scikit-learn; install it with `pip install scikit-learn`."
        ) from err
    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.float32), np.asarray(bunch.target, dtype=np.int64)


def split_indices(labels: np.ndarray, split: Split, seed: int = 0, test_fraction: float = TEST_FRACTION) -> np.ndarray:
    """Indices of a deterministic stratified train/test split.

    For every class, its indices are shuffled with ``numpy.random.default_rng(seed)``
    (classes visited in increasing order) and the first ``round(test_fraction * n_class)``
    go to the test split. The returned indices are sorted.
    """
    if split == "all":
        return np.arange(len(labels))
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        test.append(idx[: round(test_fraction * len(idx))])
    test_idx = np.sort(np.concatenate(test))
    if split == "test":
        return test_idx
    mask = np.ones(len(labels), dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask)


def load_digit_dataset(size: int = 16, split: Split = "all", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Digit images and their labels.

    Args:
        size: output height and width. The 8x8 images are resized bilinearly
            (``align_corners=False``; antialiased when ``size < 8``).
        split: ``"all"`` (1797 images), or the ``"train"`` (80 %) / ``"test"`` (20 %)
            part of a stratified split fixed by ``seed`` (see :func:`split_indices`).
        seed: seed of the split.

    Returns:
        ``(images, labels)``: float32 images of shape ``(N, 1, size, size)`` in ``[-1, 1]``
        and int64 labels of shape ``(N,)``.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    images, labels = _load_sklearn_digits()
    idx = split_indices(labels, split, seed)
    x = torch.from_numpy(images[idx]).unsqueeze(1) / 16.0 * 2.0 - 1.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 8)
    return x.clamp_(-1.0, 1.0).contiguous(), torch.from_numpy(labels[idx])


def load_digit_images(size: int = 16, split: Split = "all", seed: int = 0) -> torch.Tensor:
    """Digit images of shape ``(N, 1, size, size)`` in ``[-1, 1]``; see :func:`load_digit_dataset`."""
    return load_digit_dataset(size=size, split=split, seed=seed)[0]


class DigitClassifier(nn.Module):
    """A small CNN for 16x16 digits in ``[-1, 1]``, used as a feature extractor.

    Layout: two stages of (conv3x3-ReLU) x 2 + 2x2 max-pool, with ``channels[i]`` channels
    in stage ``i``; then flatten, a linear layer to ``feature_dim`` with ReLU (the
    features), dropout and a linear layer to ``num_classes`` logits.
    """

    def __init__(
        self,
        image_size: int = 16,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64),
        feature_dim: int = 128,
        num_classes: int = 10,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.config: dict[str, object] = {
            "image_size": int(image_size),
            "in_channels": int(in_channels),
            "channels": [int(c) for c in channels],
            "feature_dim": int(feature_dim),
            "num_classes": int(num_classes),
            "dropout": float(dropout),
        }
        layers: list[nn.Module] = []
        prev = in_channels
        for ch in channels:
            layers += [
                nn.Conv2d(prev, ch, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(ch, ch, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            prev = ch
        self.body = nn.Sequential(*layers)
        spatial = image_size // 2 ** len(channels)
        self.fc = nn.Linear(prev * spatial * spatial, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def feature_dim(self) -> int:
        """Length of the vectors returned by :meth:`features`."""
        return self.fc.out_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, shape ``(N, feature_dim)``, of images ``(N, C, H, W)`` in ``[-1, 1]``."""
        return F.relu(self.fc(self.body(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, shape ``(N, num_classes)``."""
        return self.head(self.dropout(self.features(x)))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Softmax class probabilities (eval mode, batched)."""
        was_training = self.training
        self.eval()
        out = torch.cat([self(b).softmax(-1) for b in x.split(batch_size)])
        self.train(was_training)
        return out

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into the directory ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / _CONFIG_NAME).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / _WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str | Path = SHIPPED_CLASSIFIER_PATH) -> DigitClassifier:
        """Load a classifier saved with :meth:`save_pretrained` (the shipped one by default), in eval mode."""
        from safetensors.torch import load_file

        path = Path(path)
        config = json.loads((path / _CONFIG_NAME).read_text())
        model = cls(**config)
        model.load_state_dict(load_file(str(path / _WEIGHTS_NAME)))
        return model.eval()
