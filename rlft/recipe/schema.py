"""The recipe schema: one strict pydantic model per stage kind, and `load_recipe`.

Every key is a schema field with a one-line description; defaults live here and nowhere
else. `extra="forbid"` everywhere, so a typo is an error, never silently ignored. Stages are
named and refer to each other by name (`from:`, `data:`, `teacher:`); `base` is the model
the recipe starts from. Reading YAML with line numbers and reporting every error at once
lives in `rlft/recipe/load.py`; this module only says what a valid recipe is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rlft.recipe.alarm_spec import AlarmsSpec

# \Z, not $: `$` also matches before a trailing newline, which would let "run\n" through.
SAFE_NAME = re.compile(r"^(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")
RESERVED_STAGE_NAMES = {"base"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)


def _source_from_string(value: Any) -> Any:
    return {"source": value} if isinstance(value, str) else value


# --------------------------------------------------------------------------- model, LoRA, data


class TinyOverrides(Strict):
    """Size overrides for a built-in tiny model (`model.name: tiny:<preset>`)."""

    arch: Literal["qwen2", "llama"] | None = Field(default=None, description="Architecture of the tiny model.")
    hidden_size: int | None = Field(default=None, ge=8, description="Hidden size.")
    num_layers: int | None = Field(default=None, ge=1, description="Number of transformer layers.")
    num_heads: int | None = Field(default=None, ge=1, description="Attention heads.")
    num_kv_heads: int | None = Field(default=None, ge=1, description="Key/value heads (grouped-query attention).")
    intermediate_size: int | None = Field(default=None, ge=8, description="MLP width.")
    max_position: int | None = Field(default=None, ge=16, description="Longest sequence the model handles.")
    tokenizer: Literal["byte", "bpe"] | None = Field(
        default=None, description="byte (default): one token per character; bpe: a byte-level BPE trained locally "
        "(multi-character tokens, eos != pad, a chat template without generation markers), real-shaped."
    )


class ModelSpec(Strict):
    """Which causal LM to start from."""

    name: str = Field(
        description="Hub name (Qwen/Qwen2.5-0.5B-Instruct), local directory (relative to the recipe's "
        "directory, else the working directory), or tiny:<preset> (nano, small, student, llama-nano) for "
        "a model rlft builds locally."
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit) to load.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weight dtype; auto = what `precision` needs (float32, bfloat16 for bf16_master)."
    )
    precision: Literal["auto", "fp32", "bf16_autocast", "bf16_master"] = Field(
        default="auto", description="Training numerics: fp32; bf16_autocast (float32 weights, bf16 matmuls under "
        "torch.autocast); bf16_master (bfloat16 weights, float32 master weights and moments in AdamW). "
        "auto = fp32 on CPU, bf16_master on CUDA."
    )
    trust_remote_code: bool = Field(
        default=False, description="Run the model repo's own Python code; needs a 40-hex `revision`."
    )
    tiny: TinyOverrides | None = Field(default=None, description="Size overrides for a tiny:<preset> model.")
    seed: int = Field(default=0, ge=0, lt=2**63, description="Initialisation seed of a tiny:<preset> model.")
    quantize: Literal["none", "4bit", "8bit"] = Field(
        default="none", description="Load the base weights quantized for LoRA through bitsandbytes (QLoRA): 4bit = NF4 "
        "with double quantization and bf16 compute, 8bit = LLM.int8(). Needs CUDA and bitsandbytes; every training "
        "stage must use LoRA. Unverified on GPU by the project's CPU tests."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute each decoder layer in the backward: less activation memory, more compute "
        "(every training stage, RL included; benchmarks/memory.py)."
    )

    @model_validator(mode="after")
    def _remote_code_pinned(self) -> ModelSpec:
        if self.trust_remote_code and not re.fullmatch(r"[0-9a-f]{40}", self.revision or ""):
            raise ValueError(
                "trust_remote_code: true runs code from the model repo; pin it with "
                "`revision: <40-hex commit>`"
            )
        if self.tiny is not None and not self.name.startswith("tiny:"):
            raise ValueError("`tiny:` overrides only apply to a tiny:<preset> model name")
        needs = {"fp32": "float32", "bf16_autocast": "float32", "bf16_master": "bfloat16"}.get(self.precision)
        if needs and self.dtype not in ("auto", needs):
            raise ValueError(f"precision: {self.precision} keeps weights in {needs}, not dtype: {self.dtype}; "
                             f"drop `dtype` or set dtype: {needs}")
        return self


class LoraSpec(Strict):
    """LoRA adapter settings (peft)."""

    r: int = Field(default=16, ge=1, le=1024, description="Adapter rank.")
    alpha: float = Field(default=32.0, gt=0, description="Scaling numerator: the update is scaled by alpha/r.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    targets: list[str] | Literal["all-linear"] = Field(
        default="all-linear", description="Module names to adapt (q_proj, v_proj, ...) or all-linear."
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full beside the adapter (e.g. lm_head)."
    )


LoraOrFull = LoraSpec | Literal["full"]


class DataSpec(Strict):
    """A data set. A plain string is shorthand for `{source: <string>}`."""

    source: str = Field(
        description="tiny:<task> (built-in generator), a .jsonl/.json/.parquet/.csv file (relative to "
        "the recipe), a hub data set name, or the name of an earlier `sample` stage."
    )
    format: Literal["auto", "messages", "prompt_completion", "text"] = Field(
        default="auto", description="Row format; auto detects it from the columns."
    )
    subset: str | None = Field(default=None, description="Hub data set configuration (e.g. main for openai/gsm8k).")
    split: str = Field(default="train", description="Split of the source to train on.")
    eval_split: str | None = Field(default=None, description="Split to hold out for evaluation.")
    eval_size: float | int = Field(
        default=0.1, ge=0, description="Held-out share (<1) or count (>=1) when there is no eval_split."
    )
    num_examples: int | None = Field(default=None, ge=1, description="Cap on rows (tiny:* tasks: rows generated).")
    columns: dict[str, str] = Field(default_factory=dict, description="Rename columns: {source_name: canonical}.")
    system_prompt: str | None = Field(
        default=None, description="System message of every row's prompt, in every stage (a row's own system message wins)."
    )
    max_length: int = Field(default=512, ge=8, description="Longest tokenised row, and longest prompt.")
    long_rows: Literal["error", "drop", "truncate"] = Field(
        default="error", description="What to do with a row (held-out rows too) or prompt longer than max_length; a "
        "prompt is never cut (docs/data.md)."
    )
    max_row_bytes: int = Field(
        default=1_000_000, ge=1, description="Largest row in bytes (as a JSON Lines line); larger rows are refused "
        "before tokenising."
    )
    packing: bool = Field(default=False, description="Pack several short rows into one sequence (SFT).")
    weight: float = Field(default=1.0, gt=0, description="Mixing weight when a stage lists several data sets.")


DataList = Annotated[list[DataSpec], Field(min_length=1)]


class RewardEntry(Strict):
    """A reward function. A plain string is shorthand for `{name: <string>}`."""

    name: str = Field(
        description="Built-in reward name, `package.module:function`, or `path/to/file.py:function`."
    )
    weight: float = Field(default=1.0, description="Weight in the summed reward.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options for the reward.")


class SamplingSpec(Strict):
    """How completions are sampled."""

    temperature: float = Field(default=1.0, ge=0.0, description="0 = greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(default=0, ge=0, description="Keep the k most likely tokens; 0 = off.")
    max_new_tokens: int = Field(default=128, ge=1, description="Longest completion, in tokens.")
    stop: list[str] = Field(default_factory=list, description="Stop strings (kept in the completion).")


class VLLMSpec(Strict):
    """The colocated vLLM engine of GRPO/PPO sampling (`sampling.engine: vllm`; unverified, see README)."""

    gpu_memory_utilization: float = Field(default=0.3, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    sleep: bool = Field(default=True, description="Offload vLLM's weights and free its KV cache while training.")
    dtype: str = Field(default="auto", description="vLLM's weight dtype (auto = the checkpoint's).")
    max_model_len: int | None = Field(default=None, ge=16, description="Longest prompt + completion; default the model's.")


class RolloutSamplingSpec(SamplingSpec):
    """How GRPO/PPO sample their rounds: the built-in sampler or vLLM."""

    engine: Literal["hf", "vllm"] = Field(
        default="hf", description="hf: the built-in KV-cached sampler; vllm: vLLM colocated on the GPU, weights "
        "pushed every round (unverified; needs vllm and CUDA)."
    )
    vllm: VLLMSpec = Field(default_factory=VLLMSpec, description="vLLM engine settings (engine: vllm).")


class GateSpec(Strict):
    """A bound a stage's final held-out metric must meet for later stages to run (exit 4 otherwise)."""

    metric: str = Field(
        description="eval stages: greedy, greedy_ci_low, greedy_ci_high, avg@<k>, pass@<k>; sft and distill: "
        "eval/accuracy or eval/loss; grpo and ppo: eval/accuracy (the stage's last held-out eval)."
    )
    min: float | None = Field(default=None, description="Stop the pipeline when the metric is below this.")
    max: float | None = Field(default=None, description="Stop the pipeline when the metric is above this (e.g. eval/loss).")
    models: list[str] = Field(
        default_factory=list, description="eval stages: the scored stages the gate applies to; empty = every one."
    )

    @model_validator(mode="after")
    def _bounded(self) -> GateSpec:
        if self.min is None and self.max is None:
            raise ValueError("needs min or max (a gate without a bound checks nothing), e.g. `gate: {metric: greedy, min: 0.5}`")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min must be <= max {self.max}, got {self.min}: no value could pass")
        return self


