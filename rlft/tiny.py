"""The built-in tiny model and its byte-level character tokenizer, for `make demo` and the tests.

A tiny model is an ordinary Hugging Face directory (safetensors weights, config, tokenizer,
generation config), so every other module loads it with `from_pretrained` like any model.

The tokenizer has one token per byte and no merges: ASCII text is one token per character and
`decode(encode(s)) == s` for any NFC text, so string-matching rewards see what the model wrote.
It uses the byte-level pipeline of Qwen2's tokenizer (NFC, the Qwen split regex, GPT-2 byte
alphabet) because `AutoTokenizer` loads any qwen2 model directory as `Qwen2Tokenizer`, which
rebuilds exactly that pipeline around the saved vocabulary; a different pipeline (e.g.
WordLevel) would be silently replaced on reload.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlft.ckpt.fsio import commit_dir
from rlft.errors import UserInputError
from rlft.tiny_bpe import ENDOFTEXT as ENDOFTEXT  # the special tokens, shared with the BPE tokenizer
from rlft.tiny_bpe import IM_END as IM_END
from rlft.tiny_bpe import IM_START as IM_START
from rlft.tiny_bpe import PAD as PAD
from rlft.tiny_bpe import SPECIAL_TOKENS as SPECIAL_TOKENS
from rlft.tiny_bpe import fast_tokenizer

# Qwen2's pre-tokenizer split; with no merges it only decides piece boundaries, not tokens.
_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen-style turns. Assistant content plus its end marker sit inside {% generation %} so
# `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the tokens to train.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

MARKER_FILE = "rlft_tiny.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", MARKER_FILE)


@dataclass(frozen=True)
class TinyConfig:
    """Shape of a tiny causal LM."""

    arch: Literal["qwen2", "llama"]
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position: int = 512
    tie_word_embeddings: bool = True
    # Wider than transformers' 0.02: with tied embeddings and a frozen final norm, logits are
    # bounded by |h| * |e_v| ~ sqrt(d) * std * sqrt(d); at 0.02 and d=64 that caps them near 1.3,
    # so a LoRA adapter alone could never make the tiny model confident.
    initializer_range: float = 0.1
    # "byte": `build_tokenizer` (one token per character); "bpe": `rlft.tiny_bpe.build_bpe_tokenizer`
    # (multi-character tokens, byte fallback, a chat template without generation markers).
    tokenizer: Literal["byte", "bpe"] = "byte"


PRESETS: dict[str, TinyConfig] = {
    # ~91k parameters: the default for tests and `make demo`. Measured, one CPU minute of SFT from
    # the random init: full fine-tune ~100% held-out accuracy on every built-in task; LoRA r=8 on
    # all linear layers ~70% on arith; LoRA on q_proj/v_proj only ~0% (too little to adapt).
    "nano": TinyConfig("qwen2", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128),
    # ~477k parameters.
    "small": TinyConfig("qwen2", hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=256),
    # ~27k parameters: a distillation student smaller than nano.
    "student": TinyConfig("qwen2", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64),
    "llama-nano": TinyConfig(
        "llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128
    ),
}


def byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode map as a list: `byte_alphabet()[b]` is the printable stand-in for byte b.

    Printable Latin-1 bytes stand for themselves; the others (space, newline, control bytes)
    are shifted to code points from 256 up, so every byte has a visible one-character name.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]


def build_tokenizer() -> Any:
    """Byte-level character tokenizer with Qwen-style chat markers.

    Vocabulary: ids 0-3 are `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|pad|>`; id 4 + b is
    byte b. No merges, so no character is unknown: ASCII is one token per character, other
    characters one token per UTF-8 byte. eos is `<|im_end|>` (generation stops at the end of the
    assistant turn), pad is `<|pad|>`, there is no bos and no unk.

    Returns:
        A `transformers` fast tokenizer (`TokenizersBackend`) with the chat template set.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + b for b, ch in enumerate(byte_alphabet())})
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=[], unk_token=None, continuing_subword_prefix="",
                   end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return fast_tokenizer(backend, CHAT_TEMPLATE)


def tokenizer_of(kind: str = "byte") -> Any:
    """The tokenizer of a tiny model whose `TinyConfig.tokenizer` is `kind` ("byte" or "bpe")."""
    if kind == "bpe":
        from rlft.tiny_bpe import build_bpe_tokenizer

        return build_bpe_tokenizer()
    return build_tokenizer()


