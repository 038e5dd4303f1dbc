"""rlft.core.advantages vs the float64 loop reference, hand-worked cases and edge cases."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from rlft.core import advantages
from tests import reference as ref

GROUPS = [(1, 2), (3, 4), (5, 8)]  # (B, G)
SEEDS = [0, 1, 2]
TOL = {"rtol": 1e-5, "atol": 1e-6}


def rewards_for(b: int, g: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b * g, generator=gen) + 0.5


def ragged_mask(n: int, t: int, gen: torch.Generator, holes: bool = False) -> torch.Tensor:
    """Right-padded (N, T) bool mask, row 1 all padding; with holes, some interior tokens masked too."""
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    if n > 1:
        lengths[1] = 0
    mask = torch.arange(t)[None, :] < lengths[:, None]
    if holes:
        mask &= torch.rand(n, t, generator=gen) > 0.25
    return mask


# --- GRPO outcome / Dr. GRPO / RLOO --------------------------------------------------------------


@pytest.mark.parametrize(("b", "g"), GROUPS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grouped_matches_reference(b, g, seed, scale):
    r = rewards_for(b, g, seed)
    assert_close(advantages.grouped(r, g, scale=scale).double(), ref.grouped(r, g, scale), **TOL)


@pytest.mark.parametrize(("b", "g"), GROUPS)
@pytest.mark.parametrize("seed", SEEDS)
def test_rloo_matches_reference(b, g, seed):
    r = rewards_for(b, g, seed)
    assert_close(advantages.rloo(r, g).double(), ref.rloo(r, g), **TOL)


def test_grouped_and_rloo_hand_worked():
    # Group [1, 0, 0, 0]: mean 0.25, sample std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    #   group: [0.75, -0.25, -0.25, -0.25] / 0.5001 = [1.4997001, -0.4999000, ...]
    #   none:  [0.75, -0.25, -0.25, -0.25]
    #   RLOO:  1 - 0 = 1;  0 - 1/3 = -0.3333333
    # Second group [2, 4, 2, 4] (mean 3, std sqrt(4/3) = 1.1547005): batch std over all 8 rewards
    #   = sqrt((0.625^2 + 3 * 1.625^2 + 2 * 0.375^2 + 2 * 2.375^2) / 7) = sqrt(19.875 / 7) = 1.6850180,
    #   so batch-scaled row 0 = 0.75 / (1.6850180 + 1e-4) (mean still per group).
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 2.0, 4.0])
    assert_close(advantages.grouped(r[:4], 4), torch.tensor([1.4997001, -0.4999000, -0.4999000, -0.4999000]))
    assert_close(advantages.grouped(r[:4], 4, scale="none"), torch.tensor([0.75, -0.25, -0.25, -0.25]))
    assert_close(advantages.rloo(r[:4], 4), torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    assert advantages.grouped(r, 4, scale="batch")[0].item() == pytest.approx(
        0.75 / (1.6850180 + 1e-4), rel=1e-6
    )
    assert advantages.grouped(r, 4)[4].item() == pytest.approx(-1.0 / (1.1547005 + 1e-4), rel=1e-6)


@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, -3.7])
def test_equal_rewards_give_exactly_zero_advantage(value):
    # 0.1 * 8 / 8 != 0.1 in float32, so a naive (R - mean) would leave ~1e-9 / 1e-4 = 1e-5 behind.
    r = torch.cat([torch.full((8,), value), torch.tensor([0.0, 1.0, 0.5, 0.2, 0.9, 0.1, 0.3, 0.7])])
    for scale in ("group", "batch", "none"):
        adv = advantages.grouped(r, 8, scale=scale)
        assert (adv[:8] == 0).all() and torch.isfinite(adv).all() and (adv[8:] != 0).all()
    assert (advantages.rloo(r, 8)[:8] == 0).all()
    assert (advantages.grouped(torch.full((6,), value), 3) == 0).all()


def test_group_layout_is_validated():
    with pytest.raises(ValueError, match="group_size must be >= 2, got 1"):
        advantages.grouped(torch.tensor([1.0, 0.0]), 1)
    for fn in (advantages.rloo, advantages.zero_variance_groups):
        with pytest.raises(ValueError, match="group_size must be >= 2"):
            fn(torch.tensor([1.0, 0.0]), 1)
    with pytest.raises(ValueError, match="not a multiple of group_size=4"):
        advantages.grouped(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="1-D"):
        advantages.grouped(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="unknown advantage scale"):
        advantages.grouped(torch.zeros(4), 2, scale="std")  # type: ignore[arg-type]
    # Integer rewards are accepted and give float advantages.
    assert_close(advantages.grouped(torch.tensor([1, 0]), 2, scale="none"), torch.tensor([0.5, -0.5]))


# --- whitening, GAE, REINFORCE++ -----------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("holes", [False, True])
def test_whiten_matches_reference(seed, holes):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 9, generator=gen) * 2 + 1
    mask = ragged_mask(6, 9, gen, holes)
    assert_close(advantages.whiten(x, mask).double(), ref.whiten(x, mask), **TOL)


def test_whiten_hand_worked_and_degenerate():
    # Counted [1, 2, 3] (the 50 is padding): mean 2, sample std 1 -> [-1, 0, 1] (eps 1e-8 in the variance).
    x = torch.tensor([[1.0, 2.0], [3.0, 50.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert_close(advantages.whiten(x, mask), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    assert (advantages.whiten(torch.full((2, 3), 0.1), torch.ones(2, 3)) == 0).all()
    assert (advantages.whiten(x, torch.zeros(2, 2)) == 0).all()
    assert (advantages.whiten(x, torch.tensor([[0, 1], [0, 0]])) == 0).all()


@pytest.mark.parametrize("shape", [(1, 1), (5, 8), (3, 13)])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_reference(shape, seed, gamma, lam, holes):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(*shape, generator=gen)
    values = torch.randn(*shape, generator=gen)
    mask = ragged_mask(*shape, gen, holes)
    out = advantages.gae(rewards, values, mask, gamma, lam)
    adv_ref, ret_ref = ref.gae(rewards, values, mask, gamma, lam)
    assert_close(out.advantages.double(), adv_ref, **TOL)
    assert_close(out.returns.double(), ret_ref, **TOL)


def test_gae_hand_worked_and_padding_ignored():
    # rew = [0, 0, 1], V = [0.5, 0.4, 0.3], gamma 0.9, lam 0.5 (gamma*lam = 0.45), V after last = 0:
    #   delta2 = 1 - 0.3 = 0.7;  delta1 = 0.9*0.3 - 0.4 = -0.13;  delta0 = 0.9*0.4 - 0.5 = -0.14
    #   A2 = 0.7;  A1 = -0.13 + 0.45*0.7 = 0.185;  A0 = -0.14 + 0.45*0.185 = -0.05675
    #   returns = A + V = [0.44325, 0.585, 1.0]
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0, 9.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 7.0, 7.0]])  # positions 3, 4 are padding with garbage
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    out = advantages.gae(rewards, values, mask, 0.9, 0.5)
    assert_close(out.advantages, torch.tensor([[-0.05675, 0.185, 0.7, 0.0, 0.0]]))
    assert_close(out.returns, torch.tensor([[0.44325, 0.585, 1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="gamma and lam"):
        advantages.gae(rewards, values, mask, 1.5, 0.5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_reference(seed, gamma):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(6, generator=gen)
    kl = torch.randn(6, 7, generator=gen) * 0.1
    mask = ragged_mask(6, 7, gen)
    got = advantages.reinforce_pp(rewards, kl, mask, beta=0.05, gamma=gamma)
    assert_close(got.double(), ref.reinforce_pp(rewards, kl, mask, 0.05, gamma), **TOL)


def test_reinforce_pp_hand_worked():
    # beta = 1, kl = 0.1 everywhere, gamma = 1. Row 0: 2 tokens, R = 1 -> token rewards [-0.1, 0.9],
    # returns [0.8, 0.9]. Row 1: 1 token (+1 padding), R = 0 -> [-0.1]. Counted returns [0.8, 0.9, -0.1]:
    # mean 0.5333333, sample std sqrt((0.0711111 + 0.1344444 + 0.4011111) / 2) = 0.5507571.
    rewards = torch.tensor([1.0, 0.0])
    kl = torch.full((2, 2), 0.1)
    mask = torch.tensor([[1, 1], [1, 0]])
    got = advantages.reinforce_pp(rewards, kl, mask, beta=1.0)
    want = (torch.tensor([[0.8, 0.9], [-0.1, 0.5333333]]) - 0.5333333) / 0.5507571
    want[1, 1] = 0.0
    assert_close(got, want)


# --- process supervision -------------------------------------------------------------------------


@pytest.mark.parametrize(("b", "g"), GROUPS)
@pytest.mark.parametrize("seed", SEEDS)
def test_process_supervision_matches_reference(b, g, seed):
    gen = torch.Generator().manual_seed(seed)
    n, t = b * g, 9
    step_rewards = torch.randn(n, t, generator=gen)
    step_end = torch.rand(n, t, generator=gen) < 0.35
    mask = ragged_mask(n, t, gen)
    got = advantages.process_supervision(step_rewards, step_end, mask, g)
    assert_close(got.double(), ref.process_supervision(step_rewards, step_end, mask, g), **TOL)


def test_process_supervision_hand_worked():
    # G = 2. Row 0: steps end at t=1 (reward 1) and t=3 (reward 0); row 1: one step ending at t=2 (reward 0.5).
    # Group step rewards {1, 0, 0.5}: mean 0.5, sample std 0.5 -> normalised 0.5/0.5001 = +-0.9998 and 0.
    #   row 0: A = [r~1 + r~3, r~1 + r~3, r~3, r~3] = [0, 0, -0.9998, -0.9998]
    #   row 1: A = [0, 0, 0, 0] (its one step is exactly the mean); token 3 of row 1 is padding.
    step_rewards = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0]])
    step_end = torch.tensor([[False, True, False, True], [False, False, True, False]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    got = advantages.process_supervision(step_rewards, step_end, mask, 2)
    k = 0.5 / 0.5001
    assert_close(got, torch.tensor([[0.0, 0.0, -k, -k], [0.0, 0.0, 0.0, 0.0]]))
    equal = advantages.process_supervision(torch.full((2, 4), 0.3), step_end, mask, 2)
    assert (equal == 0).all()
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        advantages.process_supervision(step_rewards, step_end, mask, 1)


# --- DAPO helpers --------------------------------------------------------------------------------


def test_overlong_penalty_hand_worked_and_reference():
    # L_max 10, L_cache 4: 0 up to 6, then (6 - L) / 4, -1 from 10 on: L=8 -> -0.5, L=9 -> -0.75.
    lengths = torch.tensor([3, 6, 7, 8, 9, 10, 12])
    got = advantages.overlong_penalty(lengths, 10, 4)
    assert_close(got, torch.tensor([0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0]))
    lengths = torch.randint(0, 40, (50,), generator=torch.Generator().manual_seed(0))
    assert_close(advantages.overlong_penalty(lengths, 32, 8).double(), ref.overlong_penalty(lengths, 32, 8))
    for bad in (0, 11):
        with pytest.raises(ValueError, match="cache_len"):
            advantages.overlong_penalty(lengths, 10, bad)


def test_zero_variance_groups():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.2, 0.2, 0.2])
    assert advantages.zero_variance_groups(r, 3).tolist() == [True, False, True]
    r = (torch.rand(40, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    assert torch.equal(advantages.zero_variance_groups(r, 4), ref.zero_variance_groups(r, 4))


# --- CUDA ----------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_advantages_on_cuda_match_cpu():
    gen = torch.Generator().manual_seed(3)
    r = rewards_for(4, 4, 3)
    rewards, values = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    mask = ragged_mask(4, 6, gen)
    assert_close(advantages.grouped(r.cuda(), 4).cpu(), advantages.grouped(r, 4))
    cuda = advantages.gae(rewards.cuda(), values.cuda(), mask.cuda(), 0.99, 0.95)
    cpu = advantages.gae(rewards, values, mask, 0.99, 0.95)
    assert_close(cuda.advantages.cpu(), cpu.advantages)
    assert_close(advantages.whiten(rewards.cuda(), mask.cuda()).cpu(), advantages.whiten(rewards, mask))
