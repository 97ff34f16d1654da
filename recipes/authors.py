"""The authors' SVHN runs as settings (docs/design.md, section 4.9).

Dandi et al. trained the models of their Table 1 with one script per model
(``train/SVHN/ALI_train_SVHN.py``, ``ALICE_train_SVHN.py``, ``GALI_4_train_SVHN.py``,
``GALI_8_train_SVHN.py``, ``GALI_pretrain_train_SVHN.py`` of their repository). What those
scripts do, restated as :class:`~gali_ext.recipes.RecipeConfig` settings:

- Adam, lr 2e-4, betas (0.5, 0.999), batch 100, latent 256, SVHN's ``extra`` split;
- 300 epochs of ``extra`` for ALI, ALICE and GALI-8, 100 for GALI-4 and GALI-PT;
- ALI, ALICE and GALI-8: a full forward on a fresh batch every iteration, D stepped alone in
  five of every six iterations and E and G alone in the sixth (``n_dis=5`` with
  ``own_generator_batch``); GALI-4 and GALI-PT: D and E/G stepped every iteration from one
  forward (``shared_forward``);
- G's output ``tanh(net(z) + b)`` with a per-pixel bias ``b`` set from the first batch
  (``output_bias="pixel"``); instance noise 0.1 decaying to 0; ALICE's lambda 1;
- the loss weights of :func:`loss_weight_matrices` (``loss_weights="authors"``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gali_ext.errors import ConfigError
from gali_ext.presets import get_preset

__all__ = [
    "AUTHORS_EPOCHS",
    "LOSS_WEIGHTS",
    "loss_weight_matrices",
    "svhn_settings",
]

LOSS_WEIGHTS = ("paper", "authors")
"""The names of the recipe setting ``loss_weights``: ``paper``, every term weighted by ``2/T``
(the paper's equations, docs/design.md, eq. 3.7); ``authors``, the weights of the authors'
SVHN scripts (:func:`loss_weight_matrices`)."""

AUTHORS_EPOCHS = {"ali": 300, "alice": 300, "gali8": 300, "gali4": 100, "gali_pt": 100}
"""Epochs of SVHN ``extra`` in the authors' script of each preset; also the presets for which
``loss_weights="authors"`` is defined."""


def svhn_settings(spec: str) -> dict[str, Any]:
    """The settings of the authors' SVHN run of preset ``spec`` (one of
    :data:`AUTHORS_EPOCHS`), as keyword arguments of
    :class:`~gali_ext.recipes.RecipeConfig`."""
    if spec in ("gali4", "gali_pt"):
        schedule: dict[str, Any] = {"n_dis": 1, "shared_forward": True}
    else:
        schedule = {"n_dis": 5, "own_generator_batch": True}
    return {
        "lr": 2e-4,
        "betas": (0.5, 0.999),
        "batch_size": 100,
        "latent_dim": 256,
        "train_split": "extra",
        "epochs": float(AUTHORS_EPOCHS[spec]),
        "instance_noise": 0.1,
        "output_bias": "pixel",
        "loss_weights": "authors",
        "alice_weight": 1.0,
        **schedule,
    }


def loss_weight_matrices(loss_weights: str, spec_name: str) -> tuple[Tensor | None, Tensor | None]:
    """The per-term weights of D's loss and of the product of terms (docs/design.md,
    eqs. 3.13 and 3.14), each ``[K, K]`` in the class order of preset ``spec_name``, or
    ``(None, None)`` for ``"paper"`` (the losses' own ``2/T``).

    ``"authors"``, from the authors' SVHN scripts (each cross-entropy a batch mean):

    - ALI, ALICE: ``BCE(D(x, E(x)), 1) + BCE(D(G(z), z), 0)`` for D and the two swapped terms
      for E and G: weight 1 each (the K = 2 softmax of :mod:`gali_ext.losses` is the sigmoid
      of the logits' difference);
    - GALI-8: the 8 terms of D and the 56 of E and G, unweighted;
    - GALI-4: ``0.5 CE(class (x, E(x))) + CE(1) + CE(2) + CE(3)`` for D, and for E and G
      ``(1/6) CE((x, E(x)) -> (x, E(G(E(x)))))`` plus the 11 other wrong-class terms with
      weight 1: the 0.5 and the 1/6 apply to one term each (operator precedence);
    - GALI-PT: ``0.5 (sum of 4)`` and ``(1/6) (sum of 12)``, which is ``2/T``.
    """
    if loss_weights not in LOSS_WEIGHTS:
        raise ConfigError(
            f"loss_weights={loss_weights!r} is invalid: expected {' or '.join(LOSS_WEIGHTS)}"
        )
    if loss_weights == "paper":
        return None, None
    if spec_name not in AUTHORS_EPOCHS:
        raise ConfigError(
            f"loss_weights=authors: the authors' SVHN scripts weigh the losses of "
            f"{', '.join(sorted(AUTHORS_EPOCHS))}, not spec {spec_name!r}: use loss_weights=paper"
        )
    spec = get_preset(spec_name).spec
    k = spec.num_classes
    d, g = torch.eye(k), 1 - torch.eye(k)
    if spec_name == "gali_pt":
        d, g = d * 2 / k, g * 2 / (k * (k - 1))
    elif spec_name == "gali4":
        index = {c.nodes: i for i, c in enumerate(spec.classes)}
        real, real2 = index[("x0", "z0")], index[("x0", "z1")]
        d[real, real] = 0.5
        g[real, real2] = 1 / 6
    return d, g