def resolve_config(preset: str = "nano", overrides: dict[str, Any] | None = None) -> TinyConfig:
    """The preset with `overrides` applied and checked.

    Raises:
        UserInputError: unknown preset or override key, or heads that do not divide the sizes.
    """
    if preset not in PRESETS:
        raise UserInputError(f"unknown tiny preset {preset!r}{_did_you_mean(preset, PRESETS)}; choose from {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TinyConfig)}
    for key in overrides or {}:
        if key not in fields:
            raise UserInputError(f"unknown tiny model override {key!r}{_did_you_mean(key, fields)}; valid: {sorted(fields)}")
    cfg = dataclasses.replace(PRESETS[preset], **(overrides or {}))
    if cfg.arch not in ("qwen2", "llama"):
        raise UserInputError(f"tiny model arch must be 'qwen2' or 'llama', got {cfg.arch!r}")
    if cfg.tokenizer not in ("byte", "bpe"):
        raise UserInputError(f"tiny model tokenizer must be 'byte' or 'bpe', got {cfg.tokenizer!r}")
    if cfg.hidden_size % cfg.num_heads:
        raise UserInputError(f"tiny model hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
    if cfg.num_heads % cfg.num_kv_heads:
        raise UserInputError(f"tiny model num_heads {cfg.num_heads} is not divisible by num_kv_heads {cfg.num_kv_heads}")
    return cfg


def config_hash(cfg: TinyConfig, seed: int) -> str:
    """sha256 over the model shape, init seed, tokenizer definition and chat template."""
    config = dataclasses.asdict(cfg)
    if cfg.tokenizer == "byte":  # the byte tokenizer's models keep the hash they had before the option
        del config["tokenizer"]
    else:
        from rlft import tiny_bpe

        config["tokenizer_def"] = [tiny_bpe.SPLIT_REGEX, tiny_bpe.CHAT_TEMPLATE, tiny_bpe.VOCAB_SIZE]
    ident = {"config": config, "seed": seed, "specials": list(SPECIAL_TOKENS),
             "split": _SPLIT_REGEX, "template": CHAT_TEMPLATE}
    blob = json.dumps(ident, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_tiny_model(out_dir: Path, preset: str = "nano", overrides: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """Build (or reuse) a tiny causal LM saved as a normal Hugging Face directory.

    The weights depend only on the config and `seed` (bitwise, same machine). The directory is
    written under a temporary name and renamed into place, so a kill never leaves a half
    directory. An existing directory built with the same config hash is reused; one built by
    rlft with another config is replaced.

    Args:
        out_dir: Directory to create.
        preset: Key of `PRESETS`.
        overrides: TinyConfig fields to change, e.g. `{"hidden_size": 32}`.
        seed: Initialisation seed.

    Returns:
        `out_dir`.

    Raises:
        UserInputError: bad preset/overrides, or `out_dir` holds something rlft did not build.
    """
    out_dir = Path(out_dir)
    cfg = resolve_config(preset, overrides)
    digest = config_hash(cfg, seed)
    if _is_built(out_dir, digest):
        return out_dir
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _write_model(tmp, cfg, seed, {"config_hash": digest, "preset": preset, "seed": seed,
                                      "config": dataclasses.asdict(cfg)})
        _move_into_place(tmp, out_dir, digest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_model(tmp: Path, cfg: TinyConfig, seed: int, marker: dict[str, Any]) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer_of(cfg.tokenizer)
    tokenizer.model_max_length = cfg.max_position
    hf_config = _hf_config(cfg, tokenizer)
    # A private RNG scope: the init depends on `seed` only and the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    tmp.mkdir(parents=True)
    transformers.utils.logging.disable_progress_bar()  # a tiny save needs no bar of its own
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    marker["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    marker["num_parameters"] = sum(p.numel() for p in model.parameters())
    (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def _hf_config(cfg: TinyConfig, tokenizer: Any) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    config_cls = Qwen2Config if cfg.arch == "qwen2" else LlamaConfig
    return config_cls(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _is_built(out_dir: Path, digest: str) -> bool:
    marker = _read_marker(out_dir)
    return marker is not None and marker.get("config_hash") == digest and all(
        (out_dir / name).is_file() for name in _REQUIRED_FILES
    )


def _read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _check_replaceable(out_dir: Path) -> None:
    if not out_dir.exists() or _read_marker(out_dir) is not None:
        return
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return
    raise UserInputError(
        f"{out_dir} exists and is not a tiny model built by rlft (no {MARKER_FILE}); "
        "choose another directory or remove it"
    )


def _move_into_place(tmp: Path, out_dir: Path, digest: str) -> None:
    try:
        commit_dir(tmp, out_dir, best_effort=True)
    except OSError:
        # Another process finished the same build first: keep its directory when it matches.
        if not _is_built(out_dir, digest):
            raise


def _did_you_mean(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
