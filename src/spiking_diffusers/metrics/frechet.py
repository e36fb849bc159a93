"""Fréchet distance between generated images and a fixed real reference set, on a chosen feature extractor.

``d² = |μ₁ - μ₂|² + Tr Σ₁ + Tr Σ₂ - 2 Tr (Σ₁ Σ₂)^½`` over the features of the two sets (any ``nn.Module``
with a ``num_features`` attribute; see :mod:`.features`), the formula of torchmetrics'
``FrechetInceptionDistance`` and of the FID papers. The extractors here take images in ``[-1, 1]``.

The numbers are computed to be as reproducible as the hardware allows:

- every batch is copied to a fresh contiguous tensor before the extractor sees it: MKL and oneDNN kernels
  may round differently with the memory alignment of their input, and images from numpy come at any one;
- the statistics are float64: the mean is a running sum over the samples in their order, the covariance
  the scatter matrix of the centred features (no ``Σ xxᵀ - n μμᵀ`` cancellation), and all float64 linear
  algebra runs on one thread, so neither the thread count nor the batch size changes an addition's order;
- the trace term is the sum of the singular values of ``Aᵀ L`` with ``Σ₁ = AᵀA`` and ``Σ₂ = L Lᵀ``, equal to
  ``Σ √λᵢ(Σ₁Σ₂)`` in exact arithmetic. A singular value moves by no more than the matrix it comes from,
  whereas the square root of an eigenvalue near zero (``d - n + 1`` of them when n samples have d > n - 1
  features) turns a 1e-14 rounding difference into a 1e-7 one;
- the result stays float64 (torchmetrics rounds it to the features' float32, where one step is 1.5e-5 at
  150: a 1e-13 difference could flip it).

What stays machine-dependent is the float32 feature extraction itself: convolution and matrix kernels add
in an order that depends on the CPU's vector width (and on the thread count, unless the extractor sets
``single_thread``, as the small digit classifier does), which changes features in their last bits and the
distance by about 1e-8 relative. The same images on the same machine give the same distance bit for bit
(with Inception features: at the same thread count); across machines or process set-ups it agrees to a
relative 1e-5 (docs/evaluation.md, "Determinism").

The reference side depends only on the real images and the extractor, so its statistics are cached on
disk (:func:`reference_statistics`) and loaded into every metric instead of being recomputed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import check_finite

DEFAULT_BATCH_SIZE = 256
CACHE_FORMAT = "v2"  # v2: float64 mean + centred scatter matrix (v1 held torchmetrics' raw accumulators)


@dataclass
class ReferenceStatistics:
    """Float64 feature statistics of a set: ``mean`` (d), ``scatter`` = Σᵢ (xᵢ - mean)(xᵢ - mean)ᵀ (d x d), count."""

    mean: torch.Tensor
    scatter: torch.Tensor
    count: int

    @property
    def covariance(self) -> torch.Tensor:
        """The unbiased sample covariance, ``scatter / (count - 1)``."""
        return self.scatter / (self.count - 1)

    @classmethod
    def from_features(cls, features: torch.Tensor) -> ReferenceStatistics:
        """Statistics of the rows of ``features`` ``(N, d)``, in float64 and a fixed order of additions."""
        features = features.detach().to("cpu", torch.float64).contiguous()
        check_finite(features, "The features for the Fréchet distance", "the feature extractor overflows.")
        total = torch.zeros(features.shape[1], dtype=torch.float64)
        for row in features:  # a running sum in sample order: no vector width or thread count reorders it
            total += row
        mean = total / len(features)
        centred = features - mean
        with one_thread():
            scatter = centred.T @ centred
        return cls(mean, scatter, len(features))

    @classmethod
    def from_images(
        cls, extractor: nn.Module, images: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> ReferenceStatistics:
        """Statistics of the features of ``images`` (in ``[-1, 1]``) under ``extractor``."""
        return cls.from_features(extract_features(extractor, images, batch_size))

    def save(self, path: str | Path) -> None:
        """Write the statistics to a safetensors file (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # concurrent writers never share a staging file
        tensors = {"mean": self.mean, "scatter": self.scatter, "count": torch.tensor(self.count)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging))
        staging.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStatistics:
        """Read statistics written by :meth:`save`."""
        tensors = load_file(str(path))
        return cls(tensors["mean"], tensors["scatter"], int(tensors["count"]))


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
    name = f"{extractor.fingerprint}-{CACHE_FORMAT}-{digest.hexdigest()[:16]}.safetensors"
    path = Path(cache_dir) / "fd-reference" / name
    if path.is_file():
        try:
            return ReferenceStatistics.load(path)
        except Exception:  # a damaged cache entry is simply rebuilt
            path.unlink(missing_ok=True)
    stats = ReferenceStatistics.from_images(extractor, images)
    stats.save(path)
    return stats


