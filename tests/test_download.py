"""``gali-ext recipe --download`` without network: SVHN ``.mat`` files and a CelebA zip the tests
write in the real formats, served from a local HTTP server on 127.0.0.1 through
torchvision's ``download_url``; good files load, a wrong checksum or a truncated file is refused
with one line and never trained on, and a second run fetches again (docs/design.md, section 8)."""

import hashlib
import http.server
import os
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
import zipfile

import numpy as np
import pytest
from scipy.io import savemat

from gali_ext.errors import DataError
from gali_ext.recipes.data import (
    CELEBA_URL_ENV,
    SVHN_URL_ENV,
    default_data_dir,
    load_dataset,
    prepare_data,
)
from tests.test_data import write_celeba

LOCAL_HOSTS = ("127.0.0.1", "localhost")


@pytest.fixture(autouse=True)
def local_only(monkeypatch, tmp_path):
    """Every URL opened in this process is on 127.0.0.1 or a file; the cache is the test's."""
    real_urlopen = urllib.request.urlopen

    def urlopen(request, *args, **kwargs):
        url = request.full_url if isinstance(request, urllib.request.Request) else request
        parts = urllib.parse.urlparse(url)
        assert parts.scheme == "file" or parts.hostname in LOCAL_HOSTS, f"network access: {url}"
        return real_urlopen(request, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(SVHN_URL_ENV, raising=False)
    monkeypatch.delenv(CELEBA_URL_ENV, raising=False)


class Server(http.server.ThreadingHTTPServer):
    """Serves ``files`` by name; a name in ``truncate`` gets only that many bytes of its body
    under the full Content-Length, then the connection closes (an interrupted download)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.truncate: dict[str, int] = {}
        self.requests: list[str] = []

    def handle_error(self, request, client_address) -> None:  # a client that hung up early
        pass


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        self.server.requests.append(name)
        body = self.server.files.get(name)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: self.server.truncate.get(name, len(body))])
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(monkeypatch):
    httpd = Server()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    monkeypatch.setenv(SVHN_URL_ENV, f"http://127.0.0.1:{httpd.server_address[1]}/")
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)
    assert not thread.is_alive()


def svhn_bytes(tmp_path, n, seed):
    """A ``.mat`` file in SVHN's layout: X uint8 (32, 32, 3, n), y (n, 1) in 1..10."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)
    path = tmp_path / f"made-{seed}.mat"
    savemat(path, {"X": x, "y": y})
    return path.read_bytes(), x, y


@pytest.fixture
def svhn(tmp_path, server, monkeypatch):
    """train (12 images), test (6) and extra (12) served; torchvision's table holds their
    MD5s."""
    from torchvision.datasets import SVHN

    made = {}
    for split, n, seed in (("train", 12, 1), ("test", 6, 2), ("extra", 12, 3)):
        body, x, y = svhn_bytes(tmp_path, n, seed)
        name = f"{split}_32x32.mat"
        server.files[name] = body
        made[split] = (x, y)
        url, filename, _ = SVHN.split_list[split]
        monkeypatch.setitem(SVHN.split_list, split, [url, filename, md5(body)])
    return made


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def folder_names(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != ".download.lock")


def test_default_data_dir_follows_xdg_cache_home(tmp_path, monkeypatch):
    assert default_data_dir("svhn") == tmp_path / "cache" / "gali-ext" / "svhn"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored (XDG rule)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir("celeba") == tmp_path / "home" / ".cache" / "gali-ext" / "celeba"
    assert prepare_data("svhn", tmp_path / "mine") == str(tmp_path / "mine")
    assert prepare_data("digits") == ""


def test_good_download_is_verified_and_loads(tmp_path, server, svhn):
    lines = []
    folder = prepare_data("svhn", download=True, echo=lines.append)
    assert folder == str(tmp_path / "cache" / "gali-ext" / "svhn")
    assert folder_names(tmp_path / "cache" / "gali-ext" / "svhn") == [
        "test_32x32.mat",
        "train_32x32.mat",
    ]
    assert any("downloading SVHN train_32x32.mat from http://127.0.0.1:" in x for x in lines)
    data = load_dataset("svhn", "train", folder)
    x, y = svhn["train"]
    assert np.array_equal(data.images.numpy(), x.transpose(3, 2, 0, 1))
    assert np.array_equal(data.labels.numpy(), y[:, 0] % 10)
    assert len(load_dataset("svhn", "test", folder)) == 6
    fetched = len(server.requests)
    prepare_data("svhn", download=True, echo=lines.append)  # verified files are kept
    assert len(server.requests) == fetched


def test_wrong_checksum_is_refused_in_one_line_and_nothing_is_trained(tmp_path, server):
    """The CLI as a user runs it, with torchvision's real checksums: the served files are not
    SVHN's, so the first one is refused."""
    body, _, _ = svhn_bytes(tmp_path, 12, 1)
    server.files["train_32x32.mat"] = body
    server.files["test_32x32.mat"] = body
    run = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gali_ext.cli",
            "recipe",
            "svhn-ali",
            "--download",
            "--out",
            str(run),
            "--steps",
            "1",
            "--set",
            "batch_size=4",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: SVHN train_32x32.mat from http://127.0.0.1:")
    assert f"received {len(body)} bytes with MD5 {md5(body)}" in last
    assert "expected MD5 e26dedcc434d2e4c54c9b2d4a06d8373" in last  # torchvision's
    assert "run again with --download" in last
    assert not run.exists()  # nothing trained, nothing written
    assert folder_names(tmp_path / "cache" / "gali-ext" / "svhn") == []  # no .part, no .mat


def test_truncated_file_is_refused_and_not_loadable(tmp_path, server, svhn):
    body = server.files["train_32x32.mat"]
    server.truncate["train_32x32.mat"] = len(body) // 2
    with pytest.raises(DataError) as caught:
        prepare_data("svhn", download=True, echo=lambda _: None)
    message = str(caught.value)
    assert "\n" not in message
    assert f"received {len(body) // 2} bytes with MD5 " in message
    assert f"expected MD5 {md5(body)} (a truncated or corrupted download)" in message
    folder = tmp_path / "cache" / "gali-ext" / "svhn"
    assert folder_names(folder) == []
    with pytest.raises(DataError, match="missing SVHN file .*train_32x32.mat.*pass --download"):
        load_dataset("svhn", "train", folder)


def test_rerun_after_a_failure_fetches_again(tmp_path, server, svhn):
    folder = tmp_path / "cache" / "gali-ext" / "svhn"
    server.truncate["test_32x32.mat"] = 100
    with pytest.raises(DataError, match="test_32x32.mat"):
        prepare_data("svhn", download=True, echo=lambda _: None)
    assert folder_names(folder) == ["train_32x32.mat"]  # the verified one stays
    del server.truncate["test_32x32.mat"]
    (folder / "test_32x32.mat.part").write_bytes(b"left by a run killed mid-download")
    (folder / "train_32x32.mat").write_bytes(b"corrupted since")
    lines = []
    prepare_data("svhn", download=True, echo=lines.append)
    assert any("train_32x32.mat does not have the expected MD5" in x for x in lines)
    assert folder_names(folder) == ["test_32x32.mat", "train_32x32.mat"]
    assert (folder / "train_32x32.mat").read_bytes() == server.files["train_32x32.mat"]
    assert len(load_dataset("svhn", "test", str(folder))) == 6


def test_missing_server_file_is_one_clear_line(server, svhn):
    del server.files["test_32x32.mat"]
    with pytest.raises(
        DataError,
        match=r"test_32x32.mat from http://127.0.0.1:\d+/test_32x32.mat:"
        r" the download failed after 0 bytes \(HTTPError: HTTP Error 404",
    ):
        prepare_data("svhn", download=True, echo=lambda _: None)


def test_without_download_the_error_says_to_pass_it(tmp_path):
    from typer.testing import CliRunner

    from gali_ext.recipes.cli import app

    run = tmp_path / "run"
    args = ["recipe", "svhn-ali", "--out", str(run), "--steps", "1", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, DataError), result.output
    default = tmp_path / "cache" / "gali-ext" / "svhn"
    assert f"--data-dir '{default}' is not a folder: pass --download" in str(result.exception)
    default.mkdir(parents=True)
    result = CliRunner().invoke(app, args)
    assert str(result.exception).startswith(  # svhn-ali trains on extra (the authors' split)
        f"missing SVHN file '{default / 'extra_32x32.mat'}': pass --download to fetch SVHN there"
    )
    assert not run.exists()


def test_cli_download_into_an_explicit_data_dir_then_trains(tmp_path, server, svhn):
    from typer.testing import CliRunner

    from gali_ext.recipes.cli import app
    from gali_ext.recipes.settings import RecipeConfig

    mine, run = tmp_path / "mine", tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "recipe",
            "svhn-ali",
            "--download",
            "--set",
            f"data_dir={mine}",
            "--out",
            str(run),
            "--steps",
            "1",
            "--set",
            "batch_size=4",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    # the files every run reads, and the split svhn-ali trains on (the authors' extra)
    assert folder_names(mine) == ["extra_32x32.mat", "test_32x32.mat", "train_32x32.mat"]
    assert not (tmp_path / "cache").exists()
    saved = RecipeConfig.from_json(run / "config.json")
    assert (saved.data_dir, saved.download) == (str(mine), True)


# ---------------------------------------------------------------- CelebA


@pytest.fixture
def celeba_zip(tmp_path, server, monkeypatch):
    """CelebA's three files as torchvision lists them, served; its table holds their MD5s."""
    from torchvision.datasets import CelebA

    made = tmp_path / "made"
    names = write_celeba(made)
    archive = tmp_path / "img_align_celeba.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for name in names:
            zipped.write(made / "img_align_celeba" / name, f"img_align_celeba/{name}")
    server.files["img_align_celeba.zip"] = archive.read_bytes()
    for name in ("list_attr_celeba.txt", "list_eval_partition.txt"):
        server.files[name] = (made / name).read_bytes()
    table = [
        (drive_id, md5(server.files[name]) if name in server.files else checksum, name)
        for drive_id, checksum, name in CelebA.file_list
    ]
    monkeypatch.setattr(CelebA, "file_list", table)
    monkeypatch.setenv(CELEBA_URL_ENV, f"http://127.0.0.1:{server.server_address[1]}")
    return made


def test_celeba_download_unpacks_and_loads(tmp_path, server, celeba_zip):
    folder = prepare_data("celeba", download=True, echo=lambda _: None)
    data = load_dataset("celeba", "train", folder)
    assert len(data) == 3 and data.image_size == 64
    assert sorted(os.listdir(os.path.join(folder, "img_align_celeba"))) == sorted(
        os.listdir(celeba_zip / "img_align_celeba")
    )
    assert not os.path.exists(os.path.join(folder, "img_align_celeba.zip"))  # unpacked, removed
    requests = len(server.requests)
    prepare_data("celeba", download=True, echo=lambda _: None)  # complete: nothing fetched
    assert len(server.requests) == requests


def test_celeba_truncated_zip_is_refused(tmp_path, server, celeba_zip):
    server.truncate["img_align_celeba.zip"] = 50
    with pytest.raises(DataError, match="CelebA img_align_celeba.zip .*received 50 bytes"):
        prepare_data("celeba", download=True, echo=lambda _: None)
    assert not (tmp_path / "cache" / "gali-ext" / "celeba" / "img_align_celeba").exists()


def test_google_drive_refusal_names_the_quota_and_the_manual_way(monkeypatch, tmp_path):
    import torchvision.datasets.utils as utils

    def refuse(file_id, root, filename=None, md5=None):
        raise RuntimeError(
            "Failed to retrieve file url:\n\n\tToo many users have viewed or "
            "downloaded this file recently."
        )

    monkeypatch.setattr(utils, "download_file_from_google_drive", refuse)
    with pytest.raises(DataError) as caught:
        prepare_data("celeba", tmp_path / "celeba", download=True, echo=lambda _: None)
    message = str(caught.value)
    assert "\n" not in message and "Too many users" in message
    assert "Google Drive" in message and "quota" in message
    assert "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html" in message
