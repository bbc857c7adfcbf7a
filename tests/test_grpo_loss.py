"""GRPO advantages and loss against numbers worked out by hand (the arithmetic is spelled out in the
comments), and gradients against autograd through an independently written per-token formula."""
import math

import pytest
import torch

from grpo import group_advantages, grpo_loss

torch.set_num_threads(1)

# -----------------------------------------------------------------------------
# group_advantages


def test_group_advantages_group_std_unbiased():
    # groups of 2: [1, 0] -> mean .5, unbiased std sqrt((.25 + .25) / 1) = sqrt(.5); [0, 1] likewise;
    # [.5, .5] has zero variance -> advantage 0, flagged
    adv, zero = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5]), 2)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert adv.tolist() == pytest.approx([a, -a, -a, a, 0.0, 0.0], abs=1e-6)
    assert zero.tolist() == [False, False, False, False, True, True]
    # groups of 3: [1, 0, 0] -> mean 1/3, unbiased var ((2/3)^2 + 2 (1/3)^2) / 2 = 1/3
    adv, zero = group_advantages(torch.tensor([1.0, 0.0, 0.0]), 3)
    s = math.sqrt(1 / 3) + 1e-4
    assert adv.tolist() == pytest.approx([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s], abs=1e-6)
    assert not zero.any()


def test_group_advantages_batch_and_none():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5])
    # batch: group means .5, .5, .5; batch mean .5; unbiased batch var = (4 * .25) / 5 = .2
    adv, zero = group_advantages(r, 2, scale_rewards='batch')
    b = math.sqrt(0.2) + 1e-4
    assert adv.tolist() == pytest.approx([0.5 / b, -0.5 / b, -0.5 / b, 0.5 / b, 0.0, 0.0], abs=1e-6)
    assert zero.tolist() == [False] * 4 + [True] * 2
    # batch std differs from group std when group spreads differ: [2, 0] and [1, 1.5]
    adv, _ = group_advantages(torch.tensor([2.0, 0.0, 1.0, 1.5]), 2, scale_rewards='batch')
    # mean 1.125; deviations .875, -1.125, -.125, .375; sum sq = .765625 + 1.265625 + .015625 + .140625 = 2.1875
    b = math.sqrt(2.1875 / 3) + 1e-4
    assert adv.tolist() == pytest.approx([1 / b, -1 / b, -0.25 / b, 0.25 / b], abs=1e-6)
    adv, _ = group_advantages(torch.tensor([2.0, 0.0, 1.0, 1.5]), 2, scale_rewards='none')
    assert adv.tolist() == pytest.approx([1.0, -1.0, -0.25, 0.25], abs=1e-7)


def test_group_advantages_zero_variance_is_exactly_zero():
    # eight float32 0.9s do not average to exactly 0.9 (off by 6e-8), and TRL's
    # (r - mean) / (std + 1e-4) turns that into advantages of ~6e-4; ours are exactly 0
    r = torch.tensor([0.9] * 8 + [0.0] * 7 + [1.0])
    adv, zero = group_advantages(r, 8)
    assert adv[:8].tolist() == [0.0] * 8 and zero.tolist() == [True] * 8 + [False] * 8
    assert adv[8:].abs().min() > 0.3


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match='num_generations'):
        group_advantages(torch.tensor([1.0, 0.0]), 1)
    with pytest.raises(ValueError, match='groups of num_generations=2'):
        group_advantages(torch.tensor([1.0, 0.0, 1.0]), 2)
    with pytest.raises(ValueError, match='scale_rewards'):
        group_advantages(torch.tensor([1.0, 0.0]), 2, scale_rewards='global')
    with pytest.raises(ValueError, match='finite'):
        group_advantages(torch.tensor([1.0, float('nan')]), 2)

