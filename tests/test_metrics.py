"""The offline quality metrics on data with known answers: Fréchet distance, paired PSNR, noise-prediction error."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
from diffusers import DDPMScheduler
from torch import nn

from spiking_diffusers.digits import load_digit_images
from spiking_diffusers.metrics import (
    DigitFeatures,
    FeatureExtractorError,
    FrechetDistance,
    InceptionFeatures,
    ReferenceStatistics,
    extract_features,
    frechet_distance,
    noise_prediction_errors,
    noised_inputs,
    paired_psnr,
    predict_noise,
    reference_statistics,
    relative_error,
)


class Identity(nn.Module):
    """Features = the input rows themselves, so distributions can be set directly."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.fingerprint = f"identity-{num_features}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def whitened(n: int, d: int, seed: int) -> torch.Tensor:
    """n samples whose empirical mean is exactly 0 and empirical covariance exactly the identity."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - x.mean(0)
    cov = x.T @ x / (n - 1)
    return x @ torch.linalg.inv(torch.linalg.cholesky(cov)).T


def fd(reference: torch.Tensor, samples: torch.Tensor) -> float:
    extractor = Identity(reference.shape[1])
    return FrechetDistance(extractor, ReferenceStatistics.from_images(extractor, reference))(samples)


def test_identical_sets_give_zero() -> None:
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(fd(x, x)) < 1e-6


def test_shifted_identity_gaussians_give_the_squared_mean_shift() -> None:
    a, b = whitened(400, 5, seed=1), whitened(300, 5, seed=2)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    assert fd(a, b + shift) == pytest.approx(float(shift.square().sum()), rel=1e-5)  # 14.25


def test_scaled_isotropic_gaussians_give_the_closed_form() -> None:
    # N(0, s1^2 I) vs N(0, s2^2 I) in d dimensions: d * (s1 - s2)^2
    d, s1, s2 = 4, 1.0, 3.0
    assert fd(s1 * whitened(400, d, 3), s2 * whitened(400, d, 4)) == pytest.approx(d * (s1 - s2) ** 2, rel=1e-5)


def test_general_gaussians_match_the_formula_with_scipy_sqrtm() -> None:
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(600, 4, generator=gen, dtype=torch.float64) @ torch.randn(4, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(500, 4, generator=gen, dtype=torch.float64) * torch.tensor([0.5, 1.0, 2.0, 1.5]) + 0.7
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert fd(a, b) == pytest.approx(expected, rel=1e-4)


def test_fewer_than_two_images_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        fd(torch.randn(10, 3), torch.randn(1, 3))


def test_fewer_samples_than_features_use_the_samples_directly() -> None:
    # n - 1 < d: the set's covariance is singular; the trace term comes from the n x d centred features, and
    # agrees with the route through the covariance's own factor (what n > d samples take).
    gen = torch.Generator().manual_seed(6)
    reference = ReferenceStatistics.from_features(torch.randn(300, 12, generator=gen, dtype=torch.float64))
    features = torch.randn(5, 12, generator=gen, dtype=torch.float64) * 2 + 1
    stats = ReferenceStatistics.from_features(features)
    direct = frechet_distance(stats, reference, features)
    assert direct == pytest.approx(frechet_distance(stats, reference), rel=1e-10)
    mu1, mu2 = stats.mean.numpy(), reference.mean.numpy()
    s1, s2 = stats.covariance.numpy(), reference.covariance.numpy()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert direct == pytest.approx(expected, rel=1e-4)


def test_distance_is_bit_identical_for_any_batch_size_and_thread_count() -> None:
    # With features equal to the inputs, only the statistics and the linear algebra could reorder additions:
    # the running mean, the one-thread float64 products and the fixed input layout leave nothing to change.
    gen = torch.Generator().manual_seed(7)
    reference, samples = torch.rand(200, 16, generator=gen), torch.rand(40, 16, generator=gen)
    extractor = Identity(16)
    stats = ReferenceStatistics.from_images(extractor, reference, batch_size=7)
    assert torch.equal(stats.scatter, ReferenceStatistics.from_images(extractor, reference).scatter)
    previous = torch.get_num_threads()
    try:
        distances = set()
        for threads, batch_size in ((1, 3), (2, 256), (1, 40)):
            torch.set_num_threads(threads)
            distances.add(FrechetDistance(extractor, stats, batch_size=batch_size)(samples))
    finally:
        torch.set_num_threads(previous)
    assert len(distances) == 1


def test_digit_distance_is_bit_identical_for_any_thread_count() -> None:
    # The digit classifier runs on one thread whatever the caller's setting, so its float32 features, and the
    # distance, do not depend on the thread count (on one machine; another CPU may still round differently).
    extractor, real = DigitFeatures(), load_digit_images()
    previous = torch.get_num_threads()
    try:
        distances = set()
        for threads in (1, 2):
            torch.set_num_threads(threads)
            distances.add(FrechetDistance(extractor, ReferenceStatistics.from_images(extractor, real))(real[:40]))
    finally:
        torch.set_num_threads(previous)
    assert len(distances) == 1


def test_float32_rounding_of_features_moves_the_distance_far_less_than_the_tests_tolerance() -> None:
    """The scale-out and determinism tests compare distances from different thread/process set-ups with a
    relative 1e-5: the float32 features may then differ in their last bits (the kernels' order of additions
    depends on the CPU and the thread count). A few float32 steps on every feature move the distance by
    ~1e-8 relative, for fewer samples than features (n = 5, as in the tests' sweeps) as for more."""
    extractor = DigitFeatures()
    real = load_digit_images()
    reference = ReferenceStatistics.from_images(extractor, real)
    noisy = (real[:300] + 0.3 * torch.randn(real[:300].shape, generator=torch.Generator().manual_seed(8))).clamp(-1, 1)
    for n in (5, 300):
        features = extract_features(extractor, noisy[:n]).float()
        distances = []
        for seed in range(4):
            steps = torch.randint(-3, 4, features.shape, generator=torch.Generator().manual_seed(seed))
            moved = (features.double() * (1 + steps * 2.0**-24)).float()  # up to 3 float32 steps
            distances.append(frechet_distance(ReferenceStatistics.from_features(moved), reference, moved.double()))
        assert max(distances) / min(distances) - 1 < 1e-6, n
    # while one image of five replaced by another digit moves it by far more than 1e-5
    five = noisy[:5]
    other = torch.cat([five[:4], real[500:501]])
    frechet = FrechetDistance(extractor, reference)
    assert abs(frechet(other) / frechet(five) - 1) > 1e-3


def test_digit_features_real_digits_against_themselves() -> None:
    extractor = DigitFeatures()
    real = load_digit_images()
    frechet = FrechetDistance(extractor, reference_statistics(extractor, real))
    assert abs(frechet(real)) < 1e-3
    assert frechet(real[:900]) < frechet(torch.rand_like(real[:900]) * 2 - 1)  # noise is far from digits


def test_digit_features_are_deterministic_and_refuse_other_shapes() -> None:
    extractor = DigitFeatures().train()  # stays in eval mode: dropout would make features random
    x = load_digit_images()[:8]
    assert torch.equal(extractor(x), extractor(x))
    assert extractor(x).shape == (8, extractor.num_features)
    with pytest.raises(FeatureExtractorError, match=r"1x16x16.*--inception-weights"):
        extractor(torch.zeros(2, 3, 32, 32))


def test_reference_statistics_are_cached_per_extractor_and_images(tmp_path, monkeypatch) -> None:
    extractor, images = Identity(3), torch.randn(50, 3)
    first = reference_statistics(extractor, images, cache_dir=tmp_path)
    assert len(list((tmp_path / "fd-reference").iterdir())) == 1

    def fail(*args, **kwargs):
        raise AssertionError("recomputed instead of read from the cache")

    monkeypatch.setattr(ReferenceStatistics, "from_images", fail)
    cached = reference_statistics(extractor, images, cache_dir=tmp_path)
    assert torch.equal(cached.scatter, first.scatter) and cached.count == 50
    monkeypatch.undo()
    reference_statistics(extractor, images[:40], cache_dir=tmp_path)  # other images: another entry
    assert len(list((tmp_path / "fd-reference").iterdir())) == 2


def test_inception_features_explain_what_is_missing(tmp_path, monkeypatch) -> None:
    with pytest.raises(FeatureExtractorError, match="not found"):
        InceptionFeatures(tmp_path / "missing.pth")
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FeatureExtractorError, match="pip install torch-fidelity"):
        InceptionFeatures(weights)