GATE_DESCRIPTION = "Stop the pipeline (exit 4) when this stage's final metric is out of bounds; null = no gate."

# --------------------------------------------------------------------------- stages


class StageBase(Strict):
    from_: str = Field(
        default="base", alias="from", description="Stage whose model this one starts from; base = recipe model."
    )
    lora: LoraOrFull | None = Field(default=None, description="Override the recipe's lora for this stage; full = no adapter.")


class TrainSpec(StageBase):
    lr: float = Field(default=2e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup, in optimizer steps.")
    schedule: Literal["cosine", "linear", "constant"] = Field(default="cosine", description="LR decay after warmup.")
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1, description="Final LR as a share of lr.")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Gradient clipping norm; null = off.")
    save_every: int = Field(default=50, ge=1, description="Checkpoint every this many optimizer steps.")
    keep_last: int = Field(default=2, ge=1, description="Committed checkpoints kept.")
    nan_policy: Literal["skip", "abort"] = Field(
        default="skip", description="On a NaN/Inf loss or gradient: skip the step, or stop the stage."
    )
    max_bad_steps: int = Field(default=10, ge=1, description="Stop after this many skipped steps in a row.")
    log_every: int = Field(
        default=1, ge=1, description="Write a metrics row (metrics.jsonl, TensorBoard) every this many steps; the last step "
        "and steps with a held-out eval are always written."
    )
    eval_every: int = Field(default=0, ge=0, description="Held-out eval every this many steps; 0 = at start and end.")
    eval_samples: int = Field(default=64, ge=1, description="Held-out rows used per eval.")
    gate: GateSpec | None = Field(default=None, description=GATE_DESCRIPTION)

    # YAML gives a list; strict validation (as the loader runs it) accepts only a tuple.
    _betas_tuple = field_validator("adam_betas", mode="before")(lambda v: tuple(v) if isinstance(v, list) else v)


