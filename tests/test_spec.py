import pytest

from gali_ext import SpecError, TupleClass, TupleSpec, available_presets, build_spec, parse_node

# docs/design.md, section 2, written out by hand.
EXPECTED = {
    "ali": [("x0", "z0"), ("xp0", "zp0")],
    "alice": [("x0", "z0"), ("xp0", "zp0")],
    "alice_pt": [("x0", "z0"), ("xp0", "zp0")],
    "gali4": [("x0", "z0"), ("xp0", "zp0"), ("x0", "z1"), ("xp1", "zp0")],
    "gali8": [
        ("x0", "z0", "x1", "z1"),
        ("x0", "z1", "x1", "z0"),
        ("x1", "z0", "x0", "z1"),
        ("x1", "z1", "x0", "z0"),
        ("xp0", "zp0", "xp1", "zp1"),
        ("xp0", "zp1", "xp1", "zp0"),
        ("xp1", "zp0", "xp0", "zp1"),
        ("xp1", "zp1", "xp0", "zp0"),
    ],
    "gali_pt": [
        ("x0", "z0", "M(x0)"),
        ("xp0", "zp0", "M(xp0)"),
        ("x0", "z1", "M(x1)"),
        ("xp1", "zp0", "M(xp0)"),
    ],
    "gali_mix": [
        ("x0", "E(Mask1(x0))"),
        ("xp0", "zp0"),
        ("x0", "E(Mask2(G(E(Mask1(x0)))))"),
        ("G(E(Mask3(xp0)))", "zp0"),
        ("Mix1(x0)", "E(Mask1(x0))"),
        ("Mix1(x0)", "E(Mask2(G(E(Mask1(x0)))))"),
        ("x0", "E(Mask4(Mix1(x0)))"),
        ("G(E(Mask1(x0)))", "E(Mask4(Mix1(x0)))"),
    ],
}
SHAPES = {
    "ali": (2, 2),
    "alice": (2, 2),
    "alice_pt": (2, 2),
    "gali4": (4, 2),
    "gali8": (8, 4),
    "gali_mix": (8, 2),
    "gali_pt": (4, 3),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_presets_match_design_table(name):
    spec = build_spec(name)
    assert [c.nodes for c in spec.classes] == EXPECTED[name]
    assert (spec.num_classes, spec.arity) == SHAPES[name]
    assert spec.name == name


def test_available_presets_lists_every_preset():
    assert set(EXPECTED) <= set(available_presets())


def test_gali4_reconstruction_classes_spelled_as_expressions():
    # (x, E(G(E(x)))) and (G(E(G(z))), z): the appendix's classes, not the main text's typo.
    spec = TupleSpec(
        [("x0", "E(x0)"), ("G(zp0)", "zp0"), ("x0", "E(G(E(x0)))"), ("G(E(G(zp0)))", "zp0")]
    )
    assert [c.nodes for c in spec.classes] == EXPECTED["gali4"]


def test_slot_kinds_and_nodes():
    spec = build_spec("gali_pt")
    assert spec.slot_kinds == ("image", "latent", "M")
    assert spec.nodes_of_kind("image") == ("x0", "xp0", "xp1")
    assert spec.nodes_of_kind("latent") == ("z0", "zp0", "z1")
    assert spec.nodes_of_kind("M") == ("M(x0)", "M(xp0)", "M(x1)")


@pytest.mark.parametrize(
    "name, canonical, kind",
    [
        ("G(E(x0))", "x1", "image"),
        ("E(G(E(x0)))", "z1", "latent"),
        ("E(G(zp0))", "zp1", "latent"),
        ("G(E(G(zp0)))", "xp1", "image"),
        ("G(z3)", "x4", "image"),
        ("M(G(E(x0)))", "M(x1)", "M"),
        ("E(Mask1(x0))", "E(Mask1(x0))", "latent"),
        ("Mix2(xp0)", "Mix2(xp0)", "image"),
        (" G( E( x0 ) ) ", "x1", "image"),
    ],
)
def test_parse_node_canonicalises(name, canonical, kind):
    node = parse_node(name)
    assert (node.name, node.kind) == (canonical, kind)


def test_custom_spec_any_k_and_m():
    spec = TupleSpec([("x0", "z0", "x2"), ("xp0", "zp0", "xp2"), ("x1", "z2", "x0")], name="k3m3")
    assert (spec.num_classes, spec.arity) == (3, 3)
    assert spec.slot_kinds == ("image", "latent", "image")


@pytest.mark.parametrize(
    "classes, message",
    [
        ([("x0", "z0")], "K >= 2"),
        ([("x0", "z0"), ("xp0", "zp0", "xp1")], "same arity"),
        ([("x0", "z0"), ("zp0", "xp0")], "slot 0 holds an image"),
        ([("x0", "z0"), ("x0", "E(x0)")], "duplicate tuple class"),
        ([("x0", "z0"), ("y0", "zp0")], "unknown node name 'y0'"),
        ([("x0", "z0"), ("E(z0)", "zp0")], "E takes an image"),
        ([("x0", "z0"), ("G(x1", "zp0")], "unbalanced"),
        ([("x0", "z0"), ("M(zp0)", "zp0")], "M takes an image"),
        ([(), ()], "at least one node"),
        (["x0z0", ("xp0", "zp0")], "sequence of node names, got 'x0z0'"),
    ],
)
def test_invalid_specs_name_the_problem(classes, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        TupleSpec(classes)


def test_unknown_preset_lists_available():
    with pytest.raises(SpecError, match="unknown preset 'gali5'.*gali4"):
        build_spec("gali5")


def test_tuple_class_equality_uses_canonical_names():
    assert TupleClass(("x0", "G(z0)")) == TupleClass(("x0", "x1"))
    assert hash(TupleClass(("x0", "G(z0)"))) == hash(TupleClass(("x0", "x1")))
