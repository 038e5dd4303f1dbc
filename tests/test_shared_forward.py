"""The training-time forward skips work (ALGORITHMS.md §9): a prompt shared by the G rows of a
group runs once, padding is not computed. Each path must equal a plain full forward over the
whole padded batch, in log-probs and in gradients, for the policy (LoRA), the reference (adapter
disabled), old log-probs, PPO's critic (values of a shared value head and of a separate trunk),
under activation checkpointing, and through a whole GRPO or PPO update."""

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


def _cheapest_cut(lengths: torch.Tensor, cost: int, cap: float = float("inf")) -> float:
    """Brute force over every contiguous cut of the rows with a counted token, longest first:
    the least sum(rows x longest) + cost per bucket, among cuts whose buckets of more than one row
    hold at most `cap` padded positions."""
    import itertools

    sizes = sorted(lengths[lengths > 0].tolist(), reverse=True)
    best = float("inf")
    for k in range(len(sizes)):
        for cuts in itertools.combinations(range(1, len(sizes)), k):
            edges = list(itertools.pairwise([0, *cuts, len(sizes)]))
            if all(j - i == 1 or (j - i) * sizes[i] <= cap for i, j in edges):
                best = min(best, sum((j - i) * sizes[i] + cost for i, j in edges))
    return best


def _cut_cost(lengths: torch.Tensor, buckets: list[torch.Tensor], cost: int) -> int:
    return sum(len(b) * int(lengths[b].max()) + cost for b in buckets if len(b))


def test_length_buckets_are_the_cheapest_cut():
    """`_length_buckets` against every contiguous cut of the sorted rows (brute force)."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        n = int(torch.randint(1, 10, (1,), generator=gen))
        lengths = torch.randint(0, 200, (n,), generator=gen)
        cost = int(torch.randint(0, 100, (1,), generator=gen))
        buckets = rollout._length_buckets(lengths, cost=cost)
        rows = torch.cat(buckets).tolist() if buckets else []
        assert sorted(rows) == (lengths > 0).nonzero().squeeze(1).tolist()
        if (lengths > 0).any():
            assert _cut_cost(lengths, buckets, cost) == _cheapest_cut(lengths, cost), (trial, lengths.tolist(), cost)


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
    and adapter weights with the shared/trimmed forward, backpropagated bucket by bucket, as with
    plain forwards and one backward per micro-batch."""
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
    real, real_by_bucket = rollout.completion_logprobs, rollout.loss_by_bucket
    monkeypatch.setattr(rollout, "BUCKET_COST", 2)  # several buckets, each backpropagated on its own

    def one_share(model, tensors, temperature, share_of, with_entropy=False, share_prompts=True):
        """The reference: the whole micro-batch's plain forward as one share."""
        logp = plain_logprobs(model, tensors, temperature if temperature > 0 else 1.0)
        yield share_of(torch.arange(len(logp)), logp, torch.zeros_like(logp) if with_entropy else None)

    def train(fast: bool):
        torch.manual_seed(0)
        policy = attach_lora(load_model(source, mspec, torch.device("cpu")), LoraSpec(r=4)).eval()
        monkeypatch.setattr(rollout, "completion_logprobs",
                            lambda *a, **k: real(*a, **{**k, "one_forward": not fast}))
        monkeypatch.setattr(rollout, "loss_by_bucket", real_by_bucket if fast else one_share)
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


# ---- backward by length bucket (rollout.loss_by_bucket) -------------------------------------------------

def experience(tensors, seed: int, with_old: bool, with_ref: bool, per_token_adv: bool = False):
    from rlft.rl.learner import Experience

    p_ids, p_mask, c_ids, c_mask = tensors
    gen = torch.Generator().manual_seed(seed)
    shape = c_ids.shape
    noise = lambda: torch.where(c_mask.bool(), 0.3 * torch.randn(shape, generator=gen), 0.0)  # noqa: E731
    adv = torch.randn(shape if per_token_adv else shape[:1], generator=gen)
    return Experience(prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=c_ids, mask=c_mask, advantages=adv,
                      old_logp=noise() - 2.0 if with_old else None, ref_logp=noise() - 2.0 if with_ref else None,
                      sample_logp=noise() - 2.0)


