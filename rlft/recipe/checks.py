"""Recipe checks the schema cannot make, on the plain data so they run even when the schema fails.

- recipes are data: no `_component_`/`_target_`, no secrets (RELIABILITY S1, S6, test 24);
- stage names are safe directory names (RELIABILITY 23);
- the stage graph: `from:`, `teacher:` and eval `models:` name an earlier stage that produces a
  model (or `base`); a data `source` that names a stage names an earlier `sample` stage;
- `tiny:<task>` names a known task; local data files and `file.py:function` rewards exist, and
  reward files live inside the recipe's directory (RELIABILITY S4);
- a gate's metric is one the stage reports (rlft/recipe/gates.py);
- data files may live anywhere (users keep data elsewhere) unless the recipe sets `data_root`:
  then each must resolve, symlinks followed, inside it. Reward files are code, so their rule is
  always the strict one;
- stages that only generate from prompts (grpo, ppo, sample, eval) refuse `long_rows: truncate`:
  a cut prompt asks another question than the one its answer belongs to.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlft.data.rows import local_path
from rlft.errors import DataError, Problem
from rlft.recipe.gates import gate_problems
from rlft.recipe.problems import Locator, closest, did_you_mean, dotted
from rlft.recipe.schema import RESERVED_STAGE_NAMES, SAFE_NAME
from rlft.recipe.secret_values import secret_problems
from rlft.recipe.yaml_tree import Path_, walk

MODEL_KINDS = ("sft", "grpo", "ppo", "distill")
PROMPT_KINDS = ("grpo", "ppo", "sample", "eval")
_REWARD_FILE = re.compile(r"^(?P<file>.+\.py):(?P<fn>[^:]*)$")


def data_problems(raw: dict[str, Any], loc: Locator) -> list[Problem]:
    """`_component_`/`_target_` keys and secrets (rlft/recipe/secret_values.py) anywhere in the recipe."""
    problems = []
    for path, _ in walk(raw):
        if path and path[-1] in ("_component_", "_target_"):
            problems.append(loc.at(path, "recipes are data: rlft does not instantiate classes from recipes; "
                                   "use a stage `kind:` or a reward name"))
    return problems + secret_problems(raw, loc)


def _stages(raw: dict[str, Any]) -> dict[str, Any]:
    stages = raw.get("stages")
    return stages if isinstance(stages, dict) else {}


def name_problems(raw: dict[str, Any], loc: Locator) -> list[Problem]:
    """Stage names: safe directory names, not `base`."""
    problems = []
    for name in _stages(raw):
        if name in RESERVED_STAGE_NAMES:
            problems.append(loc.at(("stages", name), "'base' is reserved: it names the recipe's model"))
        elif not SAFE_NAME.match(name):
            problems.append(loc.at(("stages", name), f"stage name {name!r} is not a safe directory name: use at "
                                   "most 64 letters, digits, '_', '-' or '.', not starting with '.' or '-', without '..'"))
    return problems


def _ref_problem(ref: str, stage: str, stages: dict[str, Any], data: bool) -> str | None:
    """Why `ref` is not an earlier stage that produces a model (`data`: an earlier sample stage), or None."""
    names = list(stages)
    earlier = names[: names.index(stage)]
    kind_of = {n: (s.get("kind") if isinstance(s, dict) else None) for n, s in stages.items()}
    choices = [n for n in earlier if kind_of[n] == "sample"] if data else ["base"] + [
        n for n in earlier if kind_of[n] in MODEL_KINDS
    ]
    if ref in choices:
        return None
    if ref == stage:
        return "a stage cannot read its own output" if data else "a stage cannot start from itself"
    if ref in names and ref not in earlier:
        return f"stage '{ref}' runs after '{stage}' (stages run in the order written); use an earlier stage"
    what = "earlier sample stages" if data else "earlier model stages"
    listed = f"{what}: {', '.join(choices)}" if choices else f"there are no {what}"
    if ref in earlier:
        makes = "data" if kind_of[ref] == "sample" else "no model" if kind_of[ref] == "eval" else "a model"
        return f"stage '{ref}' (kind: {kind_of[ref]}) produces {makes}; {listed}"
    return f"unknown stage '{ref}'{did_you_mean(ref, names + ['base'])}; {listed}"


def _data_entries(name: str, spec: dict[str, Any]) -> Iterator[tuple[Path_, Any]]:
    for key in ("data", "mix"):
        value = spec.get(key)
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)] if value else []
        for i, item in items:
            path = ("stages", name, key) + (() if i is None else (i,))
            if isinstance(item, dict):
                yield path + ("source",), item.get("source")
            else:
                yield path, item


def graph_problems(raw: dict[str, Any], loc: Locator) -> list[Problem]:
    """`from:`, `teacher:`, eval `models:` and stage-name data sources point backwards, at the right kind."""
    stages, problems = _stages(raw), []
    for name, spec in stages.items():
        if not isinstance(spec, dict):
            continue
        refs = [(("stages", name, k), spec[k]) for k in ("from", "teacher") if k in spec]
        if isinstance(spec.get("models"), list):
            refs += [(("stages", name, "models", i), m) for i, m in enumerate(spec["models"])]
        for path, ref in refs:
            why = _ref_problem(ref, name, stages, data=False) if isinstance(ref, str) else None
            problems += [loc.at(path, why)] if why else []
        for path, source in _data_entries(name, spec):
            if not isinstance(source, str):
                continue
            if source in stages:
                why = _ref_problem(source, name, stages, data=True)
                problems += [loc.at(path, why)] if why else []
            elif re.fullmatch(r"[\w-]+", source) and closest(source, stages):
                # a bare word close to a stage name is a typo, not a hub data set
                near = closest(source, stages)
                problems.append(loc.at(path, f"unknown data source '{source}' (did you mean stage '{near}'?)"))
    return problems


def _tasks() -> dict[str, Any] | None:
    try:
        from rlft.data.tasks import TASKS
    except ImportError:
        return None
    return TASKS


def _missing_file(file: Path, shown: str, suffixes: tuple[str, ...]) -> str:
    if not file.parent.is_dir():
        return f"directory not found: {file.parent}"
    siblings = [p.name for p in file.parent.iterdir() if p.suffix in suffixes]
    hint = did_you_mean(file.name, siblings)
    return f"file not found: {shown} (looked in {file.parent}){hint}"


def data_root(raw: dict[str, Any], base_dir: Path) -> Path | None:
    """The resolved `data_root` directory (relative to the recipe's directory), or None when unset."""
    root = raw.get("data_root")
    return (base_dir / Path(root).expanduser()).resolve() if isinstance(root, str) else None


def source_problems(raw: dict[str, Any], loc: Locator, base_dir: Path) -> list[Problem]:
    """`tiny:<task>` names a task; a local data file (and a local source's eval_split file) is a
    readable data file, inside `data_root` when the recipe sets one."""
    problems, tasks = [], _tasks()
    stages, root = _stages(raw), data_root(raw, base_dir)
    if root is not None and not root.is_dir():
        problems.append(loc.at(("data_root",), f"directory not found: {root}"))
        root = None
    for name, spec in stages.items():
        if not isinstance(spec, dict):
            continue
        for path, source in _data_entries(name, spec):
            if not isinstance(source, str) or source in stages or "://" in source:
                continue
            if source.startswith("tiny:"):
                if tasks is not None and source[5:] not in tasks:
                    task = source[5:]
                    problems.append(loc.at(path, f"unknown task '{task}'{did_you_mean(task, tasks)}; "
                                           f"built-in tasks: {', '.join(sorted(tasks))}"))
                continue
            why, is_file = _file_problem(source, base_dir, root, must_exist=False)
            split = _entry(raw, path).get("eval_split") if path[-1] == "source" else None
            if why is None and is_file and isinstance(split, str):
                path, (why, _) = path[:-1] + ("eval_split",), _file_problem(split, base_dir, root, must_exist=True)
            problems += [loc.at(path, why)] if why else []
    return problems


def _entry(raw: dict[str, Any], path: Path_) -> dict[str, Any]:
    """The data entry (a mapping) whose `source` is at `path`."""
    node: Any = raw
    for key in path[:-1]:
        node = node[key]
    return node


def _file_problem(source: str, base_dir: Path, root: Path | None, must_exist: bool) -> tuple[str | None, bool]:
    """(why `source` is not a usable data file, or None; whether it names a local file)."""
    try:
        file = local_path(source, base_dir, must_exist)
    except DataError as err:
        return str(err), True
    if file is None:
        return None, False
    resolved = file.resolve()
    if root is not None and not resolved.is_relative_to(root):
        return f"{source} resolves to {resolved} (symlinks followed), outside data_root {root}", True
    return None, True


def prompt_length_problems(raw: dict[str, Any], loc: Locator) -> list[Problem]:
    """Stages that only generate from prompts refuse `long_rows: truncate` (a prompt is never cut)."""
    problems = []
    for name, spec in _stages(raw).items():
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind not in PROMPT_KINDS:
            continue
        for path, _ in _data_entries(name, spec):
            entry = _entry(raw, path) if path[-1] == "source" else None
            if path[2] == "data" and entry is not None and entry.get("long_rows") == "truncate":
                problems.append(loc.at(path[:-1] + ("long_rows",), f"a {kind} stage generates from prompts and a "
                                       "prompt is never cut (it would ask another question than the one its "
                                       "answer belongs to); use long_rows: error or drop"))
    return problems


def model_problems(raw: dict[str, Any], loc: Locator) -> list[Problem]:
    """`tiny:<preset>` model names (the recipe's model and stages' students) name a known preset."""
    from rlft.tiny import PRESETS  # no torch import: presets are plain dataclasses

    entries: list[tuple[tuple[str, ...], Any]] = [(("model", "name"), (raw.get("model") or {}).get("name") if isinstance(raw.get("model"), dict) else None)]
    for name, spec in _stages(raw).items():
        student = spec.get("student") if isinstance(spec, dict) else None
        if isinstance(student, dict):
            entries.append((("stages", name, "student", "name"), student.get("name")))
    problems = []
    for path, value in entries:
        if isinstance(value, str) and value.startswith("tiny:") and value[5:] not in PRESETS:
            preset = value[5:]
            problems.append(loc.at(path, f"unknown tiny preset '{preset}'{did_you_mean(preset, PRESETS)}; "
                                   f"presets: {', '.join(sorted(PRESETS))}"))
    return problems


def quantize_problems(raw: dict[str, Any], loc: Locator) -> list[Problem]:
    """Quantized base weights (`model.quantize`) train through LoRA only: a training stage with
    `lora: full` (its own or the recipe's) would update the quantized weights themselves."""
    def quantize_of(model: Any) -> Any:
        return model.get("quantize", "none") if isinstance(model, dict) else "none"

    problems = []
    for name, spec in _stages(raw).items():
        if not isinstance(spec, dict) or spec.get("kind") not in MODEL_KINDS:
            continue
        # a distillation trains its student, whose own spec says how it loads
        quantize = quantize_of(spec.get("student") if spec.get("kind") == "distill" else raw.get("model"))
        if quantize in ("none", None):
            continue
        own = "lora" in spec
        if (spec["lora"] if own else raw.get("lora")) == "full":
            problems.append(loc.at(("stages", name, "lora") if own else ("lora",),
                                   f"quantize: {quantize} trains a LoRA adapter on frozen quantized weights; "
                                   f"stage '{name}' asks for lora: full (give it a LoRA spec, or quantize: none)"))
    return problems


def strategy_problems(raw: dict[str, Any], loc: Locator) -> list[Problem]:
    """`distributed.strategy: fsdp` shards every training stage, fully fine-tuned or with a LoRA
    adapter (the frozen base is sharded too): an RL stage sampling with vLLM, or a quantized
    model, is refused (docs/distributed.md says why)."""
    spec = raw.get("distributed")
    if not isinstance(spec, dict) or spec.get("strategy") != "fsdp":
        return []
    problems = []
    for name, stage in _stages(raw).items():
        kind = stage.get("kind") if isinstance(stage, dict) else None
        if kind not in MODEL_KINDS or not isinstance(stage, dict):
            continue
        sampling = stage.get("sampling")
        if kind in ("grpo", "ppo") and isinstance(sampling, dict) and sampling.get("engine") == "vllm":
            why = (f"stage '{name}' ({kind}) samples with vLLM, and each rank's engine takes the whole policy from "
                   "the rank, which fsdp keeps sharded: use strategy: ddp with sampling.engine: vllm, or engine: hf")
        elif (quantize := _quantize_of(stage, raw)) not in ("none", None):
            why = (f"stage '{name}' loads its model with quantize: {quantize}; FSDP2 does not shard bitsandbytes' "
                   "quantized weights: use strategy: ddp, or quantize: none")
        else:
            continue
        problems.append(loc.at(("distributed", "strategy"), f"fsdp: {why}"))
    return problems


def _quantize_of(stage: dict[str, Any], raw: dict[str, Any]) -> Any:
    """`quantize` of the model a training stage loads: its own student's, else the recipe's model's."""
    model = stage.get("student") if isinstance(stage.get("student"), dict) else raw.get("model")
    return model.get("quantize", "none") if isinstance(model, dict) else "none"


def _reward_entries(raw: dict[str, Any]) -> Iterator[tuple[Path_, Any]]:
    for name, spec in _stages(raw).items():
        rewards = spec.get("rewards") if isinstance(spec, dict) else None
        for i, item in enumerate(rewards if isinstance(rewards, list) else []):
            path = ("stages", name, "rewards", i)
            yield (path + ("name",), item.get("name")) if isinstance(item, dict) else (path, item)


def reward_file_problems(raw: dict[str, Any], loc: Locator, base_dir: Path) -> list[Problem]:
    """`path/to/file.py:function` rewards: the file exists inside the recipe's directory."""
    problems = []
    root = base_dir.resolve()
    for path, name in _reward_entries(raw):
        match = _REWARD_FILE.match(name) if isinstance(name, str) else None
        if not match:
            continue
        file = (base_dir / Path(match["file"]).expanduser()).resolve()
        if not file.is_relative_to(root):
            why = f"reward files must be inside the recipe's directory ({root}); got {match['file']}"
        elif not file.is_file():
            why = _missing_file(file, match["file"], (".py",))
        elif not match["fn"].isidentifier():
            why = f"'{match['fn']}' is not a function name; write {match['file']}:<function>"
        else:
            continue
        problems.append(loc.at(path, why))
    return problems


def reward_name_problems(raw: dict[str, Any], loc: Locator, base_dir: Path, skip: set[str]) -> list[Problem]:
    """Reward names checked against the reward table (`rlft.rewards.runner.validate_reward_entry`).

    Entries whose dotted key is in `skip` (already reported) are not checked again.
    """
    try:
        from rlft.rewards.runner import validate_reward_entry
    except ImportError:
        return []
    problems = []
    for name, spec in _stages(raw).items():
        rewards = spec.get("rewards") if isinstance(spec, dict) else None
        for i, entry in enumerate(rewards if isinstance(rewards, list) else []):
            path = ("stages", name, "rewards", i)
            if any(s == dotted(path) or s.startswith(dotted(path) + ".") for s in skip):
                continue
            label = entry.get("name") if isinstance(entry, dict) else entry
            if not isinstance(label, str):
                continue  # the schema reports a missing or non-string name
            if isinstance(entry, dict):
                # unknown keys and the weight's type are the schema's to report, at their own lines
                options = entry.get("options")
                entry = {"name": label, **({"options": options} if isinstance(options, dict) else {})}
            try:
                why = validate_reward_entry(entry, recipe_dir=base_dir)
            except Exception as exc:  # a checker bug must still end in a readable problem
                why = f"cannot check this reward: {exc}"
            problems += [loc.at(path, why)] if why else []
    return problems


def all_problems(raw: dict[str, Any], loc: Locator, base_dir: Path) -> list[Problem]:
    """Every check of this module."""
    problems = (
        data_problems(raw, loc)
        + name_problems(raw, loc)
        + graph_problems(raw, loc)
        + source_problems(raw, loc, base_dir)
        + prompt_length_problems(raw, loc)
        + model_problems(raw, loc)
        + quantize_problems(raw, loc)
        + strategy_problems(raw, loc)
        + reward_file_problems(raw, loc, base_dir)
        + gate_problems(raw, loc)
    )
    return problems + reward_name_problems(raw, loc, base_dir, {p.path for p in problems})
