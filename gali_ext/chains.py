"""The real and prior chains of one training step, each node computed once (docs/design.md,
section 1).

The real chain starts from data, ``x0 = x, z0 = E(x0), x1 = G(z0), z1 = E(x1), ...``; the prior
chain from a prior sample, ``zp0 = z, xp0 = G(zp0), zp1 = E(xp0), ...``. :class:`Chains` computes a
node the first time it is asked for and returns the cached tensor afterwards, so a node shared by
several tuple classes (``x0`` in every real class of GALI-8) costs one pass of E or G, and nodes no
class uses are never computed.

Nodes that are not on the two chains (``Mask1(x0)``, ``Mix1(x0)``, ``M(x0)``) are computed by
*node functions* that feedback providers register; see :mod:`gali_ext.providers`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from .errors import GaliError, ProviderError, ShapeError
from .spec import Node, parse_node

__all__ = ["Chains", "NodeFunction", "latent_mean", "sample_latent"]


class NodeFunction(Protocol):
    """Computes ``node = F(arg)`` for a function name F a provider makes (``Mask1``, ``M``, ...).

    It receives the parsed node and the step's :class:`Chains`, from which it reads its argument
    (``chains[node.arg.name]``) and any other node it needs, each computed once.
    """

    def __call__(self, node: Node, chains: Chains) -> Tensor: ...


def sample_latent(output: Any, rng: torch.Generator | None = None) -> Tensor:
    """Turn an encoder's output into a latent sample ``z ~ p_E(z | x)``.

    - a tensor: a deterministic encoder (BiGAN, BigBiGAN); returned as is;
    - a pair ``(mu, log_sigma)``: the stochastic ALI encoder, reparameterised as
      ``z = mu + exp(log_sigma) * eps`` with ``eps ~ N(0, I)``;
    - a ``torch.distributions.Distribution``: ``rsample()``.

    Other conventions (``(mu, logvar)``, latents of another shape) are handled by the adapters.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, torch.distributions.Distribution):
        if not output.has_rsample:
            raise ShapeError(
                f"the encoder returned a {type(output).__name__} distribution, which cannot be "
                "reparameterised (no rsample); gradients could not reach the encoder"
            )
        return output.rsample()
    if isinstance(output, (tuple, list)) and len(output) == 2:
        mu, log_sigma = output
        if not (isinstance(mu, Tensor) and isinstance(log_sigma, Tensor)):
            raise ShapeError("an encoder returning a pair must return two tensors (mu, log_sigma)")
        if mu.shape != log_sigma.shape:
            raise ShapeError(
                f"encoder returned mu of shape {list(mu.shape)} but log_sigma of shape "
                f"{list(log_sigma.shape)}"
            )
        eps = torch.randn(mu.shape, generator=rng, device=mu.device, dtype=mu.dtype)
        return mu + log_sigma.exp() * eps
    raise ShapeError(
        "expected the encoder to return a latent tensor, a pair (mu, log_sigma) or a "
        f"torch.distributions.Distribution, got {type(output).__name__}"
    )


