"""The losses against closed forms (docs/design.md, section 3)."""

import math

import pytest
import torch

from gali_ext import (
    AliceReconstructionLoss,
    DiscriminatorLoss,
    MinimaxLoss,
    MisclassificationLoss,
    ProductOfTermsLoss,
    ShapeError,
    tuple_class_accuracy,
)
from gali_ext.errors import ConfigError
from gali_ext.losses import discriminator_loss, product_of_terms_loss


def test_k2_product_of_terms_is_non_saturating_ali_loss():
    torch.manual_seed(0)
    b = 7
    # ALI's D(x, z) = sigmoid(s); the 2-class logits (s, 0) give softmax_0 = sigmoid(s).
    s_real, s_fake = torch.randn(b), torch.randn(b)
    logits = torch.stack(
        [torch.stack([s_real, torch.zeros(b)], -1), torch.stack([s_fake, torch.zeros(b)], -1)]
    )
    d_real, d_fake = torch.sigmoid(s_real), torch.sigmoid(s_fake)
    by_hand = (-torch.log(1 - d_real) - torch.log(d_fake)).mean()
    assert ProductOfTermsLoss()(logits).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # and D's loss is ALI's discriminator loss
    d_by_hand = (-torch.log(d_real) - torch.log(1 - d_fake)).mean()
    assert DiscriminatorLoss()(logits).item() == pytest.approx(d_by_hand.item(), rel=1e-6)


def test_known_softmax_values_and_weights():
    # K = 3, B = 1, logits log(1), log(2), log(3): p = (1/6, 2/6, 3/6) for every class's tuple.
    p = torch.tensor([1.0, 2.0, 3.0]) / 6
    logits = torch.log(torch.tensor([1.0, 2.0, 3.0])).expand(3, 1, 3).clone()
    log_p = p.log()
    d = -(log_p[0] + log_p[1] + log_p[2])
    pot = -sum(log_p[j] for i in range(3) for j in range(3) if j != i)
    minimax = log_p[0] + log_p[1] + log_p[2]
    miscls = -sum(torch.log(1 - p[i]) for i in range(3))
    cases = [
        (DiscriminatorLoss, d, 3),
        (ProductOfTermsLoss, pot, 6),
        (MinimaxLoss, minimax, 3),
        (MisclassificationLoss, miscls, 3),
    ]
    for cls, value, terms in cases:
        assert cls(weighted=False)(logits).item() == pytest.approx(value.item(), rel=1e-6)
        assert cls()(logits).item() == pytest.approx(2 / terms * value.item(), rel=1e-6)


def _batched_logits(table, index):
    """logits[i, b] = table[index[i][b]] with one common batch size per class."""
    b = min(len(ix) for ix in index)
    assert all(len(ix) == b for ix in index)
    return torch.stack([table[ix] for ix in index])


def _equal_size_problem(k, support, seed):
    g = torch.Generator().manual_seed(seed)
    batch = 60
    counts = torch.zeros(k, support, dtype=torch.long)
    for i in range(k):
        raw = torch.rand(support, generator=g) + 0.05
        c = torch.floor(raw / raw.sum() * (batch - support)).long() + 1
        c[0] += batch - c.sum()
        counts[i] = c
    p = counts.double() / batch
    index = [torch.repeat_interleave(torch.arange(support), c) for c in counts]
    return p, index


@pytest.mark.parametrize("k", [2, 4, 8])
def test_optimal_discriminator_is_p_i_over_sum_p(k):
    p, index = _equal_size_problem(k, support=5, seed=k)
    optimal = p.t().log()  # logits table [S, K]: softmax gives p_i / sum_j p_j
    table = optimal.clone().requires_grad_(True)
    loss = discriminator_loss(_batched_logits(table, index), weighted=False)
    (grad,) = torch.autograd.grad(loss, table)
    assert grad.abs().max().item() < 1e-6
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        moved = optimal + 0.3 * torch.randn(optimal.shape, generator=g, dtype=optimal.dtype)
        assert discriminator_loss(_batched_logits(moved, index), weighted=False) > loss + 1e-6


@pytest.mark.parametrize("k", [2, 4, 8])
def test_product_of_terms_lower_bound_at_optimal_discriminator(k):
    bound = k * (k - 1) * math.log(k)
    # all distributions equal: D* = 1/K everywhere, the loss is exactly K(K-1) log K
    p, index = _equal_size_problem(1, support=5, seed=0)
    same = [index[0]] * k
    table = torch.log(p.t().expand(5, k))
    equal = product_of_terms_loss(_batched_logits(table, same), weighted=False)
    assert equal.item() == pytest.approx(bound, rel=1e-6)
    assert product_of_terms_loss(_batched_logits(table, same)).item() == pytest.approx(
        2 * math.log(k), rel=1e-6
    )
    for seed in range(5):
        p, index = _equal_size_problem(k, support=5, seed=100 + seed)
        loss = product_of_terms_loss(_batched_logits(p.t().log(), index), weighted=False)
        assert loss.item() > bound + 1e-6


