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

A preset whose providers take options registers a function of keyword arguments, the options,
each with a default, which it passes to the providers' constructors; it takes ``features`` too
when it needs the pretrained feature model M::

    def noisy_chain(*, std: float = 0.1) -> list[FeedbackProvider]:
        return [ReconstructionChain(), Noise(std)]  # Noise: a provider of one's own

    register_preset("noisy", classes, noisy_chain)
    build_gali("noisy", models, provider_options={"std": 0.05})
"""

from __future__ import annotations

import difflib
import inspect
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from .errors import ProviderError, SpecError
from .providers import (
    AliceReconstruction,
    FeedbackProvider,
    MaskMix,
    NegativeAugmentation,
    ReconstructionChain,
)
from .providers.base import resolve_node_functions
from .spec import TupleSpec

if TYPE_CHECKING:
    import torch

__all__ = [
    "ENTRY_POINT_GROUP",
    "Preset",
    "ProviderFactory",
    "available_presets",
    "build_spec",
    "get_preset",
    "load_entry_points",
    "register_preset",
]

ENTRY_POINT_GROUP = "gali_ext.presets"
"""The entry-point group through which an installed package registers its presets and
providers: each entry point names a module (imported) or a function (called) that calls
:func:`register_preset`."""

ProviderFactory = Callable[..., Sequence[FeedbackProvider]]
"""A preset's provider factory: a function of keyword arguments, the provider options (each with
a default) and, for a preset that needs M, ``features``, that returns fresh providers."""

FEATURES = "features"
"""The factory parameter that receives the pretrained feature model M; not a provider option."""


def _factory_options(factory: Callable[..., Any], preset: str) -> dict[str, Any]:
    """The provider options ``factory`` takes, name -> default, read from its signature.

    Every parameter other than ``features`` is an option and must be passable by keyword and
    have a default, so that the options can be listed and checked; ``*args``, ``**kwargs`` and
    a required option (such as the former ``lambda options: ...``) raise :class:`SpecError`.
    """
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError) as error:
        raise SpecError(
            f"preset {preset!r}: cannot read the signature of its provider factory {factory!r} "
            f"({error})"
        ) from None
    options: dict[str, Any] = {}
    for parameter in parameters:
        if parameter.name == FEATURES:
            if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.VAR_POSITIONAL):
                raise SpecError(
                    f"preset {preset!r}: its provider factory must take {FEATURES!r} by keyword"
                )
            continue
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise SpecError(
                f"preset {preset!r}: its provider factory takes {parameter}; name each provider "
                "option as a keyword parameter with a default, so that the options can be listed "
                "and checked"
            )
        if parameter.kind is parameter.POSITIONAL_ONLY or parameter.default is parameter.empty:
            raise SpecError(
                f"preset {preset!r}: its provider factory's parameter {parameter.name!r} has no "
                "default; a factory takes the provider options as keyword arguments with "
                f"defaults (and {FEATURES!r} when it needs M), e.g. "
                "def make(*, option=default): ... (PresetOptions and "
                "'lambda options: ...' factories are gone)"
            )
        options[parameter.name] = parameter.default
    return options


def _takes_features(factory: Callable[..., Any]) -> bool:
    """``factory`` has a ``features`` parameter (gets the pretrained feature model M)."""
    return FEATURES in inspect.signature(factory).parameters


def _describe_options(options: Mapping[str, Any]) -> str:
    """``name (default value), ...`` for an error message."""
    return ", ".join(f"{name} (default {default!r})" for name, default in options.items())


@dataclass(frozen=True)
class Preset:
    """A named model: K tuple classes and a factory of the feedback providers they need.

    Attributes:
        name: the registry key (``"gali8"``).
        classes: the tuple classes, as sequences of node names.
        make_providers: the provider factory: keyword arguments (the provider options, and
            ``features`` when the preset needs M) -> providers. Called once per built
            objective, so every objective gets its own provider modules.
        title: one line for listings.
        needs_features: the providers need a pretrained feature model M (the ``features``
            argument of :meth:`providers` and :func:`~gali_ext.build_gali`).
        source: where it was registered: the module that called :func:`register_preset`
            (``"gali_ext.presets"`` for the built-ins), or the installed package's entry point
            (``"entry point nda = gali_nda.presets of gali-nda 0.1"``). A run records it, so
            that a resume can say what to import.
    """

    name: str
    classes: tuple[tuple[str, ...], ...]
    make_providers: ProviderFactory = field(repr=False)
    title: str = ""
    needs_features: bool = False
    source: str = field(default="", compare=False)

    @property
    def spec(self) -> TupleSpec:
        """The preset's :class:`~gali_ext.spec.TupleSpec`."""
        return TupleSpec(self.classes, name=self.name)

    @property
    def options(self) -> dict[str, Any]:
        """The provider options this preset takes, name -> default (the factory's keyword
        parameters; the defaults are the providers' own)."""
        return _factory_options(self.make_providers, self.name)

    def providers(
        self, features: FeedbackProvider | None = None, **options: Any
    ) -> list[FeedbackProvider]:
        """Fresh feedback providers for one objective of this preset.

        Args:
            features: the pretrained feature model M (a
                :class:`~gali_ext.providers.PretrainedFeatures`), required when
                ``needs_features``; passed to a factory that takes ``features``.
            **options: provider options (:attr:`options`), passed to the factory and by it to
                the providers' constructors; an option left out keeps the constructor's default.

        Raises:
            ProviderError: M is missing, an option is not one the preset takes (the message
                lists those it takes), or the factory returned something else than providers.
        """
        if self.needs_features and features is None:
            raise ProviderError(
                f"preset {self.name!r} needs a pretrained feature model M: pass "
                "features=PretrainedFeatures(...)"
            )
        accepted = self.options
        unknown = [name for name in options if name not in accepted]
        if unknown:
            names = ", ".join(map(repr, unknown))
            if not accepted:
                raise ProviderError(f"preset {self.name!r} takes no provider options, got {names}")
            close = difflib.get_close_matches(unknown[0], list(accepted), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ProviderError(
                f"preset {self.name!r} has no provider option {names}{hint}; its options: "
                f"{_describe_options(accepted)}"
            )
        arguments = dict(options)
        if _takes_features(self.make_providers):
            arguments[FEATURES] = features
        made = list(self.make_providers(**arguments))
        for p in made:
            if not isinstance(p, FeedbackProvider):
                raise ProviderError(
                    f"preset {self.name!r}: its provider factory returned a "
                    f"{type(p).__name__}, expected FeedbackProvider instances"
                )
        return made


_REGISTRY: dict[str, Preset] = {}


def _factory(
    providers: ProviderFactory | Sequence[Callable[[], FeedbackProvider]],
) -> ProviderFactory:
    """The preset's provider factory: ``providers`` itself when it is a function, else a
    factory without options that calls each listed class (or zero-argument function) once."""
    if callable(providers):
        return providers
    if isinstance(providers, (str, bytes)) or not isinstance(providers, Sequence):
        raise SpecError(
            "providers must be a function of keyword arguments (the provider options) or a list "
            f"of provider classes (e.g. [ReconstructionChain]), got {type(providers).__name__}"
        )
    makers = tuple(providers)
    for maker in makers:
        if not callable(maker):
            raise SpecError(
                f"providers lists {maker!r}, which is not a provider class or factory; "
                "list classes such as ReconstructionChain, not instances"
            )

    def make() -> list[FeedbackProvider]:
        return [maker() for maker in makers]

    return make


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
    ``ReconstructionChain``), which takes no options, or one function of keyword arguments: the
    provider options, each with a default (use the provider constructor's own, so that it is
    written once), and ``features``, the pretrained feature model M, when the preset needs it
    (``needs_features=True``). :meth:`Preset.providers` and :func:`~gali_ext.build_gali` pass
    the options given to it and refuse any other. The tuple classes are validated now, and
    checked against the providers built with the default options (a node no provider makes is
    refused here, not at the first training step).
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
        source=_loading or sys._getframe(1).f_globals.get("__name__", ""),
    )
    spec = preset.spec  # validates the classes
    _factory_options(preset.make_providers, name)  # validates the factory's signature
    if needs_features and not _takes_features(preset.make_providers):
        raise SpecError(
            f"preset {name!r} needs a pretrained feature model M, but its provider factory takes "
            f"no {FEATURES!r} argument to receive it"
        )
    if not needs_features:
        _check_providers(preset, spec)
    _REGISTRY[name] = preset
    return preset