# -----------------------------------------------------------------------------
# grpo_loss on a hand-worked case
#
# ratios r = exp(logp - old) = [[1.1, 1.5, pad], [0.9, 0.5, 1.0]], A = [1, -0.5],
# epsilon = 0.2, epsilon_high = 0.28 -> clip range [0.8, 1.28].
#   seq 0 (A = 1):   t0 r=1.1 -> -min(1.1, 1.1) = -1.1
#                    t1 r=1.5 -> -min(1.5, 1.28) = -1.28           (clipped high)
#   seq 1 (A = -.5): t0 r=0.9 -> -min(-.45, -.45) = .45
#                    t1 r=0.5 -> -min(-.25, .8 * -.5 = -.4) = .4    (clipped low)
#                    t2 r=1.0 -> .5
#   grpo:    ((-1.1 - 1.28) / 2 + (.45 + .4 + .5) / 3) / 2 = (-1.19 + .45) / 2 = -0.37
#   dapo:    (-1.1 - 1.28 + .45 + .4 + .5) / 5 = -1.03 / 5 = -0.206
#   dr_grpo: -1.03 / (2 * 4) = -0.12875         (max_completion_length 4)
# KL: ref - logp = d = [[0, ln 2, pad], [-ln 2, 0, ln 2]], k3 = e^d - d - 1:
#   k3(ln 2) = 1 - ln 2, k3(-ln 2) = ln 2 - .5, so seq 0 sums 1 - ln 2 and seq 1 sums exactly .5


R = [[1.1, 1.5, 7.0], [0.9, 0.5, 1.0]]
D = [[0.0, math.log(2), 3.0], [-math.log(2), 0.0, math.log(2)]]
MASK = [[1, 1, 0], [1, 1, 1]]
K_LN2 = 1 - math.log(2)


def _case(dtype=torch.float64):
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]], dtype=dtype)
    logp = (old + torch.log(torch.tensor(R, dtype=dtype))).requires_grad_(True)
    ref = logp.detach() + torch.tensor(D, dtype=dtype)
    return logp, old, ref, torch.tensor([1.0, -0.5], dtype=dtype), torch.tensor(MASK, dtype=torch.bool)


@pytest.mark.parametrize('loss_type,kw,expected', [
    ('grpo', {}, -0.37),
    ('dapo', {}, -0.206),
    ('dapo', {'num_items': 10}, -1.03 / 10),
    ('dr_grpo', {'max_completion_length': 4}, -0.12875),
])
def test_loss_values_with_clipping(loss_type, kw, expected):
    logp, old, _, A, m = _case()
    loss, stats = grpo_loss(logp, old, None, A, m, beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type, **kw)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats['clip_low'].item() == pytest.approx(1 / 5)
    assert stats['clip_high'].item() == pytest.approx(1 / 5)
    assert stats['clip_region'].item() == pytest.approx(2 / 5)
    assert stats['ratio'].item() == pytest.approx((1.1 + 1.5 + 0.9 + 0.5 + 1.0) / 5, abs=1e-6)
    assert 'kl' not in stats


@pytest.mark.parametrize('loss_type,kw,expected', [
    ('grpo', {}, -0.37 + 0.1 * ((K_LN2 / 2) + (0.5 / 3)) / 2),
    ('dapo', {}, (-1.03 + 0.1 * (K_LN2 + 0.5)) / 5),
    ('dr_grpo', {'max_completion_length': 4}, (-1.03 + 0.1 * (K_LN2 + 0.5)) / 8),
])
def test_loss_values_with_kl(loss_type, kw, expected):
    logp, old, ref, A, m = _case()
    loss, stats = grpo_loss(logp, old, ref, A, m, beta=0.1, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type, **kw)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats['kl'].item() == pytest.approx((K_LN2 + 0.5) / 5, abs=1e-6)


def test_ref_without_beta_is_logged_not_added():
    logp, old, ref, A, m = _case()
    loss, stats = grpo_loss(logp, old, ref, A, m, beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type='grpo')
    assert loss.item() == pytest.approx(-0.37, abs=1e-6)
    assert stats['kl'].item() == pytest.approx((K_LN2 + 0.5) / 5, abs=1e-6)


