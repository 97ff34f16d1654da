"""A provider of one's own: the kinds its functions declare are the node language's, its outputs
are checked against them, and the negative-augmentation preset (issue 33)."""

import math
import re

import pytest
import torch
from torch import nn

from gali_ext import (
    GALI,
    ProviderError,
    ShapeError,
    SpecError,
    TupleSpec,
    build_gali,
    build_spec,
    parse_node,
    train_step,
)
from gali_ext.providers import (
    FeedbackProvider,
    MaskMix,
    NegativeAugmentation,
    ReconstructionChain,
    StopGradient,
    cutout,
    jigsaw,
)
from gali_ext.spec import Signature, function_signature
from tests._helpers import make_head

# Each test module declares function names of its own: declarations are process-wide, one
# meaning per name.


class Rotate(FeedbackProvider):
    """Rot(a): a quarter turn, the image -> image function of the issue."""

    signatures = {"Rot": ("image", "image")}

    def function_for(self, name):
        if name == "Rot":
            return lambda node, chains: torch.rot90(chains[node.arg.name], 1, (2, 3))
        return None


class Perturb(FeedbackProvider):
    """Perturb(z): z plus Gaussian noise drawn from the step's generator; latent -> latent."""

    signatures = {"Perturb": ("latent", "latent")}

    def __init__(self, std=0.5):
        super().__init__()
        self.std = std

    def perturb(self, node, chains):
        z = chains[node.arg.name]
        noise = torch.randn(z.shape, generator=chains.rng, dtype=z.dtype)
        return z + self.std * noise

    def function_for(self, name):
        return self.perturb if name == "Perturb" else None


class Flattened(FeedbackProvider):
    """Declares an image but returns the image flattened: the wrong shape at run time."""

    signatures = {"Flat": ("image", "image")}

    def function_for(self, name):
        if name == "Flat":
            return lambda node, chains: chains[node.arg.name].flatten(1)
        return None


class Blurs(FeedbackProvider):
    """A family of image -> image functions, Blur0, Blur1, ...: Blur<k> averages over k+1
    pixels along the width."""

    signatures = {"Blur<k>": ("image", "image")}

    def function_for(self, name):
        if name.startswith("Blur") and name[4:].isdigit():
            width = int(name[4:]) + 1
            return lambda node, chains: nn.functional.avg_pool2d(
                chains[node.arg.name], (1, width), stride=1, padding=(0, width // 2)
            )[..., : chains[node.arg.name].shape[-1]]
        return None


def toy_pair(latent=6):
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, latent))
    generator = nn.Sequential(nn.Linear(latent, 64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8)))
    return encoder, generator


def images(batch=4, seed=0):
    return torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


ROTATION = [("x0", "z0"), ("xp0", "zp0"), ("Rot(x0)", "z0"), ("x0", "z1")]


def test_a_declared_image_function_fills_an_image_slot_and_trains():
    spec = TupleSpec(ROTATION)  # the spec, refused before providers declared kinds
    assert spec.slot_kinds == ("image", "latent")
    assert spec.nodes_of_kind("image") == ("x0", "xp0", "Rot(x0)")  # the head's Dx sees it
    assert spec.signatures == {"Rot": Signature("image", "image")}
    encoder, generator = toy_pair()
    head = make_head(spec)
    gali = GALI(encoder, generator, head, [ReconstructionChain(), Rotate()])
    x = images()
    chains = gali.chains(x)
    # a quarter turn counter-clockwise: the top row becomes the left column, read upwards
    assert torch.equal(chains["Rot(x0)"][:, 0, :, 0], x[:, 0, 0, :].flip(-1))
    d_opt = torch.optim.Adam(head.parameters(), 1e-3)
    g_opt = torch.optim.Adam([*encoder.parameters(), *generator.parameters()], 1e-3)
    metrics = train_step(gali, [x], d_opt, g_opt)
    assert len(metrics.class_accuracy) == 4 and math.isfinite(metrics.g_loss)


