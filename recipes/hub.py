"""What an export is to the one who loads it (docs/design.md, section 10.11): the schema of its
``config.json``, its files, from a folder, the Hugging Face Hub or the local cache, and the two
networks loaded from them (:class:`HubEncoder`, :class:`HubGenerator`; also importable from
:mod:`gali_ext.recipes.export`, as the model cards write).

- **the schema** (:data:`EXPORT_FIELDS`, :func:`check_export_config`): every field of the
  ``config.json`` that ``gali-ext export`` writes, with its type and range; the sizes
  (``latent_dim``, ``num_classes``) are bounded by the architecture's image. The writer checks
  what it writes against it and every reader what it reads, before anything is built, so a
  forged ``"latent_dim": 100000000000`` is one :class:`~gali_ext.errors.ConfigError` naming the
  field, the value and the range, not an allocation of 400 GB;
- **the files** (:func:`export_file`): a folder is read as it is; a repository id goes through
  ``huggingface_hub``. Offline (``HF_HUB_OFFLINE=1``, ``local_files_only``, or no network: the
  Hub is asked once, without retries) the local cache is used, and a repository that is not in
  it is one line saying so and how to load a folder instead, without huggingface_hub's retries.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelHubMixin
from safetensors.torch import save_model

from gali_ext.errors import CheckpointError, ConfigError, GaliError, first_line
from gali_ext.priors import resolve_prior
from gali_ext.providers.pretrained import load_safetensors_into
from gali_ext.recipes.checkpoints import weights_mismatch
from gali_ext.recipes.models import (
    OUTPUT_BIASES,
    GaussianEncoder,
    Generator,
    arch_image_shape,
    architecture,
    available_archs,
)

__all__ = [
    "TAGS",
    "EXPORT_FIELDS",
    "EXPORT_FORMAT",
    "EXPORT_FORMAT_VERSION",
    "MAX_CHANNELS",
    "WEIGHT_NAMES",
    "ExportField",
    "HubEncoder",
    "HubGenerator",
    "check_export_config",
    "export_file",
    "hub_failure",
]

#: ``config.json``'s ``"format"``: what ``HubEncoder.from_pretrained`` accepts
EXPORT_FORMAT = "gali-ext-export"
EXPORT_FORMAT_VERSION = 1
#: the weights file of each network of an export
WEIGHT_NAMES = {"encoder": "encoder.safetensors", "generator": "generator.safetensors"}
#: image channels an export may have: grayscale, RGB, RGBA
MAX_CHANNELS = 4


@dataclass(frozen=True)
class ExportField:
    """One field of an export's ``config.json``.

    Attributes:
        name: the key.
        required: whether every reader needs it (``save_pretrained`` of one network writes the
            format, the architecture, ``latent_dim``, ``channels`` and its own argument only).
        valid: ``valid(value, config)``, where ``config`` holds the fields checked before it.
        expected: ``expected(config)``, the type and range in words, for the error.
    """

    name: str
    required: bool
    valid: Callable[[Any, Mapping[str, Any]], bool]
    expected: Callable[[Mapping[str, Any]], str]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _image_values(config: Mapping[str, Any]) -> tuple[int, str]:
    """The values of one image of the export's architecture and channels, and the product."""
    c, h, w = arch_image_shape(config["arch"], config["channels"])
    return c * h * w, f"{c} x {h} x {w}"


def _size(what: str) -> ExportField:
    """A size bounded by the architecture's image: a code or a condition longer than the image
    it describes is no model gali-ext trains, and would only allocate memory."""

    def valid(value: Any, config: Mapping[str, Any]) -> bool:
        return _is_int(value) and 1 <= value <= _image_values(config)[0]

    def expected(config: Mapping[str, Any]) -> str:
        count, shape = _image_values(config)
        return (
            f"an int in [1, {count}] ({what} at most the {shape} = {count} values of one image "
            f"of the {config['arch']} architecture)"
        )

    return ExportField("", True, valid, expected)


def _prior_valid(value: Any, config: Mapping[str, Any]) -> bool:
    if not isinstance(value, str):
        return False
    try:
        resolve_prior(value)
    except GaliError:
        return False
    return True


_latent, _classes = _size("a code of"), _size("classes")