def test_no_clipping_when_epsilon_is_wide_and_symmetric_default():
    # epsilon 10 (range [-9, 11]): nothing clips; seq 0 = -(1.1 + 1.5) / 2 = -1.3,
    # seq 1 = .5 * (.9 + .5 + 1) / 3 = .4; grpo = (-1.3 + .4) / 2 = -.45
    logp, old, _, A, m = _case()
    loss, stats = grpo_loss(logp, old, None, A, m, epsilon=10.0, loss_type='grpo')
    assert loss.item() == pytest.approx(-0.45, abs=1e-6)
    assert stats['clip_region'].item() == 0.0
    # epsilon_high defaults to epsilon: with epsilon .2 the 1.5 clips at 1.2:
    # seq 0 = -(1.1 + 1.2) / 2 = -1.15, seq 1 = .45 as before -> (-1.15 + .45) / 2 = -.35
    loss, _ = grpo_loss(logp, old, None, A, m, epsilon=0.2, loss_type='grpo')
    assert loss.item() == pytest.approx(-0.35, abs=1e-6)


def test_on_policy_default_old_logp():
    # old_logp None: ratio 1 everywhere; grpo = (-(1) + .5) / 2 = -.25 and the gradient is the
    # plain policy gradient: d/dlogp = -A * w with w = 1 / (n_i * B)
    logp, _, _, A, m = _case()
    loss, stats = grpo_loss(logp, None, None, A, m, loss_type='grpo')
    assert loss.item() == pytest.approx(-0.25, abs=1e-7)
    assert stats['ratio'].item() == pytest.approx(1.0)
    loss.backward()
    expected = [[-1 / 4, -1 / 4, 0.0], [0.5 / 6, 0.5 / 6, 0.5 / 6]]
    assert logp.grad.tolist() == [pytest.approx(row, abs=1e-7) for row in expected]


def test_hand_gradient_with_clipping_and_kl():
    # d l_t / d logp_t = -r A when the unclipped term is taken, 0 when clipped, plus beta (1 - e^d)
    # (k3' = -e^d + 1). dapo weight 1/5 per token.
    logp, old, ref, A, m = _case()
    loss, _ = grpo_loss(logp, old, ref, A, m, beta=0.1, epsilon=0.2, epsilon_high=0.28, loss_type='dapo')
    loss.backward()
    g = [[-1.1 * 1 + 0.1 * (1 - 1), 0.0 + 0.1 * (1 - 2), 0.0],
         [-0.9 * -0.5 + 0.1 * (1 - 0.5), 0.0 + 0.0, -1.0 * -0.5 + 0.1 * (1 - 2)]]
    expected = [[x / 5 for x in row] for row in g]
    assert logp.grad.tolist() == [pytest.approx(row, abs=1e-7) for row in expected]


def test_padding_garbage_does_not_leak():
    logp, old, ref, A, m = _case()
    bad = logp.detach().clone()
    bad[0, 2] = float('-inf')
    bad = bad.requires_grad_(True)
    ref = ref.clone()
    ref[0, 2] = float('nan')
    loss, stats = grpo_loss(bad, old, ref, A, m, beta=0.1, epsilon=0.2, epsilon_high=0.28, loss_type='grpo')
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(bad.grad).all() and bad.grad[0, 2] == 0
    assert loss.item() == pytest.approx(-0.37 + 0.1 * ((K_LN2 / 2) + (0.5 / 3)) / 2, abs=1e-6)

def test_extreme_log_prob_gaps_stay_finite():
    """A token the sampler or the reference found ~impossible (a gap of 1e4 nats either way): exp would overflow
    to inf and inf * 0 to nan; the clamped gap keeps the loss and the gradient finite, the KL large."""
    logp = torch.tensor([[-1e4, -0.5, 0.0], [0.0, -3.0, -1e4]], requires_grad=True)
    old = torch.tensor([[0.0, -0.5, -1e4], [-1e4, -3.0, 0.0]])
    ref = torch.tensor([[0.0, -1e4, 0.0], [-1e4, 0.0, -1e4]])
    m = torch.ones(2, 3, dtype=torch.bool)
    for A in (torch.tensor([1.0, -1.0]), torch.tensor([0.0, -2.0])):
        for loss_type in ('grpo', 'dapo', 'dr_grpo'):
            logp.grad = None
            loss, stats = grpo_loss(logp, old, ref, A, m, beta=0.04, loss_type=loss_type, max_completion_length=3)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(logp.grad).all(), (A, loss_type, loss)
            assert torch.isfinite(stats['ratio']) and stats['kl'] > 1e6

