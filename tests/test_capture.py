"""The capture-safe training step (gali_ext.capture): on the CPU it runs the code a CUDA graph
records, eagerly, so these tests check that code: equal to train_step, no host syncs, the
instance-noise std a device tensor filled in place, the NaN guard a device flag."""

import contextlib
import itertools

import pytest
import torch
from torch import nn

from gali_ext import GALI, add_instance_noise, build_spec
from gali_ext.capture import CapturedStep, tf32_mode
from gali_ext.errors import ConfigError, DivergenceError, ShapeError
from gali_ext.providers import MaskMix, ReconstructionChain
from gali_ext.trainer import DivergenceGuard, build_optimizer, train_step
from tests._helpers import make_head


class TinyEncoder(nn.Module):
    """A stochastic conv encoder with batch norm for 1 x 8 x 8 images: (mu, log_sigma)."""

    def __init__(self, latent: int = 6) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, 2, 1),
            nn.BatchNorm2d(4),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(64, 2 * latent),
        )

    def forward(self, x):
        return self.net(x).chunk(2, dim=1)


PROVIDERS = {"ali": list, "gali8": lambda: [ReconstructionChain()], "gali_mix": lambda: [MaskMix()]}


def make(preset: str, seed: int = 0) -> GALI:
    """Small networks (batch norm in E and G, spectral norm in D) over a preset's classes."""
    torch.manual_seed(seed)
    generator = nn.Sequential(
        nn.Linear(6, 64), nn.BatchNorm1d(64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8))
    )
    spec = build_spec(preset)
    return GALI(TinyEncoder(), generator, make_head(spec), PROVIDERS[preset](), latent_shape=(6,))


def adam_pair(gali: GALI, fused: bool = True):
    """Adam over D and over E and G; fused=True is what build_optimizer gives on CUDA (the CPU
    has a fused Adam too), whose update the device-side NaN guard can skip."""
    eg = itertools.chain(gali.encoder.parameters(), gali.generator.parameters())
    return (
        torch.optim.Adam(gali.head.parameters(), 1e-3, betas=(0.5, 0.999), fused=fused),
        torch.optim.Adam(eg, 1e-3, betas=(0.5, 0.999), fused=fused),
    )


def batches(n_dis: int, steps: int = 3, seed: int = 5) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        [torch.rand(6, 1, 8, 8, generator=g) * 2 - 1 for _ in range(n_dis)] for _ in range(steps)
    ]


NOISE = (0.1, 0.07, 0.04)  # instance noise > 0, changing every step


def eager_run(gali, n_dis, data, noise=NOISE, fused=True):
    d_opt, g_opt = adam_pair(gali, fused)
    torch.manual_seed(1)
    return [
        train_step(gali, x, d_opt, g_opt, n_dis=n_dis, instance_noise=s, step=t)
        for t, (x, s) in enumerate(zip(data, noise))
    ]


def captured_run(gali, n_dis, data, noise=NOISE, fused=True):
    step = CapturedStep(gali, *adam_pair(gali, fused), n_dis=n_dis)
    torch.manual_seed(1)
    return [step(x, instance_noise=s, step=t) for t, (x, s) in enumerate(zip(data, noise))]


