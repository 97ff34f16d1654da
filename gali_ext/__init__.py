"""gali-ext: Generalized Adversarially Learned Inference as a composable extension for GANs.

The small core: tuple specs (:mod:`gali_ext.spec`), the chains (:mod:`gali_ext.chains`), the
fused :class:`MultiClassJointDiscriminatorHead` and the losses, above all the non-saturating
:class:`ProductOfTermsLoss` (eq. 4 of Dandi et al., AAAI 2021).
"""

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
from .gali import GALI, Objective, build_gali
from .head import MultiClassJointDiscriminatorHead, SpectralMLP, add_instance_noise
from .losses import (
    AliceReconstructionLoss,
    DiscriminatorLoss,
    MinimaxLoss,
    MisclassificationLoss,
    ProductOfTermsLoss,
    tuple_class_accuracy,
)
from .spec import TupleClass, TupleSpec, available_specs, build_spec, parse_node

__version__ = "0.1.0"

__all__ = [
    "AliceReconstructionLoss",
    "Chains",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DiscriminatorLoss",
    "DivergenceError",
    "GALI",
    "GaliError",
    "MinimaxLoss",
    "MisclassificationLoss",
    "MultiClassJointDiscriminatorHead",
    "Objective",
    "ProductOfTermsLoss",
    "ProviderError",
    "ShapeError",
    "SpecError",
    "SpectralMLP",
    "TupleClass",
    "TupleSpec",
    "add_instance_noise",
    "available_specs",
    "build_gali",
    "build_spec",
    "parse_node",
    "sample_latent",
    "tuple_class_accuracy",
]
