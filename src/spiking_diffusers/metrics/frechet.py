"""Fréchet distance between generated images and a fixed real reference set, on a chosen feature extractor.

The distance itself is torchmetrics' ``FrechetInceptionDistance`` with a custom feature module (any
``nn.Module`` with a ``num_features`` attribute; see :mod:`.features`). torchmetrics accumulates, per set,
the feature sum, the sum of outer products and the count in float64, and takes the matrix square root
through the eigenvalues of ``S1 @ S2``. With a custom module it passes the images to the module untouched
(its ``normalize`` flag then only picks the dtype of a dummy probe, which ``num_features`` makes
unnecessary), so the extractors here take images in ``[-1, 1]`` directly.

The reference side depends only on the real images and the extractor, so its three accumulators are
cached on disk (:func:`reference_statistics`) and loaded into every metric instead of being recomputed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from ..errors import check_finite

DEFAULT_BATCH_SIZE = 256


@dataclass
class ReferenceStatistics:
    """torchmetrics' accumulators for the real side: feature sum, sum of outer products, sample count."""

    feature_sum: torch.Tensor
    outer_sum: torch.Tensor
    count: int

    @classmethod
    @torch.no_grad()
    def from_images(
        cls, extractor: nn.Module, images: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> ReferenceStatistics:
        """Accumulate the statistics of ``images`` (in ``[-1, 1]``) through ``extractor``."""
        metric = _metric(extractor)
        _update(metric, images, real=True, batch_size=batch_size)
        return cls(
            metric.real_features_sum.detach().cpu(),
            metric.real_features_cov_sum.detach().cpu(),
            int(metric.real_features_num_samples),
        )

    def save(self, path: str | Path) -> None:
        """Write the statistics to a safetensors file (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # concurrent writers never share a staging file
        tensors = {"feature_sum": self.feature_sum, "outer_sum": self.outer_sum, "count": torch.tensor(self.count)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging))
        staging.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStatistics:
        """Read statistics written by :meth:`save`."""
        tensors = load_file(str(path))
        return cls(tensors["feature_sum"], tensors["outer_sum"], int(tensors["count"]))


def reference_statistics(
    extractor: nn.Module, images: torch.Tensor, cache_dir: str | Path | None = None
) -> ReferenceStatistics:
    """Statistics of the real ``images`` under ``extractor``, cached in ``cache_dir`` when it is given.

    The cache key hashes the extractor's ``fingerprint`` and the image tensor itself, so a different
    classifier, weights file, reference set or image size never reuses a stale entry.
    """
    if cache_dir is None:
        return ReferenceStatistics.from_images(extractor, images)
    digest = hashlib.sha256(extractor.fingerprint.encode())
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.detach().float().cpu().contiguous().numpy().tobytes())
    path = Path(cache_dir) / "fd-reference" / f"{extractor.fingerprint}-{digest.hexdigest()[:16]}.safetensors"
    if path.is_file():
        try:
            return ReferenceStatistics.load(path)
        except Exception:  # a damaged cache entry is simply rebuilt
            path.unlink(missing_ok=True)
    stats = ReferenceStatistics.from_images(extractor, images)
    stats.save(path)
    return stats


class FrechetDistance:
    """Fréchet distance of image sets to one reference, e.g. ``FrechetDistance(DigitFeatures(), stats)(images)``."""

    def __init__(
        self, extractor: nn.Module, reference: ReferenceStatistics, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> None:
        self.batch_size = batch_size
        self.metric = _metric(extractor)
        device = self.metric.real_features_sum.device
        self.metric.real_features_sum = reference.feature_sum.to(device, torch.float64)
        self.metric.real_features_cov_sum = reference.outer_sum.to(device, torch.float64)
        self.metric.real_features_num_samples = torch.tensor(reference.count, device=device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> float:
        """The distance of ``images`` (``(N, C, H, W)`` in ``[-1, 1]``, N >= 2) to the reference."""
        if len(images) < 2:
            raise ValueError(f"The Fréchet distance needs at least 2 images, got {len(images)}.")
        # NaN features would reach LAPACK's eigen-solver inside torchmetrics, which can crash the process.
        check_finite(images, "An image set for the Fréchet distance", "the network that made it overflows.")
        self.metric.reset()  # keeps the reference: reset_real_features=False
        _update(self.metric, images, real=False, batch_size=self.batch_size)
        return float(self.metric.compute())


def _metric(extractor: nn.Module) -> FrechetInceptionDistance:
    if not isinstance(getattr(extractor, "num_features", None), int):
        raise TypeError("The feature extractor needs an int attribute num_features (see metrics.features).")
    device = next(extractor.parameters(), torch.empty(0)).device
    # No sync on compute: under accelerate launch every process holds all images (gathered by the sampling),
    # and torchmetrics would otherwise add up the processes' accumulators, changing the covariance's n - 1.
    metric = FrechetInceptionDistance(
        feature=extractor.eval(), reset_real_features=False, normalize=True, sync_on_compute=False
    )
    return metric.to(device)


def _update(metric: FrechetInceptionDistance, images: torch.Tensor, real: bool, batch_size: int) -> None:
    device = metric.real_features_sum.device
    for batch in images.split(batch_size):
        metric.update(batch.to(device), real=real)
