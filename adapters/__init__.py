"""Adapters: wrap any user encoder/generator pair for gali-ext.

:class:`gali_ext.GALI` calls ``encoder(x)`` and ``generator(z)``. The encoder may return a latent
tensor (deterministic: BiGAN, BigBiGAN), a pair ``(mu, log_sigma)`` (ALI's stochastic encoder)
or a ``torch.distributions.Distribution``; see :func:`gali_ext.chains.sample_latent`. These
adapters bring other conventions to that contract:

- :class:`LatentEncoder`: ``(mu, logvar)`` (``log_sigma = logvar / 2``), ``(mu, log_sigma)``,
  ``(mu, sigma)``, distributions, dicts and objects through a callable, and latents of another
  shape (BigBiGAN's ``[B, 120, 1, 1]`` viewed as ``[B, 120]``);
- :class:`StochasticEncoder`: a Gaussian encoder returning ``(mu, s)``, log_sigma clamped below;
- :class:`LatentGenerator`: generators taking extra arguments (a class vector per batch) or
  another input shape, with their output checked to be ``[B, C, H, W]`` images;
- :class:`EncoderGenerator`: the pair, with ``hidden_features`` for representation evaluation;
- :class:`FeatureNetwork`, :class:`JointNetwork`, :func:`monolithic_head`: discriminator
  networks of other shapes (tuple or dict outputs, the condition, ``J(F, H)``, ``[B, C, 1, 1]``
  maps, a monolithic ``D(x, z)``, a separate score layer, a score computed in ``forward``);
- :func:`widen_input`: a joint network written for one (image, latent) pair, widened in place
  for GALI-8's two;
- :func:`check`: one D step and one E/G step on your networks, reporting what trains where and
  failing on anything silently lost (:func:`baseline_of`: what your project's own losses
  train, so that what they never trained is told apart).

See ``adapters/README.md`` for plugging gali-ext into an existing BiGAN loop.
"""

from gali_ext.check import Baseline, CheckReport, baseline_of, check

from .discriminators import FeatureNetwork, JointNetwork, monolithic_head
from .encoders import LatentEncoder, LatentOutput, StochasticEncoder
from .generators import LatentGenerator
from .layers import widen_input
from .pair import EncoderGenerator

__all__ = [
    "Baseline",
    "CheckReport",
    "EncoderGenerator",
    "FeatureNetwork",
    "JointNetwork",
    "LatentEncoder",
    "LatentGenerator",
    "LatentOutput",
    "StochasticEncoder",
    "baseline_of",
    "check",
    "monolithic_head",
    "widen_input",
]
