"""The adapted encoder/generator pair, with the representation the linear-SVM evaluation reads."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from gali_ext.chains import latent_mean
from gali_ext.errors import ConfigError, ShapeError

from .encoders import LatentEncoder
from .generators import LatentGenerator
from .layers import find_layer

__all__ = ["EncoderGenerator"]


class EncoderGenerator(nn.Module):
    """A user's encoder/generator pair, adapted for :class:`gali_ext.GALI`.

    ``GALI(pair.encoder, pair.generator, head, providers)`` trains it; the user's modules stay
    the same objects (``pair.encoder.module is encoder``), so the user's optimisers keep working.

    Args:
        encoder, generator: the user's modules.
        encoder_output: how to read the encoder's output; see :class:`LatentEncoder` ``output``.
        latent_shape: the shape of one latent as the library uses it (the encoder's latent is
            viewed as ``[B, *latent_shape]``, the generator is checked to receive it); default:
            whatever the encoder returns.
        generator_input_shape: see :class:`LatentGenerator` ``input_shape``.
        generator_kwargs: see :class:`LatentGenerator` ``extra_kwargs``.
        generator_condition: see :class:`LatentGenerator` ``condition``.
        feature_layers: dotted names of sub-modules of the user's encoder (as in
            ``encoder.named_modules()``) whose outputs make :meth:`hidden_features`.

    Attributes:
        encoder: the :class:`LatentEncoder`.
        generator: the :class:`LatentGenerator`.
        latent_shape: ``latent_shape`` as a tuple, or None.
    """

    def __init__(
        self,
        encoder: nn.Module,
        generator: nn.Module,
        *,
        encoder_output: str | Callable[[Any], Any] = "auto",
        latent_shape: Sequence[int] | int | None = None,
        generator_input_shape: Sequence[int] | int | None = None,
        generator_kwargs: Mapping[str, Any] | None = None,
        generator_condition: bool | str | None = None,
        feature_layers: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = LatentEncoder(encoder, encoder_output, latent_shape)
        self.latent_shape = self.encoder.latent_shape
        self.generator = LatentGenerator(
            generator,
            latent_shape=self.latent_shape,
            extra_kwargs=generator_kwargs,
            input_shape=generator_input_shape,
            condition=generator_condition,
        )
        self.feature_layers = _check_layer_names(feature_layers)
        self._layers = [find_layer(encoder, name) for name in self.feature_layers]

    def hidden_features(self, x: Tensor) -> list[Tensor]:
        """The encoder's representation of ``x``: a list of ``[B, d_i]`` tensors.

        - with ``feature_layers``: the outputs of those sub-modules, in the order named, from one
          pass of the encoder (forward hooks), then the latent mean ``E[z | x]``;
        - else, when the user's encoder has a ``hidden_features`` method: its outputs;
        - else: ``[E[z | x]]``, the latent mean (the latent itself when deterministic).

        Each is flattened to ``[B, d_i]``; ``torch.cat(..., dim=1)`` gives the SVM's input. Call
        it under ``torch.no_grad()`` with the encoder in eval mode to evaluate.
        """
        if self.feature_layers:
            return self._hooked_features(x)
        own = getattr(self.encoder.module, "hidden_features", None)
        if callable(own):
            return [f.flatten(1) for f in own(x)]
        return [latent_mean(self.encoder(x)).flatten(1)]

    def _hooked_features(self, x: Tensor) -> list[Tensor]:
        seen: dict[str, list[Any]] = {name: [] for name in self.feature_layers}

        def keep(name: str):
            return lambda module, inputs, output: seen[name].append(output)

        handles = [
            layer.register_forward_hook(keep(name))
            for name, layer in zip(self.feature_layers, self._layers)
        ]
        try:
            mean = latent_mean(self.encoder(x)).flatten(1)
        finally:
            for handle in handles:
                handle.remove()
        features = []
        for name, outputs in seen.items():
            if len(outputs) != 1:
                raise ConfigError(
                    f"feature layer {name!r} ran {len(outputs)} times in one pass of the "
                    "encoder; name a layer that runs exactly once (a module reused at several "
                    "depths, such as a shared activation, has no single output)"
                )
            out = outputs[0]
            if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != mean.shape[0]:
                got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ShapeError(
                    f"feature layer {name!r} should output a tensor [{mean.shape[0]}, ...], "
                    f"got {got}"
                )
            features.append(out.flatten(1))
        return features + [mean]


def _check_layer_names(names: Sequence[str] | None) -> tuple[str, ...]:
    if names is None:
        return ()
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ConfigError(
            f"feature_layers must be a list of sub-module names, e.g. ['body.2'], got {names!r}"
        )
    return tuple(names)
