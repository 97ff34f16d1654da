"""The preset registry: a named GALI model is its tuple classes and the feedback providers they
need, declared together (docs/design.md, section 2).

One registry serves every entry point: :func:`~gali_ext.build_spec`, :func:`~gali_ext.build_gali`,
the recipes (``--set spec=NAME``) and the benchmark (``gali-ext bench --specs NAME``). A preset
registered from Python is usable by all of them::

    from gali_ext import register_preset
    from gali_ext.providers import ReconstructionChain

    register_preset(
        "gali3",
        classes=[("x0", "z0"), ("xp0", "zp0"), ("x0", "z1")],
        providers=[ReconstructionChain],
        title="three classes: ALI's two and (x, E(G(E(x))))",
    )
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .errors import ProviderError, SpecError
from .providers import AliceReconstruction, FeedbackProvider, MaskMix, ReconstructionChain
from .providers.base import resolve_node_functions
from .spec import TupleSpec

__all__ = [
    "Preset",
    "PresetOptions",
    "available_presets",
    "build_spec",
    "get_preset",
    "register_preset",
]


@dataclass(frozen=True)
class PresetOptions:
    """What a preset's provider factory may use beyond the networks.

    ``features``: the pretrained feature model M (a
    :class:`~gali_ext.providers.PretrainedFeatures`) for presets that need one;
    ``alice_weight``: lambda of ALICE's reconstruction penalty.
    """

    features: FeedbackProvider | None = None
    alice_weight: float = 1.0


ProviderFactory = Callable[[PresetOptions], Sequence[FeedbackProvider]]


@dataclass(frozen=True)
class Preset:
    """A named model: K tuple classes and a factory of the feedback providers they need.

    Attributes:
        name: the registry key (``"gali8"``).
        classes: the tuple classes, as sequences of node names.
        make_providers: ``options -> providers``; called once per built objective, so every
            objective gets its own provider modules.
        title: one line for listings.
        needs_features: the providers need a pretrained feature model M
            (``PresetOptions.features``).
    """

    name: str
    classes: tuple[tuple[str, ...], ...]
    make_providers: ProviderFactory = field(repr=False)
    title: str = ""
    needs_features: bool = False

    @property
    def spec(self) -> TupleSpec:
        """The preset's :class:`~gali_ext.spec.TupleSpec`."""
        return TupleSpec(self.classes, name=self.name)

    def providers(
        self, features: FeedbackProvider | None = None, alice_weight: float = 1.0
    ) -> list[FeedbackProvider]:
        """Fresh feedback providers for one objective of this preset."""
        if self.needs_features and features is None:
            raise ProviderError(
                f"preset {self.name!r} needs a pretrained feature model M: pass "
                "features=PretrainedFeatures(...)"
            )
        made = list(self.make_providers(PresetOptions(features, alice_weight)))
        for p in made:
            if not isinstance(p, FeedbackProvider):
                raise ProviderError(
                    f"preset {self.name!r}: its provider factory returned a "
                    f"{type(p).__name__}, expected FeedbackProvider instances"
                )
        return made


_REGISTRY: dict[str, Preset] = {}


def _factory(providers: ProviderFactory | Sequence[Callable[[], FeedbackProvider]]):
    if callable(providers):
        return providers
    if isinstance(providers, (str, bytes)) or not isinstance(providers, Sequence):
        raise SpecError(
            "providers must be a function of PresetOptions or a list of provider classes "
            f"(e.g. [ReconstructionChain]), got {type(providers).__name__}"
        )
    makers = tuple(providers)
    for maker in makers:
        if not callable(maker):
            raise SpecError(
                f"providers lists {maker!r}, which is not a provider class or factory; "
                "list classes such as ReconstructionChain, not instances"
            )
    return lambda options: [maker() for maker in makers]


