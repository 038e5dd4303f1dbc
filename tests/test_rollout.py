"""rlft.rollout: the KV-cached sampler and the training-time log-prob forward."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlft.errors import UserInputError
from rlft.rollout import (
    Rollouts,
    SamplingParams,
    _sample,
    cache_keyword,
    completion_logprobs,
    generate,
    seed_generator,
)
from rlft.tiny import build_tokenizer
from rlft.tiny_bpe import build_bpe_tokenizer

PROMPTS = ["hello world", "1+1=", "a", "The quick brown fox"]  # different lengths: left padding


@pytest.fixture(scope="module", params=["byte", "bpe"])
def tokenizer(request):
    """Every test on both the byte-level tokenizer and a BPE one (multi-character tokens, byte
    fallback, eos != pad), so stop strings and decodes also meet tokens that split them."""
    return build_tokenizer() if request.param == "byte" else build_bpe_tokenizer()


def _model(tokenizer, seed: int = 0, arch: str = "qwen2", **overrides) -> Qwen2ForCausalLM | LlamaForCausalLM:
    torch.manual_seed(seed)
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, initializer_range=0.3,  # peaked: no argmax near-ties
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **overrides,
    )
    return model_cls(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _model(tokenizer)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.encode(p) for p in PROMPTS]


def _run(model, tokenizer, prompts, group_size=3, seed=0, micro_batch_size=None, **sampling) -> Rollouts:
    params = SamplingParams(**{"max_new_tokens": 16, **sampling})
    return generate(model, tokenizer, prompts, params, group_size, seed_generator(seed, 7), micro_batch_size)


def _lengths(r: Rollouts) -> list[int]:
    return r.completion_mask.sum(-1).tolist()


def _same(a: Rollouts, b: Rollouts) -> bool:
    tensors = ["prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "sample_logp", "truncated"]
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in tensors) and a.texts == b.texts


def _full_logits(model, r: Rollouts) -> torch.Tensor:
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    return logits[:, r.prompt_ids.shape[1] - 1 : -1]  # (N, T, V)


# The KV-cached decode and the full forward compute the same logits with different reduction
# orders (one query row against the cache vs the whole sequence at once; other matmul shapes), so
# each logit carries a rounding error of a few float32 ulps of the logits' magnitude, and so does
# logp = z_tok / T - logsumexp(z / T). The error therefore scales with max_v |z_v / T| at that
# position, not with |logp| (a confident token's logp is near 0, its logits are not): measured
# over 216 rollouts (qwen2/llama, with/without LoRA, T in {1, 0.9, 0.7}) the worst was 22 ulps of
# that scale, up to 1.9e-5 absolute. A real bug (wrong position, temperature, mask) moves logp by
# 1e-2 or more.
LOGIT_ULPS = 64


def logp_tolerance(model, r: Rollouts, temperature: float) -> torch.Tensor:
    """(N, T) rounding tolerance of r's log-probs: LOGIT_ULPS float32 ulps of max_v |z_v / T|."""
    scale = (_full_logits(model, r) / (temperature if temperature > 0 else 1.0)).abs().amax(-1)
    return LOGIT_ULPS * torch.finfo(torch.float32).eps * scale


def assert_logp_close(actual: torch.Tensor, expected: torch.Tensor, model, r: Rollouts, temperature: float) -> None:
    """actual == expected on r's counted tokens to `logp_tolerance`; equal (0) elsewhere."""
    tol = logp_tolerance(model, r, temperature)
    counted = r.completion_mask.bool()
    diff = (actual - expected).abs()
    worst = int((diff - tol).masked_fill(~counted, -torch.inf).argmax())
    assert (diff <= tol)[counted].all(), (
        f"|logp difference| {diff.flatten()[worst]:.3g} > {tol.flatten()[worst]:.3g} at {divmod(worst, diff.shape[1])}")
    assert torch.equal(actual[~counted], expected[~counted])


