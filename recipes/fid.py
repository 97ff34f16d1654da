"""FID on the network behind published FIDs (docs/design.md, section 6).

Published FIDs (the paper's CelebA FIDs among them) are computed on the 2048 pool features of
the TensorFlow Inception graph of 2015-12-05, which torch-fidelity ported to PyTorch and which
torchmetrics' ``FrechetInceptionDistance`` and clean-fid load. :class:`StandardInceptionFID`
computes FID with torchmetrics on that network, its weights read from a local file (nothing
is downloaded): ``weights-inception-2015-12-05-6726825d.pth`` from :data:`STANDARD_WEIGHTS_URL`.

The Frechet distance on the evaluator classifier's features (``fid_evaluator``,
:func:`gali_ext.recipes.metrics.fid`) is another quantity, for digits, where Inception's
features say little; every FID is reported with the name of its network.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gali_ext.errors import CheckpointError, ConfigError, ShapeError, first_line

__all__ = [
    "NETWORK",
    "STANDARD_NETWORK",
    "STANDARD_WEIGHTS_FILE",
    "STANDARD_WEIGHTS_URL",
    "FIDScore",
    "StandardInceptionFID",
    "fid_networks",
    "inception_input",
]

NETWORK = "TF Inception 2015-12-05"
STANDARD_NETWORK = f"{NETWORK}, torch-fidelity weights"
STANDARD_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
STANDARD_WEIGHTS_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{STANDARD_WEIGHTS_FILE}"
)
# torch.hub's convention: the hex digits in the file's name begin the SHA-256 of its bytes.
_STANDARD_SHA256_PREFIX = "6726825d"
_WHERE = f"the standard file is {STANDARD_WEIGHTS_FILE} from {STANDARD_WEIGHTS_URL}"


class FIDScore(NamedTuple):
    """An FID and the network whose features it was computed on."""

    value: float
    network: str


def inception_input(images: Tensor) -> Tensor:
    """The project's images (float ``[N, C, H, W]`` in [-1, 1], ``C`` 1 or 3) as the network
    takes them: uint8 RGB ``[N, 3, H, W]``, pixels ``round((x + 1) * 127.5)`` (the inverse of
    the data's ``p / 127.5 - 1``, so real images get back their stored bytes); one channel is
    repeated three times. The network resizes to 299 x 299 itself."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ShapeError(
            f"FID takes images [N, 1 or 3, H, W] in [-1, 1], got shape {tuple(images.shape)}"
        )
    pixels = ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class StandardInceptionFID:
    """FID on the 2048 pool features of the TF Inception (2015-12-05) network, as torchmetrics'
    ``FrechetInceptionDistance`` computes it (torch-fidelity's port of the network, its
    TensorFlow-1-compatible bilinear resize to 299 x 299, Gaussian fits in float64), with the
    network's weights from the local file ``weights``.

    ``network`` names what was used: :data:`STANDARD_NETWORK` when the file's SHA-256 is the
    standard file's, else the architecture and the file's own hash (such FIDs are not
    comparable with published ones). ``device`` defaults to CUDA when available.
    """

    def __init__(self, weights: str | Path, device: str | torch.device | None = None) -> None:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(
                f"the FID weights file {str(path)!r} does not exist; {_WHERE} (download it once; "
                "nothing is downloaded at run time)"
            )
        # torch-fidelity unpickles the file in full (weights_only=False); loading it first as
        # plain tensors refuses a file that would run code when unpickled.
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            reason = (
                "torch.load(weights_only=True) refuses it, and it is not unpickled further"
                if isinstance(error, pickle.UnpicklingError)
                else f"torch.load: {type(error).__name__}: {first_line(error)}"
            )
            raise CheckpointError(
                f"{str(path)!r} is not a PyTorch state dict of tensors ({reason}); {_WHERE}"
            ) from error
        if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(
                f"{str(path)!r} holds a {type(state).__name__}, not a state dict of tensors; "
                f"{_WHERE}"
            )
        del state
        from torchmetrics.image.fid import FrechetInceptionDistance

        try:
            # antialias=False: torchmetrics >= 1.8 resizes with antialiasing by default, unlike
            # TensorFlow's graph and torch-fidelity; off, it resizes as they do.
            self.metric = FrechetInceptionDistance(
                feature=2048,
                feature_extractor_weights_path=str(path),
                normalize=False,
                antialias=False,
            )
        except RuntimeError as error:  # load_state_dict: missing, unexpected or misshapen keys
            found = " ".join(str(error).split())
            raise CheckpointError(
                f"{str(path)!r} is not the weights of {NETWORK} (torch-fidelity's "
                f"FeatureExtractorInceptionV3): {found[:300]}; {_WHERE}"
            ) from error
        sha256 = _sha256(path)
        self.network = (
            STANDARD_NETWORK
            if sha256.startswith(_STANDARD_SHA256_PREFIX)
            else f"{NETWORK} architecture, other weights ({path.name}, sha256 {sha256[:8]}, "
            f"not the standard {_STANDARD_SHA256_PREFIX})"
        )
        self.to("cuda" if device is None and torch.cuda.is_available() else device or "cpu")

    def to(self, device: str | torch.device) -> StandardInceptionFID:
        """Move the network to ``device``; returns itself."""
        self.device = torch.device(device)
        self.metric.to(self.device)
        return self

    @torch.no_grad()
    def __call__(self, real: Tensor, generated: Tensor, batch_size: int = 50) -> FIDScore:
        """FID between ``real`` and ``generated`` images (float ``[N, C, H, W]`` in [-1, 1],
        ``C`` 1 or 3), fed to the network ``batch_size`` at a time."""
        if min(len(real), len(generated)) < 2:
            raise ShapeError("FID needs at least 2 real and 2 generated images")
        self.metric.reset()
        for images, is_real in ((real, True), (generated, False)):
            for batch in images.split(batch_size):
                self.metric.update(inception_input(batch).to(self.device), real=is_real)
        return FIDScore(float(self.metric.compute()), self.network)


def fid_networks(results: Iterable[dict[str, Any]]) -> dict[str, str]:
    """``{FID key: network}`` over evaluated runs (``fid_inception_network`` and the like):
    which network each reported FID was computed on; networks that differ between runs are
    joined with " | "."""
    found: dict[str, list[str]] = {}
    for result in results:
        for key, value in result.items():
            if key.startswith("fid_") and key.endswith("_network"):
                names = found.setdefault(key.removesuffix("_network"), [])
                if value not in names:
                    names.append(value)
    return {key: " | ".join(names) for key, names in sorted(found.items())}
