"""Random malformed specs and tensors at the public API raise our documented errors, never a
cryptic failure from deep inside torch."""

import random

import pytest
import torch

from gali_ext import (
    Chains,
    DiscriminatorLoss,
    GaliError,
    MinimaxLoss,
    MisclassificationLoss,
    ProductOfTermsLoss,
    TupleSpec,
    build_spec,
    parse_node,
)
from tests._helpers import make_head, random_variables

ATOMS = ["x0", "z0", "x1", "z1", "xp0", "zp0", "xp1", "zp1", "x", "y1", "zp", "", "0", "xp-1"]
FUNCTIONS = ["E", "G", "M", "Mask1", "Mix2", "image", "latent", "1F", "E E", "("]


def random_node(rng: random.Random) -> object:
    roll = rng.random()
    if roll < 0.05:
        return rng.choice([None, 3, 1.5, b"x0", ["x0"]])
    node = rng.choice(ATOMS)
    for _ in range(rng.randint(0, 3)):
        fn = rng.choice(FUNCTIONS)
        node = f"{fn}({node})" if rng.random() > 0.1 else f"{fn}({node}"
    return node


def test_random_specs_build_or_raise_spec_errors():
    rng = random.Random(0)
    built = 0
    for _ in range(3000):
        k, m = rng.randint(0, 4), rng.randint(0, 3)
        classes = [
            tuple(random_node(rng) for _ in range(m + rng.choice([0, 0, 0, 1]))) for _ in range(k)
        ]
        try:
            spec = TupleSpec(classes)
        except GaliError:
            continue
        built += 1
        assert spec.num_classes == k and all(c.arity == spec.arity for c in spec.classes)
        for name in spec.nodes:
            assert parse_node(name).name == name  # canonical names are fixed points
    assert built > 0


@pytest.mark.parametrize("seed", range(4))
def test_random_logits_raise_shape_errors_or_give_finite_losses(seed):
    rng = random.Random(seed)
    losses = [DiscriminatorLoss(), ProductOfTermsLoss(), MinimaxLoss(), MisclassificationLoss()]
    for _ in range(200):
        shape = tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 4)))
        dtype = rng.choice([torch.float32, torch.float64, torch.bfloat16, torch.int64])
        logits = (
            (torch.randn(shape) * 50).to(dtype)
            if dtype != torch.int64
            else torch.zeros(shape, dtype=dtype)
        )
        for loss in losses:
            try:
                value = loss(logits)
            except GaliError:
                continue
            assert value.dtype == torch.float32
            if logits.numel():
                assert torch.isfinite(value)


def test_random_variables_at_the_head_raise_our_errors():
    rng = random.Random(1)
    spec = build_spec("gali4")
    head = make_head(spec)
    for _ in range(100):
        variables = random_variables(spec, batch=rng.randint(1, 4))
        name = rng.choice(list(variables))
        action = rng.randrange(5)
        if action == 0:
            del variables[name]
        elif action == 1:
            variables[name] = variables[name][..., :1]
        elif action == 2:
            variables[name] = variables[name].long()
        elif action == 3:
            variables[name] = variables[name][:0]
        else:
            variables[name] = torch.randn(3, 2, 2, 2, 2)
        with pytest.raises(GaliError):
            head(variables)


def test_random_bad_images_at_the_chains_raise_our_errors():
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 6))
    generator = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.Unflatten(1, (1, 8, 8)))
    for bad in [torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4), "images", None]:
        with pytest.raises(GaliError):
            Chains(bad, encoder, generator)