@pytest.mark.parametrize(
    "preset, n_dis, fused",
    [
        ("ali", 1, True),
        ("ali", 2, False),
        ("gali8", 1, False),
        ("gali8", 2, True),
        ("gali_mix", 1, True),
    ],
)
def test_capture_safe_step_equals_train_step(preset, n_dis, fused):
    eager, captured = make(preset), make(preset)
    data = batches(n_dis)
    expected = eager_run(eager, n_dis, data, fused=fused)
    got = captured_run(captured, n_dis, data, fused=fused)
    for a, b in zip(expected, got):
        assert b.d_loss == pytest.approx(a.d_loss, rel=1e-5)
        assert b.g_loss == pytest.approx(a.g_loss, rel=1e-5)
        assert b.parts == pytest.approx(a.parts, rel=1e-5)
        assert b.class_accuracy == pytest.approx(a.class_accuracy)
    for (name, p), q in zip(eager.named_parameters(), captured.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    for (name, p), q in zip(eager.named_buffers(), captured.buffers()):  # batch norm, sn vectors
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    # The instance noise reaches the step: other stds give other losses (the test can fail).
    other = captured_run(make(preset), n_dis, data, noise=(0.3, 0.2, 0.1), fused=fused)
    assert other[0].d_loss != pytest.approx(expected[0].d_loss, rel=1e-5)


@contextlib.contextmanager
def no_host_syncs():
    """Every Python-level way of reading a tensor on the host raises inside the block."""

    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called inside the step")

        return method

    names = ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"]
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_the_sync_detector_catches_syncs():
    x = torch.ones(2)
    for read in (
        lambda: x.sum().item(),
        lambda: bool(torch.isfinite(x).all()),
        lambda: float(x[0]),
        lambda: x.cpu(),
        lambda: x.tolist(),
    ):
        with no_host_syncs(), pytest.raises(AssertionError, match="host sync"):
            read()
    gali = make("ali")
    # train_step's default reads its metrics once at the end: a sync, caught
    with no_host_syncs(), pytest.raises(AssertionError, match="host sync"):
        train_step(gali, batches(1, 1)[0], *adam_pair(gali), instance_noise=0.1)


@pytest.mark.parametrize("preset", ["ali", "gali8", "gali_mix"])
def test_captured_step_makes_no_host_sync(preset):
    gali = make(preset)
    step = CapturedStep(gali, *adam_pair(gali), n_dis=2)
    data = batches(2)
    with no_host_syncs():
        for t, (x, s) in enumerate(zip(data, NOISE)):
            assert step(x, instance_noise=s, step=t, sync=False) is None
    metrics = step.metrics()  # the logging step's one sync, outside the block
    assert metrics.d_loss > 0 and len(metrics.class_accuracy) == gali.spec.num_classes


def test_eager_train_step_syncs_only_when_asked():
    gali = make("gali8")
    d_opt, g_opt = adam_pair(gali)  # fused: the NaN guard needs no host check
    guard = DivergenceGuard()
    data = batches(1)
    with no_host_syncs():
        for t, x in enumerate(data[:2]):
            assert (
                train_step(
                    gali, x, d_opt, g_opt, instance_noise=0.1, step=t, sync=False, guard=guard
                )
                is None
            )
    metrics = train_step(gali, data[2], d_opt, g_opt, instance_noise=0.1, step=2, guard=guard)
    assert metrics.g_loss > 0
    with pytest.raises(ConfigError, match="needs a DivergenceGuard"):
        train_step(gali, data[0], d_opt, g_opt, sync=False)


def test_instance_noise_std_is_a_device_tensor_filled_in_place():
    gali = make("ali")
    step = CapturedStep(gali, *adam_pair(gali))
    tensor, address = step.instance_noise, step.instance_noise.data_ptr()
    for x, s in zip(batches(1), NOISE):
        step(x, instance_noise=s, sync=False)
        assert step.instance_noise is tensor and tensor.data_ptr() == address
        assert tensor.item() == pytest.approx(s) and tensor.shape == ()
    noiseless = make("ali")
    step = CapturedStep(noiseless, *adam_pair(noiseless))
    step(batches(1)[0], instance_noise=0.0)
    with pytest.raises(ConfigError, match="without instance noise"):
        step(batches(1)[1], instance_noise=0.1)
    with pytest.raises(ConfigError, match="finite float >= 0"):
        step(batches(1)[1], instance_noise=float("nan"))


def test_tensor_std_adds_the_same_noise_as_a_float():
    spec = build_spec("ali")
    variables = {
        "x0": torch.zeros(3, 1, 4, 4),
        "z0": torch.zeros(3, 2),
        "xp0": torch.ones(3, 1, 4, 4),
        "zp0": torch.zeros(3, 2),
    }
    a = add_instance_noise(variables, spec, 0.25, torch.Generator().manual_seed(0))
    b = add_instance_noise(variables, spec, torch.tensor(0.25), torch.Generator().manual_seed(0))
    draw = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a["x0"], 0.25 * draw)  # x0 = 0 plus std * N(0, 1)
    for name in variables:
        torch.testing.assert_close(a[name], b[name])
    # a tensor std of 0 still draws (the captured step's shape does not depend on it) but adds 0
    zero = add_instance_noise(variables, spec, torch.tensor(0.0), torch.Generator())
    torch.testing.assert_close(zero["xp0"], variables["xp0"])


def test_static_inputs_keep_their_shape():
    gali = make("ali")
    step = CapturedStep(gali, *adam_pair(gali))
    step([torch.zeros(6, 1, 8, 8)], sync=False)
    with pytest.raises(ShapeError, match=r"batches of shape \[6, 1, 8, 8\].*got \[4, 1, 8, 8\]"):
        step([torch.zeros(4, 1, 8, 8)])
    with pytest.raises(ConfigError, match="n_dis=1 batches, got 0"):
        step([])