def test_shapes_group_layout_and_padding(model, tokenizer, prompts):
    r = _run(model, tokenizer, prompts, group_size=3)
    n, width = 12, max(len(p) for p in prompts)
    assert r.prompt_ids.shape == r.prompt_mask.shape == (n, width)
    assert r.completion_ids.shape == r.completion_mask.shape == r.sample_logp.shape
    assert r.completion_ids.shape[0] == n and r.completion_ids.shape[1] <= 16
    assert r.group_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for i in range(n):
        p = prompts[i // 3]
        assert r.prompt_ids[i, width - len(p) :].tolist() == p  # left-padded
        assert r.prompt_mask[i].tolist() == [0] * (width - len(p)) + [1] * len(p)
        assert set(r.prompt_ids[i, : width - len(p)].tolist()) <= {tokenizer.pad_token_id}
    pad = r.completion_mask == 0
    assert (r.completion_ids[pad] == tokenizer.pad_token_id).all()
    assert (r.sample_logp[pad] == 0).all() and (r.sample_logp[~pad] < 0).all()
    assert len(r.texts) == n
    ends_eos = r.completion_ids.gather(1, (r.completion_mask.sum(-1, keepdim=True) - 1)) == tokenizer.eos_token_id
    assert torch.equal(r.truncated, ~ends_eos.squeeze(1) & (r.completion_mask.sum(-1) == 16))
    assert len(set(r.texts)) > 1  # the group members differ: each row has its own draws


def test_same_seed_same_rollouts_other_seed_differs(model, tokenizer, prompts):
    a = _run(model, tokenizer, prompts, top_p=0.9, temperature=0.8)
    torch.manual_seed(123)  # global RNG must not matter
    b = _run(model, tokenizer, prompts, top_p=0.9, temperature=0.8)
    c = _run(model, tokenizer, prompts, top_p=0.9, temperature=0.8, seed=1)
    assert _same(a, b)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_seed_generator_is_stateless_and_keyed():
    draw = lambda *k: torch.rand(4, generator=seed_generator(*k))  # noqa: E731
    assert torch.equal(draw(3, 10, 0), draw(3, 10, 0))
    assert not torch.equal(draw(3, 10, 0), draw(3, 10, 1))
    assert not torch.equal(draw(3, 10), draw(3, 11))
    assert not torch.equal(draw(3, 1, 0), draw(3, 0, 1))


def test_eos_ends_the_mask_right_after_it(model, tokenizer, prompts):
    """Declare a token seen mid-completion an EOS (via generation_config): every row ends right after
    its first occurrence, and the tokens before it are the ones the unconstrained run sampled."""
    free = _run(model, tokenizer, prompts)
    ids = free.completion_ids.tolist()
    # a token of row 0 that other rows sample too (with a large vocabulary most tokens occur once)
    eos = max(ids[0][1:8], key=lambda t: sum(t in row for row in ids))
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, eos]
    try:
        r = _run(model, tokenizer, prompts)
    finally:
        model.generation_config.eos_token_id = saved
    hit_rows = 0
    for i, row in enumerate(ids):
        end = row.index(eos) + 1 if eos in row else 16
        hit_rows += eos in row
        assert _lengths(r)[i] == end
        assert r.completion_ids[i, :end].tolist() == row[:end]
        assert bool(r.truncated[i]) == (eos not in row)
        assert (r.completion_ids[i, end:] == tokenizer.pad_token_id).all()
    assert hit_rows >= 2 and not r.truncated.all()


def test_stop_string_honoured_and_kept(model, tokenizer, prompts):
    """Stops taken from an unconstrained run: the same seed then samples the same prefix, which
    must end right after the earliest stop (a multi-token one and a frequent one-character one)."""
    free = _run(model, tokenizer, prompts, max_new_tokens=24)
    pairs = [t[j : j + 2] for t in free.texts for j in range(len(t) - 1)]
    pair = next(s for s in pairs if s.isascii() and s.isprintable())
    chars = sorted({c for t in free.texts for c in t if c.isascii() and c.isprintable()},
                   key=lambda c: -sum(c in t for t in free.texts))
    stops = ("zzzz", pair, next(c for c in chars if sum(c in t for t in free.texts) < len(free.texts)))
    r = _run(model, tokenizer, prompts, max_new_tokens=24, stop=stops)
    cut_rows = 0
    for i, text in enumerate(free.texts):
        ends = [text.index(s) + len(s) for s in stops if s in text]
        if ends:
            cut_rows += 1
            assert r.texts[i] == text[: min(ends)] and not r.truncated[i]
            # the ids end with the token that completes the stop; text after the stop in that token
            # (a multi-character token) is cut from `texts` only
            ids = r.completion_ids[i, : _lengths(r)[i]]
            assert tokenizer.decode(ids, skip_special_tokens=True).startswith(text[: min(ends)])
            assert not any(s in tokenizer.decode(ids[:-1], skip_special_tokens=True) for s in stops)
        else:
            assert r.texts[i] == text and bool(r.truncated[i]) == bool(free.truncated[i])
    assert 3 <= cut_rows < len(free.texts)