def test_a_latent_function_takes_latents_and_draws_from_the_steps_generator():
    spec = TupleSpec([("x0", "z0"), ("xp0", "zp0"), ("x0", "Perturb(z0)")])
    assert spec.slot_kinds == ("image", "latent")
    assert parse_node("Perturb(zp1)").kind == "latent"
    with pytest.raises(SpecError, match=r"Perturb takes a latent node \(as Perturb \(module"):
        parse_node("Perturb(x0)")
    encoder, generator = toy_pair()
    gali = GALI(encoder, generator, make_head(spec), [Perturb()])
    x = images()

    def perturbed(seed):
        chains = gali.chains(x, rng=torch.Generator().manual_seed(seed))
        return chains["Perturb(z0)"] - chains["z0"]

    torch.testing.assert_close(perturbed(1), perturbed(1))  # reproducible from the generator
    assert not torch.allclose(perturbed(1), perturbed(2))
    assert perturbed(1).std().item() == pytest.approx(0.5, rel=0.4)
    # in the G/E step the loss reaches E through Perturb(z0); G is not on that path
    g = gali.generator_objective(x, rng=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(g.loss, [encoder[1].weight])
    assert grad.abs().sum() > 0


def test_a_family_declares_every_index():
    spec = TupleSpec([("x0", "z0"), ("Blur2(xp0)", "zp0")])
    assert spec.slot_kinds == ("image", "latent")
    assert function_signature("Blur17") == Signature("image", "image")
    encoder, generator = toy_pair()
    gali = GALI(encoder, generator, make_head(spec), [Blurs()])
    assert gali.chains(images())["Blur2(xp0)"].shape == (4, 1, 8, 8)


def test_the_builtin_functions_keep_their_kinds():
    # Mask<k> and Mix<k> are MaskMix's declaration now, not a rule of the node language; M
    # (declared by no class) is still a new kind named after itself
    assert function_signature("Mask3") == Signature("image", "image")
    assert function_signature("Mix12") == Signature("image", "image")
    assert function_signature("M") == Signature("image", "M")
    assert build_spec("gali_mix").slot_kinds == ("image", "latent")
    assert build_spec("gali_pt").slot_kinds == ("image", "latent", "M")
    assert MaskMix().signature("Mask2") == Signature("image", "image")
    assert MaskMix().signature("Rot") is None


def test_an_undeclared_function_in_an_image_slot_says_how_to_declare_it():
    with pytest.raises(SpecError) as error:
        TupleSpec([("x0", "z0"), ("xp0", "zp0"), ("Spin(x0)", "z0")])
    message = str(error.value)
    assert "slot 0 holds an image in class 0" in message and "but a 'Spin' in class 2" in message
    assert "no provider class declares the function Spin" in message
    assert "signatures = {'Spin': ('image', 'image')}" in message
    assert "\n" not in message


def test_a_spec_made_before_its_provider_was_declared_is_refused_when_gali_is_built():
    early = TupleSpec([("x0", "z0", "Later(x0)"), ("xp0", "zp0", "Later(xp0)")])
    assert early.slot_kinds == ("image", "latent", "Later")  # a new kind, as today

    class Later(FeedbackProvider):
        signatures = {"Later": ("image", "image")}

        def function_for(self, name):
            return (lambda node, chains: chains[node.arg.name]) if name == "Later" else None

    encoder, generator = toy_pair()
    with pytest.raises(ProviderError) as error:
        GALI(encoder, generator, make_head(early), [Later()])
    message = str(error.value)
    assert "the spec's node 'Later(x0)' was parsed with Later: image -> Later" in message
    assert "but Later makes Later: image -> image" in message
    assert "make the spec after the class is defined" in message


def test_one_function_name_has_one_meaning():
    with pytest.raises(ProviderError) as error:

        class Turn(FeedbackProvider):
            signatures = {"Rot": ("image", "R")}

    message = str(error.value)
    assert "Turn (module tests.test_own_providers) declares 'Rot' as image -> R" in message
    # the first class to declare Rot (this module's Rotate, or the README's when it ran first)
    assert re.search(r"Rotate \(module [\w.]+\) declares it image -> image", message)
    # the same kinds from a subclass, or the class defined again, are one meaning
    type("Rotate2", (Rotate,), {})
    assert function_signature("Rot") == Signature("image", "image")
    with pytest.raises(ProviderError, match="E, G, 'image' and 'latent' are the node language"):
        type("Bad", (FeedbackProvider,), {"signatures": {"E": ("image", "latent")}})
    with pytest.raises(ProviderError, match=r"expected \(argument kind, output kind\)"):
        type("Bad", (FeedbackProvider,), {"signatures": {"Odd": "image"}})


def test_a_function_two_providers_make_names_the_node_and_the_fix():
    encoder, generator = toy_pair()
    with pytest.raises(ProviderError) as error:
        GALI(
            encoder,
            generator,
            make_head(TupleSpec(ROTATION)),
            [ReconstructionChain(), Rotate(), Rotate()],
        )
    message = str(error.value)
    assert "the spec's node 'Rot(x0)' needs the function 'Rot'" in message
    assert "several providers make: Rotate, Rotate; keep one of them" in message


def test_an_output_of_the_wrong_shape_names_the_provider_the_node_and_the_fix():
    spec = TupleSpec([("x0", "z0"), ("xp0", "zp0"), ("Flat(x0)", "z0")])
    encoder, generator = toy_pair()
    gali = GALI(encoder, generator, make_head(spec), [Flattened()])
    with pytest.raises(ShapeError) as error:
        gali.discriminator_loss(images())
    message = str(error.value)
    assert message == (
        "Flattened's function Flat made node 'Flat(x0)' of shape [4, 64], but Flattened "
        "declares Flat: image -> image, and images here are [4, 1, 8, 8]: return images of "
        "that shape, or declare the kind it makes in Flattened.signatures"
    )


def test_jigsaw_moves_whole_tiles_and_never_keeps_the_order():
    # a 4 x 4 image of 2 x 2 tiles, tile t filled with the value t
    tile = torch.tensor([[0, 1], [2, 3]], dtype=torch.float32)
    x = tile.repeat_interleave(2, 0).repeat_interleave(2, 1).expand(64, 1, 4, 4).contiguous()
    out = jigsaw(x, 2, torch.Generator().manual_seed(0))
    tiles = out[:, 0, ::2, ::2].reshape(64, 4)  # the value of each tile of the result
    # each tile is whole (constant), the four values a permutation, never the identity
    assert torch.equal(
        out, tiles.view(64, 2, 2).repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None]
    )
    assert torch.equal(tiles.sort(dim=1).values, torch.arange(4.0).expand(64, 4))
    assert not (tiles == torch.arange(4.0)).all(dim=1).any()
    assert len({tuple(t.tolist()) for t in tiles}) > 10  # many of the 23 other orders
    with pytest.raises(ShapeError, match="divisible by 3"):
        jigsaw(x, 3)


