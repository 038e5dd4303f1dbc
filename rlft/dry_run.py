"""`--dry-run`: the same recipe rehearsed on CPU in minutes before the GPU hours.

The rehearsal keeps the recipe's tokenizers and chat templates, data sources and columns,
rewards and stage graph, and shrinks everything that costs time: each model becomes a randomly
initialised model of the same architecture, built from the real config with 2 layers and a
small hidden size but the real vocabulary (`shrunk_model`); each data set keeps a few rows;
each training stage runs 2 steps; generations are short; evals score a handful of prompts;
gates are off (a random model fails them by construction). It runs in its own run directory,
`<run_name>-dry-run`, and goes through the same pipeline as a real run, so an error a real run
would hit (a missing column, a template that rejects a row, a reward that raises, a stage that
reads a missing output) stops it the same way. `report` then prints what each stage exercised.

`stand_ins` maps a hub name (model or data set) to a local directory or file used instead,
for rehearsing offline (CI) or with a cached copy: `--stand-in Qwen/Qwen2.5-1.5B-Instruct=DIR`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from rlft.errors import UserInputError
from rlft.recipe.load import LoadedRecipe
from rlft.recipe.schema import Recipe

log = logging.getLogger(__name__)

SUFFIX = "-dry-run"
ROWS = 16  # rows kept of each data set
STEPS = 2  # optimizer steps (rollout rounds) per training stage
NEW_TOKENS = 16  # tokens generated per completion
EVAL_PROMPTS = 4  # held-out prompts per eval
LAYERS, HIDDEN, HEADS, KV_HEADS = 2, 64, 4, 2


def parse_stand_ins(items: list[str] | None, base_dir: Path) -> dict[str, str]:
    """`NAME=PATH` pairs as {hub name: absolute path}; a relative PATH is taken from the working directory.

    Raises:
        UserInputError: an item without `=`, or a PATH that does not exist.
    """
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserInputError(f"--stand-in {item!r}: expected HUB_NAME=LOCAL_PATH, e.g. "
                                 "--stand-in Qwen/Qwen2.5-0.5B-Instruct=./models/qwen-local")
        local = Path(path.strip()).expanduser()
        if not local.exists():
            raise UserInputError(f"--stand-in {item!r}: {local} does not exist")
        out[name.strip()] = str(local.absolute())
    return out


# --------------------------------------------------------------------------- the shrunk recipe


def dry_recipe(loaded: LoadedRecipe, stand_ins: dict[str, str]) -> LoadedRecipe:
    """The recipe as it is rehearsed: shrunk models, few rows and steps, its own run directory.

    Raises:
        UserInputError: a model whose config cannot be loaded.
        RecipeError: never for a recipe that loaded (the changes stay within the schema).
    """
    raw = copy.deepcopy(loaded.raw)
    run_dir = loaded.run_dir.with_name(loaded.run_dir.name + SUFFIX)
    raw["run_name"] = loaded.recipe.run_name + SUFFIX
    models_dir = run_dir / "models"
    raw["model"] = _dry_model(raw["model"], models_dir, loaded.base_dir, stand_ins)
    for name, stage in raw["stages"].items():
        _shrink_stage(stage, stand_ins, loaded.recipe.stages)
        if isinstance(stage.get("student"), dict):
            stage["student"] = _dry_model(stage["student"], models_dir, loaded.base_dir, stand_ins, f"stages.{name}.student")
    recipe = Recipe.model_validate(raw, strict=True)
    return replace(loaded, recipe=recipe, raw=raw, run_dir=run_dir)


def _dry_model(spec: dict, models_dir: Path, base_dir: Path, stand_ins: dict[str, str], key: str = "model") -> dict:
    """A model entry pointing at a shrunk copy of the model (tiny:<preset> models stay as they are)."""
    spec = {k: v for k, v in spec.items() if k != "quantize"}  # CPU: bitsandbytes quantizes on CUDA only
    name = spec["name"]
    if name.startswith("tiny:"):
        return spec
    from rlft.models import local_model_dir

    source = stand_ins.get(name) or local_model_dir(name, base_dir) or name
    out = shrunk_model(source, spec, models_dir, key)
    return {**{k: v for k, v in spec.items() if k != "revision"}, "name": str(out)}


def _shrink_stage(stage: dict, stand_ins: dict[str, str], stages: dict[str, Any]) -> None:
    kind = stage["kind"]
    stage.pop("gate", None)
    if "data" in stage:
        stage["data"] = [_shrink_data(d, stand_ins, stages) for d in _as_list(stage["data"])]
    if "mix" in stage:
        stage["mix"] = [_shrink_data(d, stand_ins, stages) for d in _as_list(stage["mix"])]
    if kind in ("sft", "distill", "grpo", "ppo"):
        stage.update(eval_samples=2, eval_every=0, save_every=1, log_every=1, warmup_steps=0)
    if kind in ("sft", "distill"):
        stage.update(max_steps=STEPS, batch_size=2, eval_max_new_tokens=NEW_TOKENS)
        stage.pop("micro_batch_size", None)
    if kind in ("grpo", "ppo"):
        stage.update(steps=STEPS, prompts_per_step=2, micro_batch_size=2, eval_max_new_tokens=NEW_TOKENS,
                     mini_batches=1, log_samples_every=1)
        if kind == "grpo":
            stage["group_size"] = 2
        else:
            stage.update(group_size=1, ppo_epochs=1)
        if isinstance(stage.get("dynamic_sampling"), dict):
            stage["dynamic_sampling"]["max_rounds"] = 1
    if kind == "sample":
        # a random model's samples are never correct: keep every one, so the stages after it get data
        stage.update(per_prompt=2, batch_size=2, shard_size=2, keep="all", threshold=-1e9, min_chars=0)
        stage.pop("max_chars", None)
    if kind == "eval":
        stage.update(k=2, num_prompts=EVAL_PROMPTS)
    if kind in ("grpo", "ppo", "sample", "eval", "distill"):
        sampling = stage.setdefault("sampling", {})
        sampling["max_new_tokens"] = min(int(sampling.get("max_new_tokens", NEW_TOKENS)), NEW_TOKENS)
        if sampling.get("engine") == "vllm":  # a GPU engine: the rehearsal samples with the built-in one
            sampling["engine"] = "hf"
            sampling.pop("vllm", None)
        if isinstance(stage.get("loss"), dict) and "max_len" in stage["loss"]:
            stage["loss"]["max_len"] = sampling["max_new_tokens"]


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _shrink_data(entry: Any, stand_ins: dict[str, str], stages: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {"source": entry} if isinstance(entry, str) else dict(entry)
    if data["source"] in stand_ins:
        data.update(_stand_in_data(stand_ins[data["source"]], data))
        data.pop("subset", None)  # local files have no configurations
        if data.get("eval_split") is None:
            data.pop("eval_split", None)
    if data["source"] not in stages:  # a sample stage's output is already small
        data["num_examples"] = min(int(data.get("num_examples") or ROWS), ROWS)
    size = data.get("eval_size")
    if data.get("eval_split") is None and size not in (None, 0, 0.0):
        data["eval_size"] = 2  # a fraction or count of the real rows would be none or all of 16
    return data


def _stand_in_data(local: str, data: dict) -> dict:
    """A hub data set's local stand-in: a file (held-out rows drawn from it), or a directory of
    `<split>.jsonl` files, one per split the recipe names."""
    path = Path(local)
    if not path.is_dir():
        return {"source": local, "eval_split": None}
    split, held = data.get("split", "train"), data.get("eval_split")
    return {"source": str(path / f"{split}.jsonl"), "eval_split": None if held is None else str(path / f"{held}.jsonl")}


def shrunk_model(source: str, spec: dict, models_dir: Path, key: str = "model") -> Path:
    """A random model of `source`'s architecture with 2 layers and a small hidden size, and the real
    vocabulary and tokenizer, saved under `models_dir` (reused when it is already there).

    Raises:
        UserInputError: the config or tokenizer of `source` cannot be loaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": bool(spec.get("trust_remote_code", False))}
    if spec.get("revision") and source == spec["name"]:
        kwargs["revision"] = spec["revision"]
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise UserInputError(f"{key}.name: cannot load the config and tokenizer of {source!r} for the dry run "
                             f"({err}); map it to a local copy with --stand-in {spec['name']}=DIR") from None
    shrink_config(config)
    digest = hashlib.sha256((source + config.to_json_string()).encode()).hexdigest()[:12]
    out = models_dir / f"shrunk-{Path(source).name}-{digest}"
    if (out / "config.json").exists():
        return out
    import torch

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    from rlft.ckpt.fsio import writing
    with writing(f"the shrunk model of {source}", out):
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    log.info("dry run: %s -> %s (%d layers, hidden %d, vocab %d, %.1fM parameters)", source, out, LAYERS,
             HIDDEN, config.vocab_size, sum(p.numel() for p in model.parameters()) / 1e6)
    return out