def test_divergence_is_a_device_flag_that_skips_the_updates():
    gali = make("ali")
    d_opt, g_opt = adam_pair(gali)
    step = CapturedStep(gali, d_opt, g_opt)
    real, calls = gali.generator_objective, {"n": 0}

    def poisoned(*args, **kwargs):
        objective = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            objective.loss = objective.loss * float("nan")
        return objective

    gali.generator_objective = poisoned
    data = batches(1, steps=4)
    step(data[0], instance_noise=0.1, step=10, sync=False)
    eg = [p.detach().clone() for p in g_opt.param_groups[0]["params"]]
    head = [p.detach().clone() for p in d_opt.param_groups[0]["params"]]
    step(data[1], instance_noise=0.1, step=11, sync=False)  # G/E loss NaN: no error yet
    step(data[2], instance_noise=0.1, step=12, sync=False)
    with pytest.raises(DivergenceError, match="generator-encoder loss became nan at step 11"):
        step(data[3], instance_noise=0.1, step=13)
    # E and G kept the weights from before the NaN; D took the step-11 update (its loss was
    # finite, as train_step does) and none after
    for before, p in zip(eg, g_opt.param_groups[0]["params"]):
        assert torch.equal(before, p)
    assert any(not torch.equal(b, p) for b, p in zip(head, d_opt.param_groups[0]["params"]))


def test_divergence_guard_reports_the_first_non_finite_value():
    guard = DivergenceGuard()
    guard.check()  # nothing watched yet
    guard.at_step(3)
    guard.watch(torch.tensor(1.5), "discriminator loss")
    guard.check()
    assert guard.skip.item() == 0
    guard.at_step(4)
    guard.watch(torch.tensor(float("-inf")), "generator-encoder loss")
    guard.at_step(5)
    guard.watch(torch.tensor(float("nan")), "discriminator loss")
    assert guard.skip.item() == 1
    with pytest.raises(DivergenceError, match="the generator-encoder loss became -inf at step 4"):
        guard.check()


def test_eager_step_with_host_checks_still_stops_before_the_update():
    gali = make("ali")
    d_opt, g_opt = adam_pair(gali, fused=False)  # plain Adam: checked on the host
    assert not DivergenceGuard.can_skip(d_opt) and DivergenceGuard.can_skip(adam_pair(gali)[0])
    x = batches(1)[0]
    x[0][0, 0, 0, 0] = float("nan")
    before = [p.detach().clone() for p in gali.head.parameters()]
    # the losses' host-side check finds the NaN logits first, naming them and the step
    with pytest.raises(DivergenceError, match=r"logits .* discriminator_loss hold .* at step 7"):
        train_step(gali, x, d_opt, g_opt, step=7)
    assert all(torch.equal(a, b) for a, b in zip(before, gali.head.parameters()))


def test_capture_is_refused_where_it_cannot_work():
    gali = make("ali")
    with pytest.raises(ConfigError, match="CUDA graphs need the model on a CUDA device, .* cpu"):
        CapturedStep(gali, *adam_pair(gali), capture=True)
    with pytest.raises(ConfigError, match="fp16 needs loss scaling"):
        CapturedStep(gali, *adam_pair(gali), autocast_dtype=torch.float16)
    gali._original_forward = gali.forward  # what accelerate leaves on a prepared model
    with pytest.raises(ConfigError, match="unwrap_model"):
        CapturedStep(gali, *adam_pair(gali))


def test_bf16_autocast_runs_inside_the_step():
    gali = make("ali")
    seen = []
    gali.generator.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    step = CapturedStep(gali, *adam_pair(gali), autocast_dtype=torch.bfloat16)
    metrics = step(batches(1)[0], instance_noise=0.1)
    assert seen and set(seen) == {torch.bfloat16} and metrics.d_loss > 0


def test_build_optimizer_fused_on_cuda_capturable_on_request(monkeypatch):
    import sys

    params = [torch.nn.Parameter(torch.zeros(3))]
    monkeypatch.setitem(sys.modules, "torch_optimizer", None)  # not needed for torch.optim names
    plain = build_optimizer("adam", params, 1e-3)
    assert not plain.defaults["fused"] and not plain.defaults["capturable"]
    cuda = build_optimizer("adam", params, 1e-3, device="cuda", capturable=True)
    assert cuda.defaults["fused"] and cuda.defaults["capturable"]
    assert cuda.defaults["betas"] == (0.5, 0.999)
    with pytest.raises(ConfigError, match="'sgd' cannot be captured"):
        build_optimizer("sgd", params, 1e-3, capturable=True)


