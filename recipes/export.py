"""Share a trained run like a timm or Hugging Face Hub model, and load its E and G back.

``gali-ext export RUN DIR`` (:func:`export_run`) writes a folder that is a Hub model repository
as it stands (docs/design.md, section 10.11)::

    encoder.safetensors       G_z(x), the run's moving average (EMA) where it has one
    generator.safetensors     G_x(z), EMA or trained as the encoder is (config.json says which)
    config.json               what rebuilds them (architecture, latent size, channels, classes),
                              which weights, and the run's settings under "recipe"
    summary.json              the run's own summary.json, byte for byte
    samples.png               the grids training drew last
    reconstructions.png
    README.md                 the model card: Hub front matter, settings, metrics, grids, usage

Two lines load E or G back, from that folder (offline) or from a Hub repository, through
``huggingface_hub``'s :class:`~huggingface_hub.ModelHubMixin`; ``config.json`` is checked field by
field against the schema the export was written with (:mod:`.hub`) before anything is built::

    from gali_ext.recipes.export import HubEncoder
    encoder = HubEncoder.from_pretrained("user/gali-digits-gali4")  # or the folder

:func:`push_to_hub` (``--push-to-hub REPO``) uploads the folder with
``HfApi.create_repo`` and ``HfApi.upload_folder``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCardData
from safetensors.torch import save_model

from gali_ext import __version__
from gali_ext.errors import CheckpointError, ConfigError, first_line
from gali_ext.recipes.hub import (
    EXPORT_FORMAT,
    EXPORT_FORMAT_VERSION,
    TAGS,
    WEIGHT_NAMES,
    HubEncoder,
    HubGenerator,
    check_export_config,
    hub_failure,
)
from gali_ext.recipes.outputs import check_output_path
from gali_ext.recipes.runs import has_ema_weights, load_run_models
from gali_ext.recipes.settings import RecipeConfig

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_FORMAT_VERSION",
    "Export",
    "HubEncoder",
    "HubGenerator",
    "export_run",
    "model_card",
    "push_to_hub",
]

GRIDS = {
    "samples.png": "Samples `G(z)`, `z` drawn from the prior",
    "reconstructions.png": "Rows of test images `x`, each over its row of reconstructions "
    "`G(E(x))`",
}
#: settings that hold paths of the training machine: only the file or folder name is exported
LOCAL_PATHS = ("data_dir", "features_weights", "fid_weights")
#: the settings the card lists (all of them are in config.json, under "recipe")
CARD_SETTINGS = (
    "name",
    "spec",
    "dataset",
    "arch",
    "latent_dim",
    "prior",
    "conditions",
    "steps",
    "batch_size",
    "optimizer",
    "lr",
    "betas",
    "n_dis",
    "instance_noise",
    "alice_weight",
    "generator_criterion",
    "discriminator_criterion",
    "ema_decay",
    "mixed_precision",
    "seed",
)


@dataclass
class Export:
    """What :func:`export_run` wrote.

    Attributes:
        folder: the export folder.
        weights: ``"ema"`` (the moving averages of E and G) or ``"raw"`` (the trained weights).
        files: the file names in the folder, sorted.
    """

    folder: Path
    weights: str
    files: list[str]


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    ema: bool = True,
    license: str = "mit",
    repo_id: str | None = None,
    best: bool = False,
) -> Export:
    """Write run ``run_dir``'s E and G as a Hub-ready folder ``out`` (the module docstring lists
    its files): the moving averages (EMA) where the run has them and ``ema``, else the trained
    weights; with ``best``, the best weights the run kept by its ``best_metric`` (``best/``,
    recorded under ``"best"`` in ``config.json`` and on the card). ``license`` goes into the
    card's front matter; ``repo_id`` (the repository it will be pushed to) into its usage
    example.

    ``out`` must not exist or be an empty folder, and be a path gali-ext may write
    (:func:`.outputs.check_output_path`); it is written under a temporary name and renamed, so a
    failure leaves no half export. ``config.json`` is checked against the schema every reader
    checks (:func:`.hub.check_export_config`) before anything is written. Raises
    :class:`~gali_ext.errors.ConfigError` for a missing run or a non-empty ``out``,
    :class:`~gali_ext.errors.CheckpointError` for a run without trained weights (stopped before
    its first checkpoint) or with damaged ones.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(
            f"no run directory at {str(run)!r}: expected a folder written by `gali-ext recipe`"
        )
    if not (run / "config.json").is_file():
        raise ConfigError(f"{str(run)!r} is not a run directory: it has no config.json")
    out = check_output_path(out, "the export folder", kind="new folder")
    config = RecipeConfig.from_json(run / "config.json")
    missing = [f"{n}.safetensors" for n in WEIGHT_NAMES if not (run / f"{n}.safetensors").is_file()]
    if missing:
        raise CheckpointError(
            f"{str(run)!r} has no trained weights yet ({', '.join(missing)} missing): the run "
            f"stopped before its first checkpoint (checkpoint_every={config.checkpoint_every}); "
            f"continue it with `gali-ext recipe {config.name} --out {run} --resume`"
        )
    models = load_run_models(run, ema=ema, best=best)
    summary = _read_summary(run)
    config_json = export_config(run, models)
    check_export_config(config_json, f"the export of {run}")  # what readers will check
    temporary = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        _write_export(
            temporary,
            run,
            models,
            config_json,
            summary,
            license=license,
            repo_id=repo_id,
            folder_name=out.name,
        )
        os.replace(temporary, out)  # an empty folder is replaced too (POSIX rename)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return Export(out, models.weights, sorted(p.name for p in out.iterdir()))