def shrink_config(config: Any) -> Any:
    """Cut a transformers config down in place: 2 layers, hidden 64, 4 heads (2 key/value heads),
    MLP width 128; vocabulary, positions, activation and everything else as they were."""
    sizes = {"num_hidden_layers": LAYERS, "n_layer": LAYERS, "hidden_size": HIDDEN, "n_embd": HIDDEN,
             "intermediate_size": 2 * HIDDEN, "num_attention_heads": HEADS, "n_head": HEADS,
             "num_key_value_heads": KV_HEADS, "head_dim": HIDDEN // HEADS}
    for attr, value in sizes.items():
        if getattr(config, attr, None) is not None:
            setattr(config, attr, value)
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[:LAYERS])
    if getattr(config, "max_window_layers", None) is not None:
        config.max_window_layers = LAYERS
    return config


# --------------------------------------------------------------------------- what it exercised


def report(loaded: LoadedRecipe) -> str:
    """Per stage: rows, prompt/completion token counts, the first rendered prompt, rewards returned;
    then a warning for each stage that renders a data set's prompt differently from a stage it reads."""
    from rlft.prompt_report import answer_problems, mismatches, stage_prompts

    prompts = stage_prompts(loaded)
    lines = [f"dry run of {loaded.path} in {loaded.run_dir}: every stage ran"]
    for stage, spec in loaded.recipe.stages.items():
        marker = _read_json(loaded.run_dir / stage / "stage.done.json")
        data = (marker.get("lineage") or {}).get("data") or []
        rows = ", ".join(f"{d.get('source', '?')}: {d.get('train_rows', '?')} train / {d.get('held_out_rows', '?')} "
                         "held-out" for d in data if isinstance(d, dict))
        lines.append(f"\n== {stage} ({spec.kind})" + (f"  rows: {rows}" if rows else ""))
        shown = prompts.get(stage)
        if shown is not None:
            lines.append(f"  prompt tokens {shown.prompt_tokens}, completion tokens {shown.completion_tokens}")
            lines.append("  first rendered prompt:")
            lines += [f"    | {line}" for line in shown.text.splitlines()]
        rewards = _rewards(loaded.run_dir / stage, marker)
        if rewards:
            lines.append("  rewards: " + ", ".join(f"{k}={v:.3g}" for k, v in rewards.items()))
    warnings = mismatches(loaded, prompts) + answer_problems(loaded, prompts)
    lines += ["", *[f"warning: {w}" for w in warnings]] if warnings else []
    return "\n".join(lines)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _rewards(stage_dir: Path, marker: dict) -> dict[str, float]:
    """The reward metrics the stage logged last (training stages) or reported (sample, eval)."""
    found: dict[str, float] = {}
    metrics = stage_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            found |= {k: float(v) for k, v in row.items() if k.startswith("reward") and isinstance(v, int | float)}
    metrics = (marker.get("artifact") or {}).get("metrics") or {}
    flat = {f"{m}/{k}": v for m, sub in metrics.items() if isinstance(sub, dict) for k, v in sub.items()}
    flat |= {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    for k, v in flat.items():
        if isinstance(v, int | float) and any(w in k for w in ("reward", "greedy", "@", "pass_rate", "rows_")):
            found[k] = float(v)
    return found