def test_stop_ending_inside_a_token_cuts_the_text_and_keeps_the_token():
    """A stop string that ends inside a multi-character token (BPE): the completion ends with that
    whole token (its ids and log-prob are what was sampled, so training sees exactly the sampled
    sequence), while `texts`, which rewards score, end at the stop. The reward misses at most the
    rest of one token; the policy is trained on the tokens it actually produced."""
    tokenizer = build_bpe_tokenizer()
    model, prompts = _model(tokenizer), [tokenizer.encode(p) for p in PROMPTS]
    free = _run(model, tokenizer, prompts, max_new_tokens=24)
    found = None
    for i, row in enumerate(free.completion_ids.tolist()):
        for k in range(1, _lengths(free)[i]):
            upto = tokenizer.decode(row[: k + 1], skip_special_tokens=True)
            piece = tokenizer.decode(row[k : k + 1], skip_special_tokens=True)
            stop = upto[len(upto) - len(piece) : len(upto) - 1]  # the token's text but its last character
            if len(piece) >= 3 and piece.isascii() and upto.find(stop) + len(stop) == len(upto) - 1:
                found = i, k, stop, upto
                break
        if found:
            break
    assert found, free.texts
    i, k, stop, upto = found
    r = _run(model, tokenizer, prompts, max_new_tokens=24, stop=(stop,))
    assert r.texts[i] == upto[:-1] and not r.truncated[i]
    assert _lengths(r)[i] == k + 1
    assert torch.equal(r.completion_ids[i, : k + 1], free.completion_ids[i, : k + 1])
    assert torch.equal(r.sample_logp[i, : k + 1], free.sample_logp[i, : k + 1])
    assert tokenizer.decode(r.completion_ids[i, : k + 1], skip_special_tokens=True) == upto  # the whole token


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_equals_hf_generate(tokenizer, prompts, arch):
    model = _model(tokenizer, arch=arch)
    r = _run(model, tokenizer, prompts, group_size=1, temperature=0.0)
    batch = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
    out = model.generate(**batch, do_sample=False, max_new_tokens=16, pad_token_id=tokenizer.pad_token_id)
    hf = out[:, batch["input_ids"].shape[1] :]
    for i, n in enumerate(_lengths(r)):
        assert r.completion_ids[i, :n].tolist() == hf[i, :n].tolist()
    assert len(set(map(tuple, hf.tolist()))) > 1
    with torch.no_grad():
        assert_logp_close(completion_logprobs(model, r, 0.0), r.sample_logp, model, r, 0.0)


def test_top_k1_and_tiny_top_p_equal_greedy(model, tokenizer, prompts):
    greedy = _run(model, tokenizer, prompts, temperature=0.0)
    for params in ({"top_k": 1}, {"top_p": 1e-6}):
        r = _run(model, tokenizer, prompts, temperature=1.0, **params)
        assert torch.equal(r.completion_ids, greedy.completion_ids), params
        # sample_logp is under the untruncated distribution: temperature 1 == greedy's
        torch.testing.assert_close(r.sample_logp, greedy.sample_logp, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("top_k", "top_p"), [(3, 1.0), (0, 0.5)])
def test_sampled_tokens_stay_inside_top_k_and_nucleus(model, tokenizer, prompts, top_k, top_p):
    r = _run(model, tokenizer, prompts, group_size=4, top_k=top_k, top_p=top_p, temperature=1.3)
    probs = torch.softmax(_full_logits(model, r) / 1.3, -1)
    chosen = probs.gather(-1, r.completion_ids[..., None]).squeeze(-1)
    rank = (probs > chosen[..., None]).sum(-1)  # tokens strictly more likely than the chosen one
    mass_before = (probs * (probs > chosen[..., None])).sum(-1)
    counted = r.completion_mask.bool()
    if top_k:
        assert (rank[counted] < top_k).all() and (rank[counted] > 0).any()
    else:
        assert (mass_before[counted] < top_p + 1e-5).all() and (rank[counted] > 0).any()