def test_inception_features_from_a_local_weights_file(tmp_path, monkeypatch) -> None:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as err:  # ImportError, or torchvision's RuntimeError when its ops do not fit this torch
        pytest.skip(
            f"torch-fidelity unusable here ({type(err).__name__}: {str(err)[:80]}). It needs a torchvision built for "
            "the installed torch; PyPI's Linux torchvision wheels need CUDA torch, so a CPU-only torch setup "
            "(the Makefile's) skips this. With a matching torchvision: pip install -e '.[metrics]'."
        )

    # A weights file of the real layout with random values stands in for the real one: nothing is downloaded.
    with monkeypatch.context() as patch:
        patch.setattr(torch, "load", lambda *args, **kwargs: {})
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    weights = tmp_path / "inception.pth"
    torch.save(network.state_dict(), weights)

    extractor = InceptionFeatures(weights)
    digits = load_digit_images()[:4]
    features = extractor(digits)
    assert features.shape == (4, 2048) and torch.isfinite(features).all()
    assert extractor.fingerprint.startswith("inception-")
    frechet = FrechetDistance(extractor, ReferenceStatistics.from_images(extractor, digits))
    assert abs(frechet(digits)) < 1e-3


def test_psnr_known_values() -> None:
    x = torch.rand(3, 1, 4, 4) * 1.6 - 0.8
    psnr = paired_psnr(x + 0.2, x)  # [-1, 1] images: range 2, MSE 0.04 -> 10 log10(4 / 0.04) = 20 dB
    assert torch.allclose(psnr, torch.full((3,), 20.0, dtype=torch.float64))
    assert paired_psnr(x[:1] + 0.1, x[:1], data_range=1.0).item() == pytest.approx(20.0)
    assert paired_psnr(x, x).isinf().all()
    with pytest.raises(ValueError, match="differ in shape"):
        paired_psnr(x, x[:2])