LOSS_VARIANTS = [
    {"aggregate": "token"},
    {"aggregate": "sequence", "beta": 0.05, "kl_estimator": "k3", "importance_sampling_kl": True},
    {"aggregate": "constant", "max_len": 16, "beta": 0.1, "kl_estimator": "k2", "dual_clip": 3.0},
    {"aggregate": "sequence", "ratio": "sequence", "eps_low": 0.05, "eps_high": 0.05},
    {"aggregate": "token", "tis_cap": 1.2, "beta": 0.05, "kl_estimator": "k1"},
]


def by_bucket(model, exp, spec, normalizer, temperature, **kw):
    """Backpropagate `learner.policy_loss` share by share; returns the summed loss, stats and share count."""
    from rlft.rl.learner import policy_loss

    def share(rows, logp, ent):
        return policy_loss(logp, exp.rows(rows), spec, normalizer)

    total, sums, count = 0.0, {}, 0
    for loss, stats in rollout.loss_by_bucket(model, exp.tensors(), temperature, share, **kw):
        loss.backward()
        total, count = total + float(loss.detach()), count + 1
        for k, v in stats.items():
            sums[k] = torch.maximum(sums[k], v) if k.endswith("_max") and k in sums else sums.get(k, 0.0) + v
    return total, sums, count


def plain_loss(model, exp, spec, normalizer, temperature):
    """The reference: plain full-width log-probs, the loss over the whole batch, one backward."""
    from rlft.rl.learner import policy_loss

    loss, stats = policy_loss(plain_logprobs(model, exp.tensors(), temperature), exp, spec, normalizer)
    loss.backward()
    return float(loss), stats


def param_grads(model) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    out = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return out


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
@pytest.mark.parametrize("off_policy", [False, True])
def test_backward_by_bucket_equals_one_backward_of_the_plain_forward(policy, monkeypatch, variant, off_policy):
    """Every loss variant is a sum over rows divided by one batch normaliser, so the per-bucket
    backward (prompt keys/values as leaves, one backward through the prompts at the end) gives the
    gradients of one backward through a plain forward of the whole batch (LoRA, left padding,
    ragged completions, a fully masked row, several buckets)."""
    from rlft.core.losses import aggregation_normalizer
    from rlft.recipe.schema import LossSpec

    monkeypatch.setattr(rollout, "BUCKET_COST", 2)
    spec = LossSpec.model_validate(variant)
    tensors = batch(policy.config.vocab_size, seed=11)
    exp = experience(tensors, seed=12, with_old=off_policy, with_ref=spec.beta > 0)
    normalizer = aggregation_normalizer(exp.mask, spec.aggregate, spec.max_len)
    cuts = []
    real_cut = rollout._SharedPrompts.cut
    monkeypatch.setattr(rollout._SharedPrompts, "cut", lambda self: cuts.append(real_cut(self)) or cuts[-1])
    loss_b, stats_b, count = by_bucket(policy, exp, spec, normalizer, 0.8)
    g_bucket = param_grads(policy)
    loss_p, stats_p = plain_loss(policy, exp, spec, normalizer, 0.8)
    g_plain = param_grads(policy)
    assert count >= 3 and cuts == [True]  # several buckets, and the prompts' outputs were cut into leaves
    assert abs(loss_b - loss_p) <= 1e-5 * max(1.0, abs(loss_p))
    assert stats_b.keys() == stats_p.keys()
    for k in stats_p:
        assert_close(stats_b[k], stats_p[k], rtol=1e-5, atol=1e-5)
    for a, b in zip(g_bucket, g_plain, strict=True):
        assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert max(float(g.abs().max()) for g in g_plain) > 1e-3


