"""The real and prior chains of one training step, each node computed once (docs/design.md,
section 1).

The real chain starts from data, ``x0 = x, z0 = E(x0), x1 = G(z0), z1 = E(x1), ...``; the prior
chain from a prior sample, ``zp0 = z ~ p(z), xp0 = G(zp0), zp1 = E(xp0), ...`` (any prior:
:mod:`gali_ext.priors`). In a conditional step the real chain carries the batch's condition
``y`` and the prior chain a condition ``y_p`` drawn by a sampler (the batch's, shuffled, by
default); G receives the condition of the chain it works on (section 9.3). :class:`Chains`
computes a node the first time it is asked for and returns the cached tensor afterwards, so a node
shared by several tuple classes (``x0`` in every real class of GALI-8) costs one pass of E or G,
and nodes no class uses are never computed.

Nodes that are not on the two chains (``Mask1(x0)``, ``Mix1(x0)``, ``M(x0)``) are computed by
*node functions* that feedback providers register; see :mod:`gali_ext.providers`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from .errors import ConfigError, GaliError, ProviderError, ShapeError
from .priors import resolve_prior
from .spec import Node, parse_node

__all__ = [
    "Chains",
    "ConditionSampler",
    "NodeFunction",
    "latent_mean",
    "sample_latent",
    "shuffled_condition",
    "split_batch",
]

ConditionSampler = Callable[[Tensor, "torch.Generator | None"], Tensor]
"""Draws the prior chain's condition from the batch's: ``sampler(y, rng) -> y_p``."""


def shuffled_condition(y: Tensor, rng: torch.Generator | None = None) -> Tensor:
    """The default :data:`ConditionSampler`: the batch's conditions in a random order, so that
    the prior chain's conditions follow the data's distribution of classes."""
    device = rng.device if rng is not None else y.device
    order = torch.randperm(y.shape[0], generator=rng, device=device)
    return y[order.to(y.device)]


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(x, y)`` of a batch: a tensor of images ``x`` (no condition), or a pair ``(x, y)``
    (a list or tuple, as data loaders yield) with ``y`` the per-sample condition."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Tensor):
        x, y = batch
        if not isinstance(y, Tensor):
            raise ShapeError(
                f"expected a batch (x, y) with a tensor condition y, got y of type "
                f"{type(y).__name__}"
            )
        return x, y
    got = f"a {type(batch).__name__}" + (
        f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""
    )
    raise ShapeError(
        f"expected a batch of images x [B, C, H, W] or a pair (x, y) with a per-sample "
        f"condition y, got {got}"
    )


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
        generate: the generator G, ``[B, *latent_shape] -> [B, C, H, W]``; called
            ``generate(z, y)`` in a conditional step.
        z: the prior sample (node ``zp0``); drawn from ``prior`` when omitted.
        latent_shape: the shape of one latent, needed to draw ``zp0``; when omitted it is read
            off ``z0 = E(x0)``.
        functions: node functions of the feedback providers, by function name.
        rng: a ``torch.Generator`` for the prior sample, the encoder's noise and the prior
            chain's condition.
        y: the batch's per-sample condition ``[B, ...]`` (class ids, attribute vectors): the
            condition of every node of the real chain. None: an unconditional step.
        prior_condition: the condition of the prior chain's nodes; drawn by
            ``condition_sampler(y, rng)`` when omitted.
        prior: the prior of ``zp0`` (:func:`gali_ext.priors.resolve_prior`); N(0, I) by default.
        condition_sampler: see :data:`ConditionSampler`; default :func:`shuffled_condition`.

    ``chains["x1"]`` (or any node name, e.g. ``"G(E(x0))"``) returns the node's tensor;
    ``chains.compute(spec.nodes)`` returns a dict of all nodes a spec needs;
    ``chains.conditions`` the condition of each chain. ``calls`` counts the passes of E, G and
    every node function, so tests can check that nothing runs twice.
    """

    def __init__(
        self,
        x: Tensor,
        encode: Callable[[Tensor], Any],
        generate: Callable[..., Tensor],
        *,
        z: Tensor | None = None,
        latent_shape: Iterable[int] | None = None,
        functions: Mapping[str, NodeFunction] | None = None,
        rng: torch.Generator | None = None,
        y: Tensor | None = None,
        prior_condition: Tensor | None = None,
        prior: Any = None,
        condition_sampler: ConditionSampler | None = None,
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
        self.prior = resolve_prior(prior)
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
        if y is None and prior_condition is not None:
            raise ConfigError("a prior_condition was given without the batch's condition y")
        for name, value in (("y", y), ("prior_condition", prior_condition)):
            if value is not None and (
                not isinstance(value, Tensor) or value.shape[:1] != (self.batch_size,)
            ):
                got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ShapeError(
                    f"the condition {name} should be a tensor with the batch size "
                    f"{self.batch_size} of the images, got {got}"
                )
        self.condition_sampler = condition_sampler or shuffled_condition
        self._conditions: dict[str, Tensor] | None = None
        if y is not None:
            self._conditions = {"x0": y}
            if prior_condition is not None:
                self._conditions["zp0"] = prior_condition

    @property
    def conditional(self) -> bool:
        """Whether this step carries a condition."""
        return self._conditions is not None

    @property
    def conditions(self) -> dict[str, Tensor] | None:
        """``{"x0": y, "zp0": y_p}``: the condition of the real chain and of the prior chain
        (drawn on first use), or None in an unconditional step."""
        if self._conditions is None:
            return None
        if "zp0" not in self._conditions:
            drawn = self.condition_sampler(self._conditions["x0"], self.rng)
            if not isinstance(drawn, Tensor) or drawn.shape[:1] != (self.batch_size,):
                got = list(drawn.shape) if isinstance(drawn, Tensor) else type(drawn).__name__
                raise ShapeError(
                    f"the condition sampler should return one condition per sample "
                    f"[{self.batch_size}, ...], got {got}"
                )
            self._conditions["zp0"] = drawn
        return self._conditions

    def condition_of(self, name: str) -> Tensor | None:
        """The condition a node carries: its chain's (:attr:`Node.root`), or None."""
        conditions = self.conditions
        return None if conditions is None else conditions[parse_node(name).root]

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

    def _generate(self, z: Tensor, node: str) -> Tensor:
        self.calls["G"] += 1
        condition = self.condition_of(node)
        if condition is None:
            return _run("generator G", self.generate, z)
        try:
            return self.generate(z, condition)
        except TypeError as error:
            raise ConfigError(
                f"the generator failed computing node {node!r}: TypeError: {error}; the step is "
                "conditional, so the generator is called generator(z, y): if it takes the "
                "condition under another name, wrap it as gali_ext.adapters.LatentGenerator(G, "
                "condition='name'), and if it takes none, LatentGenerator(G, condition=False)"
            ) from error

    def _compute(self, node: Node) -> Tensor:
        name = node.name
        if node.fn is None:
            prefix = name.rstrip("0123456789")
            index = int(name[len(prefix) :])
            if prefix == "z":
                return self._encode(self[f"x{index}"])
            if prefix == "x":  # x0 is always present, so index >= 1
                return self._generate(self[f"z{index - 1}"], name)
            if prefix == "xp":
                return self._generate(self[f"zp{index}"], name)
            if index > 0:  # zp{i} = E(xp{i-1})
                return self._encode(self[f"xp{index - 1}"])
            return self._prior_sample()
        assert node.arg is not None
        if node.fn == "E":
            return self._encode(self[node.arg.name])
        if node.fn == "G":
            return self._generate(self[node.arg.name], name)
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
        return self.prior((self.batch_size, *shape), x.device, x.dtype, self.rng)
