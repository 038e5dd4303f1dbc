"""Tokenisation masks, packing, collation and resumable loaders on the tiny tokenizer and model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlft import tiny
from rlft.data import encode
from rlft.data.batch import PromptLoader, SFTExample, SFTLoader, collate, model_inputs, pack, token_count
from rlft.data.rows import load_rows
from rlft.errors import CheckpointError, DataError, UserInputError

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "<think>2+3=5</think><answer>5</answer>"},
    {"role": "user", "content": "And\n4+4?"},
    {"role": "assistant", "content": "<think>4+4=8</think>\n<answer>8</answer>"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def tok_no_markers():
    """The same tokenizer with a template lacking {% generation %}: masks come from prefix diffs."""
    t = tiny.build_tokenizer()
    t.chat_template = tiny.CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    return t


def masked_text(tok, ex: SFTExample) -> str:
    return tok.decode([i for i, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m])


def masked_spans(ex: SFTExample) -> list[list[int]]:
    spans, cur = [], []
    for i, m in zip(ex.input_ids, ex.loss_mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            spans, cur = [*spans, cur], []
    return spans + ([cur] if cur else [])


@pytest.mark.parametrize("fixture", ["tok", "tok_no_markers"])
def test_messages_mask_is_assistant_content_plus_end_marker(request: pytest.FixtureRequest, fixture: str) -> None:
    tok = request.getfixturevalue(fixture)
    (ex,) = encode.tokenize_sft([{"messages": CHAT}], tok, 512, "error", "mem")
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(CHAT, tokenize=False)
    spans = [tok.decode(s) for s in masked_spans(ex)]
    assert spans == [CHAT[2]["content"] + tiny.IM_END, CHAT[4]["content"] + tiny.IM_END]


def test_both_mask_methods_agree(tok, tok_no_markers) -> None:
    rows = [{"messages": CHAT}, {"messages": CHAT[1:3]}, {"prompt": "p", "completion": "c"}]
    a = encode.tokenize_sft(rows, tok, 512, "error", "mem")
    b = encode.tokenize_sft(rows, tok_no_markers, 512, "error", "mem")
    assert a == b


def test_prompt_completion_matches_rollout_layout(tok) -> None:
    row = {"prompt": "What is 2+3?", "completion": "<answer>5</answer>", "answer": "5", "_row": 1}
    (ex,) = encode.tokenize_sft([row], tok, 512, "error", "mem")
    (prompt,) = encode.prompt_examples([row], tok)
    # SFT trains on exactly the tokens a rollout would generate after the RL prompt ids.
    assert ex.input_ids[: len(prompt.prompt_ids)] == prompt.prompt_ids
    assert ex.loss_mask == [0] * len(prompt.prompt_ids) + [1] * (len(ex.input_ids) - len(prompt.prompt_ids))
    assert masked_text(tok, ex) == "<answer>5</answer>" + tiny.IM_END
    assert prompt.prompt_text == "What is 2+3?" and prompt.columns == {"answer": "5"}
    assert tok.decode(prompt.prompt_ids).endswith("<|im_start|>assistant\n")


def test_text_rows_train_every_token_but_the_first(tok) -> None:
    (ex,) = encode.tokenize_sft([{"text": "abc\nd"}], tok, 512, "error", "mem")
    assert tok.decode(ex.input_ids) == "abc\nd" + tiny.IM_END
    assert ex.loss_mask == [0, 1, 1, 1, 1, 1]


def test_system_prompt(tok) -> None:
    """A data set's system prompt travels with its rows (`_system`) into SFT and prompt ids."""
    (ex,) = encode.tokenize_sft([{"prompt": "hi", "completion": "yo", "_system": "S"}], tok, 512, "error", "mem")
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi")
    (p,) = encode.prompt_examples([{"messages": CHAT, "_system": "ignored: the row has one"}], tok)
    assert tok.decode(p.prompt_ids) == tok.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)
    assert p.prompt_text == "And\n4+4?"


def test_long_rows(tok) -> None:
    rows = [{"prompt": "a", "completion": "b", "_source": "f.jsonl", "_row": 1},
            {"prompt": "a", "completion": "x" * 100, "_source": "f.jsonl", "_row": 7}]
    with pytest.raises(DataError, match=r"f\.jsonl:row 7: is \d+ tokens, longer than max_length 40"):
        encode.tokenize_sft(rows, tok, 40, "error", "f.jsonl")
    assert len(encode.tokenize_sft(rows, tok, 40, "drop", "f.jsonl")) == 1
    cut = encode.tokenize_sft(rows, tok, 40, "truncate", "f.jsonl")
    assert [len(e.input_ids) for e in cut][1] == 40 and all(len(e.loss_mask) == len(e.input_ids) for e in cut)
    with pytest.raises(DataError, match=r"f\.jsonl: all 2 rows were dropped"):
        encode.tokenize_sft(rows, tok, 10, "drop", "f.jsonl")


