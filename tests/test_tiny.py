"""The built-in tiny model and tokenizer load like any Hugging Face model and round-trip text exactly."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlft import tiny
from rlft.errors import UserInputError

TEXTS = [
    string.printable,
    "What is 47+85?\n<think>7+5=12,4+8+1=13</think><answer>132</answer>",
    "  leading and trailing spaces  \n\n\ttabs\r\nCRLF  ",
    "<think>\n</think>\n<answer> 3 </answer>\n",
    "unicode: é ü 日本 ∑",
    "",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny") / "nano", preset="nano", seed=0)


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact(tok, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_ascii_is_one_token_per_character(tok) -> None:
    text = "<think>a b\nc</think>"
    assert len(tok.encode(text, add_special_tokens=False)) == len(text)
    assert tok.encode("", add_special_tokens=False) == []


def test_special_tokens(tok) -> None:
    assert tok.eos_token == tiny.IM_END and tok.pad_token == tiny.PAD and tok.bos_token is None
    assert tok.eos_token_id != tok.pad_token_id
    ids = tok.encode("a<|im_start|>b<|im_end|>c", add_special_tokens=False)
    assert len(ids) == 5
    assert tok.decode(ids) == "a<|im_start|>b<|im_end|>c"
    assert tok.decode(ids, skip_special_tokens=True) == "abc"
    # No bos/eos is added implicitly: the chat template decides the markers.
    assert tok("ab")["input_ids"] == tok.encode("ab", add_special_tokens=False)


def test_chat_template_and_assistant_mask(tok) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": "<think>1+2=3</think><answer>3</answer>"},
    ]
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+2?<|im_end|>\n<|im_start|>assistant\n"
    enc = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    trained = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tok.decode(trained) == msgs[2]["content"] + tiny.IM_END


def _assert_same_tokenizer(a, b) -> None:
    for text in TEXTS:
        ids = a.encode(text, add_special_tokens=False)
        assert b.encode(text, add_special_tokens=False) == ids
        assert b.decode(ids) == text
    msgs = [{"role": "user", "content": "hi\nthere"}, {"role": "assistant", "content": "<answer>x</answer>"}]
    assert a.apply_chat_template(msgs, tokenize=False) == b.apply_chat_template(msgs, tokenize=False)
    assert (a.eos_token_id, a.pad_token_id, a.bos_token_id) == (b.eos_token_id, b.pad_token_id, b.bos_token_id)
    assert len(a) == len(b)


def test_tokenizer_save_reload_with_auto_tokenizer(tok, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    _assert_same_tokenizer(tok, AutoTokenizer.from_pretrained(tmp_path))


@pytest.mark.parametrize("preset", ["nano", "llama-nano"])
def test_model_dir_loads_with_auto_classes(tok, tmp_path: Path, preset: str) -> None:
    out = tiny.build_tiny_model(tmp_path / preset, preset=preset)
    # A qwen2 directory loads as Qwen2Tokenizer, which rebuilds the pipeline: it must still agree.
    loaded = AutoTokenizer.from_pretrained(out)
    _assert_same_tokenizer(tok, loaded)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == tiny.PRESETS[preset].arch
    assert model.config.vocab_size == len(tok)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    ids = loaded.apply_chat_template([{"role": "user", "content": "1+1"}], add_generation_prompt=True,
                                     return_dict=True, return_tensors="pt")
    out_ids = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out_ids.shape == (1, ids["input_ids"].shape[1] + 4)


def test_same_seed_same_weights_bitwise(tmp_path: Path) -> None:
    a = load_file(tiny.build_tiny_model(tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(tiny.build_tiny_model(tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(tiny.build_tiny_model(tmp_path / "c", seed=4) / "model.safetensors")
    assert a.keys() == b.keys() and len(a) > 5
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].std() > 0)


def test_build_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    tiny.build_tiny_model(tmp_path / "m", seed=9)
    assert torch.equal(torch.get_rng_state(), state)


def test_reuse_rebuild_and_refuse(tmp_path: Path) -> None:
    out = tmp_path / "m"
    tiny.build_tiny_model(out)
    weights = out / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert tiny.build_tiny_model(out) == out
    assert weights.stat().st_mtime_ns == mtime  # same config hash: reused
    tiny.build_tiny_model(out, overrides={"hidden_size": 32})
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 32  # other config: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or old dirs left

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="not a tiny model built by rlft"):
        tiny.build_tiny_model(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(tmp: Path, *args: object) -> None:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(tiny, "_write_model", crash)
    with pytest.raises(RuntimeError):
        tiny.build_tiny_model(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_presets_and_overrides() -> None:
    assert {"nano", "small", "student", "llama-nano"} <= set(tiny.PRESETS)
    size = {name: cfg.hidden_size * cfg.num_layers for name, cfg in tiny.PRESETS.items()}
    assert size["student"] < size["nano"] < size["small"]
    assert tiny.PRESETS["llama-nano"].arch == "llama"
    assert tiny.resolve_config("nano", {"num_layers": 1}).num_layers == 1
    with pytest.raises(UserInputError, match="did you mean 'nano'"):
        tiny.resolve_config("nan0")
    with pytest.raises(UserInputError, match="did you mean 'hidden_size'"):
        tiny.resolve_config("nano", {"hiden_size": 8})
    with pytest.raises(UserInputError, match="not divisible by num_heads"):
        tiny.resolve_config("nano", {"hidden_size": 66})
    assert tiny.config_hash(tiny.PRESETS["nano"], 0) != tiny.config_hash(tiny.PRESETS["nano"], 1)
