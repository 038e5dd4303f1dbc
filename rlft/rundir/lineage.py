"""What fed what: the lineage record a finished stage writes into its `stage.done.json`.

The marker's `inputs_hash` and `outputs` decide skip and verify (rlft/pipeline.py); `lineage`
only describes the run, so a marker written before it existed still verifies. Its fields:

    parents    [{stage, roles (from/teacher/models/data), kind, fingerprint, model, data}]
    data       [{role (data/mix), source, resolved, fingerprint, train_rows, held_out_rows}]
    model      the recipe's base model: {name, revision, commit, source, fingerprint}
    student    the same for a model the stage trains from its own weights (distill, sft student:)
    versions   python, torch, transformers, peft, rlft
    threads, device, started / finished (UTC, ISO 8601), wall_s (this invocation), resumed_from_step

Row counts come from where the stages load their data (rlft/stage_io.py records them in the
run context), never from reading the data again here.
"""

from __future__ import annotations

import importlib.metadata
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlft.recipe.schema import stage_refs

LIBRARIES = ("torch", "transformers", "peft", "rlft")


@dataclass
class StageRecord:
    """What a running stage reports about its inputs, filled in as it loads them."""

    data: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_step: int | None = None
    started: str = field(default_factory=lambda: utc_now())
    clock: float = field(default_factory=time.monotonic)

    def add_data(self, role: str, source: str, resolved: str, fingerprint: str, train: int, held_out: int) -> None:
        """One data set as loaded: `source` as the recipe names it, `resolved` the file it came from."""
        self.data.append({
            "role": role, "source": source, "resolved": resolved, "fingerprint": fingerprint,
            "train_rows": train, "held_out_rows": held_out,
        })


def utc_now() -> str:
    """Now, in UTC, as `2025-01-31T12:00:00Z`."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def stage_lineage(ctx: Any, parent_names: list[str]) -> dict[str, Any]:
    """The lineage of the stage `ctx` just finished; `parent_names` are the stages it read."""
    import torch

    from rlft.models import device

    record: StageRecord = ctx.record
    spec = ctx.spec
    student = getattr(spec, "student", None)
    return {
        "parents": parents(ctx, parent_names),
        "data": record.data,
        "model": model_record(ctx.recipe.model, ctx.artifacts["base"].model, ctx.artifacts["base"].fingerprint),
        "student": None if student is None else model_record(student, *_student_source(ctx, student)),
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "device": str(device()),
        "started": record.started,
        "finished": utc_now(),
        "wall_s": round(time.monotonic() - record.clock, 2),
        "resumed_from_step": record.resumed_from_step,
    }


def parents(ctx: Any, names: list[str]) -> list[dict[str, Any]]:
    """Each stage this one read, with what for (its roles) and the fingerprint of what it read."""
    spec = ctx.spec
    # distill and an sft stage with its own `student:` start from that model: `from:` is not read
    from_ignored = spec.kind == "distill" or getattr(spec, "student", None) is not None
    roles: dict[str, list[str]] = {}
    for key, name in stage_refs(ctx.stage, spec):
        role = next(p for p in reversed(key.split(".")) if not p.isdigit())
        if not (role == "from" and from_ignored):
            roles.setdefault(name, []).append(role)
    for d in getattr(spec, "data", []) + getattr(spec, "mix", []):
        if d.source in ctx.recipe.stages:
            roles.setdefault(d.source, []).append("data")
    if spec.kind == "eval" and not spec.models:  # default: every earlier model stage
        for name in names:
            roles.setdefault(name, ["models"])
    out = []
    for name, what in roles.items():
        a = ctx.artifacts[name]
        out.append({"stage": name, "roles": what, "kind": a.kind, "fingerprint": a.fingerprint,
                    "model": a.model, "data": a.data})
    return out


def model_record(spec: Any, source: str | None, fingerprint: str) -> dict[str, Any]:
    """A model as the recipe names it and as it was resolved: local directory or hub commit."""
    return {"name": spec.name, "revision": spec.revision, "commit": hub_commit(spec, source),
            "source": source, "fingerprint": fingerprint}


def hub_commit(spec: Any, source: str | None) -> str | None:
    """The commit a hub model's revision resolved to, read from the local hub cache (no network)."""
    if source is None or source != spec.name or Path(source).exists():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec.name, "config.json", revision=spec.revision)
    except Exception:  # an unusual cache layout: the name and revision still say what was asked for
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def _student_source(ctx: Any, student: Any) -> tuple[str, str]:
    from rlft.ckpt.manifest import fingerprint, hash_tree
    from rlft.models import prepare_base

    source = prepare_base(student, ctx.run_dir / "models")  # built already: the stage loaded it
    return source, fingerprint(hash_tree(Path(source))) if Path(source).is_dir() else ""


def versions() -> dict[str, str]:
    """python and the libraries whose versions change results."""
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
