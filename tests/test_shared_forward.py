"""The training-time forward skips work (ALGORITHMS.md §9): a prompt shared by the G rows of a
group runs once, padding is not computed. Each path must equal a plain full forward over the
whole padded batch, in log-probs and in gradients, for the policy (LoRA), the reference (adapter
disabled), old log-probs, under activation checkpointing, and through a whole GRPO update."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from rlft import rollout
from rlft.core.logits import token_logprobs

G = 4


def plain_logprobs(model, tensors, temperature: float) -> torch.Tensor:
    """The reference: one forward over [prompt; completion] at the full padded width, LM head everywhere."""
    p_ids, p_mask, c_ids, c_mask = tensors
    ids, mask = torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1).ne(0).long()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   use_cache=False).logits[:, p_ids.shape[1] - 1 : -1]
    return torch.where(c_mask.bool(), token_logprobs(logits.float(), c_ids, temperature), 0.0)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from rlft.models import attach_lora, load_model, prepare_base
    from rlft.recipe.schema import LoraSpec, ModelSpec

    mspec = ModelSpec(name="tiny:nano")
    source = prepare_base(mspec, tmp_path_factory.mktemp("base"))
    torch.manual_seed(0)
    model = attach_lora(load_model(source, mspec, torch.device("cpu")), LoraSpec(r=4)).eval()
    with torch.no_grad():  # LoRA B starts at 0: make the adapter change the function
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def batch(vocab: int, seed: int, n_prompts: int = 3, p_max: int = 9, t_max: int = 7, extra_cols: int = 3):
    """Groups of G rows sharing a left-padded prompt of its own length; completions of ragged
    lengths right-padded past the longest one (`extra_cols` all-padding columns), one row fully
    masked (a truncated row left out of the loss)."""
    gen = torch.Generator().manual_seed(seed)
    P, T = p_max + 2, t_max + extra_cols
    p_ids = torch.zeros(n_prompts, P, dtype=torch.long)
    p_mask = torch.zeros(n_prompts, P, dtype=torch.long)
    for u in range(n_prompts):
        length = int(torch.randint(2, p_max + 1, (1,), generator=gen))
        p_ids[u, P - length:] = torch.randint(3, vocab, (length,), generator=gen)
        p_mask[u, P - length:] = 1
    owner = torch.arange(n_prompts).repeat_interleave(G)
    n = len(owner)
    lengths = torch.randint(1, t_max + 1, (n,), generator=gen)
    c_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    c_ids = torch.where(c_mask.bool(), torch.randint(3, vocab, (n, T), generator=gen), 0)
    c_mask[1] = 0  # masked out of the loss; its tokens are still there
    return p_ids[owner], p_mask[owner], c_ids, c_mask


def grads(model, logp: torch.Tensor, weights: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad((logp * weights).sum(), params))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("micro_batch_size", [None, 6, 3])
@pytest.mark.parametrize("mode", [{}, {"share_prompts": False}, {"one_forward": True}])
@pytest.mark.parametrize("bucket_cost", [64, 2])  # 2: several length buckets per micro-batch
def test_policy_logprobs_and_gradients_equal_the_plain_forward(policy, monkeypatch, temperature, micro_batch_size,
                                                                mode, bucket_cost):
    monkeypatch.setattr(rollout, "BUCKET_COST", bucket_cost)
    tensors = batch(policy.config.vocab_size, seed=1)
    weights = torch.randn(tensors[2].shape, generator=torch.Generator().manual_seed(2))
    expected = plain_logprobs(policy, tensors, temperature)
    got = rollout.completion_logprobs(policy, tensors, temperature, micro_batch_size=micro_batch_size, **mode)
    assert got.shape == expected.shape
    assert_close(got, expected, rtol=0, atol=1e-5)
    assert got[tensors[3].bool()].abs().min() > 0 and (got[~tensors[3].bool()] == 0).all()
    g_plain = grads(policy, plain_logprobs(policy, tensors, temperature), weights)
    g_fast = grads(policy, rollout.completion_logprobs(policy, tensors, temperature, micro_batch_size=micro_batch_size,
                                                       **mode), weights)
    for a, b in zip(g_fast, g_plain, strict=True):
        assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert max(float(g.abs().max()) for g in g_plain) > 1e-3  # the gradients compared are not ~0


def test_prompt_is_forwarded_once_and_padding_is_not(policy, monkeypatch):
    """The distinct prompts run once; then only rows with a counted token run, in length buckets,
    each no wider than its longest row: fewer tokens fed than one padded forward of every row."""
    monkeypatch.setattr(rollout, "BUCKET_COST", 4)  # these completions are short: make buckets pay
    tensors = batch(policy.config.vocab_size, seed=3, n_prompts=4)
    seen: list[tuple[int, int]] = []
    hook = policy.get_base_model().model.embed_tokens.register_forward_hook(
        lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            rollout.completion_logprobs(policy, tensors, 1.0)
    finally:
        hook.remove()
    p_mask, c_mask = tensors[1], tensors[3]
    lengths = c_mask.sum(-1)
    assert seen[0] == (4, int(p_mask.sum(-1).max()))  # the 4 distinct prompts, left padding cut
    buckets = seen[1:]
    assert len(buckets) >= 2  # the lengths are spread enough to split
    assert sum(r for r, _ in buckets) == int((lengths > 0).sum())  # the masked row is not computed
    fed = sum(r * w for r, w in seen)
    assert fed < 0.8 * c_mask.shape[0] * (p_mask.shape[1] + c_mask.shape[1])
    # each bucket holds the rows it is as wide as: widths (minus the token the last position needs
    # no input for) cover the sorted lengths
    sorted_lengths = sorted(lengths[lengths > 0].tolist(), reverse=True)
    at = 0
    for r, w in buckets:
        assert w + 1 == sorted_lengths[at]
        at += r


def test_length_buckets_are_the_cheapest_cut():
    """`_length_buckets` against every contiguous cut of the sorted rows (brute force)."""
    import itertools

    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        n = int(torch.randint(1, 10, (1,), generator=gen))
        lengths = torch.randint(0, 200, (n,), generator=gen)
        cost = int(torch.randint(0, 100, (1,), generator=gen))
        buckets = rollout._length_buckets(lengths, cost=cost)
        rows = torch.cat(buckets).tolist() if buckets else []
        assert sorted(rows) == (lengths > 0).nonzero().squeeze(1).tolist()
        got = sum(len(b) * int(lengths[b].max()) + cost for b in buckets if len(b))
        sizes = sorted(lengths[lengths > 0].tolist(), reverse=True)
        best = float("inf")
        for k in range(len(sizes)):
            for cuts in itertools.combinations(range(1, len(sizes)), k):
                edges = [0, *cuts, len(sizes)]
                best = min(best, sum((j - i) * sizes[i] + cost for i, j in itertools.pairwise(edges)))
        if sizes:
            assert got == best, (trial, lengths.tolist(), cost)


def test_reference_and_old_logprobs_equal_the_plain_forward(policy):
    from rlft.models import reference_mode

    tensors = batch(policy.config.vocab_size, seed=4)
    with torch.no_grad():
        with reference_mode(policy):
            ref = rollout.completion_logprobs(policy, tensors, 1.0, micro_batch_size=8)
            ref_plain = plain_logprobs(policy, tensors, 1.0)
        old = rollout.completion_logprobs(policy, tensors, 1.0, micro_batch_size=8)
        old_plain = plain_logprobs(policy, tensors, 1.0)
    assert_close(ref, ref_plain, rtol=0, atol=1e-5)
    assert_close(old, old_plain, rtol=0, atol=1e-5)
    assert (ref - old)[tensors[3].bool()].abs().max() > 1e-3  # the adapter was really off


def test_activation_checkpointing_takes_the_plain_path_with_the_same_numbers(tmp_path: Path):
    from rlft.models import attach_lora, dropout_free_mode, load_model, prepare_base
    from rlft.recipe.schema import LoraSpec, ModelSpec

    mspec = ModelSpec(name="tiny:nano", gradient_checkpointing=True)
    source = prepare_base(mspec, tmp_path)
    torch.manual_seed(0)
    model = dropout_free_mode(attach_lora(load_model(source, mspec, torch.device("cpu")), LoraSpec(r=4)))
    assert rollout._checkpointed(model)
    tensors = batch(model.config.vocab_size, seed=5)
    weights = torch.randn(tensors[2].shape, generator=torch.Generator().manual_seed(6))
    got = rollout.completion_logprobs(model, tensors, 1.0)
    assert_close(got, plain_logprobs(model, tensors, 1.0), rtol=0, atol=1e-5)
    for a, b in zip(grads(model, got, weights), grads(model, plain_logprobs(model, tensors, 1.0), weights), strict=True):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_all_rows_masked_still_returns_a_graph(policy):
    p_ids, p_mask, c_ids, c_mask = batch(policy.config.vocab_size, seed=7)
    logp = rollout.completion_logprobs(policy, (p_ids, p_mask, c_ids, torch.zeros_like(c_mask)), 1.0)
    assert logp.requires_grad and (logp == 0).all() and logp.shape == c_ids.shape


@pytest.mark.parametrize("mu,mini_batches", [(1, 1), (2, 2)])
def test_grpo_update_equals_the_plain_forward_update(tmp_path: Path, monkeypatch, mu, mini_batches):
    """A whole GRPO round (beta > 0, old log-probs recomputed when off-policy): same per-step losses
    and adapter weights with the shared/trimmed forward as with plain forwards."""
    from rlft.metrics import StepTimer
    from rlft.models import attach_lora, load_model, load_tokenizer, prepare_base, reference_mode
    from rlft.recipe.schema import GRPOSpec, LoraSpec, ModelSpec
    from rlft.rl import learner
    from rlft.stages.grpo import build_experience
    from rlft.training import NanGuard, make_optimizer

    mspec = ModelSpec(name="tiny:nano")
    source = prepare_base(mspec, tmp_path)
    tok = load_tokenizer(source, mspec)
    spec = GRPOSpec.model_validate({
        "kind": "grpo", "data": "tiny:arith", "rewards": ["math_answer"], "prompts_per_step": 3,
        "group_size": G, "micro_batch_size": 5, "num_iterations": mu, "mini_batches": mini_batches,
        "sampling": {"max_new_tokens": 12}, "loss": {"beta": 0.05}, "lr": 1e-3,
    })
    prompts = [tok.encode(p) for p in ["1+2=", "what is 17*3?", "9-4"]]
    sampling = rollout.SamplingParams.of(spec.sampling)
    real = rollout.completion_logprobs

    def train(share: bool):
        torch.manual_seed(0)
        policy = attach_lora(load_model(source, mspec, torch.device("cpu")), LoraSpec(r=4)).eval()
        monkeypatch.setattr(rollout, "completion_logprobs",
                            lambda *a, **k: real(*a, **{**k, "share_prompts": share}))
        out = rollout.generate(policy, tok, prompts, sampling, G, rollout.seed_generator(0, 0))
        rewards = torch.randn(len(out.texts), generator=torch.Generator().manual_seed(1))
        ref = lambda: reference_mode(policy)  # noqa: E731
        exp = build_experience(policy, ref, out, rewards, spec, sampling, StepTimer())
        stats = learner.update(policy, make_optimizer(policy, spec), exp, spec, NanGuard("abort", 1), 0,
                               sampling.temperature, lambda s: spec.lr)
        weights = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        return [s["loss/policy"] for s in stats], weights, exp

    losses_fast, w_fast, exp = train(True)
    losses_plain, w_plain, _ = train(False)
    assert len(losses_fast) == mu * mini_batches
    assert_close(torch.tensor(losses_fast), torch.tensor(losses_plain), rtol=0, atol=1e-5)
    for name in w_plain:
        assert_close(w_fast[name], w_plain[name], rtol=0, atol=1e-5)
    assert exp.prompt_ids.shape[0] == 3 * G and (exp.prompt_ids[0] == exp.prompt_ids[G - 1]).all()