def test_tf32_mode_sets_and_restores():
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    with tf32_mode(True):
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.allow_tf32
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before
    with tf32_mode(False):
        assert torch.get_float32_matmul_precision() == before[0]


def test_shared_forward_step_equals_train_step():
    eager, captured = make("gali8"), make("gali8")
    data = batches(2)
    d_opt, g_opt = adam_pair(eager)
    torch.manual_seed(1)
    expected = [
        train_step(eager, x, d_opt, g_opt, n_dis=2, instance_noise=s, shared_forward=True)
        for x, s in zip(data, NOISE)
    ]
    step = CapturedStep(captured, *adam_pair(captured), n_dis=2, shared_forward=True)
    torch.manual_seed(1)
    got = [step(x, instance_noise=s) for x, s in zip(data, NOISE)]
    assert [m.g_loss for m in got] == pytest.approx([m.g_loss for m in expected], rel=1e-5)
    for p, q in zip(eager.parameters(), captured.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_cuda_graphs_setting_is_refused_on_the_cpu(tmp_path):
    from gali_ext import recipes
    from gali_ext.recipes.train import train

    config = recipes.get("digits-ali").with_overrides(
        {"steps": "2", "batch_size": "8", "cuda_graphs": "true"}
    )
    with pytest.raises(ConfigError, match=r"CUDA graphs need the model on a CUDA device.*cpu"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="cuda_graphs=true does not work with fp16"):
        config.with_overrides({"mixed_precision": "fp16"}).validate()


def test_tf32_setting_holds_during_the_run_and_is_recorded(tmp_path, monkeypatch):
    import json

    from gali_ext import recipes
    from gali_ext.recipes import build as build_module
    from gali_ext.recipes import train as train_module

    seen = []
    real = build_module.build_model

    def spy(config, channels):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32))
        return real(config, channels)

    monkeypatch.setattr(build_module, "build_model", spy)
    before = torch.get_float32_matmul_precision()
    config = recipes.get("digits-ali").with_overrides(
        {"steps": "1", "batch_size": "8", "tf32": "true"}
    )
    run = train_module.train(config, tmp_path / "run", progress=False)
    assert seen == [("high", True)] and torch.get_float32_matmul_precision() == before
    saved = json.loads((run / "config.json").read_text())
    assert saved["tf32"] is True and saved["cuda_graphs"] is False


def test_eager_step_with_a_device_guard_raises_after_skipping_the_update():
    gali = make("ali")
    d_opt, g_opt = adam_pair(gali)  # fused: checked on the device, read once at the end
    real = gali.generator_objective

    def poisoned(*args, **kwargs):
        objective = real(*args, **kwargs)
        objective.loss = objective.loss * float("inf")  # inf * a positive loss = inf
        return objective

    gali.generator_objective = poisoned
    eg = [p.detach().clone() for p in g_opt.param_groups[0]["params"]]
    with pytest.raises(DivergenceError, match="generator-encoder loss became inf at step 4"):
        train_step(gali, batches(1)[0], d_opt, g_opt, step=4)
    assert all(torch.equal(a, b) for a, b in zip(eg, g_opt.param_groups[0]["params"]))
    assert all(s["step"].item() == 0 for s in g_opt.state.values())  # Adam's count undone too


def test_own_generator_batch_step_equals_train_step():
    eager, captured = make("gali8"), make("gali8")
    data = batches(3)  # n_dis=2 and the G/E step's own batch
    d_opt, g_opt = adam_pair(eager)
    torch.manual_seed(1)
    expected = [
        train_step(eager, x, d_opt, g_opt, n_dis=2, instance_noise=s, own_generator_batch=True)
        for x, s in zip(data, NOISE)
    ]
    step = CapturedStep(captured, *adam_pair(captured), n_dis=2, own_generator_batch=True)
    assert step.batches_per_step == 3
    torch.manual_seed(1)
    got = [step(x, instance_noise=s) for x, s in zip(data, NOISE)]
    assert [m.g_loss for m in got] == pytest.approx([m.g_loss for m in expected], rel=1e-5)
    for p, q in zip(eager.parameters(), captured.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match=r"n_dis=2 \+ 1 \(own_generator_batch\) batches, got 2"):
        step(data[0][:2], instance_noise=0.1)