def _check_providers(preset: Preset, spec: TupleSpec) -> None:
    """The objective's own checks (every function made once, chain depth), before any network
    exists."""
    resolve_node_functions(spec, preset.providers())


_loading: str | None = None  # the entry point being loaded: the source of what it registers
_entry_points_loaded = False
_entry_point_failures: list[str] = []


def load_entry_points() -> None:
    """Register the presets of the installed packages, once per process: every entry point of
    the group :data:`ENTRY_POINT_GROUP` is loaded (a module is imported, a function called), as
    pytest loads its plugins. :func:`get_preset` and :func:`available_presets` call it, so a
    preset of an installed package needs no import.

    An entry point that fails is one warning naming it and its package; its presets are then
    missing, and :func:`get_preset` of one of them names the failure.
    """
    global _entry_points_loaded, _loading
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(point, "dist", None)
        package = f" of {dist.name} {dist.version}" if dist is not None else ""
        _loading = f"entry point {point.name} = {point.value}{package}"
        try:
            loaded = point.load()
            if callable(loaded):
                loaded()
        except Exception as error:  # a broken plugin must not stop the others
            text = str(error).strip().splitlines()
            failure = (
                f"the {_loading} (group {ENTRY_POINT_GROUP}) failed: "
                f"{type(error).__name__}: {text[0] if text else ''}; fix or uninstall it"
            )
            _entry_point_failures.append(failure)
            warnings.warn(failure, stacklevel=2)
        finally:
            _loading = None