def test_psnr_is_per_image() -> None:
    reference = torch.zeros(2, 1, 2, 2)
    images = torch.stack([torch.full((1, 2, 2), 0.02), torch.full((1, 2, 2), 0.2)])
    assert paired_psnr(images, reference).tolist() == pytest.approx([40.0, 20.0])


def test_relative_error_known_value() -> None:
    reference = torch.randn(4, 1, 8, 8)
    assert relative_error(1.1 * reference, reference) == pytest.approx(0.1)
    assert relative_error(reference, reference) == 0.0


class Scaled(nn.Module):
    """A stand-in UNet whose 'noise prediction' is ``scale * sample``."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, sample, timestep, snn_timesteps=None):
        assert timestep.dim() == 0
        return SimpleNamespace(sample=self.scale * sample * (snn_timesteps or 1))


def test_noise_prediction_errors_over_a_timestep_sweep() -> None:
    clean = load_digit_images()[:6]
    inputs = noised_inputs(clean, DDPMScheduler(num_train_timesteps=1000), num_timesteps=5, seed=0)
    assert inputs.samples.shape == (5, 6, 1, 16, 16)
    assert inputs.timesteps.tolist() == [1, 250, 500, 750, 999]
    assert relative_error(inputs.samples[0], clean) < 0.05  # t = 1 is almost clean
    again = noised_inputs(clean, DDPMScheduler(num_train_timesteps=1000), num_timesteps=5, seed=0)
    assert torch.equal(inputs.samples, again.samples)

    reference = predict_noise(Scaled(1.0), inputs, batch_size=4)
    errors = noise_prediction_errors(predict_noise(Scaled(1.25), inputs, batch_size=4), reference)
    assert errors == pytest.approx([0.25] * 5)
    doubled = predict_noise(Scaled(1.0), inputs, snn_timesteps=2)  # forward kwargs reach the model
    assert noise_prediction_errors(doubled, reference) == pytest.approx([1.0] * 5)
    assert math.isclose(noise_prediction_errors(reference, reference)[0], 0.0)