def _read_summary(run: Path) -> tuple[dict[str, Any], bytes] | None:
    path = run / "summary.json"
    if not path.is_file():
        return None
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except ValueError as error:
        raise ConfigError(f"{str(path)!r} is not JSON ({error})") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r}: expected a JSON object, got {type(data).__name__}")
    return data, raw


def export_config(run: Path, models: Any) -> dict[str, Any]:
    """The export's ``config.json``: the format, what rebuilds E and G (the arguments of
    :class:`HubEncoder` and :class:`HubGenerator`), which weights, and the run's settings under
    ``"recipe"`` (local paths reduced to their last part) and ``"launch"``."""

    settings = asdict(models.config)
    for key in LOCAL_PATHS:
        settings[key] = Path(settings[key]).name if settings[key] else ""
    launch = json.loads((run / "config.json").read_text()).get("launch")
    encoder, generator = models.encoder, models.generator
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "gali_ext_version": __version__,
        "arch": models.config.arch,
        "latent_dim": models.latent_dim,
        "channels": encoder.image_shape[0],
        "image_shape": list(encoder.image_shape),
        "deterministic": encoder.deterministic,
        "num_classes": generator.num_classes,
        "output_bias": generator.output_bias_mode,
        "prior": models.config.prior,
        "image_range": [-1.0, 1.0],
        "weights": models.weights,
        "files": dict(WEIGHT_NAMES),
        "recipe": settings,
        "launch": launch,
        **({"best": models.best} if models.best else {}),
    }


def _write_export(
    folder: Path,
    run: Path,
    models: Any,
    config: dict[str, Any],
    summary: Any,
    *,
    license: str,
    repo_id: str | None,
    folder_name: str,
) -> None:

    metadata = {"format": "pt", "gali_ext_weights": models.weights}
    for name, file in WEIGHT_NAMES.items():
        save_model(
            getattr(models, name), str(folder / file), metadata=metadata, force_contiguous=True
        )
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if summary is not None:
        (folder / "summary.json").write_bytes(summary[1])
    grids = [name for name in GRIDS if (run / name).is_file()]
    for name in grids:
        shutil.copyfile(run / name, folder / name)
    card = model_card(
        config,
        summary[0] if summary else None,
        grids,
        license=license,
        repo_id=repo_id or folder_name,
        run_has_ema=has_ema_weights(run),
    )
    (folder / "README.md").write_text(card)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def model_card(
    config: dict[str, Any],
    summary: dict[str, Any] | None,
    grids: list[str],
    *,
    license: str = "mit",
    repo_id: str = "DIR",
    run_has_ema: bool = False,
) -> str:
    """The model card (``README.md``) of an export: Hub front matter (``library_name``,
    ``license``, ``tags``), which weights, the settings, every number of ``summary`` as
    ``json`` writes it (so the card's numbers are summary.json's exactly), the ``grids`` and
    the two lines that load E and G."""
    recipe = config["recipe"]
    tags = TAGS + [recipe["dataset"], recipe["spec"].replace("_", "-")]
    data = ModelCardData(library_name="gali-ext", license=license, tags=tags)
    ema = config["weights"] == "ema"
    which = (
        f"the moving average (EMA) of E's and G's weights, decay {recipe['ema_decay']}"
        if ema
        else "the trained weights of E and G"
    )
    if not ema and run_has_ema:
        which += " (the run also kept a moving average; exported without it, `--raw-weights`)"
    elif not ema:
        which += " (the run kept no moving average: ema_decay = 0)"
    best = config.get("best")
    if best:
        which = (
            f"the best of {which} by `{best['metric']}` on the {best.get('split', 'held-out')} "
            f"split ({json.dumps(best['value'])} at step {best['step']}; the metrics and grids "
            "below are of the last weights)"
        )
    shape = " x ".join(str(n) for n in config["image_shape"])
    if summary is not None and _number(summary.get("steps")):
        trained = f"for {summary['steps']} steps"
    else:
        trained = f"configured for {recipe['steps']} steps (the run did not finish)"
    outputs = "`z`" if config["deterministic"] else "`(mu, log_sigma)` of `q(z | x)`"
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {recipe['name']}: GALI encoder and generator ({recipe['dataset']})",
        "",
        f"{recipe['description']}" if recipe["description"] else "",
        "",
        f"An encoder `E = G_z(x)` and a generator `G = G_x(z)` trained with gali-ext "
        f"(Generalized Adversarially Learned Inference), preset `{recipe['spec']}`, {trained}. "
        f"Images are {shape} in [-1, 1]; `z` has "
        f"{config['latent_dim']} dimensions, prior `{config['prior']}`.",
        "",
        f"**Weights**: {which}.",
        "",
        "## Use",
        "",
        "```python",
        "from gali_ext.recipes.export import HubEncoder, HubGenerator",
        f"encoder = HubEncoder.from_pretrained({json.dumps(repo_id)})  # Hub repo id or folder",
        f"generator = HubGenerator.from_pretrained({json.dumps(repo_id)})",
        "```",
        "",
        f"`encoder(x)` returns {outputs}, each `[B, "
        f"{config['latent_dim']}]`; `encoder.hidden_features(x)` the representation the linear "
        "SVM reads. "
        + (
            f"`generator(z, y)` draws class `y` (class ids `[B]`, {config['num_classes']} classes)."
            if config["num_classes"]
            else f"`generator(z)` returns images `[B, {shape.replace(' x ', ', ')}]`."
        )
        + " Both load in eval mode.",
        "",
    ]
    lines += _card_metrics(summary)
    lines += _card_grids(grids, config["num_classes"])
    lines += _card_settings(recipe)
    return "\n".join(lines)


