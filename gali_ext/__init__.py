"""gali-ext: Generalized Adversarially Learned Inference as a composable extension for GANs.

``import gali_ext`` loads the small core only: tuple specs (:mod:`gali_ext.spec`), the preset
registry (:mod:`gali_ext.presets`), the chains (:mod:`gali_ext.chains`), the fused
:class:`MultiClassJointDiscriminatorHead`, the losses (above all the non-saturating
:class:`ProductOfTermsLoss`, eq. 4 of Dandi et al., AAAI 2021), the feedback providers, the
:class:`GALI` objective and the training step (:mod:`gali_ext.trainer`; replayed as a CUDA graph:
:mod:`gali_ext.capture`). The adapters
(:mod:`gali_ext.adapters`) and the application (:mod:`gali_ext.recipes`: data, reference
architectures, evaluation, the recipe loop, the benchmarks, the CLI) are imported on demand.
"""

from .capture import CapturedStep
from .chains import Chains, sample_latent
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DivergenceError,
    GaliError,
    ProviderError,
    ShapeError,
    SpecError,
)
from .gali import GALI, ObjectiveValue, build_gali
from .head import (
    ClassScores,
    DiscriminatorOutput,
    MultiClassJointDiscriminatorHead,
    SpectralMLP,
    add_instance_noise,
)
from .losses import (
    DISCRIMINATOR_CRITERIA,
    GENERATOR_CRITERIA,
    AliceReconstructionLoss,
    DiscriminatorLoss,
    HingeDiscriminatorLoss,
    HingeGeneratorLoss,
    MinimaxLoss,
    MisclassificationLoss,
    ProductOfTermsLoss,
    build_discriminator_criterion,
    build_generator_criterion,
    tuple_class_accuracy,
)
from .presets import Preset, available_presets, build_spec, get_preset, register_preset
from .priors import resolve_prior
from .spec import TupleClass, TupleSpec, parse_node
from .trainer import DivergenceGuard, StepMetrics, train_step

__version__ = "0.2.0"

__all__ = [
    "AliceReconstructionLoss",
    "CapturedStep",
    "Chains",
    "CheckpointError",
    "ClassScores",
    "ConfigError",
    "DISCRIMINATOR_CRITERIA",
    "DataError",
    "DiscriminatorLoss",
    "DiscriminatorOutput",
    "DivergenceError",
    "DivergenceGuard",
    "GALI",
    "GaliError",
    "HingeDiscriminatorLoss",
    "HingeGeneratorLoss",
    "MinimaxLoss",
    "MisclassificationLoss",
    "MultiClassJointDiscriminatorHead",
    "GENERATOR_CRITERIA",
    "ObjectiveValue",
    "Preset",
    "ProductOfTermsLoss",
    "ProviderError",
    "ShapeError",
    "SpecError",
    "SpectralMLP",
    "TupleClass",
    "TupleSpec",
    "add_instance_noise",
    "StepMetrics",
    "available_presets",
    "build_discriminator_criterion",
    "build_gali",
    "build_generator_criterion",
    "build_spec",
    "get_preset",
    "parse_node",
    "register_preset",
    "resolve_prior",
    "sample_latent",
    "train_step",
    "tuple_class_accuracy",
]