class FrechetDistance:
    """Fréchet distance of image sets to one reference, e.g. ``FrechetDistance(DigitFeatures(), stats)(images)``.

    Under ``accelerate launch`` every process holds all images (the sampling gathers them) and computes the
    same distance; nothing is summed across processes.
    """

    def __init__(
        self, extractor: nn.Module, reference: ReferenceStatistics, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> None:
        _check_extractor(extractor)
        self.extractor = extractor.eval()
        self.batch_size = batch_size
        self.reference = reference
        with one_thread():
            self._reference_factor = _factor(reference.covariance.to(torch.float64))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> float:
        """The distance of ``images`` (``(N, C, H, W)`` in ``[-1, 1]``, N >= 2) to the reference."""
        if len(images) < 2:
            raise ValueError(f"The Fréchet distance needs at least 2 images, got {len(images)}.")
        # NaN features would reach LAPACK, which can crash the process instead of raising.
        check_finite(images, "An image set for the Fréchet distance", "the network that made it overflows.")
        features = extract_features(self.extractor, images, self.batch_size)
        return frechet_distance(ReferenceStatistics.from_features(features), self.reference, features,
                                self._reference_factor)  # fmt: skip


def frechet_distance(
    stats: ReferenceStatistics,
    reference: ReferenceStatistics,
    features: torch.Tensor | None = None,
    reference_factor: torch.Tensor | None = None,
) -> float:
    """``|μ₁ - μ₂|² + Tr Σ₁ + Tr Σ₂ - 2 Tr (Σ₁ Σ₂)^½`` of two sets' statistics, in float64.

    ``features`` (the rows ``stats`` came from) lets a set of n <= d samples use ``Σ₁ = AᵀA`` with the
    n x d centred features ``A`` directly; ``reference_factor`` is ``L`` with ``Σ₂ = L Lᵀ`` when known.
    """
    with one_thread():
        mean_term = (stats.mean.double() - reference.mean.double()).square().sum()
        cov1, cov2 = stats.covariance.double(), reference.covariance.double()
        right = _factor(cov2) if reference_factor is None else reference_factor
        if features is not None and stats.count <= features.shape[1]:
            left = (features.to("cpu", torch.float64) - stats.mean.double()).T / (stats.count - 1) ** 0.5
        else:
            left = _factor(cov1)
        trace_sqrt = torch.linalg.svdvals(left.T @ right).sum()
        return float(mean_term + cov1.trace() + cov2.trace() - 2 * trace_sqrt)


def extract_features(extractor: nn.Module, images: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """The ``(N, num_features)`` features of ``images`` under ``extractor``, as float64 on the CPU."""
    _check_extractor(extractor)
    device = next(extractor.parameters(), torch.empty(0)).device
    chunks = []
    # A small extractor that says so runs on one thread: its float32 sums then add in the same order whatever
    # the process's thread count (a large one, Inception, would be too slow that way).
    threads = one_thread() if getattr(extractor, "single_thread", False) else nullcontext()
    with torch.no_grad(), threads:
        for batch in images.split(batch_size):
            # A fresh contiguous copy: kernels see the same memory layout and alignment in every run.
            batch = batch.to(device, copy=True, memory_format=torch.contiguous_format)
            features = extractor(batch)
            if features.dim() == 1:
                features = features.unsqueeze(0)
            chunks.append(features.detach().to("cpu", torch.float64))
    return torch.cat(chunks)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU kernels (and MKL) on one thread: a matrix product's order of additions then depends on
    neither the process's thread count nor the launcher."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _factor(covariance: torch.Tensor) -> torch.Tensor:
    """``L`` with ``covariance = L Lᵀ``: eigenvectors scaled by the square roots of the eigenvalues.

    Eigenvalues below ``d * eps`` of the largest are rounding noise of zero ones (a singular covariance, a
    feature that is always 0) and count as 0: their square roots (1e-8 from 1e-16) would otherwise add
    to the trace term as spurious singular values.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    cutoff = eigenvalues.abs().max() * len(eigenvalues) * torch.finfo(eigenvalues.dtype).eps
    return eigenvectors * torch.where(eigenvalues > cutoff, eigenvalues, 0).sqrt()


def _check_extractor(extractor: nn.Module) -> None:
    if not isinstance(getattr(extractor, "num_features", None), int):
        raise TypeError("The feature extractor needs an int attribute num_features (see metrics.features).")
