"""Sample-quality metrics that run offline: Fréchet distance on classifier (or Inception) features,
paired PSNR, the relative error of noise predictions across the diffusion schedule, and the conditional
accuracy of class-conditional samples."""

from .accuracy import ConditionalAccuracy
from .features import DigitFeatures, FeatureExtractorError, InceptionFeatures
from .fidelity import FIDELITY_FRACTIONS, fidelity_check
from .frechet import FrechetDistance, ReferenceStatistics, extract_features, frechet_distance, reference_statistics
from .noise_prediction import NoisedInputs, noise_prediction_errors, noised_inputs, predict_noise, relative_error
from .psnr import paired_psnr

__all__ = [
    "FIDELITY_FRACTIONS",
    "ConditionalAccuracy",
    "DigitFeatures",
    "FeatureExtractorError",
    "FrechetDistance",
    "InceptionFeatures",
    "NoisedInputs",
    "ReferenceStatistics",
    "extract_features",
    "fidelity_check",
    "frechet_distance",
    "noise_prediction_errors",
    "noised_inputs",
    "paired_psnr",
    "predict_noise",
    "reference_statistics",
    "relative_error",
]