def get_preset(name: str) -> Preset:
    """The registered preset ``name``, the installed packages' included
    (:func:`load_entry_points`); an unknown name suggests the closest."""
    preset = _REGISTRY.get(name) if isinstance(name, str) else None
    if preset is None:
        names = available_presets()
        preset = _REGISTRY.get(name) if isinstance(name, str) else None
        if preset is not None:
            return preset
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        failed = "".join(f"; {f}" for f in _entry_point_failures)
        raise SpecError(
            f"unknown preset {name!r}{hint} (presets: {', '.join(names)}; a preset of your "
            f"own: import the module that registers it first, gali-ext --import MODULE){failed}"
        )
    return preset


def available_presets() -> list[str]:
    """Names of the registered presets, the installed packages' included."""
    load_entry_points()
    return sorted(_REGISTRY)


def build_spec(name: str) -> TupleSpec:
    """The tuple spec of a registered preset (``ali``, ``gali4``, ``gali8``, ``gali_mix``,
    ``gali_pt``, ``alice``, ``alice_pt``, or one added by :func:`register_preset`)."""
    return get_preset(name).spec


def _permutations_of_four(x0: str, z0: str, x1: str, z1: str) -> list[tuple[str, ...]]:
    """GALI-8's four orders: images permuted among themselves, latents among themselves."""
    return [(x0, z0, x1, z1), (x0, z1, x1, z0), (x1, z0, x0, z1), (x1, z1, x0, z0)]


_ALI = [("x0", "z0"), ("xp0", "zp0")]


def _default(provider: type[FeedbackProvider], option: str) -> Any:
    """The default of ``option`` in ``provider``'s constructor: a built-in factory's option
    defaults are read from there, so that each is written once."""
    return inspect.signature(provider).parameters[option].default


def _gali_mix(
    *,
    fill: float = _default(MaskMix, "fill"),
    rng: torch.Generator | None = _default(MaskMix, "rng"),
) -> list[FeedbackProvider]:
    """GALI-mix's node functions ``Mask{k}`` and ``Mix{k}`` (docs/design.md, section 5):
    ``fill`` is the value of blacked-out pixels, ``rng`` the masks' generator."""
    return [MaskMix(fill=fill, rng=rng)]


def _gali_nda(
    *,
    grid: int = _default(NegativeAugmentation, "grid"),
    cutout_fraction: float = _default(NegativeAugmentation, "cutout_fraction"),
    fill: float = _default(NegativeAugmentation, "fill"),
) -> list[FeedbackProvider]:
    """GALI-NDA's node functions ``Jigsaw`` and ``Cutout`` (docs/design.md, section 2.4):
    ``grid`` tiles per side, the cut-out square's ``cutout_fraction`` of the image side, its
    ``fill``."""
    return [NegativeAugmentation(grid=grid, cutout_fraction=cutout_fraction, fill=fill)]


def _gali_pt(features: FeedbackProvider) -> list[FeedbackProvider]:
    """GALI-PT's reconstruction chain and the pretrained feature model M."""
    return [ReconstructionChain(), features]


def _alice(*, weight: float = _default(AliceReconstruction, "weight")) -> list[FeedbackProvider]:
    """ALICE's penalty ``weight * mean((x0 - x1)^2)`` on the generator-encoder
    (docs/design.md, eq. (3.11)); ``weight`` is lambda."""
    return [AliceReconstruction(weight=weight)]


def _alice_pt(
    features: FeedbackProvider, *, weight: float = _default(AliceReconstruction, "weight")
) -> list[FeedbackProvider]:
    """The pretrained feature model M and ALICE-PT's penalty
    ``weight * mean((M(x0) - M(x1))^2)`` (docs/design.md, eq. (3.11)); ``weight`` is lambda."""
    return [features, AliceReconstruction(weight=weight, features="M")]


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
    _gali_mix,
    title="GALI-mix (K=8, inpainting self-supervision)",
)
# Negative data augmentation (Sinha et al., ICLR 2021) as GALI classes: real images taken out of
# the data distribution, paired with the code of the image they came from (on digits it costs
# ALI most of its inference: docs/design.md, section 2.4).
register_preset(
    "gali_nda",
    [*_ALI, ("Jigsaw(x0)", "z0"), ("Cutout(x0)", "z0")],
    _gali_nda,
    title="GALI-NDA (K=4, ALI + negative data augmentation: Jigsaw and Cutout classes)",
)
register_preset(
    "gali_pt",
    [
        ("x0", "z0", "M(x0)"),
        ("xp0", "zp0", "M(xp0)"),
        ("x0", "z1", "M(x1)"),
        ("xp1", "zp0", "M(xp0)"),
    ],
    _gali_pt,
    title="GALI-PT (K=4, m=3, pretrained features M)",
    needs_features=True,
)
# The ALICE baselines train on ALI's tuples; their reconstruction penalty is a loss term of a
# provider, not a tuple class.
register_preset(
    "alice",
    _ALI,
    _alice,
    title="ALICE baseline (ALI + lambda ||x - G(E(x))||^2)",
)
register_preset(
    "alice_pt",
    _ALI,
    _alice_pt,
    title="ALICE-PT baseline (ALI + lambda ||M(x) - M(G(E(x)))||^2)",
    needs_features=True,
)
