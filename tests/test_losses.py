"""rlft.core.losses policy kernels vs the float64 loop reference, hand-worked cases, gradients, edges."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rlft.core import losses
from tests import reference as ref

SHAPES = [(1, 1), (3, 5), (8, 7), (5, 16)]
SEEDS = [0, 1, 2]
TOL = {"rtol": 1e-5, "atol": 1e-6}


def ragged_mask(n: int, t: int, gen: torch.Generator) -> torch.Tensor:
    """Right-padded (N, T) bool mask with random lengths; row 1 (if any) is all padding."""
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    if n > 1:
        lengths[1] = 0
    return torch.arange(t)[None, :] < lengths[:, None]


def policy_inputs(n: int, t: int, seed: int) -> dict[str, torch.Tensor]:
    """Non-zero float32 log-probs, ratios straddling the clip bounds, signed advantages, ragged mask."""
    gen = torch.Generator().manual_seed(seed)
    logp = -(torch.rand(n, t, generator=gen) * 3 + 0.05)
    old_logp = logp + torch.randn(n, t, generator=gen) * 0.3
    ref_logp = logp + torch.randn(n, t, generator=gen) * 0.5
    adv = torch.randn(n, 1, generator=gen)
    adv_tok = torch.randn(n, t, generator=gen)
    return {
        "logp": logp,
        "old_logp": old_logp,
        "ref_logp": ref_logp,
        "adv": adv,
        "adv_tok": adv_tok,
        "mask": ragged_mask(n, t, gen),
    }


# --- PPO-clip ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("eps_low", "eps_high", "dual"), [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.28, 3.0)]
)
@pytest.mark.parametrize("per_token", [False, True])
def test_clipped_surrogate_matches_reference(shape, seed, eps_low, eps_high, dual, per_token):
    x = policy_inputs(*shape, seed)
    adv = x["adv_tok"] if per_token else x["adv"]
    out = losses.clipped_surrogate(x["logp"], x["old_logp"], adv, eps_low, eps_high, dual)
    loss, low, high, dual_ind = ref.clipped_surrogate(x["logp"], x["old_logp"], adv, eps_low, eps_high, dual)
    assert_close(out.loss.double(), loss, **TOL)
    assert_close(out.ratio, torch.exp(x["logp"] - x["old_logp"]))
    assert torch.equal(out.clipped_low, low) and torch.equal(out.clipped_high, high)
    assert torch.equal(out.dual_clipped, dual_ind)


def test_clipped_surrogate_hand_worked():
    # r = [2, 0.5, 1, 5], A = [1, -1, 1, -1], eps 0.2, dual-clip c = 3:
    #   t0: min(2*1, 1.2*1) = 1.2 -> L = -1.2, clipped high
    #   t1: min(0.5*-1, 0.8*-1) = -0.8 -> L = 0.8, clipped low
    #   t2: r inside the band -> L = -1
    #   t3: min(-5, -1.2) = -5 -> L_clip = 5 > c*|A| = 3 -> L = 3, dual-clipped
    logp = torch.log(torch.tensor([[2.0, 0.5, 1.0, 5.0]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    out = losses.clipped_surrogate(logp, torch.zeros_like(logp), adv, 0.2, 0.2, dual_clip_c=3.0)
    assert_close(out.loss, torch.tensor([[-1.2, 0.8, -1.0, 3.0]]))
    assert out.clipped_high.tolist() == [[True, False, False, False]]
    assert out.clipped_low.tolist() == [[False, True, False, False]]
    assert out.dual_clipped.tolist() == [[False, False, False, True]]
    without = losses.clipped_surrogate(logp, torch.zeros_like(logp), adv, 0.2, 0.2)
    assert without.loss[0, 3].item() == pytest.approx(5.0) and not without.dual_clipped.any()


def test_clipped_surrogate_validates_arguments():
    x = policy_inputs(3, 4, 0)
    args = (x["logp"], x["old_logp"], x["adv"])
    with pytest.raises(ValueError, match="dual_clip_c must be > 1"):
        losses.clipped_surrogate(*args, 0.2, 0.2, dual_clip_c=1.0)
    with pytest.raises(ValueError, match="eps_low"):
        losses.clipped_surrogate(*args, 1.0, 0.2)
    with pytest.raises(ValueError, match="eps_high"):
        losses.clipped_surrogate(*args, 0.2, -0.1)
    with pytest.raises(ValueError, match="advantages must be"):
        losses.clipped_surrogate(x["logp"], x["old_logp"], torch.zeros(3, 2), 0.2, 0.2)
    # (N,) advantages are read as one per sequence.
    per_seq = losses.clipped_surrogate(x["logp"], x["old_logp"], x["adv"][:, 0], 0.2, 0.2)
    assert_close(per_seq.loss, losses.clipped_surrogate(*args, 0.2, 0.2).loss)


def test_clipped_tokens_get_exactly_zero_gradient():
    # Clipped high (r=2, A>0) and clipped low (r=0.5, A<0) tokens have a constant loss: grad 0.
    # Unclipped tokens get dL/dlogp = -r * A.
    old_logp = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[2.0, 0.5, 1.1, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    out = losses.clipped_surrogate(logp, old_logp, adv, 0.2, 0.2)
    out.loss.sum().backward()
    assert out.clipped_high[0, 0] and out.clipped_low[0, 1]
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[0, 1].item() == 0.0
    assert_close(logp.grad[0, 2:], torch.tensor([-1.1, -0.5]))


def test_detached_old_logp_gives_plain_policy_gradient():
    # §1: one update per batch, old_logp = logp.detach() -> r = 1 and grad = -A * m / norm.
    x = policy_inputs(4, 6, 3)
    logp = x["logp"].clone().requires_grad_()
    out = losses.clipped_surrogate(logp, logp.detach(), x["adv"], 0.2, 0.28)
    norm = losses.aggregation_normalizer(x["mask"], "token")
    losses.aggregate(out.loss, x["mask"], "token", norm).backward()
    expected = torch.where(x["mask"], -x["adv"].expand(4, 6), torch.zeros(4, 6)) / norm
    assert_close(logp.grad, expected)
    assert not (out.clipped_low.any() or out.clipped_high.any())


def test_clipped_surrogate_gradcheck():
    x = policy_inputs(3, 5, 4)
    logp = x["logp"].double().requires_grad_()
    old, adv = x["old_logp"].double(), x["adv_tok"].double()
    assert torch.autograd.gradcheck(
        lambda lp: losses.clipped_surrogate(lp, old, adv, 0.2, 0.28, 3.0).loss, (logp,)
    )


# --- GSPO ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_gspo_matches_reference(shape, seed):
    x = policy_inputs(*shape, seed)
    adv = x["adv"][:, 0]
    s = losses.gspo_sequence_ratio(x["logp"], x["old_logp"], x["mask"])
    out = losses.gspo_loss(x["logp"], x["old_logp"], adv, x["mask"], 0.05, 0.08)
    s_ref, loss_ref = ref.gspo(x["logp"], x["old_logp"], adv, x["mask"], 0.05, 0.08)
    assert_close(s.double(), s_ref, **TOL)
    assert_close(out.loss.double(), loss_ref, **TOL)
    assert out.loss.shape == (shape[0],)


def test_gspo_hand_worked_and_gradient_reaches_every_token():
    # Row 0: log-ratios [log 2, 0], both counted -> s = exp(log 2 / 2) = sqrt 2 = 1.41421;
    #   A = 1, eps 0.2 -> clipped at 1.2 -> L = -1.2 (constant, zero gradient).
    # Row 1: log-ratios [0.1, 0.3, garbage], third masked -> s = exp(0.2); A = -1 -> L = exp(0.2),
    #   dL/dlogp_t = -A * s / |o| = exp(0.2) / 2 on both counted tokens, 0 on the masked one.
    old = torch.zeros(2, 3)
    logp = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.1, 0.3, 7.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    s = losses.gspo_sequence_ratio(logp, old, mask)
    assert_close(s, torch.tensor([math.sqrt(2.0), math.exp(0.2)]))
    out = losses.gspo_loss(logp, old, torch.tensor([1.0, -1.0]), mask, 0.2, 0.2)
    assert_close(out.loss, torch.tensor([-1.2, math.exp(0.2)]))
    assert out.clipped_high.tolist() == [True, False]
    out.loss.sum().backward()
    g = math.exp(0.2) / 2
    assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.0], [g, g, 0.0]]))


def test_gspo_gradcheck_and_empty_row():
    x = policy_inputs(4, 5, 5)
    old, adv, mask = x["old_logp"].double(), x["adv"].double(), x["mask"]
    logp = x["logp"].double().requires_grad_()
    assert torch.autograd.gradcheck(lambda lp: losses.gspo_loss(lp, old, adv, mask, 0.2, 0.28).loss, (logp,))
    assert torch.autograd.gradcheck(lambda lp: losses.gspo_sequence_ratio(lp, old, mask), (logp,))
    # Row 1 of ragged_mask is all padding: s = 1, no NaN.
    assert losses.gspo_sequence_ratio(logp, old, mask)[1].item() == 1.0
    with pytest.raises(ValueError, match="one advantage per sequence"):
        losses.gspo_loss(logp, old, x["adv_tok"].double(), mask, 0.2, 0.2)


# --- KL and value loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("weighted", [False, True])
def test_kl_penalty_matches_reference(shape, seed, estimator, weighted):
    x = policy_inputs(*shape, seed)
    old = x["old_logp"] if weighted else None
    got = losses.kl_penalty(x["logp"], x["ref_logp"], estimator, old_logp=old)
    assert_close(got.double(), ref.kl_penalty(x["logp"], x["ref_logp"], estimator, old), **TOL)
    if estimator in ("k2", "k3"):
        assert (got >= 0).all()


def test_kl_penalty_hand_worked_and_gradcheck():
    # x = ref_logp - logp = log 2: k1 = -log 2 = -0.693147, k2 = (log 2)^2 / 2 = 0.240227,
    # k3 = 2 - log 2 - 1 = 0.306853; weighted by r = exp(log 0.5) = 0.5 -> k3 * r = 0.153426.
    logp, ref_logp = torch.tensor([[math.log(0.25)]]), torch.tensor([[math.log(0.5)]])
    expected = {"k1": -0.6931472, "k2": 0.2402265, "k3": 0.3068528}
    for est, value in expected.items():
        assert_close(losses.kl_penalty(logp, ref_logp, est), torch.tensor([[value]]))
    weighted = losses.kl_penalty(logp, ref_logp, "k3", old_logp=torch.tensor([[math.log(0.5)]]))
    assert_close(weighted, torch.tensor([[0.1534264]]))
    x = policy_inputs(3, 4, 6)
    lp = x["logp"].double().requires_grad_()
    rl, ol = x["ref_logp"].double(), x["old_logp"].double()
    for est in ("k1", "k2", "k3"):
        assert torch.autograd.gradcheck(lambda z, e=est: losses.kl_penalty(z, rl, e), (lp,))
        assert torch.autograd.gradcheck(lambda z, e=est: losses.kl_penalty(z, rl, e, old_logp=ol), (lp,))
    with pytest.raises(ValueError, match="unknown KL estimator"):
        losses.kl_penalty(logp, ref_logp, "k4")  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", SEEDS)
def test_value_loss_matches_reference_and_hand_worked(seed):
    gen = torch.Generator().manual_seed(seed)
    v, v_old, ret = (torch.randn(4, 6, generator=gen) for _ in range(3))
    assert_close(losses.value_loss(v, v_old, ret, 0.2).double(), ref.value_loss(v, v_old, ret, 0.2), **TOL)
    # V = 1, V_old = 0, R = 0, eps 0.2: max(1^2, 0.2^2) / 2 = 0.5.
    # V = 0.5, V_old = 0, R = 1, eps 0.2: max(0.5^2, (0.2 - 1)^2) / 2 = 0.32.
    got = losses.value_loss(torch.tensor([1.0, 0.5]), torch.zeros(2), torch.tensor([0.0, 1.0]), 0.2)
    assert_close(got, torch.tensor([0.5, 0.32]))
    with pytest.raises(ValueError, match="eps_v"):
        losses.value_loss(v, v_old, ret, -1.0)


# --- aggregation ---------------------------------------------------------------------------------


MODES = ["sequence", "token", "constant"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", MODES)
def test_aggregate_matches_reference(shape, seed, mode):
    x = policy_inputs(*shape, seed)
    loss = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) + 0.5
    norm = losses.aggregation_normalizer(x["mask"], mode, max_len=20)
    got = losses.aggregate(loss, x["mask"], mode, norm)
    assert got.item() == pytest.approx(ref.aggregate(loss, x["mask"], mode, 20), rel=1e-5, abs=1e-6)


def test_aggregate_hand_worked():
    # L = [[1, 2, 3], [4, 9, 9]], mask = [[1, 1, 1], [1, 0, 0]] (the 9s are padding):
    #   sequence: (1/2) * (6/3 + 4/1) = 3;  token: 10 / 4 = 2.5;  constant (L_max 4): 10 / (2 * 4) = 1.25
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    for mode, want in {"sequence": 3.0, "token": 2.5, "constant": 1.25}.items():
        norm = losses.aggregation_normalizer(mask, mode, max_len=4)  # type: ignore[arg-type]
        assert losses.aggregate(loss, mask, mode, norm).item() == pytest.approx(want)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", SEEDS)
def test_micro_batches_sum_to_whole_batch(mode, seed):
    # Split 10 rows into uneven micro-batches; each uses the whole-batch normaliser.
    gen = torch.Generator().manual_seed(seed)
    loss = torch.randn(10, 9, generator=gen, dtype=torch.float64)
    mask = ragged_mask(10, 9, gen)
    norm = losses.aggregation_normalizer(mask, mode, max_len=12)
    whole = losses.aggregate(loss, mask, mode, norm)
    spans = [(0, 1), (1, 4), (4, 5), (5, 10)]
    parts = [losses.aggregate(loss[a:b], mask[a:b], mode, norm) for a, b in spans]
    assert abs(sum(parts).item() - whole.item()) < 1e-6
    # The normaliser is additive, so summing micro-batch normalisers gives the same value.
    micro_norms = [losses.aggregation_normalizer(mask[a:b], mode, max_len=12) for a, b in spans]
    assert sum(micro_norms).item() == norm.item()
    # Per-micro-batch normalisation would not be exact (the bug this API prevents).
    naive = sum(
        losses.aggregate(
            loss[a:b], mask[a:b], mode, losses.aggregation_normalizer(mask[a:b], mode, max_len=12)
        )
        for a, b in spans
    ) / len(spans)
    assert abs(naive.item() - whole.item()) > 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_all_masked_rows_give_zero_loss_and_finite_gradients(mode):
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(3, 4, 6, generator=gen) * 3).requires_grad_()
    ids = torch.randint(0, 6, (3, 4), generator=gen)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    logp = losses.token_logprobs(logits, ids)
    old = logp.detach() + 0.3
    per_token = losses.clipped_surrogate(logp, old, torch.tensor([1.0, -2.0, 0.5]), 0.2, 0.28, 3.0).loss
    per_token = per_token + 0.1 * losses.kl_penalty(logp, old - 0.2, "k3")
    norm = losses.aggregation_normalizer(mask, mode, max_len=4)
    total = losses.aggregate(per_token, mask, mode, norm)
    total.backward(retain_graph=True)
    assert torch.isfinite(total) and torch.isfinite(logits.grad).all()
    assert (logits.grad[1] == 0).all() and (logits.grad[0, 2:] == 0).all() and logits.grad[2].abs().sum() > 0
    assert losses.aggregate(per_token[1:2], mask[1:2], mode, norm).item() == 0.0
    # A batch with no counted token at all: zero loss, zero (not NaN) gradient.
    empty = torch.zeros_like(mask)
    logits.grad = None
    total = losses.aggregate(per_token, empty, mode, losses.aggregation_normalizer(empty, mode, max_len=4))
    total.backward()
    assert total.item() == 0.0 and (logits.grad == 0).all()


def test_aggregation_validates_arguments():
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="max_len"):
        losses.aggregation_normalizer(mask, "constant")
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        losses.aggregation_normalizer(mask, "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        losses.aggregate(torch.ones(2, 3), mask, "mean", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same"):
        losses.aggregate(torch.ones(2, 4), mask, "token", 1.0)


# --- CUDA ----------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_kernels_on_cuda_match_cpu():
    x = policy_inputs(6, 8, 11)
    cuda = {k: v.cuda() for k, v in x.items()}
    out = losses.clipped_surrogate(cuda["logp"], cuda["old_logp"], cuda["adv"], 0.2, 0.28, 3.0)
    cpu = losses.clipped_surrogate(x["logp"], x["old_logp"], x["adv"], 0.2, 0.28, 3.0)
    assert_close(out.loss.cpu(), cpu.loss)
    assert_close(
        losses.kl_penalty(cuda["logp"], cuda["ref_logp"], "k3").cpu(),
        losses.kl_penalty(x["logp"], x["ref_logp"], "k3"),
    )
    for mode in MODES:
        norm = losses.aggregation_normalizer(cuda["mask"], mode, max_len=8)
        assert norm.device.type == "cuda"
        got = losses.aggregate(out.loss, cuda["mask"], mode, norm)
        want = losses.aggregate(
            cpu.loss, x["mask"], mode, losses.aggregation_normalizer(x["mask"], mode, max_len=8)
        )
        assert_close(got.cpu(), want)