EXPORT_FIELDS: tuple[ExportField, ...] = (
    ExportField(
        "format",
        True,
        lambda v, c: v == EXPORT_FORMAT,
        lambda c: f'"{EXPORT_FORMAT}" (written by `gali-ext export`)',
    ),
    ExportField(
        "format_version",
        True,
        lambda v, c: _is_int(v) and 1 <= v <= EXPORT_FORMAT_VERSION,
        lambda c: f"an int in [1, {EXPORT_FORMAT_VERSION}] (the versions this gali-ext reads)",
    ),
    ExportField(
        "gali_ext_version",
        False,
        lambda v, c: isinstance(v, str) and 0 < len(v) <= 64,
        lambda c: "a version string, e.g. '0.2.0'",
    ),
    ExportField(
        "arch",
        True,
        lambda v, c: isinstance(v, str) and v in available_archs(),
        lambda c: f"one of {', '.join(available_archs())}",
    ),
    ExportField(
        "channels",
        True,
        lambda v, c: _is_int(v) and 1 <= v <= MAX_CHANNELS,
        lambda c: f"an int in [1, {MAX_CHANNELS}] (grayscale, RGB or RGBA images)",
    ),
    ExportField(
        "image_shape",
        False,
        lambda v, c: v == list(arch_image_shape(c["arch"], c["channels"])),
        lambda c: (
            f"{list(arch_image_shape(c['arch'], c['channels']))} (channels, height, width "
            f"of the {c['arch']} architecture)"
        ),
    ),
    ExportField("latent_dim", True, _latent.valid, _latent.expected),
    ExportField(
        "deterministic",
        False,
        lambda v, c: isinstance(v, bool),
        lambda c: "true or false",
    ),
    ExportField(
        "num_classes",
        False,
        lambda v, c: v is None or _classes.valid(v, c),
        lambda c: f"null (unconditional) or {_classes.expected(c)}",
    ),
    ExportField(
        "output_bias",
        False,
        lambda v, c: isinstance(v, str) and v in OUTPUT_BIASES,
        lambda c: f"one of {', '.join(OUTPUT_BIASES)} (G's output bias)",
    ),
    ExportField("prior", False, _prior_valid, lambda c: "a prior name, e.g. 'normal'"),
    ExportField(
        "image_range",
        False,
        lambda v, c: isinstance(v, list) and v == [-1.0, 1.0] and not any(map(_is_bool, v)),
        lambda c: "[-1.0, 1.0]",
    ),
    ExportField(
        "weights",
        False,
        lambda v, c: v in ("ema", "raw") and isinstance(v, str),
        lambda c: '"ema" or "raw"',
    ),
    ExportField(
        "files",
        False,
        lambda v, c: v == WEIGHT_NAMES,
        lambda c: f"{WEIGHT_NAMES} (the weights files of an export)",
    ),
    ExportField(
        "recipe",
        False,
        lambda v, c: isinstance(v, dict),
        lambda c: "an object (the run's settings)",
    ),
    ExportField(
        "launch",
        False,
        lambda v, c: v is None or isinstance(v, dict),
        lambda c: "null or an object (the processes that trained the run)",
    ),
    ExportField(
        "best",
        False,
        lambda v, c: isinstance(v, dict),
        lambda c: "an object (the evaluation the best weights were kept by)",
    ),
)
"""The schema of an export's ``config.json``, in the order the fields are checked (the range of
``latent_dim`` and ``num_classes`` depends on ``arch`` and ``channels`` before them)."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_export_config(
    config: Any, source: str, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``config`` (the contents of ``source``'s ``config.json``), with ``overrides`` (arguments
    given to ``from_pretrained``) put over it, once every field of :data:`EXPORT_FIELDS` in it
    has its type and range and the required ones are there; else one
    :class:`~gali_ext.errors.ConfigError` naming the field, the value and the expected range.
    Fields the schema does not know are left alone."""
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        if config is None:
            found = "no config.json"
        elif isinstance(config, dict):
            found = f"a config.json with format {_shown(config.get('format'))}"
        else:
            found = f"a config.json holding {type(config).__name__}"
        raise ConfigError(
            f"{source!r} is not a gali-ext export: expected a config.json with "
            f'"format": "{EXPORT_FORMAT}" (written by `gali-ext export`), found {found}'
        )
    version = config.get("format_version")
    if _is_int(version) and version > EXPORT_FORMAT_VERSION:
        raise ConfigError(
            f"{source!r}: config.json field 'format_version' is {version}: this gali-ext reads "
            f"exports of format_version 1 to {EXPORT_FORMAT_VERSION}; upgrade gali-ext"
        )
    merged = {**config, **(overrides or {})}
    checked: dict[str, Any] = {}
    for field in EXPORT_FIELDS:
        if field.name not in merged:
            if field.required:
                raise ConfigError(
                    f"{source!r}: config.json lacks {field.name!r}: expected "
                    f"{field.expected(checked)}"
                )
            continue
        value = merged[field.name]
        if not field.valid(value, checked):
            given = "from_pretrained's argument" if field.name in (overrides or {}) else "field"
            raise ConfigError(
                f"{source!r}: config.json {given} {field.name!r} is {_shown(value)}: expected "
                f"{field.expected(checked)}"
            )
        checked[field.name] = value
    return merged