class SFTSpec(TrainSpec):
    """Supervised fine-tuning (cold start, retrain, sequence-level distillation)."""

    kind: Literal["sft"]
    data: DataList = Field(description="Data sets; a `sample` stage name uses its output.")
    epochs: float = Field(default=1.0, gt=0, description="Passes over the training data (ignored if max_steps).")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(default=8, ge=1, description="Sequences per optimizer step.")
    micro_batch_size: int | None = Field(
        default=None, ge=1, description="Sequences per forward pass; must divide batch_size (default: batch_size)."
    )
    eval_max_new_tokens: int = Field(default=128, ge=1, description="Tokens generated per held-out answer.")
    student: ModelSpec | None = Field(
        default=None, description="Train this model from its own weights instead of the `from:` one (e.g. a smaller model)."
    )

    _coerce_data = field_validator("data", mode="before")(
        lambda v: [_source_from_string(x) for x in v] if isinstance(v, list) else [_source_from_string(v)]
    )

    @model_validator(mode="after")
    def _micro_divides(self) -> SFTSpec:
        _check_divides(self.batch_size, self.micro_batch_size)
        return self


class LossSpec(Strict):
    """Policy loss (ALGORITHMS.md sections 1, 3, 4, 5)."""

    aggregate: Literal["sequence", "token", "constant"] = Field(
        default="token", description="sequence (GRPO), token (DAPO) or constant (Dr. GRPO)."
    )
    ratio: Literal["token", "sequence"] = Field(default="token", description="sequence = GSPO's sequence-level ratio.")
    eps_low: float = Field(default=0.2, gt=0, lt=1, description="Lower clip range: ratio >= 1 - eps_low.")
    eps_high: float = Field(default=0.2, gt=0, description="Upper clip range: ratio <= 1 + eps_high (DAPO: 0.28).")
    dual_clip: float | None = Field(default=None, gt=1, description="Dual-clip constant c > 1 for A < 0; null = off.")
    beta: float = Field(default=0.0, ge=0, description="KL coefficient; 0 skips the reference model.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field(default="k3", description="Per-token KL estimator.")
    kl_in: Literal["loss", "reward"] = Field(
        default="loss", description="Put beta*KL in the loss (GRPO) or the reward (PPO; the KL there is k1)."
    )
    importance_sampling_kl: bool = Field(
        default=False, description="Weight the KL estimate by the ratio pi_theta/pi_old (1 on-policy; its gradient counts)."
    )
    mask_truncated: bool = Field(default=False, description="Leave completions cut at max_new_tokens out of the loss.")
    max_len: int | None = Field(default=None, ge=1, description="L_max of the constant aggregation; default max_new_tokens.")
    tis_cap: float | None = Field(
        default=None, ge=1, description="Truncated importance sampling: weight each token's clipped term by "
        "min(exp(old_logp - sampler logp), tis_cap) for a sampler that disagrees with the trainer "
        "(ALGORITHMS.md §10); null = off. Token-level ratio only."
    )

    @model_validator(mode="after")
    def _check_tis(self) -> LossSpec:
        if self.tis_cap is not None and self.ratio == "sequence":
            raise ValueError("tis_cap weights each token; with ratio: sequence (GSPO) leave tis_cap unset")
        return self


class AdvantageSpec(Strict):
    """Advantage estimator (ALGORITHMS.md section 2)."""

    estimator: Literal["grpo", "rloo", "reinforce_pp"] = Field(default="grpo", description="Baseline and normalisation.")
    scale: Literal["group", "batch", "none"] = Field(
        default="group", description="grpo: divide by the group std, the batch std, or not at all (Dr. GRPO)."
    )
    delta: float = Field(default=1e-4, gt=0, description="Added to the std so equal rewards give advantage 0.")


class DynamicSamplingSpec(Strict):
    """DAPO dynamic sampling: drop groups whose rewards are all equal and sample more."""

    enabled: bool = Field(default=False, description="Drop zero-variance groups and refill the batch.")
    max_rounds: int = Field(default=3, ge=1, description="Sampling rounds per step at most.")


class RolloutStageSpec(TrainSpec):
    data: DataList = Field(description="Prompt data sets (with an `answer` column for verifiable rewards).")
    steps: int = Field(default=100, ge=1, description="Generation rounds (each one or more optimizer steps).")
    prompts_per_step: int = Field(default=8, ge=1, description="Prompts B per generation round.")
    micro_batch_size: int = Field(default=8, ge=1, description="Completions per forward/backward pass.")
    sampling: RolloutSamplingSpec = Field(default_factory=RolloutSamplingSpec, description="Sampling of completions.")
    rewards: list[RewardEntry] = Field(min_length=1, description="Reward functions, summed with weights.")
    reward_timeout_s: float = Field(default=10.0, gt=0, description="Per-call timeout of a user reward function.")
    max_reward_error_rate: float = Field(default=0.05, ge=0, le=1, description="Abort above this reward error rate.")
    allow_unsafe_code_exec: bool = Field(
        default=False, description="Run model-written code without namespace isolation (recorded in the manifest)."
    )
    log_samples_every: int = Field(default=10, ge=1, description="Write sample completions every this many steps.")
    alarms: AlarmsSpec = Field(default_factory=AlarmsSpec, description="Training-health alarms checked on each "
                               "logged step (warn, or stop with a checkpoint and exit 4); not an input of the stage.")
    eval_max_new_tokens: int | None = Field(default=None, ge=1, description="Held-out generation length (default sampling's).")
    lr: float = Field(default=1e-5, gt=0, description="Peak learning rate (AdamW).")

    _coerce_data = field_validator("data", mode="before")(
        lambda v: [_source_from_string(x) for x in v] if isinstance(v, list) else [_source_from_string(v)]
    )
    _coerce_rewards = field_validator("rewards", mode="before")(
        lambda v: [{"name": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v
    )


def _check_kl_in_reward(loss: LossSpec) -> None:
    """The KL folded into the reward is always k1 (GRPO and PPO alike): a different estimator
    written beside kl_in: reward would be silently ignored, so it is an error."""
    if loss.kl_in == "reward" and "kl_estimator" in loss.model_fields_set and loss.kl_estimator != "k1":
        raise ValueError(
            "loss must not set kl_estimator with kl_in: reward: the KL in the reward is k1 = logp - ref_logp "
            "(Ziegler et al. 2019); the other estimators apply with kl_in: loss"
        )


class GRPOSpec(RolloutStageSpec):
    """GRPO with verifiable rewards (ALGORITHMS.md sections 1-6)."""

    kind: Literal["grpo"]
    group_size: int = Field(default=8, description="Completions G per prompt; >= 2.")
    mini_batches: int = Field(default=1, ge=1, description="Optimizer steps per generation round.")
    num_iterations: int = Field(default=1, ge=1, description="mu: passes over each generation round.")
    old_logp: Literal["auto", "recompute", "detach", "sampler"] = Field(
        default="auto", description="auto: logp.detach() when fully on-policy, else recompute once before updating; "
        "sampler: the sampler's own log-probs (no forward; equal to recompute to float rounding with the "
        "built-in engine, not with another engine or precision)."
    )
    loss: LossSpec = Field(default_factory=LossSpec, description="Policy loss options.")
    advantage: AdvantageSpec = Field(default_factory=AdvantageSpec, description="Advantage options.")
    dynamic_sampling: DynamicSamplingSpec = Field(default_factory=DynamicSamplingSpec, description="DAPO.")

    @model_validator(mode="after")
    def _check(self) -> GRPOSpec:
        if self.group_size < 2:
            raise ValueError(
                f"group_size must be >= 2, got {self.group_size}; with one sample per prompt every "
                "advantage is 0 (use kind: ppo for a critic baseline)"
            )
        off_policy = self.num_iterations > 1 or self.mini_batches > 1
        if self.old_logp == "detach" and off_policy:
            raise ValueError(
                "old_logp: detach is only exact when fully on-policy; with num_iterations > 1 or "
                "mini_batches > 1 use old_logp: recompute (or auto)"
            )
        if self.old_logp == "sampler" and self.loss.tis_cap is not None:
            raise ValueError("loss.tis_cap corrects for a sampler that differs from pi_old; with old_logp: sampler "
                             "the two are the same and every weight is 1: drop one of them")
        if (self.prompts_per_step * self.group_size) % self.mini_batches:
            raise ValueError(
                f"prompts_per_step*group_size = {self.prompts_per_step * self.group_size} completions "
                f"must split evenly into mini_batches = {self.mini_batches}"
            )
        _check_kl_in_reward(self.loss)
        return self


class PPOSpec(RolloutStageSpec):
    """PPO with a critic: value head, GAE, KL in the reward (ALGORITHMS.md sections 1-3)."""

    kind: Literal["ppo"]
    group_size: int = Field(default=1, ge=1, description="Completions per prompt (a critic needs no groups).")
    ppo_epochs: int = Field(default=4, ge=1, description="Passes over each rollout batch.")
    mini_batches: int = Field(default=1, ge=1, description="Optimizer steps per pass.")
    critic: Literal["shared", "separate"] = Field(
        default="shared", description="Value head on the policy's trunk (one forward), or its own model copy with its own LoRA."
    )
    gamma: float = Field(default=1.0, ge=0, le=1, description="Discount.")
    lam: float = Field(default=0.95, ge=0, le=1, description="GAE lambda.")
    value_coef: float = Field(default=0.1, ge=0, description="Weight of the value loss.")
    value_clip: float = Field(default=0.2, gt=0, description="Clip range eps_v of the value loss.")
    critic_lr: float | None = Field(
        default=None, gt=0, description="Peak LR of the critic's parameters (same schedule as lr); null = lr."
    )
    kl_target: float | None = Field(
        default=None, gt=0, description="Adaptive KL controller target (per-sequence KL); null = fixed beta."
    )
    kl_horizon: int = Field(default=10000, ge=1, description="Adaptive KL controller horizon, in completions.")
    early_stop_kl: float | None = Field(
        default=None, gt=0, description="Stop a round's epochs when an epoch's approx KL to the rollout policy exceeds this."
    )
    loss: LossSpec = Field(
        default_factory=lambda: LossSpec(kl_in="reward", beta=0.05),
        description="Policy loss; keys not given take PPO's defaults (kl_in: reward, beta: 0.05).",
    )
    reward_model: str | None = Field(
        default=None, description="Initialise the critic from this reward model (AutoModelForSequenceClassification "
        "directory relative to the recipe, or hub name): its score head, and its trunk for critic: separate."
    )

    _ppo_loss_defaults = field_validator("loss", mode="before")(
        lambda v: {"kl_in": "reward", "beta": 0.05, **v} if isinstance(v, dict) else v
    )

    @model_validator(mode="after")
    def _check(self) -> PPOSpec:
        n = self.prompts_per_step * self.group_size
        if n % self.mini_batches:
            raise ValueError(
                f"mini_batches must split prompts_per_step*group_size = {n} completions evenly, got {self.mini_batches}"
            )
        if self.kl_target is not None and self.loss.beta == 0:
            raise ValueError(
                "kl_target must start from loss.beta > 0: the controller scales beta, so from 0 it stays 0; "
                "set loss.beta (e.g. 0.05) or drop kl_target"
            )
        if self.loss.ratio == "sequence":
            raise ValueError(
                "loss must use ratio: token; GSPO's sequence ratio needs one advantage per completion, and "
                "PPO's GAE advantages are per token"
            )
        _check_kl_in_reward(self.loss)
        return self


class SampleSpec(StageBase):
    """Rejection sampling: generate K completions per prompt and keep the good ones."""

    kind: Literal["sample"]
    data: DataList = Field(description="Prompt data sets.")
    per_prompt: int = Field(default=8, ge=1, description="Completions K per prompt.")
    keep: Literal["correct", "best", "all"] = Field(
        default="correct", description="correct: reward >= threshold; best: the top one if it passes; all."
    )
    threshold: float = Field(default=1.0, description="Minimum summed reward of a kept completion.")
    max_per_prompt: int | None = Field(default=1, ge=1, description="Keep at most M per prompt; null = all that pass.")
    dedup: bool = Field(default=True, description="Drop identical completions of the same prompt.")
    min_chars: int = Field(default=1, ge=0, description="Shortest completion kept, in characters.")
    max_chars: int | None = Field(default=None, ge=1, description="Longest completion kept, in characters.")
    rewards: list[RewardEntry] = Field(min_length=1, description="Verifiers scoring each completion.")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="Sampling of completions.")
    batch_size: int = Field(default=16, ge=1, description="Prompts per generation batch.")
    shard_size: int = Field(default=64, ge=1, description="Prompts per committed output shard.")
    mix: list[DataSpec] = Field(default_factory=list, description="Other SFT data mixed into the output.")
    reward_timeout_s: float = Field(default=10.0, gt=0, description="Per-call timeout of a user reward function.")
    max_reward_error_rate: float = Field(default=0.05, ge=0, le=1, description="Abort above this reward error rate.")
    allow_unsafe_code_exec: bool = Field(default=False, description="Run model-written code without isolation.")

    _coerce_data = field_validator("data", "mix", mode="before")(
        lambda v: [_source_from_string(x) for x in v] if isinstance(v, list) else [_source_from_string(v)]
    )
    _coerce_rewards = field_validator("rewards", mode="before")(
        lambda v: [{"name": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v
    )


class DistillSpec(SFTSpec):
    """Distil a teacher stage's model into a (smaller) student (ALGORITHMS.md section 7)."""

    kind: Literal["distill"]  # type: ignore[assignment]
    teacher: str = Field(description="Stage whose model teaches.")
    student: ModelSpec = Field(  # pyright: ignore[reportIncompatibleVariableOverride]  (required here)
        description="The student model (from: is ignored; the student starts fresh)."
    )
    mode: Literal["sequence", "logits", "on_policy"] = Field(
        default="sequence", description="sequence: SFT on teacher text; logits: per-token KL/JSD; on_policy: GKD."
    )
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(default="forward_kl", description="Logit-level divergence.")
    beta: float = Field(default=0.5, gt=0, lt=1, description="JSD weight beta in (0, 1).")
    temperature: float = Field(default=1.0, gt=0, description="Distillation temperature T (loss scaled by T^2).")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="Teacher/student sampling.")


class EvalSpec(Strict):
    """Score stages' models on held-out prompts with a verifier."""

    kind: Literal["eval"]
    models: list[str] = Field(default_factory=list, description="Stages to score; empty = every earlier model stage.")
    data: DataList = Field(description="Held-out prompt data sets.")
    k: int = Field(default=4, ge=1, description="Samples per prompt for avg@k and pass@k.")
    greedy: bool = Field(default=True, description="Also report greedy accuracy.")
    num_prompts: int | None = Field(default=None, ge=1, description="Cap on held-out prompts.")
    rewards: list[RewardEntry] = Field(
        default_factory=lambda: [RewardEntry(name="math_answer")], description="Verifier; correct = reward >= 1."
    )
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="Sampling for avg@k/pass@k.")
    gate: GateSpec | None = Field(default=None, description=GATE_DESCRIPTION)

    _coerce_data = field_validator("data", mode="before")(
        lambda v: [_source_from_string(x) for x in v] if isinstance(v, list) else [_source_from_string(v)]
    )
    _coerce_rewards = field_validator("rewards", mode="before")(
        lambda v: [{"name": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v
    )


StageSpec = Annotated[
    SFTSpec | GRPOSpec | PPOSpec | SampleSpec | DistillSpec | EvalSpec, Field(discriminator="kind")
]
STAGE_KINDS = ("sft", "grpo", "ppo", "sample", "distill", "eval")


def _check_divides(batch: int, micro: int | None) -> None:
    if micro is not None and batch % micro:
        raise ValueError(f"micro_batch_size {micro} must divide batch_size {batch}")


# --------------------------------------------------------------------------- several processes


class DistributedSpec(Strict):
    """How training stages split over several processes (torchrun, `rlft run --nproc N`); one process ignores it."""

    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp", description="ddp: every rank holds the whole model and optimizer, gradients are summed over "
        "ranks once per step (the default: right for LoRA, whose trained weights are small). fsdp: FSDP2 fully_shard "
        "per decoder layer, each rank holds 1/N of the weights, gradients and AdamW state (full fine-tuning of "
        "models too large to replicate; with LoRA the frozen base is sharded too); grpo, ppo and distill on_policy "
        "gather the whole policy on every rank for sampling and each optimizer step, grpo and ppo sample with the "
        "built-in engine; no quantized models (docs/distributed.md)."
    )


# --------------------------------------------------------------------------- the recipe


class Recipe(Strict):
    """A recipe: the model to start from, LoRA defaults, and named stages run in order."""

    run_name: str = Field(default="run", description="Run directory name under output_dir.")
    output_dir: str = Field(
        default="runs", description="Where run directories go: relative to the working directory; ~ is the home directory."
    )
    seed: int = Field(default=0, ge=0, lt=2**53, description="Seed for data order, sampling and dropout (stage seeds derive from it).")
    data_root: str | None = Field(
        default=None, description="Confine local data files to this directory (relative to the recipe's; `.` = the "
        "recipe's directory): a file that resolves outside it, symlinks followed, is refused. Unset: data "
        "files may be anywhere."
    )
    model: ModelSpec = Field(description="The base model.")
    lora: LoraOrFull = Field(default_factory=LoraSpec, description="LoRA defaults for every stage; full = no adapter.")
    stages: dict[str, StageSpec] = Field(min_length=1, description="Named stages, run in the order written.")
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="Several processes: the data-parallel strategy of training stages."
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Metric loggers beside metrics.jsonl; wandb and mlflow "
        "are optional extras (pip install 'rlft[wandb]' / 'rlft[mlflow]'), configured by their environment variables."
    )

    @field_validator("run_name")
    @classmethod
    def _safe_run_name(cls, v: str) -> str:
        if not SAFE_NAME.match(v):
            raise ValueError(
                f"{v!r} is not a safe directory name: use at most 64 letters, digits, '_', '-' or '.', "
                "not starting with '.' or '-', without '..'"
            )
        return v

    @field_validator("output_dir")
    @classmethod
    def _no_parent_dirs(cls, v: str) -> str:
        if ".." in Path(v).parts or "\x00" in v or "\n" in v:
            raise ValueError("must not contain '..', NUL or a newline")
        return v

    # mode="after": a bad name must not hide the errors inside the stages (the loader reports
    # each bad name at its line itself).
    @field_validator("stages", mode="after")
    @classmethod
    def _stage_names(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for name in v:
                if not isinstance(name, str) or not SAFE_NAME.match(name) or name in RESERVED_STAGE_NAMES:
                    raise ValueError(
                        f"stage name {name!r}: use letters, digits, '_', '-' or '.' (not 'base')"
                    )
        return v


def stage_refs(name: str, spec: Any) -> list[tuple[str, str]]:
    """Every (dotted key, stage name) a stage refers to, for the graph check."""
    refs = [(f"stages.{name}.from", spec.from_)] if hasattr(spec, "from_") else []
    if isinstance(spec, DistillSpec):
        refs.append((f"stages.{name}.teacher", spec.teacher))
    if isinstance(spec, EvalSpec):
        refs += [(f"stages.{name}.models.{i}", m) for i, m in enumerate(spec.models)]
    return refs
