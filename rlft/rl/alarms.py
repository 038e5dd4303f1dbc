# pyright: strict, reportUnknownMemberType=false, reportUnknownArgumentType=false, reportUnknownVariableType=false
"""Training-health alarms of the RL stages, checked on each logged step (spec: rlft/recipe/alarm_spec.py).

The checks read the stage's metric rows (what metrics.jsonl holds, resumed rows included), so a
resumed stage judges the same history as an uninterrupted one. A fired alarm is written to
`<stage>/alarms.jsonl` (cut back to the checkpoint's step on a resume, like metrics.jsonl) and
logged; each alarm fires at most once per stage. A `stop` alarm is acted on by the stage after
it saved its checkpoint: `raise_if_stopped` raises a TrainingError (exit 4).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlft.errors import TrainingError

log = logging.getLogger("rlft")

Rows = list[dict[str, Any]]


def _values(rows: Rows, key: str) -> list[float]:
    return [float(r[key]) for r in rows if isinstance(r.get(key), int | float)]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def entropy_collapse(rule: Any, rows: Rows) -> str | None:
    ent = _values(rows, "entropy")
    w = rule.window
    if len(ent) < 2 * w:
        return None
    start, now = _mean(ent[:w]), _mean(ent[-w:])
    if start > 0 and now < rule.min_ratio * start:
        return f"entropy {now:.4g} (last {w} logged steps) < {rule.min_ratio} x its start {start:.4g}"
    return None


def kl_spike(rule: Any, rows: Rows) -> str | None:
    kl = _values(rows, "kl")
    if not kl:
        return None
    now = kl[-1]
    if now > rule.max:
        return f"kl {now:.4g} > max {rule.max}"
    if len(kl) > 1:
        median = statistics.median(kl[:-1])
        if now > rule.max / 10 and now > rule.factor * median:
            return f"kl {now:.4g} > {rule.factor} x the median {median:.4g} of the earlier steps"
    return None


def clip_blowup(rule: Any, rows: Rows) -> str | None:
    shares = [float(r.get("clip/low", 0.0)) + float(r.get("clip/high", 0.0))
              for r in rows if isinstance(r.get("clip/low"), int | float)]
    if len(shares) < rule.window:
        return None
    now = _mean(shares[-rule.window:])
    return f"clipped tokens {now:.3g} (clip/low + clip/high, last {rule.window} logged steps) > max {rule.max}" \
        if now > rule.max else None


def zero_variance(rule: Any, rows: Rows) -> str | None:
    zv = _values(rows, "groups/zero_variance")
    if len(zv) < rule.window:
        return None
    now = _mean(zv[-rule.window:])
    return f"zero-variance groups {now:.3g} (last {rule.window} logged steps) >= max {rule.max}" if now >= rule.max else None


def reward_hacking(rule: Any, rows: Rows) -> str | None:
    evals = [(r["step"], float(r["eval/accuracy"])) for r in rows if isinstance(r.get("eval/accuracy"), int | float)]
    if len(evals) < 2 or rows[-1].get("eval/accuracy") is None:
        return None
    best_step, best = max(evals[:-1], key=lambda e: e[1])
    now = evals[-1][1]
    train = [r for r in rows if isinstance(r.get("reward/mean"), int | float)]
    w = rule.window
    around = [r for r in train if r["step"] <= best_step][-w:] or [r for r in train if r["step"] > best_step][:w]
    recent = train[-w:]
    if not around or not recent or recent[0]["step"] <= around[-1]["step"]:
        return None
    r_then, r_now = _mean(_values(around, "reward/mean")), _mean(_values(recent, "reward/mean"))
    if r_now - r_then >= rule.min_reward_rise and best - now >= rule.min_accuracy_drop:
        return (f"reward {r_then:.3g} -> {r_now:.3g} while held-out accuracy fell {best:.3g} (step {best_step}) "
                f"-> {now:.3g}")
    return None


def unparsed(rule: Any, rows: Rows) -> str | None:
    keys = sorted({k for r in rows for k in r if k.startswith("unparsed/")})
    for key in keys:
        vals = _values(rows, key)
        if len(vals) >= rule.window and (now := _mean(vals[-rule.window:])) > rule.max:
            return f"{key} {now:.3g} (share of completions without an answer, last {rule.window} logged steps) > max {rule.max}"
    return None


CHECKS: dict[str, Callable[[Any, Rows], str | None]] = {
    "entropy_collapse": entropy_collapse,
    "kl_spike": kl_spike,
    "clip_blowup": clip_blowup,
    "zero_variance": zero_variance,
    "reward_hacking": reward_hacking,
    "unparsed": unparsed,
}

# built-in rewards that judge an extracted answer, and the extractor each one uses
_ANSWER_REWARDS = ("math_answer", "exact_answer", "task_verifier")


def unparsed_stats(reward_names: list[str], completions: list[str]) -> dict[str, float]:
    """unparsed/<reward>: share of `completions` with no answer the reward could read."""
    from rlft.data import tasks
    from rlft.rewards import builtin
    out: dict[str, float] = {}
    for name in reward_names:
        if name not in _ANSWER_REWARDS or not completions:
            continue
        extract = tasks.extract_answer if name == "task_verifier" else builtin.extract_answer
        out[f"unparsed/{name}"] = sum(extract(c) is None for c in completions) / len(completions)
    return out


def abstaining_rewards(entries: list[Any]) -> list[str]:
    """Rewards whose None means "no answer I could read": the recipe's entries with the option
    `none_as: skip` (the built-in answer rewards are counted from the text instead)."""
    return [e.name for e in entries if e.options.get("none_as") == "skip" and e.name not in _ANSWER_REWARDS]


def abstained_stats(names: list[str], result: Any) -> dict[str, float]:
    """unparsed/<reward> of rewards that abstain (None with `none_as: skip`): the share of samples
    where `names`' function returned None. Its NaN values are abstentions or errors; errors are
    counted in `result.errors`, so they are left out."""
    out: dict[str, float] = {}
    for name in names:
        values = result.per_function[name]
        if values.numel():
            skipped = int(values.isnan().sum()) - int(result.errors.get(name, 0))
            out[f"unparsed/{name}"] = max(0, skipped) / values.numel()
    return out


@dataclass(frozen=True)
class Fired:
    alarm: str
    step: int
    action: str
    message: str


class AlarmMonitor:
    """Checks a stage's alarms after each logged step; records, logs and remembers a stop."""

    def __init__(self, spec: Any, stage: str, stage_dir: Path, resume_step: int):
        from rlft.metrics import MetricsLog

        self.spec, self.stage = spec, stage
        self.log = MetricsLog(stage_dir, resume_step, tensorboard=False, name="alarms.jsonl")
        self.fired = {str(r.get("alarm")) for r in self.log.history}
        self.stop: Fired | None = None

    def check(self, rows: Rows) -> list[Fired]:
        """Run every enabled alarm that has not fired yet on `rows` (the stage's history)."""
        if not rows:
            return []
        step = int(rows[-1]["step"])
        fired = []
        for name, check in CHECKS.items():
            rule = getattr(self.spec, name)
            if rule.action == "off" or name in self.fired:
                continue
            message = check(rule, rows)
            if message is None:
                continue
            f = Fired(name, step, rule.action, message)
            self.fired.add(name)
            self.log.log(step, {"alarm": name, "action": rule.action, "message": message}, force=True)
            log.warning("stage %s: alarm %s at step %d: %s%s", self.stage, name, step, message,
                        "; stopping after the checkpoint" if rule.action == "stop" else "")
            if rule.action == "stop" and self.stop is None:
                self.stop = f
            fired.append(f)
        return fired

    def raise_if_stopped(self) -> None:
        """TrainingError (exit 4) naming the alarm and step, when a `stop` alarm fired."""
        if self.stop is not None:
            f = self.stop
            raise TrainingError(
                f"stage {self.stage}: alarm {f.alarm} at step {f.step}: {f.message}; checkpoint step-{f.step:08d} "
                f"saved; `rlft run` again continues from it (an alarm fires once per stage), --set stages.{self.stage}."
                f"alarms.{f.alarm}.action=warn makes it a warning"
            )

    def close(self) -> None:
        self.log.close()