def hub_failure(error: BaseException) -> bool:
    """Whether ``error`` is the Hub's or the network's (huggingface_hub's HTTP errors are
    ``OSError``s; its HTTP client, ``httpx`` or ``httpx2`` by version, raises its own)."""
    if isinstance(error, OSError):
        return True
    return any(c.__module__.split(".")[0] in ("httpx", "httpx2") for c in type(error).__mro__)


def _unreachable(error: BaseException) -> bool:
    """Whether ``error`` means the Hub could not be reached at all (no network, offline mode),
    rather than an answer of the Hub (no such repository, no access)."""
    from huggingface_hub.errors import HfHubHTTPError

    return hub_failure(error) and not isinstance(error, HfHubHTTPError)


def _offline_error(model_id: str, why: str) -> ConfigError:
    return ConfigError(
        f"{model_id!r} is not in the local Hugging Face cache and the Hub cannot be reached "
        f"({why}): download it where there is a network (`hf download {model_id}`, then copy "
        "the cache), or pass from_pretrained the folder of a local export: "
        "from_pretrained('path/to/export')"
    )


def export_file(
    model_id: str,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> tuple[Path, bool]:
    """``filename`` of the export ``model_id`` (a folder, or a Hub repository id) as a local
    path, and whether the Hub was out of reach (then pass ``local_files_only=True`` for the
    export's other files).

    A folder's file is returned as it is (missing or not: the reader names a missing one).
    Offline (``local_files_only``, ``HF_HUB_OFFLINE=1``) the file comes from the local cache.
    Otherwise the Hub is asked for it once, without retries (``get_hf_file_metadata``): when it
    cannot be reached, the cache is used as in offline mode, without the retries
    huggingface_hub makes when nothing is cached. Raises
    :class:`~gali_ext.errors.ConfigError` in one line for a repository not in the cache
    offline, an id that is neither a folder nor a repository id, or a refusal of the Hub."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if os.path.isdir(model_id):
        return Path(model_id) / filename, False
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        raise ConfigError(
            f"{model_id!r} is neither a folder nor a Hub repository id (user/name): expected "
            "the folder `gali-ext export` wrote, or a repository id"
        ) from None
    offline = local_files_only or constants.HF_HUB_OFFLINE
    why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
    if not offline and not force_download:
        try:
            get_hf_file_metadata(hf_hub_url(model_id, filename, revision=revision), token=token)
        except Exception as error:
            if not _unreachable(error):
                raise _hub_refusal(model_id, filename, error) from error
            offline, why = True, f"no network: {first_line(error)}"
    try:
        path = hf_hub_download(
            repo_id=model_id,
            filename=filename,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=offline,
        )
    except Exception as error:
        from huggingface_hub.errors import LocalEntryNotFoundError

        if offline and isinstance(error, LocalEntryNotFoundError):
            raise _offline_error(model_id, why) from None
        if not hub_failure(error):
            raise
        if _unreachable(error):
            raise _offline_error(model_id, f"no network: {first_line(error)}") from None
        raise _hub_refusal(model_id, filename, error) from error
    return Path(path), offline


def _hub_refusal(model_id: str, filename: str, error: BaseException) -> ConfigError:
    return ConfigError(
        f"cannot load {filename} of {model_id!r} from the Hub ({first_line(error)}): check the "
        "repository id, or log in (`hf auth login`) for a private one"
    )


TAGS = [
    "gali-ext",
    "gali",
    "adversarially-learned-inference",
    "bigan",
    "encoder",
    "generator",
    "representation-learning",
    "pytorch",
]


_FIELD_NAMES = frozenset(f.name for f in EXPORT_FIELDS)


def _read_config(path: Path, source: str) -> Any:
    """The JSON of an export's ``config.json`` (None when there is none)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(
            f"{source!r}: its config.json is not JSON ({first_line(error)}): expected the "
            "config.json `gali-ext export` wrote"
        ) from None


