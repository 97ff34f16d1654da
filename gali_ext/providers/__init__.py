"""Feedback providers: what GALI's discriminator and generator-encoder get feedback on.

Swap them through the Python API: ``GALI(encoder, generator, head, providers=[...])``.
"""

from .alice import AliceReconstruction
from .base import FeedbackProvider
from .maskmix import MaskMix, sample_box_masks
from .negative import NegativeAugmentation, StopGradient, cutout, jigsaw
from .pretrained import PretrainedFeatures, load_safetensors_into
from .reconstruction import ReconstructionChain

__all__ = [
    "AliceReconstruction",
    "FeedbackProvider",
    "MaskMix",
    "NegativeAugmentation",
    "PretrainedFeatures",
    "ReconstructionChain",
    "StopGradient",
    "cutout",
    "jigsaw",
    "load_safetensors_into",
    "sample_box_masks",
]