def test_sampler_frequencies_match_probabilities():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, -float("inf")])
    n = 40_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    tok, logp = _sample(logits.expand(n, -1), u, SamplingParams(temperature=1.0))
    freq = torch.bincount(tok, minlength=5).double() / n
    torch.testing.assert_close(freq, torch.softmax(logits.double(), 0), rtol=0, atol=0.01)
    torch.testing.assert_close(logp, torch.log_softmax(logits, 0)[tok])
    # the largest uniform torch.rand can return never lands on the zero-probability last entry
    top = torch.full((1,), 1 - 2**-24)
    assert int(_sample(torch.tensor([[0.0, 0.0, -float("inf")]]), top, SamplingParams())[0]) == 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logprobs_match_sample_logp(model, tokenizer, prompts, temperature):
    r = _run(model, tokenizer, prompts, group_size=2, temperature=temperature, top_k=20)
    with torch.no_grad():
        logp = completion_logprobs(model, r, temperature)
        tensors = (r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
        logp_mb = completion_logprobs(model, tensors, temperature, micro_batch_size=3)
    assert_logp_close(logp, r.sample_logp, model, r, temperature)
    assert_logp_close(logp_mb, r.sample_logp, model, r, temperature)
    assert (logp[r.completion_mask == 0] == 0).all()


def test_completion_logprobs_builds_a_graph(model, tokenizer, prompts):
    r = _run(model, tokenizer, prompts, group_size=2)
    model.zero_grad()
    logp = completion_logprobs(model, r, 1.0)
    assert logp.requires_grad
    (logp.sum() / r.completion_mask.sum()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad()


def test_left_padding_does_not_change_greedy_output(model, tokenizer, prompts):
    batch = _run(model, tokenizer, prompts, group_size=1, temperature=0.0)
    tol = logp_tolerance(model, batch, 0.0)
    for i, p in enumerate(prompts):
        alone = _run(model, tokenizer, [p], group_size=1, temperature=0.0)
        n = _lengths(alone)[0]
        assert _lengths(batch)[i] == n
        assert batch.completion_ids[i, :n].tolist() == alone.completion_ids[0, :n].tolist()
        assert ((batch.sample_logp[i, :n] - alone.sample_logp[0, :n]).abs() <= tol[i, :n]).all()


def test_micro_batch_size_changes_only_rounding(model, tokenizer, prompts):
    full = _run(model, tokenizer, prompts, group_size=3)
    for mb in (1, 5):
        r = _run(model, tokenizer, prompts, group_size=3, micro_batch_size=mb)
        assert torch.equal(r.completion_ids, full.completion_ids) and r.texts == full.texts
        assert_logp_close(r.sample_logp, full.sample_logp, model, full, 1.0)


def test_generation_runs_in_eval_and_restores_modes(tokenizer, prompts):
    """With dropout 0.5 a forward in train mode is random; generation must not be."""
    model = _model(tokenizer, attention_dropout=0.5)
    reference = _run(model.eval(), tokenizer, prompts)
    model.train()
    model.model.layers[0].eval()  # mixed modes must come back exactly
    r = _run(model, tokenizer, prompts)
    assert _same(r, reference)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training


def test_peft_model(model, tokenizer, prompts):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = get_peft_model(_model(tokenizer), lora)
    r = _run(policy, tokenizer, prompts, group_size=2, temperature=0.9)
    base = _run(model, tokenizer, prompts, group_size=2, temperature=0.9)
    assert not torch.equal(r.completion_ids, base.completion_ids)  # the adapter is active
    with torch.no_grad():
        assert_logp_close(completion_logprobs(policy, r, 0.9), r.sample_logp, policy, r, 0.9)
        with policy.disable_adapter():
            assert_logp_close(completion_logprobs(policy, base, 0.9), base.sample_logp, policy, base, 0.9)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_decode_loop_passes_the_cache_under_its_current_name(tokenizer, prompts, arch):
    """The KV cache goes in as the forward's own parameter (`cache` on transformers 5.x), never as the
    deprecated `past_key_values=`, so no FutureWarning (raised here as an error) reaches the user."""
    model = _model(tokenizer, arch=arch)
    calls: list[set[str]] = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(set(kwargs)), with_kwargs=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            r = _run(model, tokenizer, prompts, group_size=2)
    finally:
        hook.remove()
    declared = inspect.signature(model.forward).parameters
    assert cache_keyword(model) in declared
    if "cache" in declared:  # transformers 5.x
        assert cache_keyword(model) == "cache" and not any("past_key_values" in c for c in calls)
    decode_steps = [c for c in calls if cache_keyword(model) in c]
    assert len(calls) == 1 + len(decode_steps) and len(decode_steps) == r.completion_ids.shape[1] - 1


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("max_new_tokens", 0), ("stop", ("",))],
)
def test_sampling_params_reject_bad_values(field, value):
    with pytest.raises(UserInputError, match=f"sampling.{field}"):
        SamplingParams(**{field: value})


def test_generate_rejects_bad_arguments(model, tokenizer, prompts):
    with pytest.raises(ValueError, match="empty"):
        _run(model, tokenizer, [prompts[0], []])
    with pytest.raises(ValueError, match="group_size"):
        _run(model, tokenizer, prompts, group_size=0)


@pytest.mark.gpu
def test_cuda_matches_cpu(tokenizer, prompts):
    """Uniforms are drawn on the CPU generator, so CUDA samples what the CPU samples (up to rounding)."""
    cpu, gpu = _model(tokenizer), _model(tokenizer).cuda()
    for sampling in ({"temperature": 0.0}, {"temperature": 0.8, "top_p": 0.9, "stop": ("a",)}):
        a, b = _run(cpu, tokenizer, prompts, **sampling), _run(gpu, tokenizer, prompts, **sampling)
        assert b.completion_ids.is_cuda and torch.equal(a.completion_ids, b.completion_ids.cpu())
        assert a.texts == b.texts
        with torch.no_grad():
            logp = completion_logprobs(gpu, b, sampling["temperature"])
            torch.testing.assert_close(logp, b.sample_logp, rtol=0, atol=1e-4)