def latent_mean(output: Any) -> Tensor:
    """The mean of ``p_E(z | x)`` from an encoder's output (the latent itself when deterministic).

    Accepts what :func:`sample_latent` accepts; used for deterministic evaluation.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, torch.distributions.Distribution):
        return output.mean
    if isinstance(output, (tuple, list)) and len(output) == 2 and isinstance(output[0], Tensor):
        return output[0]
    return sample_latent(output)  # raises the error that names what was expected


def _run(who: str, network: Callable[[Tensor], Any], value: Tensor) -> Any:
    """``network(value)``; a RuntimeError from inside it (an input of the wrong size, dtype or
    device) becomes a :class:`ShapeError` saying what it was given. Out-of-memory passes."""
    try:
        return network(value)
    except (GaliError, torch.OutOfMemoryError):
        raise
    except RuntimeError as error:
        raise ShapeError(
            f"the {who} failed on its input of shape {list(value.shape)} ({value.dtype}, on "
            f"{value.device}): {error}"
        ) from error


class Chains:
    """The chain nodes of one step, computed lazily and at most once each.

    Args:
        x: a batch of data images ``[B, C, H, W]`` (node ``x0``).
        encode: the encoder E; its output goes through :func:`sample_latent`.
        generate: the generator G, ``[B, *latent_shape] -> [B, C, H, W]``.
        z: the prior sample (node ``zp0``); drawn from ``N(0, I)`` when omitted.
        latent_shape: the shape of one latent, needed to draw ``zp0``; when omitted it is read
            off ``z0 = E(x0)``.
        functions: node functions of the feedback providers, by function name.
        rng: a ``torch.Generator`` for the prior sample and the encoder's noise.

    ``chains["x1"]`` (or any node name, e.g. ``"G(E(x0))"``) returns the node's tensor;
    ``chains.compute(spec.nodes)`` returns a dict of all nodes a spec needs. ``calls`` counts the
    passes of E, G and every node function, so tests can check that nothing runs twice.
    """

    def __init__(
        self,
        x: Tensor,
        encode: Callable[[Tensor], Any],
        generate: Callable[[Tensor], Tensor],
        *,
        z: Tensor | None = None,
        latent_shape: Iterable[int] | None = None,
        functions: Mapping[str, NodeFunction] | None = None,
        rng: torch.Generator | None = None,
    ) -> None:
        if not isinstance(x, Tensor) or x.dim() < 2:
            raise ShapeError(
                f"expected a batch of images x of shape [B, C, H, W], got "
                f"{list(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        if not x.is_floating_point():
            raise ShapeError(f"expected floating-point images, got dtype {x.dtype}")
        if x.shape[0] == 0:
            raise ShapeError(
                f"expected a batch of at least one image, got an empty batch {list(x.shape)}"
            )
        self.batch_size = x.shape[0]
        self.encode = encode
        self.generate = generate
        self.functions = dict(functions or {})
        self.rng = rng
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
        self.calls: Counter[str] = Counter()
        self.scratch: dict[str, Any] = {}  # per-step state of node functions (e.g. masks)
        self._values: dict[str, Tensor] = {"x0": x}
        if z is not None:
            if z.shape[0] != self.batch_size:
                raise ShapeError(
                    f"the prior sample z has batch size {z.shape[0]}, the images {self.batch_size}"
                )
            self._values["zp0"] = z

    def __contains__(self, name: str) -> bool:
        return parse_node(name).name in self._values

    def __getitem__(self, name: str) -> Tensor:
        node = parse_node(name)
        value = self._values.get(node.name)
        if value is None:
            value = self._compute(node)
            if not isinstance(value, Tensor) or value.shape[:1] != (self.batch_size,):
                got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ShapeError(
                    f"node {node.name!r} should be a tensor with batch size {self.batch_size}, "
                    f"got {got}"
                )
            self._values[node.name] = value
        return value

    def compute(self, names: Iterable[str]) -> dict[str, Tensor]:
        """The tensors of the given nodes, by canonical name."""
        return {parse_node(n).name: self[n] for n in names}

    def _encode(self, x: Tensor) -> Tensor:
        self.calls["E"] += 1
        return sample_latent(_run("encoder E", self.encode, x), self.rng)

    def _generate(self, z: Tensor) -> Tensor:
        self.calls["G"] += 1
        return _run("generator G", self.generate, z)

    def _compute(self, node: Node) -> Tensor:
        if node.fn is None:
            prefix = node.name.rstrip("0123456789")
            index = int(node.name[len(prefix) :])
            if prefix == "z":
                return self._encode(self[f"x{index}"])
            if prefix == "x":  # x0 is always present, so index >= 1
                return self._generate(self[f"z{index - 1}"])
            if prefix == "xp":
                return self._generate(self[f"zp{index}"])
            if index > 0:  # zp{i} = E(xp{i-1})
                return self._encode(self[f"xp{index - 1}"])
            return self._prior_sample()
        assert node.arg is not None
        if node.fn == "E":
            return self._encode(self[node.arg.name])
        if node.fn == "G":
            return self._generate(self[node.arg.name])
        function = self.functions.get(node.fn)
        if function is None:
            known = ", ".join(sorted(self.functions)) or "none"
            raise ProviderError(
                f"node {node.name!r} needs the function {node.fn!r}, which no feedback provider "
                f"makes (functions available: {known})"
            )
        self.calls[node.fn] += 1
        return function(node, self)

    def _prior_sample(self) -> Tensor:
        shape = self.latent_shape
        if shape is None:
            shape = tuple(self["z0"].shape[1:])
        x = self._values["x0"]
        return torch.randn(
            (self.batch_size, *shape), generator=self.rng, device=x.device, dtype=x.dtype
        )