@pytest.mark.parametrize("mode", [{"share_prompts": False}, {}])
def test_backward_by_bucket_per_token_advantages_and_unshared_prompts(policy, monkeypatch, mode):
    """Per-token advantages (PPO-style) and the path without prompt sharing give the same gradients."""
    from rlft.core.losses import aggregation_normalizer
    from rlft.recipe.schema import LossSpec

    monkeypatch.setattr(rollout, "BUCKET_COST", 2)
    spec = LossSpec()
    tensors = batch(policy.config.vocab_size, seed=13, n_prompts=4)
    exp = experience(tensors, seed=14, with_old=True, with_ref=False, per_token_adv=True)
    normalizer = aggregation_normalizer(exp.mask, spec.aggregate)
    _, _, count = by_bucket(policy, exp, spec, normalizer, 1.0, **mode)
    g_bucket = param_grads(policy)
    plain_loss(policy, exp, spec, normalizer, 1.0)
    assert count >= 2
    for a, b in zip(g_bucket, param_grads(policy), strict=True):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_backward_by_bucket_under_activation_checkpointing(tmp_path: Path, monkeypatch):
    """Checkpointed layers drop the cache: each bucket runs its rows' prompts itself, and is
    backpropagated on its own; the gradients still equal one plain backward."""
    from rlft.core.losses import aggregation_normalizer
    from rlft.models import attach_lora, dropout_free_mode, load_model, prepare_base
    from rlft.recipe.schema import LoraSpec, LossSpec, ModelSpec

    monkeypatch.setattr(rollout, "BUCKET_COST", 2)
    mspec = ModelSpec(name="tiny:nano", gradient_checkpointing=True)
    source = prepare_base(mspec, tmp_path)
    torch.manual_seed(0)
    model = dropout_free_mode(attach_lora(load_model(source, mspec, torch.device("cpu")), LoraSpec(r=4)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    assert rollout._checkpointed(model)
    spec = LossSpec(beta=0.05)
    exp = experience(batch(model.config.vocab_size, seed=15), seed=16, with_old=True, with_ref=True)
    normalizer = aggregation_normalizer(exp.mask, spec.aggregate)
    _, _, count = by_bucket(model, exp, spec, normalizer, 1.0)
    g_bucket = param_grads(model)
    plain_loss(model, exp, spec, normalizer, 1.0)
    assert count >= 2
    for a, b in zip(g_bucket, param_grads(model), strict=True):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


class SavedBytes:
    """Bytes of autograd-saved activations alive at once (saved_tensors_hooks): the peak of what a
    forward keeps for its backward."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, t):
        meter, size = self, t.numel() * t.element_size()

        class Held:
            def __init__(self):
                meter.live += size
                meter.peak = max(meter.peak, meter.live)
                self.t = t

            def __del__(self):
                meter.live -= size

        return Held()

    @staticmethod
    def unpack(held):
        return held.t


def test_backward_by_bucket_holds_one_bucket_at_a_time(policy, monkeypatch):
    """The point of backpropagating bucket by bucket: the activations held at once are the shared
    prompts' and one bucket's, well under what one graph over the whole micro-batch holds; no
    bucket is wider than 1/BUCKET_SPLIT of the micro-batch's tokens (unless it is a single row)."""
    from rlft.core.losses import aggregation_normalizer
    from rlft.recipe.schema import LossSpec

    spec = LossSpec()
    tensors = batch(policy.config.vocab_size, seed=17, n_prompts=4, t_max=12)
    exp = experience(tensors, seed=18, with_old=False, with_ref=False)
    normalizer = aggregation_normalizer(exp.mask, spec.aggregate)
    whole, split = SavedBytes(), SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(whole.pack, whole.unpack):
        logp = rollout.completion_logprobs(policy, tensors, 1.0)  # one graph over every bucket
        from rlft.rl.learner import policy_loss

        policy_loss(logp, exp, spec, normalizer)[0].backward()
    del logp
    param_grads(policy)
    widths: list[tuple[int, int]] = []

    def share(rows, logp, ent):
        widths.append((len(rows), int(exp.mask[rows].ne(0).sum(-1).max())))
        return policy_loss(logp, exp.rows(rows), spec, normalizer)

    with torch.autograd.graph.saved_tensors_hooks(split.pack, split.unpack):
        for loss, _ in rollout.loss_by_bucket(policy, exp.tensors(), 1.0, share):
            loss.backward()
    param_grads(policy)
    assert whole.live == 0 and split.live == 0  # every saved activation was released
    assert len(widths) >= rollout.BUCKET_SPLIT
    cap = -(-int(exp.mask.ne(0).sum(-1).sum()) // rollout.BUCKET_SPLIT)
    assert all(r == 1 or r * w <= cap for r, w in widths), widths
    assert split.peak < 0.6 * whole.peak, (split.peak, whole.peak)


def test_length_buckets_respect_max_positions():
    """With a cap, the dynamic program still finds the cheapest cut among those whose buckets of
    more than one row hold at most `max_positions` padded positions (brute force)."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(30):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        lengths = torch.randint(0, 50, (n,), generator=gen)
        cost, cap = int(torch.randint(0, 40, (1,), generator=gen)), int(torch.randint(1, 150, (1,), generator=gen))
        buckets = rollout._length_buckets(lengths, cost=cost, max_positions=cap)
        assert sorted(torch.cat(buckets).tolist()) == (lengths > 0).nonzero().squeeze(1).tolist()
        assert all(len(b) == 1 or len(b) * int(lengths[b].max()) <= cap for b in buckets)
        if (lengths > 0).any():
            got, best = _cut_cost(lengths, buckets, cost), _cheapest_cut(lengths, cost, cap)
            assert got == best, (trial, lengths.tolist(), cost, cap)


def test_old_and_reference_forwards_are_not_split_but_the_loss_forward_is(policy):
    """Without a graph nothing is held for a backward: old/reference log-probs keep the cheapest
    cut (here one bucket: every row equally long), while the loss forward splits it in
    BUCKET_SPLIT pieces; the log-probs are the same either way."""
    from rlft.rl.learner import Experience

    p_ids, p_mask, c_ids, c_mask = batch(policy.config.vocab_size, seed=19, n_prompts=3)
    c_mask = torch.ones_like(c_mask)
    forwards: list[tuple[int, int]] = []
    hook = policy.get_base_model().model.embed_tokens.register_forward_hook(
        lambda m, args, out: forwards.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            old = rollout.completion_logprobs(policy, (p_ids, p_mask, c_ids, c_mask), 1.0)
        n_old = len(forwards)
        exp = Experience(prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=c_ids, mask=c_mask,
                         advantages=torch.zeros(len(c_ids)), old_logp=None, ref_logp=None)
        pieces = []
        for logp in rollout.loss_by_bucket(policy, exp.tensors(), 1.0, lambda rows, lp, ent: (rows, lp)):
            pieces.append(logp)
        n_loss = len(forwards) - n_old
    finally:
        hook.remove()
    assert n_old == 2  # the distinct prompts, then one bucket of every row
    assert n_loss == 1 + rollout.BUCKET_SPLIT and len(pieces) == rollout.BUCKET_SPLIT
    got = torch.zeros_like(old)
    for rows, lp in pieces:
        got[rows] = lp.detach()
    assert_close(got, old, rtol=0, atol=1e-5)


# ---- PPO's critic: values from the same shared-prompt, bucketed forward ---------------------------------

def plain_evaluation(value, policy, tensors, temperature: float):
    """The reference: one plain forward at the full padded width of the policy (and of a separate
    critic's whole model), h_t read by a hook on the decoder at position P-1+t."""
    from rlft.core.losses import entropy
    from rlft.rl import critic

    p_ids, p_mask, c_ids, c_mask = tensors
    width = p_ids.shape[1]
    ids, mask = torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1).ne(0).long()
    kw = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
          "use_cache": False}
    seen: list[torch.Tensor] = []
    owner = policy if value.trunk is None else value.trunk
    handle = critic.decoder(owner).register_forward_hook(lambda m, a, out: seen.append(out.last_hidden_state))
    try:
        logits = policy(**kw).logits[:, width - 1 : -1].float()
        if value.trunk is not None:
            value.trunk(**kw)
    finally:
        handle.remove()
    assert len(seen) == 1
    keep, temp = c_mask.bool(), temperature if temperature > 0 else 1.0
    values = value.head(seen[0][:, width - 1 : -1].float()).squeeze(-1)
    return critic.Evaluation(torch.where(keep, token_logprobs(logits, c_ids, temp), 0.0),
                             torch.where(keep, entropy(logits.detach(), temp), 0.0), torch.where(keep, values, 0.0))


def _lora_model(source, mspec, seed: int):
    from rlft.models import attach_lora, dropout_free_mode, load_model
    from rlft.recipe.schema import LoraSpec

    torch.manual_seed(seed)
    model = dropout_free_mode(attach_lora(load_model(source, mspec, torch.device("cpu")), LoraSpec(r=4)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def critic_models(tmp_path_factory):
    """(policy, separate critic's LoRA trunk) per activation-checkpointing setting."""
    from rlft.models import prepare_base
    from rlft.recipe.schema import ModelSpec

    out = {}
    for checkpointed in (False, True):
        mspec = ModelSpec(name="tiny:nano", gradient_checkpointing=checkpointed)
        source = prepare_base(mspec, tmp_path_factory.mktemp(f"critic{int(checkpointed)}"))
        out[checkpointed] = (_lora_model(source, mspec, 0), _lora_model(source, mspec, 1))
    return out


def _value(policy, trunk, kind: str):
    from rlft.rl.critic import Critic

    head = torch.nn.Linear(policy.config.hidden_size, 1)
    with torch.no_grad():
        head.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(8))
        head.bias.fill_(0.1)
    return Critic(head, trunk if kind == "separate" else None)


@pytest.mark.parametrize("kind", ["shared", "separate"])
@pytest.mark.parametrize("group_size", [G, 1])
@pytest.mark.parametrize("bucket_cost,checkpointed", [(64, False), (2, False), (64, True)])
def test_critic_values_logp_entropy_and_gradients_equal_the_plain_forward(critic_models, monkeypatch, kind,
                                                                          group_size, bucket_cost, checkpointed):
    from rlft.rl.critic import Critic, decoder

    monkeypatch.setattr(rollout, "BUCKET_COST", bucket_cost)
    policy, trunk = critic_models[checkpointed]
    assert rollout._checkpointed(policy) == checkpointed
    value = _value(policy, trunk, kind)
    tensors = batch(policy.config.vocab_size, seed=9, n_prompts=3 if group_size > 1 else 10)
    if group_size == 1:  # every row its own prompt: nothing shared, buckets only
        tensors = tuple(t[::G] for t in tensors)
        tensors[3][1] = 0  # a row with no counted token
    keep = tensors[3].bool()
    gen = torch.Generator().manual_seed(10)
    w_logp, w_value = torch.randn(keep.shape, generator=gen), torch.randn(keep.shape, generator=gen)
    assert rollout._checkpointed(decoder(trunk)) == checkpointed
    named = {f"policy.{n}": p for n, p in policy.named_parameters() if p.requires_grad}
    named |= {f"critic.{n}": p for n, p in value.named_params().items()}

    def run(evaluate):
        ev = evaluate(value, policy, tensors, 0.7)
        loss = (ev.logp * w_logp).sum() + (ev.values * w_value).sum()
        return ev, dict(zip(named, torch.autograd.grad(loss, list(named.values())), strict=True))

    got, g_got = run(Critic.evaluate)
    want, g_want = run(plain_evaluation)
    for name in ("logp", "entropy", "values"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape == keep.shape
        assert_close(a, b, rtol=0, atol=1e-5, msg=name)
        assert (a[~keep] == 0).all() and a[keep].abs().min() > 0, name
    for name, g in g_want.items():
        assert_close(g_got[name], g, rtol=1e-4, atol=1e-5, msg=name)
    assert g_want["critic.head.weight"].abs().max() > 1e-3
    adapters = ["policy"] + (["critic.trunk"] if kind == "separate" else [])
    for prefix in adapters:  # the gradients compared are not ~0
        assert max(float(g.abs().max()) for n, g in g_want.items() if n.startswith(prefix) and "lora_B" in n) > 1e-4


@pytest.mark.parametrize("kind", ["shared", "separate"])
@pytest.mark.parametrize("group_size", [2, 1])
def test_ppo_update_equals_the_plain_critic_forward_update(tmp_path: Path, monkeypatch, kind, group_size):
    """ppo_epochs x mini_batches optimizer steps (policy and critic) give the same per-step losses
    and weights with the critic's bucketed forward as with one plain forward."""
    from rlft.models import load_tokenizer, prepare_base, reference_mode
    from rlft.recipe.schema import LoraSpec, ModelSpec, PPOSpec
    from rlft.rl import critic
    from rlft.stages import ppo

    mspec = ModelSpec(name="tiny:nano")
    source = prepare_base(mspec, tmp_path)
    tok = load_tokenizer(source, mspec)
    spec = PPOSpec.model_validate({"kind": "ppo", "data": "tiny:arith", "rewards": ["math_answer"],
                                   "prompts_per_step": 4, "group_size": group_size, "micro_batch_size": 3,
                                   "ppo_epochs": 2, "mini_batches": 2, "critic": kind, "lr": 1e-3})
    prompts = [tok.encode(p) for p in ["1+2=", "what is 17*3?", "9-4", "7*7 is"]]
    sampling = rollout.SamplingParams(max_new_tokens=10, stop=tuple("aeiou0123456789"))
    real = critic.Critic.evaluate
    monkeypatch.setattr(rollout, "BUCKET_COST", 2)  # several length buckets

    def train(fast: bool):
        policy = _lora_model(source, mspec, 0)
        value = critic.build_critic(kind, policy, source, mspec, LoraSpec(r=4), 0)
        with torch.no_grad():
            value.head.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        monkeypatch.setattr(critic.Critic, "evaluate", real if fast else plain_evaluation)
        out = rollout.generate(policy, tok, prompts, sampling, group_size, rollout.seed_generator(4))
        R = torch.linspace(-1.0, 1.0, len(out.texts))
        batch = ppo.build_batch(policy, value, lambda: reference_mode(policy), out, R, spec, 1.0, 0.1)
        stats = ppo.update(policy, value, batch, spec, ppo.make_optimization(policy, value, spec), 0, 1.0, 0.1)
        weights = {n: p.detach().clone() for n, p in value.named_params().items()}
        weights |= {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        return stats, weights, out

    stats_fast, w_fast, out = train(True)
    stats_plain, w_plain, _ = train(False)
    lengths = out.completion_mask.sum(-1)
    assert len(set(lengths.tolist())) > 2  # ragged completions
    assert len(stats_fast) == len(stats_plain) == 4
    for key in ("loss/policy", "loss/value"):
        got = torch.tensor([s[key] for s in stats_fast])
        assert_close(got, torch.tensor([s[key] for s in stats_plain]), rtol=0, atol=1e-5, msg=key)
    assert stats_fast[0]["loss/value"] > 1e-4
    for name in w_plain:
        assert_close(w_fast[name], w_plain[name], rtol=0, atol=1e-5, msg=name)