def test_long_prompts_are_left_out_and_counted(tok, caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"prompt": "a", "answer": "1", "_source": "p.jsonl", "_row": 1},
            {"prompt": "q" * 100, "answer": "2", "_source": "p.jsonl", "_row": 2}]
    with caplog.at_level("WARNING"):
        kept = encode.prompt_examples(rows, tok, 40, "drop")
    assert [p.row["_row"] for p in kept] == [1]
    assert "p.jsonl: left out 1 of 2 prompts longer than max_length 40" in caplog.text
    with pytest.raises(DataError, match=r"p\.jsonl: all 2 prompts are longer than max_length 5"):
        encode.prompt_examples(rows, tok, 5, "drop")
    assert encode.prompt_examples(rows, tok, 5, "drop", required=False) == []


def test_rows_with_nothing_to_train_on(tok) -> None:
    user_only = {"messages": [{"role": "user", "content": "hi"}], "_source": "c.jsonl", "_row": 3}
    with pytest.raises(DataError, match=r"c\.jsonl:row 3  column 'messages': has no assistant message"):
        encode.tokenize_sft([user_only], tok, 512, "error", "c.jsonl")
    with pytest.raises(DataError, match="has only a prompt"):
        encode.tokenize_sft([{"prompt": "p", "answer": "1"}], tok, 512, "error", "p.jsonl")
    with pytest.raises(DataError, match="text row"):
        encode.prompt_examples([{"text": "t"}], tok)


def test_template_errors_name_the_row() -> None:
    strict = tiny.build_tokenizer()
    strict.chat_template = "{{ raise_exception('roles must alternate') }}"
    row = {"messages": CHAT[1:3], "_source": "s.jsonl", "_row": 4}
    with pytest.raises(DataError, match=r"s\.jsonl:row 4: the tokenizer's chat template rejected this row: roles"):
        encode.tokenize_sft([row], strict, 512, "error", "s.jsonl")
    with pytest.raises(DataError, match=r"s\.jsonl:row 4: .*roles must alternate"):
        encode.prompt_examples([row], strict)


def test_loads_end_to_end_from_tiny_task(tok, tmp_path: Path) -> None:
    from types import SimpleNamespace

    spec = SimpleNamespace(source="tiny:reverse", format="auto", split="train", eval_split=None, eval_size=0.1,
                           num_examples=40, columns={}, system_prompt=None)
    train, _ = load_rows(spec, tmp_path, 0)
    examples = encode.tokenize_sft(train, tok, 128, "error", spec.source)
    for row, ex in zip(train, examples, strict=True):
        assert masked_text(tok, ex) == row["solution"] + tiny.IM_END
    prompts = encode.prompt_examples(train, tok)
    assert prompts[0].columns["task"] == "reverse" and prompts[0].prompt_text == train[0]["prompt"]


def examples(n: int, seed: int = 0) -> list[SFTExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(3, 12, (1,), generator=g))
        out.append(SFTExample(input_ids=[i] * k, loss_mask=[0] + [1] * (k - 1)))
    return out


def test_pack_keeps_tokens_and_restarts_positions() -> None:
    exs = examples(20)
    packed = pack(exs, 30)
    assert all(len(p.input_ids) <= 30 for p in packed) and len(packed) < len(exs)
    assert sum((p.input_ids for p in packed), []) == sum((e.input_ids for e in exs), [])
    assert sum((p.loss_mask for p in packed), []) == sum((e.loss_mask for e in exs), [])
    assert sum((p.position_ids for p in packed), []) == sum((list(range(len(e.input_ids))) for e in exs), [])
    with pytest.raises(ValueError, match="does not fit"):
        pack(exs, 5)