def register_preset(
    name: str,
    classes: Sequence[Sequence[str]],
    providers: ProviderFactory | Sequence[Callable[[], FeedbackProvider]] = (),
    *,
    title: str = "",
    needs_features: bool = False,
) -> Preset:
    """Register a preset so that :func:`build_spec`, :func:`~gali_ext.build_gali`, the recipes
    and the benchmark can build it by name.

    ``providers`` is a list of zero-argument factories (provider classes such as
    ``ReconstructionChain``), or one function ``PresetOptions -> providers`` when they need the
    options (M, ALICE's lambda). The tuple classes are validated now, and checked against the
    providers (a node no provider makes is refused here, not at the first training step).
    """
    if not isinstance(name, str) or not name:
        raise SpecError(f"a preset name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise SpecError(f"a preset named {name!r} is already registered")
    preset = Preset(
        name,
        tuple(tuple(c) for c in classes),
        _factory(providers),
        title=title,
        needs_features=needs_features,
    )
    spec = preset.spec  # validates the classes
    if not needs_features:
        _check_providers(preset, spec)
    _REGISTRY[name] = preset
    return preset


def _check_providers(preset: Preset, spec: TupleSpec) -> None:
    """The objective's own checks (every function made once, chain depth), before any network
    exists."""
    resolve_node_functions(spec, preset.providers())


def get_preset(name: str) -> Preset:
    """The registered preset ``name``; an unknown name suggests the closest."""
    preset = _REGISTRY.get(name) if isinstance(name, str) else None
    if preset is None:
        close = difflib.get_close_matches(str(name), available_presets(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SpecError(
            f"unknown preset {name!r}{hint} (presets: {', '.join(available_presets())})"
        )
    return preset


def available_presets() -> list[str]:
    """Names of the registered presets."""
    return sorted(_REGISTRY)


def build_spec(name: str) -> TupleSpec:
    """The tuple spec of a registered preset (``ali``, ``gali4``, ``gali8``, ``gali_mix``,
    ``gali_pt``, ``alice``, ``alice_pt``, or one added by :func:`register_preset`)."""
    return get_preset(name).spec


def _permutations_of_four(x0: str, z0: str, x1: str, z1: str) -> list[tuple[str, ...]]:
    """GALI-8's four orders: images permuted among themselves, latents among themselves."""
    return [(x0, z0, x1, z1), (x0, z1, x1, z0), (x1, z0, x0, z1), (x1, z1, x0, z0)]


_ALI = [("x0", "z0"), ("xp0", "zp0")]


def _features(options: PresetOptions) -> list[FeedbackProvider]:
    assert options.features is not None  # Preset.providers checks it
    return [options.features]


register_preset("ali", _ALI, title="ALI baseline")
register_preset(
    "gali4",
    [*_ALI, ("x0", "z1"), ("xp1", "zp0")],
    [ReconstructionChain],
    title="GALI-4 (K=4, m=2, reconstruction chain)",
)
register_preset(
    "gali8",
    [
        *_permutations_of_four("x0", "z0", "x1", "z1"),
        *_permutations_of_four("xp0", "zp0", "xp1", "zp1"),
    ],
    [ReconstructionChain],
    title="GALI-8 (K=8, m=4, the authors' SVHN model)",
)
register_preset(
    "gali_mix",
    [
        ("x0", "E(Mask1(x0))"),
        ("xp0", "zp0"),
        ("x0", "E(Mask2(G(E(Mask1(x0)))))"),
        ("G(E(Mask3(xp0)))", "zp0"),
        ("Mix1(x0)", "E(Mask1(x0))"),
        ("Mix1(x0)", "E(Mask2(G(E(Mask1(x0)))))"),
        ("x0", "E(Mask4(Mix1(x0)))"),
        ("G(E(Mask1(x0)))", "E(Mask4(Mix1(x0)))"),
    ],
    lambda options: [MaskMix(fill=-1.0)],
    title="GALI-mix (K=8, inpainting self-supervision)",
)
register_preset(
    "gali_pt",
    [
        ("x0", "z0", "M(x0)"),
        ("xp0", "zp0", "M(xp0)"),
        ("x0", "z1", "M(x1)"),
        ("xp1", "zp0", "M(xp0)"),
    ],
    lambda options: [ReconstructionChain(), *_features(options)],
    title="GALI-PT (K=4, m=3, pretrained features M)",
    needs_features=True,
)
# The ALICE baselines train on ALI's tuples; their reconstruction penalty is a loss term of a
# provider, not a tuple class.
register_preset(
    "alice",
    _ALI,
    lambda options: [AliceReconstruction(options.alice_weight)],
    title="ALICE baseline (ALI + lambda ||x - G(E(x))||^2)",
)
register_preset(
    "alice_pt",
    _ALI,
    lambda options: [*_features(options), AliceReconstruction(options.alice_weight, "M")],
    title="ALICE-PT baseline (ALI + lambda ||M(x) - M(G(E(x)))||^2)",
    needs_features=True,
)
