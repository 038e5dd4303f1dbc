"""The `alarms:` block of a grpo or ppo stage: training-health checks on each logged step.

Each alarm has its thresholds and an `action`: `warn` logs a line and marks the step in
`alarms.jsonl` (and on `rlft report`'s plots), `stop` also saves a checkpoint and stops the
stage with exit 4 naming the alarm and the step, `off` disables it. Every alarm is on (`warn`)
by default; each fires at most once per stage. Like a gate, alarms judge training without
changing it, so they are not one of the stage's inputs (changing them never retrains).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Action = Literal["warn", "stop", "off"]
ACTION = "warn: log it and mark the step; stop: also save a checkpoint and exit 4; off: disabled."


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class EntropyCollapse(_Strict):
    """Per-token entropy falls to a small share of where the stage started."""

    action: Action = Field(default="warn", description=ACTION)
    min_ratio: float = Field(default=0.1, gt=0, lt=1, description="Fire when the mean entropy of the last `window` logged "
                             "steps is below this share of the mean of the first `window`.")
    window: int = Field(default=3, ge=1, description="Logged steps averaged at each end.")


class KLSpike(_Strict):
    """The per-token KL to the reference jumps (logged when beta > 0)."""

    action: Action = Field(default="warn", description=ACTION)
    max: float = Field(default=1.0, gt=0, description="Fire when a step's KL (nats per token) is above this.")
    factor: float = Field(default=10.0, gt=1, description="... or above this many times the median of the earlier logged "
                          "steps while above max / 10.")


class ClipBlowup(_Strict):
    """Most tokens are clipped: the policy moved far from the one that sampled (ratio blow-up)."""

    action: Action = Field(default="warn", description=ACTION)
    max: float = Field(default=0.3, gt=0, le=1, description="Fire when clip/low + clip/high (share of tokens), averaged "
                       "over the last `window` logged steps, is above this.")
    window: int = Field(default=2, ge=1, description="Logged steps averaged.")


class ZeroVariance(_Strict):
    """Groups stop carrying a signal: all G rewards of a prompt equal (GRPO)."""

    action: Action = Field(default="warn", description=ACTION)
    max: float = Field(default=0.95, gt=0, le=1, description="Fire when groups/zero_variance averaged over the last "
                       "`window` logged steps is at least this.")
    window: int = Field(default=5, ge=1, description="Logged steps averaged.")


class RewardHacking(_Strict):
    """Reward climbs while held-out accuracy falls."""

    action: Action = Field(default="warn", description=ACTION)
    min_reward_rise: float = Field(default=0.05, gt=0, description="At a held-out eval: mean reward of the last `window` "
                                   "logged steps minus that around the best earlier eval, at least this ...")
    min_accuracy_drop: float = Field(default=0.1, gt=0, description="... while eval/accuracy is at least this much below "
                                     "its best earlier value.")
    window: int = Field(default=5, ge=1, description="Logged steps averaged for the reward.")


class Unparsed(_Strict):
    """Answers stop parsing: share of completions without an answer, per answer-checking reward."""

    action: Action = Field(default="warn", description=ACTION)
    max: float = Field(default=0.5, gt=0, le=1, description="Fire when unparsed/<reward> (math_answer, exact_answer, "
                       "task_verifier: no answer in the text; any other reward with the option `none_as: skip`: "
                       "the share it returned None for), averaged over the last `window` logged steps, is above this.")
    window: int = Field(default=3, ge=1, description="Logged steps averaged.")


class AlarmsSpec(_Strict):
    """Training-health alarms of a grpo or ppo stage, checked on each logged step."""

    entropy_collapse: EntropyCollapse = Field(default_factory=EntropyCollapse, description="Entropy collapse.")
    kl_spike: KLSpike = Field(default_factory=KLSpike, description="KL spike.")
    clip_blowup: ClipBlowup = Field(default_factory=ClipBlowup, description="Ratio/clip blow-up.")
    zero_variance: ZeroVariance = Field(default_factory=ZeroVariance, description="Zero-variance groups.")
    reward_hacking: RewardHacking = Field(default_factory=RewardHacking,
                                          description="Reward up while held-out accuracy goes down.")
    unparsed: Unparsed = Field(default_factory=Unparsed, description="Unparseable answers.")