def _card_metrics(summary: dict[str, Any] | None) -> list[str]:
    """The card's Metrics section: every number of ``summary`` as ``json`` writes it."""
    lines = ["## Metrics", ""]
    if summary is None:
        return lines + ["The run has no `summary.json` (it did not finish); no metrics.", ""]
    shown = summary.get("weights")
    lines += [
        f"From the run's `summary.json` (copied beside this card), computed with the "
        f"{'EMA' if shown == 'ema' else 'trained'} weights"
        + (
            " (`test_pixel_mse_raw`: the trained weights)"
            if "test_pixel_mse_raw" in summary
            else ""
        )
        + "; metric definitions: gali-ext's docs/design.md, section 6.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key, value in summary.items():
        if _number(value):
            lines.append(f"| `{key}` | {json.dumps(value)} |")
    return lines + [""]


def _card_grids(grids: list[str], num_classes: int) -> list[str]:
    """The card's Grids section (none without grids)."""
    if not grids:
        return []
    lines = [
        "## Grids",
        "",
        "The grids training drew last, with the weights the metrics are computed with.",
        "",
    ]
    for name in grids:
        caption = GRIDS[name]
        if num_classes and name == "samples.png":
            caption = "Samples `G(z, y)`, sample i of class `y = i mod num_classes`"
        lines += [f"{caption}:", "", f"![{name[:-4]}]({name})", ""]
    return lines


def _card_settings(recipe: dict[str, Any]) -> list[str]:
    """The card's Settings section: :data:`CARD_SETTINGS` and how to train the same."""
    lines = ["## Settings", "", "| setting | value |", "|---|---|"]
    for key in CARD_SETTINGS:
        lines.append(f"| `{key}` | `{json.dumps(recipe[key])}` |")
    return lines + [
        "",
        'Every setting is in `config.json`, under `"recipe"` (paths reduced to their '
        "last part); train the same with `gali-ext recipe "
        f"{recipe['name']} --set KEY=VALUE ...`.",
        "",
    ]


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload a gali-ext export",
) -> str:
    """Upload export ``folder`` to the Hub model repository ``repo_id`` (created when missing,
    ``private`` if asked) with ``HfApi().create_repo`` and ``HfApi().upload_folder``; returns
    the commit's URL. A refused upload (no token, no write access, no network) becomes one
    :class:`~gali_ext.errors.ConfigError` line; the folder stays complete."""
    check_repo_id(repo_id)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message=commit_message,
        )
    except Exception as error:  # the Hub's HTTP errors, httpx's network errors, OSError
        if not hub_failure(error):
            raise
        reason = first_line(error)
        raise ConfigError(
            f"--push-to-hub {repo_id}: the upload failed ({reason}); the export in "
            f"{str(folder)!r} is complete: log in (`hf auth login`) or check the "
            "repository, then push it again with `hf upload "
            f"{repo_id} {folder}`"
        ) from error
    return str(getattr(commit, "commit_url", commit))


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` when it is a valid Hub repository id (``user/name``); else
    :class:`~gali_ext.errors.ConfigError`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError(
            f"--push-to-hub: expected a repository id like user/name, got {repo_id!r} ({first})"
        ) from error
    return repo_id