def test_packed_forward_equals_separate_forwards(tok, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.build_tiny_model(tmp_path / "m")).eval()
    rows = [{"prompt": f"q{i}", "completion": "a" * (3 + 5 * i)} for i in range(4)]
    exs = encode.tokenize_sft(rows, tok, 512, "error", "mem")
    packed = pack(exs, 120)
    batch = collate(packed, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 2
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits  # (2, L, V)
        flat = [logits[b, : len(p.input_ids)] for b, p in enumerate(packed)]
        flat = torch.cat(flat)
        alone = torch.cat([model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in exs])
    assert torch.allclose(flat, alone, atol=1e-5)


def test_collate_right_pads() -> None:
    exs = [SFTExample([5, 6, 7], [0, 1, 1]), SFTExample([8], [0])]
    batch = collate(exs, pad_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [0, 0, 0]]
    assert "position_ids" not in batch and set(model_inputs(batch)) == {"input_ids", "attention_mask"}
    mixed = collate([*pack(exs, 10), SFTExample([1, 2], [0, 1])], pad_id=0)
    assert mixed["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 2, 3]]


def test_sft_loader_epochs_microbatches_and_token_count() -> None:
    exs = examples(10)
    loader = SFTLoader(exs, batch_size=4, micro_batch_size=2, seed=0, pad_id=0)
    assert loader.steps_per_epoch == len(loader) == 3
    seen = []
    for _ in range(3):
        step = next(loader)
        assert [mb["input_ids"].shape[0] for mb in step] in ([2, 2], [1, 1], [2])
        seen += [int(mb["input_ids"][r, 0]) for mb in step for r in range(mb["input_ids"].shape[0])]
        assert token_count(step) == sum(int(mb["loss_mask"].sum()) for mb in step)
    assert sorted(seen) == list(range(10))  # one epoch = every example once
    assert loader.state_dict()["epoch"] == 0
    next(loader)
    assert loader.state_dict()["epoch"] == 1
    assert len(SFTLoader(exs, 4, 2, seed=0, drop_last=True)) == 2
    orders = [[ids_of(next(loader)) for _ in range(3)] for _ in range(2)]
    assert orders[0] != orders[1]  # reshuffled every epoch
    with pytest.raises(UserInputError, match="multiple of micro_batch_size"):
        SFTLoader(exs, 4, 3, seed=0)


def ids_of(step: list[dict[str, torch.Tensor]]) -> list[list[int]]:
    return [mb["input_ids"].tolist() for mb in step]


@pytest.mark.parametrize("k", [0, 2, 3, 7])
def test_sft_loader_resume_is_exact(k: int) -> None:
    exs = examples(10)
    torch.manual_seed(0)
    reference = SFTLoader(exs, 4, 2, seed=5)
    expected = [ids_of(next(reference)) for _ in range(12)]
    first = SFTLoader(exs, 4, 2, seed=5)
    for _ in range(k):
        next(first)
    state = first.state_dict()
    torch.manual_seed(123)  # the global RNG must not matter
    resumed = SFTLoader(exs, 4, 2, seed=5)
    resumed.load_state_dict(state)
    assert [ids_of(next(resumed)) for _ in range(12 - k)] == expected[k:]
    assert [ids_of(next(SFTLoader(exs, 4, 2, seed=6))) for _ in range(1)] != expected[:1]


def test_loader_state_mismatch_is_refused() -> None:
    state = SFTLoader(examples(10), 4, 2, seed=5).state_dict()
    with pytest.raises(CheckpointError, match="num_examples 10 -> 11"):
        SFTLoader(examples(11), 4, 2, seed=5).load_state_dict(state)
    with pytest.raises(CheckpointError, match="seed 5 -> 6"):
        SFTLoader(examples(10), 4, 2, seed=6).load_state_dict(state)
    with pytest.raises(CheckpointError, match="incomplete"):
        SFTLoader(examples(10), 4, 2, seed=5).load_state_dict({"epoch": 0})


def test_prompt_loader_full_batches_and_resume() -> None:
    items = list(range(10))
    loader = PromptLoader(items, batch_size=4, seed=1)
    assert len(loader) == 2
    batches = [next(loader) for _ in range(5)]
    assert all(len(b) == 4 for b in batches)
    assert len(set(batches[0] + batches[1])) == 8
    again = PromptLoader(items, batch_size=4, seed=1)
    next(again), next(again), next(again)
    resumed = PromptLoader(items, batch_size=4, seed=1)
    resumed.load_state_dict(again.state_dict())
    assert [next(resumed), next(resumed)] == batches[3:]
    with pytest.raises(UserInputError, match="3 examples make no full batch of 4"):
        PromptLoader(items[:3], batch_size=4, seed=0)


def test_tiny_task_loss_falls_with_the_data_api(tok, tmp_path: Path) -> None:
    """SFT through tokenize_sft / SFTLoader / model_inputs / token_count learns a built-in task."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.build_tiny_model(tmp_path / "m"))
    spec = SimpleNamespace(source="tiny:reverse", format="auto", split="train", eval_split=None, eval_size=0,
                           num_examples=400, columns={}, system_prompt=None)
    exs = encode.tokenize_sft(load_rows(spec, tmp_path, 0)[0], tok, 128, "error", spec.source)
    loader = SFTLoader(exs, batch_size=16, micro_batch_size=8, seed=0, pad_id=tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        step = next(loader)
        n = token_count(step)  # token mean over the whole step, exact across micro-batches
        total = 0.0
        for mb in step:
            logits = model(**model_inputs(mb)).logits[:, :-1]  # (N, L-1, V)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), mb["input_ids"][:, 1:], reduction="none")
            loss = (nll * mb["loss_mask"][:, 1:]).sum() / n
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total)
    assert sum(losses[:5]) / 5 > 4.0 and sum(losses[-5:]) / 5 < 1.5, losses[::10]