def test_cutout_blanks_one_square_clipped_at_the_borders():
    x = torch.zeros(500, 1, 8, 8)
    out = cutout(x, 4, fill=-1.0, rng=torch.Generator().manual_seed(0))
    blank = out[:, 0] == -1
    rows, cols = blank.any(2).sum(1), blank.any(1).sum(1)
    assert torch.equal(blank.sum((1, 2)), rows * cols)  # one rectangle
    assert rows.max() == 4 and cols.max() == 4 and rows.min() >= 2  # centre inside: >= half
    # a pixel in the middle of an axis is covered by 4 of the 8 centres: P = 1/2 per axis
    assert blank[:, 4, 4].double().mean().item() == pytest.approx(0.25, abs=0.06)


def test_the_nda_preset_trains_on_digits():
    from gali_ext.recipes.models import build_ali_models

    spec = build_spec("gali_nda")
    assert [c.nodes for c in spec.classes] == [
        ("x0", "z0"),
        ("xp0", "zp0"),
        ("Jigsaw(x0)", "z0"),
        ("Cutout(x0)", "z0"),
    ]
    torch.manual_seed(0)
    models = build_ali_models("digits", latent_dim=8)
    gali = build_gali("gali_nda", models, provider_options={"grid": 4})
    assert isinstance(gali.providers[0], NegativeAugmentation) and gali.providers[0].grid == 4
    d_opt = torch.optim.Adam(gali.head.parameters(), 1e-4)
    g_opt = torch.optim.Adam([*models.encoder.parameters(), *models.generator.parameters()], 1e-4)
    metrics = train_step(gali, [torch.rand(4, 1, 16, 16) * 2 - 1], d_opt, g_opt)
    assert len(metrics.class_accuracy) == 4 and math.isfinite(metrics.g_loss)


def test_detach_gives_a_class_to_d_alone():
    spec = TupleSpec([("x0", "z0"), ("xp0", "zp0"), ("Jigsaw(x0)", "Detach(z0)")])
    encoder, generator = toy_pair()
    gali = GALI(encoder, generator, make_head(spec), [NegativeAugmentation(), StopGradient()])
    chains = gali.chains(images())
    assert chains["z0"].requires_grad and not chains["Detach(z0)"].requires_grad
    torch.testing.assert_close(chains["Detach(z0)"], chains["z0"].detach())
