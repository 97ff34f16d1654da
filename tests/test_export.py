"""`gali-ext export`: a run as a Hub-ready folder, loaded back with from_pretrained, pushed with
huggingface_hub (never over the network here)."""

import json
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gali_ext import recipes
from gali_ext.errors import CheckpointError, ConfigError
from gali_ext.recipes.export import HubEncoder, HubGenerator
from gali_ext.recipes.models import build_ali_models
from gali_ext.recipes.train import train
from tests._helpers import run_cli as cli

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "steps": "2",
    "batch_size": "16",
    "log_every": "1",
    "sample_every": "2",
    "checkpoint_every": "2",
}


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A 2-step digits-gali4 run, which keeps a moving average (ema_decay 0.998)."""
    out = tmp_path_factory.mktemp("runs") / "gali4"
    train(recipes.get("digits-gali4").with_overrides(TINY), out, progress=False)
    return out


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """A 2-step class-conditional digits-gali8-cond run, which keeps no moving average."""
    out = tmp_path_factory.mktemp("runs") / "cond"
    train(recipes.get("digits-gali8-cond").with_overrides(TINY), out, progress=False)
    return out


@pytest.fixture
def no_network(monkeypatch):
    """Any connection or Hub download fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args} {kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", refuse)  # gali_ext.recipes.hub's
    monkeypatch.setattr("huggingface_hub.get_hf_file_metadata", refuse)
    monkeypatch.setattr("huggingface_hub.hub_mixin.hf_hub_download", refuse)


def reference(run: Path, files: tuple[str, str], num_classes=None):
    """The run's own E and G, built from its config and loaded from ``files`` with torch and
    safetensors alone, in eval mode."""
    config = json.loads((run / "config.json").read_text())
    models = build_ali_models(
        config["arch"], latent_dim=config["latent_dim"], num_classes=num_classes
    )
    for module, file in zip((models.encoder, models.generator), files):
        module.load_state_dict(load_file(str(run / file)))
        module.eval()
    return models.encoder, models.generator


def fixed_inputs(latent_dim=32):
    g = torch.Generator().manual_seed(7)
    return torch.rand(6, 1, 16, 16, generator=g) * 2 - 1, torch.randn(6, latent_dim, generator=g)


def card_metrics(card: str) -> dict[str, str]:
    """The ``| `name` | value |`` rows of the card's Metrics section."""
    section = card.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(\w+)` \| (\S+) \|$", section, re.M))


def test_export_loads_back_bit_exact_offline(ema_run, tmp_path, capsys, no_network):
    code, out, err = cli(capsys, "export", str(ema_run), str(tmp_path / "hub"))
    assert code == 0, err
    assert "the moving average (EMA)" in out
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["weights"] == "ema" and config["format"] == "gali-ext-export"

    encoder = HubEncoder.from_pretrained(tmp_path / "hub")
    generator = HubGenerator.from_pretrained(str(tmp_path / "hub"))
    assert not encoder.training and not generator.training
    own_e, own_g = reference(ema_run, ("encoder_ema.safetensors", "generator_ema.safetensors"))
    raw_e, _ = reference(ema_run, ("encoder.safetensors", "generator.safetensors"))
    x, z = fixed_inputs()
    with torch.no_grad():
        mu, log_sigma = encoder(x)
        own_mu, own_log_sigma = own_e(x)
        assert torch.equal(mu, own_mu) and torch.equal(log_sigma, own_log_sigma)
        assert torch.equal(generator(z), own_g(z))
        assert not torch.equal(mu, raw_e(x)[0])  # the EMA, not the trained weights
    for name, own in (("encoder", "encoder_ema"), ("generator", "generator_ema")):
        exported = load_file(str(tmp_path / "hub" / f"{name}.safetensors"))
        saved = load_file(str(ema_run / f"{own}.safetensors"))
        assert exported.keys() == saved.keys()
        assert all(torch.equal(exported[k], saved[k]) for k in saved)


def test_card_has_front_matter_and_the_summary_numbers_exactly(ema_run, tmp_path):
    from huggingface_hub import ModelCard

    from gali_ext.recipes.export import export_run

    made = export_run(ema_run, tmp_path / "hub")
    folder = made.folder
    summary = json.loads((ema_run / "summary.json").read_text())
    card_text = (folder / "README.md").read_text()
    rows = card_metrics(card_text)
    numbers = {k: v for k, v in summary.items() if not isinstance(v, (str, bool))}
    assert rows.keys() == numbers.keys() and len(rows) >= 4
    for key, value in numbers.items():
        assert json.loads(rows[key]) == value and type(json.loads(rows[key])) is type(value)
    assert (folder / "summary.json").read_bytes() == (ema_run / "summary.json").read_bytes()

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "gali-ext" and card.data.license == "mit"
    assert {"gali-ext", "digits", "gali4"} <= set(card.data.tags)
    for grid in ("samples.png", "reconstructions.png"):
        assert (folder / grid).read_bytes() == (ema_run / grid).read_bytes()
        assert f"]({grid})" in card_text
    assert "| `ema_decay` | `0.998` |" in card_text and "decay 0.998" in card_text
    assert made.files == sorted(p.name for p in folder.iterdir())


def test_run_without_ema_exports_trained_weights_and_says_so(plain_run, tmp_path, capsys):
    code, out, err = cli(capsys, "export", str(plain_run), str(tmp_path / "hub"))
    assert code == 0, err
    assert "exported the trained E and G" in out
    folder = tmp_path / "hub"
    assert json.loads((folder / "config.json").read_text())["weights"] == "raw"
    card = (folder / "README.md").read_text()
    assert "**Weights**: the trained weights of E and G (the run kept no moving average" in card
    assert "computed with the trained weights" in card

    generator = HubGenerator.from_pretrained(folder)
    own_e, own_g = reference(plain_run, ("encoder.safetensors", "generator.safetensors"), 10)
    x, z = fixed_inputs()
    y = torch.arange(6) % 10
    with torch.no_grad():
        assert torch.equal(generator(z, y), own_g(z, y))
        assert torch.equal(HubEncoder.from_pretrained(folder)(x)[0], own_e(x)[0])


def test_raw_weights_of_a_run_with_ema_say_the_average_was_left_out(ema_run, tmp_path, capsys):
    code, out, err = cli(capsys, "export", str(ema_run), str(tmp_path / "hub"), "--raw-weights")
    assert code == 0, err
    card = (tmp_path / "hub" / "README.md").read_text()
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["weights"] == "raw"
    assert "the run also kept a moving average; exported without it" in card
    own_e, _ = reference(ema_run, ("encoder.safetensors", "generator.safetensors"))
    x, _ = fixed_inputs()
    with torch.no_grad():
        assert torch.equal(HubEncoder.from_pretrained(tmp_path / "hub")(x)[0], own_e(x)[0])


def test_errors_are_one_line(ema_run, tmp_path, capsys):
    def error(*args: str) -> str:
        code, out, err = cli(capsys, "export", *args)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        return err

    assert "no run directory at" in error(str(tmp_path / "missing"), str(tmp_path / "a"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert "exists and is not empty (1 entries, e.g. 'notes.txt')" in error(str(ema_run), str(busy))
    assert (busy / "notes.txt").read_text() == "mine" and len(list(busy.iterdir())) == 1
    unstarted = tmp_path / "unstarted"  # stopped before its first checkpoint
    unstarted.mkdir()
    (unstarted / "config.json").write_text((ema_run / "config.json").read_text())
    message = error(str(unstarted), str(tmp_path / "b"))
    assert "has no trained weights yet" in message and "--resume" in message
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert "expected a repository id" in error(
        str(ema_run), str(tmp_path / "c"), "--push-to-hub", "not a repo!"
    )
    assert not (tmp_path / "c").exists()
    empty = tmp_path / "empty"  # an empty folder is fine
    empty.mkdir()
    assert cli(capsys, "export", str(ema_run), str(empty))[0] == 0
    assert (empty / "README.md").is_file()


def test_from_pretrained_refuses_what_is_not_an_export(ema_run, tmp_path, no_network):
    with pytest.raises(ConfigError, match="is not a gali-ext export.*format None"):
        HubEncoder.from_pretrained(ema_run)  # a run directory: its config.json is a recipe's
    from gali_ext.recipes.export import export_run

    folder = export_run(ema_run, tmp_path / "hub").folder
    (folder / "generator.safetensors").unlink()
    with pytest.raises(CheckpointError, match="generator.safetensors' does not exist"):
        HubGenerator.from_pretrained(folder)


def test_save_pretrained_of_a_loaded_encoder_loads_again(ema_run, tmp_path, no_network):
    from gali_ext.recipes.export import export_run

    encoder = HubEncoder.from_pretrained(export_run(ema_run, tmp_path / "hub").folder)
    encoder.save_pretrained(tmp_path / "again")
    again = HubEncoder.from_pretrained(tmp_path / "again")
    x, _ = fixed_inputs()
    with torch.no_grad():
        assert torch.equal(again(x)[0], encoder(x)[0])


def test_push_to_hub_uploads_the_export_folder_to_the_repo(ema_run, tmp_path, capsys, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: calls.append(("create", a, k)))

    def upload_folder(self, **kwargs):
        calls.append(("upload", (), kwargs))
        assert (Path(kwargs["folder_path"]) / "encoder.safetensors").is_file()  # written first
        return "https://huggingface.co/someone/gali-digits/commit/abc"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    folder = tmp_path / "hub"
    code, out, err = cli(
        capsys,
        "export",
        str(ema_run),
        str(folder),
        "--push-to-hub",
        "someone/gali-digits",
        "--private",
    )
    assert code == 0, err
    assert [c[0] for c in calls] == ["create", "upload"]
    assert calls[0][1] == ("someone/gali-digits",)
    assert calls[0][2] == {"repo_type": "model", "private": True, "exist_ok": True}
    assert calls[1][2]["repo_id"] == "someone/gali-digits"
    assert calls[1][2]["folder_path"] == str(folder) and calls[1][2]["repo_type"] == "model"
    assert "pushed" in out and "commit/abc" in out
    assert 'HubEncoder.from_pretrained("someone/gali-digits")' in (folder / "README.md").read_text()


def test_a_refused_push_is_one_line_and_keeps_the_export(ema_run, tmp_path, capsys, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    http = sys.modules[HfHubHTTPError.__mro__[1].__module__.split(".")[0]]  # httpx or httpx2

    def refuse(self, *args, **kwargs):
        request = http.Request("POST", "https://huggingface.co/api/repos/create")
        response = http.Response(401, request=request)
        raise HfHubHTTPError("401 Client Error: Unauthorized\nmore", response=response)

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    code, out, err = cli(
        capsys,
        "export",
        str(ema_run),
        str(tmp_path / "hub"),
        "--push-to-hub",
        "someone/gali-digits",
    )
    assert code == 2 and err.count("\n") == 1
    assert "401 Client Error: Unauthorized" in err and "export in" in err
    assert (tmp_path / "hub" / "encoder.safetensors").is_file()


def test_readme_share_example_runs_on_an_export(ema_run, tmp_path, monkeypatch, no_network):
    """The README's "Share a trained encoder" Python lines, run against a local export."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(
        r"<!-- export-example -->\n```\n(.+?)```\n<!-- /export-example -->", readme, re.S
    )
    assert block, "README.md lost its export-example markers"
    python = block.group(1)
    folder = re.search(r'from_pretrained\("([^"]+)"\)', python).group(1)
    from gali_ext.recipes.export import export_run

    monkeypatch.chdir(tmp_path)
    export_run(ema_run, folder)
    namespace: dict = {}
    exec(compile(python, "README.md (export example)", "exec"), namespace)
    assert isinstance(namespace["encoder"], HubEncoder)