class _HubModel(ModelHubMixin, library_name="gali-ext", license="mit", tags=list(TAGS)):
    """``from_pretrained`` and ``save_pretrained`` for one network of an export: its weights
    file (:attr:`weights_file`) beside a ``config.json`` in :data:`EXPORT_FORMAT`."""

    weights_file: str

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        **model_kwargs: Any,
    ) -> Any:
        """The network of an export (a folder, or a Hub repository id), in eval mode on
        ``map_location`` (default ``"cpu"``).

        ``config.json`` is read first and checked field by field (:func:`.hub.check_export_config`:
        type, range, sizes bounded by the architecture); the network it describes is compared
        with the weights file's header before it is built. A repository id is fetched through
        ``huggingface_hub`` (:func:`.hub.export_file`): offline (``HF_HUB_OFFLINE=1``,
        ``local_files_only``, no network) from the local cache, and a repository not there is
        one line at once. Raises :class:`~gali_ext.errors.ConfigError` for what is not a
        gali-ext export or holds an invalid field, :class:`~gali_ext.errors.CheckpointError`
        naming the file (and key) of weights that are missing, damaged or of another shape."""
        source = str(pretrained_model_name_or_path)
        where = dict(revision=revision, cache_dir=cache_dir, token=token)
        path, offline = export_file(
            source,
            "config.json",
            force_download=force_download,
            local_files_only=local_files_only,
            **where,
        )
        overrides = {k: v for k, v in model_kwargs.items() if k in _FIELD_NAMES}
        check_export_config(_read_config(path, source), source, overrides)
        return super().from_pretrained(
            source,
            force_download=force_download,
            local_files_only=local_files_only or offline,
            **where,
            **model_kwargs,
        )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        config: dict[str, Any] | None = None,
        map_location: str = "cpu",
        **model_kwargs: Any,
    ) -> Any:
        """Build the network from the checked ``config`` and load its weights file."""
        overrides = {k: v for k, v in model_kwargs.items() if k in _FIELD_NAMES}
        check_export_config(config, model_id, overrides)
        path, _ = export_file(
            model_id,
            cls.weights_file,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
        )
        if path.is_file():  # a missing file is named by load_safetensors_into
            with torch.device("meta"):
                skeleton = cls(**model_kwargs)
            mismatch = weights_mismatch(skeleton, path)
            if mismatch is not None:
                raise CheckpointError(
                    f"{model_id!r}: the weights do not fit its config.json ({mismatch})"
                )
        model = cls(**model_kwargs)
        load_safetensors_into(model, path)
        return model.to(map_location).eval()

    def _save_pretrained(self, save_directory: Path) -> None:
        """This network's weights and a ``config.json`` that :meth:`from_pretrained` reads (the
        constructor's arguments; a re-saved network has no run settings)."""

        header = {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION}
        config = {**header, **(self._hub_mixin_config or {})}  # type: ignore[dict-item]
        check_export_config(config, str(save_directory))
        save_model(self, str(save_directory / self.weights_file))  # type: ignore[arg-type]
        (save_directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


class HubEncoder(GaussianEncoder, _HubModel):
    """The encoder ``G_z(x)`` of an export, loaded with ``HubEncoder.from_pretrained(folder or
    repo id)``: a :class:`~gali_ext.recipes.models.GaussianEncoder`, ``forward(x: [B, C, H, W]
    in [-1, 1]) -> (mu, log_sigma)``, each ``[B, latent_dim]`` (``z`` itself when
    ``deterministic``); :meth:`hidden_features` gives the representation the linear-SVM
    evaluation reads. Loaded in eval mode (batch norm uses its stored statistics).

    Args:
        arch: the recipe architecture (``digits``, ``svhn``, ``celeba``).
        latent_dim: the size of ``z``.
        channels: the image channels.
        deterministic: a BiGAN encoder returning ``z``.
    """

    weights_file = WEIGHT_NAMES["encoder"]

    def __init__(
        self, arch: str, latent_dim: int, channels: int, deterministic: bool = False
    ) -> None:
        table = architecture(arch)
        super().__init__(
            arch_image_shape(arch, channels),
            table.encoder,
            latent_dim,
            table.negative_slope,
            deterministic,
            table.init_std,
        )


class HubGenerator(Generator, _HubModel):
    """The generator ``G_x(z)`` of an export, loaded with ``HubGenerator.from_pretrained(folder
    or repo id)``: a :class:`~gali_ext.recipes.models.Generator`, ``forward(z: [B, latent_dim])
    -> [B, C, H, W]`` in [-1, 1] (``forward(z, y)`` with class ids ``y: [B]`` when
    ``num_classes`` is set). Loaded in eval mode.

    Args:
        arch: the recipe architecture (``digits``, ``svhn``, ``celeba``).
        latent_dim: the size of ``z``.
        channels: the image channels.
        num_classes: the classes of a class-conditional ``G(z, y)``; None: unconditional.
        output_bias: ``"channel"`` or ``"pixel"`` (G's output bias; exports without it are
            ``"channel"``).
    """

    weights_file = WEIGHT_NAMES["generator"]

    def __init__(
        self,
        arch: str,
        latent_dim: int,
        channels: int,
        num_classes: int | None = None,
        output_bias: str = "channel",
    ) -> None:
        table = architecture(arch)
        super().__init__(
            arch_image_shape(arch, channels),
            table.generator,
            latent_dim,
            table.negative_slope,
            table.init_std,
            num_classes,
            output_bias,
        )