def test_minimax_gradient_vanishes_when_d_is_confident_but_product_of_terms_does_not():
    k, b = 4, 8
    logits = torch.zeros(k, b, k)
    for i in range(k):
        logits[i, :, i] = 12.0  # D is right and sure about every tuple
    logits.requires_grad_(True)
    (g_minimax,) = torch.autograd.grad(MinimaxLoss()(logits), logits)
    (g_pot,) = torch.autograd.grad(ProductOfTermsLoss()(logits), logits)
    (g_miscls,) = torch.autograd.grad(MisclassificationLoss()(logits), logits)
    assert g_minimax.abs().max().item() < 1e-4
    assert g_pot.abs().max().item() > 1e-2
    assert g_miscls.abs().max().item() > 1e-2


def test_misclassification_is_finite_when_p_rounds_to_one():
    logits = torch.zeros(2, 3, 2)
    logits[0, :, 0] = 200.0
    logits[1, :, 1] = 200.0
    value = MisclassificationLoss(weighted=False)(logits)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(2 * 200.0, rel=1e-6)  # -log(1-p) = 200 + log(1+e^-200)


def test_bf16_autocast_keeps_losses_float32_and_finite():
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(torch.randn(4, 16, 5))
        assert logits.dtype == torch.bfloat16
        for cls in (DiscriminatorLoss, ProductOfTermsLoss, MinimaxLoss, MisclassificationLoss):
            value = cls()(logits)
            assert value.dtype == torch.float32
            assert torch.isfinite(value)


@pytest.mark.parametrize("shape", [(4, 10, 3), (4, 10), (1, 3, 1)])
def test_bad_logits_shape_raises_with_shape(shape):
    with pytest.raises(ShapeError, match="shape"):
        ProductOfTermsLoss()(torch.zeros(shape))


def test_tuple_class_accuracy():
    logits = torch.zeros(2, 4, 2)
    logits[0, :3, 0] = 1.0  # 3 of 4 right for class 0
    logits[0, 3, 1] = 1.0
    logits[1, :, 1] = 1.0  # all right for class 1
    assert tuple_class_accuracy(logits).tolist() == [0.75, 1.0]


def test_alice_reconstruction_terms():
    a = torch.zeros(2, 1, 2, 2)
    b = torch.ones(2, 1, 2, 2) * 2
    assert AliceReconstructionLoss(0.5)(a, b).item() == pytest.approx(0.5 * 4.0)
    with pytest.raises(ShapeError):
        AliceReconstructionLoss()(a, b[:1])


def test_per_term_weights_weigh_each_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 3)
    w = torch.tensor([[0.0, 2.0, 0.5], [1.0, 0.0, 0.0], [3.0, 0.25, 0.0]])  # zero diagonal

    def ce(i, j):  # -(1/B) sum_b log p[i, b, j], by torch's cross-entropy
        return torch.nn.functional.cross_entropy(logits[i], torch.full((7,), j))

    expected = sum(w[i, j] * ce(i, j) for i in range(3) for j in range(3) if i != j)
    torch.testing.assert_close(product_of_terms_loss(logits, weights=w), expected)
    torch.testing.assert_close(ProductOfTermsLoss(weights=w)(logits), expected)
    diag = torch.diag(torch.tensor([0.5, 1.0, 2.0]))
    expected = 0.5 * ce(0, 0) + ce(1, 1) + 2.0 * ce(2, 2)
    torch.testing.assert_close(discriminator_loss(logits, weights=diag), expected)
    torch.testing.assert_close(DiscriminatorLoss(weights=diag)(logits), expected)
    # 2/T as weights is the default weighting
    torch.testing.assert_close(
        DiscriminatorLoss(weights=torch.eye(3) * 2 / 3)(logits), DiscriminatorLoss()(logits)
    )


def test_per_term_weights_are_checked():
    with pytest.raises(ConfigError, match="zero weights off the diagonal"):
        DiscriminatorLoss(weights=torch.ones(3, 3))
    with pytest.raises(ConfigError, match="zero weights on the diagonal"):
        ProductOfTermsLoss(weights=torch.ones(3, 3))
    with pytest.raises(ConfigError, match=">= 0"):
        DiscriminatorLoss(weights=-torch.eye(3))
    with pytest.raises(ConfigError, match="takes no per-term weights"):
        MinimaxLoss(weights=torch.eye(3))
    with pytest.raises(ShapeError, match=r"\[K, K\] = \[2, 2\], got \[2, 3\]"):
        discriminator_loss(torch.randn(2, 4, 2), weights=torch.zeros(2, 3))
    with pytest.raises(ShapeError, match="K=3"):
        DiscriminatorLoss(weights=torch.eye(3))(torch.randn(2, 4, 2))
