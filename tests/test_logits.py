"""rlft.core.logits kernels (log-probs, entropy, distillation) vs the float64 loop reference, hand-worked cases."""

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


def logit_inputs(n: int, t: int, v: int, seed: int, scale: float = 3.0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(n, t, v, generator=gen) * scale
    teacher = torch.randn(n, t, v, generator=gen) * scale
    ids = torch.randint(0, v, (n, t), generator=gen)
    return student, teacher, ids


# --- token log-probs and entropy -----------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_token_logprobs_and_entropy_match_reference(shape, seed, temperature, chunk_rows):
    logits, _, ids = logit_inputs(*shape, 11, seed)
    got = losses.token_logprobs(logits, ids, temperature, chunk_rows=chunk_rows)
    assert_close(got.double(), ref.token_logprobs(logits, ids, temperature), **TOL)
    got_h = losses.entropy(logits, temperature, chunk_rows=chunk_rows)
    assert_close(got_h.double(), ref.entropy(logits, temperature), **TOL)


def test_token_logprobs_and_entropy_hand_worked():
    # logits [0, log 3]: softmax = [1/4, 3/4]; chosen id 1 -> log 0.75 = -0.2876821.
    # Entropy of [0, 0, 0, 0] (uniform over 4) = log 4 = 1.3862944.
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert_close(losses.token_logprobs(logits, torch.tensor([[1]])), torch.tensor([[-0.2876821]]))
    assert_close(losses.entropy(torch.zeros(1, 1, 4)), torch.tensor([[math.log(4.0)]]))
    # Temperature 2 on [0, 2 log 3] is the same distribution as above.
    assert_close(
        losses.token_logprobs(2 * logits, torch.tensor([[1]]), temperature=2.0), torch.tensor([[-0.2876821]])
    )


def test_huge_logits_do_not_overflow():
    student, teacher, ids = logit_inputs(2, 3, 7, 0, scale=1e4)
    lp = losses.token_logprobs(student, ids)
    h = losses.entropy(student)
    assert torch.isfinite(lp).all() and torch.isfinite(h).all()
    assert_close(lp.double(), ref.token_logprobs(student, ids), rtol=1e-5, atol=1e-2)
    assert_close(h.double(), ref.entropy(student), rtol=1e-5, atol=1e-4)
    for loss in (
        losses.forward_kl(student, teacher),
        losses.reverse_kl(student, teacher),
        losses.generalized_jsd(student, teacher, 0.5),
    ):
        assert torch.isfinite(loss).all() and (loss >= 0).all()
    assert_close(
        losses.forward_kl(student, teacher).double(),
        ref.distill(student, teacher, "forward"),
        rtol=1e-5,
        atol=1e-2,
    )


def test_token_logprobs_gradcheck_and_validation():
    logits, _, ids = logit_inputs(2, 3, 5, 1)
    x = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: losses.token_logprobs(z, ids, 0.8, chunk_rows=4), (x,))
    assert torch.autograd.gradcheck(lambda z: losses.entropy(z, 1.3, chunk_rows=4), (x,))
    with pytest.raises(ValueError, match="temperature"):
        losses.token_logprobs(logits, ids, temperature=0.0)
    with pytest.raises(ValueError, match="ids"):
        losses.token_logprobs(logits, ids[:, :2])


# --- distillation --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_losses_match_reference(shape, seed, temperature):
    student, teacher, _ = logit_inputs(*shape, 9, seed)
    pairs = {
        "forward": losses.forward_kl(student, teacher, temperature),
        "reverse": losses.reverse_kl(student, teacher, temperature),
        "jsd": losses.generalized_jsd(student, teacher, 0.3, temperature),
    }
    for kind, got in pairs.items():
        assert_close(got.double(), ref.distill(student, teacher, kind, 0.3, temperature), **TOL)


def test_distillation_hand_worked():
    # Teacher P = softmax([0, 0]) = [0.5, 0.5]; student Q = softmax([0, log 3]) = [0.25, 0.75].
    #   forward KL(P||Q) = 0.5 log(0.5/0.25) + 0.5 log(0.5/0.75) = 0.5 log(4/3) = 0.1438410
    #   reverse KL(Q||P) = 0.25 log(0.5) + 0.75 log(1.5) = 0.1308120
    #   JSD beta=0.5: M = [0.375, 0.625]; KL(P||M) = 0.0322693, KL(Q||M) = 0.0353749 -> 0.0338221
    # Temperature 2 on doubled logits gives the same distributions, times T^2 = 4.
    student = torch.tensor([[[0.0, math.log(3.0)]]])
    teacher = torch.zeros(1, 1, 2)
    assert_close(losses.forward_kl(student, teacher), torch.tensor([[0.1438410]]))
    assert_close(losses.reverse_kl(student, teacher), torch.tensor([[0.1308120]]))
    assert_close(losses.generalized_jsd(student, teacher, 0.5), torch.tensor([[0.0338221]]))
    assert_close(losses.forward_kl(2 * student, teacher, temperature=2.0), torch.tensor([[4 * 0.1438410]]))
    assert_close(losses.forward_kl(teacher, teacher), torch.zeros(1, 1))


def test_jsd_limits_reduce_to_the_kls():
    # GKD: JSD_beta / beta -> KL(teacher||student) as beta -> 0; JSD_beta / (1-beta) -> KL(student||teacher)
    # as beta -> 1 (error O(beta), so 1e-4 relative at beta = 1e-4 in float64).
    student, teacher, _ = logit_inputs(2, 3, 7, 8, scale=1.0)
    student, teacher = student.double(), teacher.double()
    b = 1e-4
    assert_close(
        losses.generalized_jsd(student, teacher, b, 1.5) / b,
        losses.forward_kl(student, teacher, 1.5),
        rtol=1e-3,
        atol=1e-8,
    )
    assert_close(
        losses.generalized_jsd(student, teacher, 1 - b, 1.5) / b,
        losses.reverse_kl(student, teacher, 1.5),
        rtol=1e-3,
        atol=1e-8,
    )
    # beta = 0.5 is symmetric in teacher and student.
    assert_close(losses.generalized_jsd(student, teacher, 0.5), losses.generalized_jsd(teacher, student, 0.5))
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="distill.beta"):
            losses.generalized_jsd(student, teacher, bad)
    with pytest.raises(ValueError, match="shared tokenizer"):
        losses.forward_kl(student, teacher[..., :5])


def test_distillation_gradcheck():
    student, teacher, _ = logit_inputs(2, 2, 5, 9, scale=1.0)
    s = student.double().requires_grad_()
    t = teacher.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: losses.forward_kl(a, b, 2.0), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: losses.reverse_kl(a, b, 0.7), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: losses.generalized_jsd(a, b, 0.3, 1.5), (s, t))


# --- CUDA ----------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_logit_kernels_on_cuda_match_cpu():
    student, teacher, ids = logit_inputs(3, 5, 13, 12)
    assert_close(
        losses.token_logprobs(student.cuda(), ids.cuda(), 0.9, chunk_rows=4).cpu(),
        losses.token_logprobs(student, ids, 0.9),
    )
    assert_close(losses.entropy(student.cuda()).cpu(), losses.entropy(student))
    assert_close(
        losses.generalized_jsd(student.cuda(), teacher.cuda(), 0.4, 2.0).cpu(),
        losses.generalized_jsd(student, teacher, 0.4, 2.0),
    )