# -----------------------------------------------------------------------------
# gradients against autograd through a plain per-token reference


def _reference_loss(logp, old, ref, A, mask, beta, eps, eps_high, loss_type, max_len, num_items):
    """Written independently of grpo_loss: explicit loops, clipping as a one-sided clamp per sign of A
    (A >= 0: min(r, 1 + eps_high) A; A < 0: max(r, 1 - eps) A), which equals PPO's pessimistic min."""
    B, L = logp.shape
    seq_losses, total, ntok = [], 0.0, 0
    for i in range(B):
        s, n = 0.0, 0
        for t in range(L):
            if not mask[i][t]:
                continue
            r = torch.exp(logp[i, t] - old[i, t])
            obj = torch.clamp(r, max=1 + eps_high) * A[i] if A[i] >= 0 else torch.clamp(r, min=1 - eps) * A[i]
            lt = -obj
            if beta > 0:
                d = ref[i, t] - logp[i, t]
                lt = lt + beta * (torch.exp(d) - d - 1)
            s, n = s + lt, n + 1
        seq_losses.append(s / max(n, 1))
        total, ntok = total + s, ntok + n
    if loss_type == 'grpo':
        return sum(seq_losses) / B
    if loss_type == 'dapo':
        return total / (num_items if num_items is not None else ntok)
    return total / (B * max_len)


@pytest.mark.parametrize('loss_type', ['grpo', 'dapo', 'dr_grpo'])
@pytest.mark.parametrize('beta', [0.0, 0.04])
def test_gradients_match_reference(loss_type, beta):
    g = torch.Generator().manual_seed(0)
    B, L = 4, 6
    old = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3
    logp0 = old + (torch.rand(B, L, generator=g, dtype=torch.float64) - 0.5) * 0.8  # ratios in ~[.67, 1.5]
    ref = old + (torch.rand(B, L, generator=g, dtype=torch.float64) - 0.5)
    A = torch.tensor([1.3, -0.7, 0.4, -1.1], dtype=torch.float64)
    lengths = [6, 3, 5, 1]
    mask = torch.tensor([[t < n for t in range(L)] for n in lengths])
    kw = dict(max_completion_length=8 if loss_type == 'dr_grpo' else None,
              num_items=17.0 if loss_type == 'dapo' else None)
    a = logp0.clone().requires_grad_(True)
    loss, stats = grpo_loss(a, old, ref if beta else None, A, mask, beta=beta, epsilon=0.2, epsilon_high=0.28,
                            loss_type=loss_type, **kw)
    loss.backward()
    b = logp0.clone().requires_grad_(True)
    ref_loss = _reference_loss(b, old, ref, A, mask.tolist(), beta, 0.2, 0.28, loss_type,
                               kw['max_completion_length'], kw['num_items'])
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    assert torch.allclose(a.grad.double(), b.grad, atol=1e-7)
    assert stats['clip_region'] > 0  # the draw does exercise clipping


def test_float32_and_bad_input():
    logp, old, ref, A, m = _case(torch.float32)
    loss, _ = grpo_loss(logp, old, None, A, m, epsilon=0.2, epsilon_high=0.28, loss_type='grpo')
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(-0.37, abs=1e-5)
    with pytest.raises(ValueError, match='ref_logp'):
        grpo_loss(logp, old, None, A, m, beta=0.1)
    with pytest.raises(ValueError, match='max_completion_length'):
        grpo_loss(logp, old, None, A, m, loss_type='dr_grpo')
    with pytest.raises(ValueError, match='loss_type'):
        grpo_loss(logp, old, None, A, m, loss_type='bnpo')
    with pytest.raises(ValueError, match='advantages'):
        grpo_loss(logp, old, None, A[:1], m)
    with pytest.raises(ValueError, match='mask'):
        grpo_loss(logp, old, None, A, m[:, :2])
    with pytest.raises(ValueError, match='num_items'):
        grpo_loss(logp, old, None, A, m, loss_type='grpo', num_items=5)
