# pyright: strict, reportUnknownMemberType=false, reportUnknownArgumentType=false, reportUnknownVariableType=false
"""The critic of PPO: a value head V_t on a transformer trunk (ALGORITHMS.md §2, "PPO with a critic").

    V_t = w . h_t + b        h_t: last hidden state (after the final norm) at position P-1+t

V_t is the value of the state before completion token t: it is read at the position whose logits
predict token t, so V_t and logp_t come from the same position of the same forward.

- `shared`: the head sits on the policy's own LoRA-adapted trunk. h is captured by a forward
  hook on the decoder during the policy forward that gives the logits: one forward for both.
- `separate`: its own copy of the parent model with its own LoRA adapter (or fully trained with
  `lora: full`) and a head; its forward stops at the trunk (no LM head).

Both run the training-time forward of `rollout.completion_logprobs` (distinct prompts once,
length buckets; ALGORITHMS.md §9): h is read only at the positions that predict completion tokens.

The head is float32 whatever the trunk's dtype, initialised to 0 (V = 0 until it learns), or
from a reward model (AutoModelForSequenceClassification): its score head always, its trunk too
for a separate critic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import safetensors.torch
import torch
from torch import Tensor

from rlft import rollout
from rlft.errors import CheckpointError, UserInputError
from rlft.models import attach_lora, dropout_free_mode, is_lora, load_model, trainable_named_params

if TYPE_CHECKING:
    from rlft.recipe.schema import LoraOrFull, ModelSpec

CriticKind = Literal["shared", "separate"]


@dataclass(frozen=True)
class Evaluation:
    """One forward over a batch: policy log-probs, entropy (a metric, no graph) and values; (N, T)
    each, 0 where the completion mask is 0."""

    logp: Tensor
    entropy: Tensor
    values: Tensor


@dataclass(frozen=True)
class Critic:
    """A value head, on the policy's trunk (`trunk` None) or on its own model (`trunk`)."""

    head: torch.nn.Linear
    trunk: Any | None = None

    @property
    def kind(self) -> CriticKind:
        return "shared" if self.trunk is None else "separate"

    def named_params(self) -> dict[str, torch.nn.Parameter]:
        """The critic's trainable parameters by stable name (head, and a separate trunk's adapter)."""
        out = {f"head.{n}": p for n, p in self.head.named_parameters()}
        if self.trunk is not None:
            out |= {f"trunk.{n}": p for n, p in trainable_named_params(self.trunk).items()}
        return out

    def evaluate(self, policy: Any, tensors: tuple[Tensor, ...], temperature: float) -> Evaluation:
        """logp, entropy and V for one micro-batch (prompt_ids, prompt_mask, completion_ids, mask).

        Carries a graph when grad is enabled; call under torch.no_grad() for old_logp/old values.
        """
        if self.trunk is None:  # one forward: the decoder's hidden states feed the head
            logp, ent, hidden = rollout.completion_logprobs(policy, tensors, temperature, with_entropy=True,
                                                            hidden_of=decoder(policy))
        else:
            logp, ent = rollout.completion_logprobs(policy, tensors, temperature, with_entropy=True)
            hidden = rollout.completion_hidden(decoder(self.trunk), tensors)
        values = self.head(hidden.float()).squeeze(-1)  # (N, T): V_t from h at position P-1+t
        return Evaluation(logp, ent, torch.where(tensors[3].bool(), values, 0.0))

    def state_tensors(self) -> dict[str, Tensor]:
        """Detached trainable tensors for a checkpoint's `critic` group."""
        return {n: p.detach() for n, p in self.named_params().items()}

    def load_state_tensors(self, tensors: dict[str, Tensor], where: str) -> None:
        """Put a checkpoint's `critic` group back (bitwise).

        Raises:
            CheckpointError: the saved names differ from this critic's (changed critic or LoRA).
        """
        params = self.named_params()
        if set(params) != set(tensors):
            diff = sorted(set(params) ^ set(tensors))[:5]
            raise CheckpointError(f"{where}: critic parameters differ from the checkpoint's: {diff}; "
                                  "was `critic:` or the LoRA setting changed? Start the stage again.")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])

    def save(self, out_dir: Path, reward_model: str | None = None) -> None:
        """Write `value_head.safetensors`, `critic.json` and, for a separate critic, its `adapter/`
        (LoRA) or `model/` (full) into `out_dir`."""
        out_dir.mkdir(parents=True, exist_ok=True)
        head = {k: v.detach().contiguous() for k, v in self.head.state_dict().items()}
        safetensors.torch.save_file(head, str(out_dir / "value_head.safetensors"))
        info = {"kind": self.kind, "hidden_size": self.head.in_features, "reward_model": reward_model,
                "value": "V_t = weight . h_t + bias, h_t = last hidden state at position P-1+t"}
        (out_dir / "critic.json").write_text(json.dumps(info, indent=1))
        if self.trunk is not None:
            self.trunk.save_pretrained(out_dir / ("adapter" if is_lora(self.trunk) else "model"),
                                       safe_serialization=True)


def decoder(model: Any) -> Any:
    """The trunk of a causal LM (plain or peft-wrapped): the module whose output is the last hidden state."""
    base = model.get_base_model() if is_lora(model) else model
    get = getattr(base, "get_decoder", None)
    trunk = get() if get is not None else None
    if trunk is None:
        raise UserInputError(f"critic: {type(base).__name__} exposes no decoder trunk (get_decoder) for a value head")
    return trunk


def hidden_size(model: Any) -> int:
    """Width of the model's last hidden state."""
    config = model.get_base_model().config if is_lora(model) else model.config
    size = getattr(config, "hidden_size", None)
    return int(size) if size is not None else int(model.get_input_embeddings().embedding_dim)


def build_critic(
    kind: CriticKind, policy: Any, parent: str, model_spec: ModelSpec, lora: LoraOrFull, seed: int,
    reward_model: RewardModel | None = None,
) -> Critic:
    """A critic for `policy`: a zero value head, on the policy's trunk or on a fresh copy of `parent`.

    Args:
        kind: "shared" or "separate".
        policy: the (LoRA) policy; the head's width and device follow it.
        parent: where the policy was loaded from (a separate critic starts from the same weights).
        model_spec: the recipe's ModelSpec (dtype).
        lora: the stage's LoRA setting (LoraSpec, or "full") for a separate critic's trunk.
        seed: seeds the separate critic's adapter initialisation.
        reward_model: a loaded reward model (`load_reward_model`) to initialise from, or None.

    Returns:
        The critic; its trunk (separate) is in eval mode (no dropout in RL).

    Raises:
        UserInputError: the reward model does not fit the policy (width) or the parent (trunk).
    """
    dev = next(policy.parameters()).device
    head = torch.nn.Linear(hidden_size(policy), 1, dtype=torch.float32, device=dev)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    trunk = None
    if kind == "separate":
        trunk = load_model(parent, model_spec, dev)
        if reward_model is not None:
            _copy_trunk(reward_model, trunk)
        torch.manual_seed(seed + 7919)  # its own adapter init, not a copy of the policy's
        trunk = trunk.requires_grad_(True) if lora == "full" else attach_lora(trunk, lora)
        dropout_free_mode(trunk)
    if reward_model is not None:
        _copy_head(reward_model, head)
    return Critic(head, trunk)


# --------------------------------------------------------------------------- reward model


@dataclass(frozen=True)
class RewardModel:
    """A loaded reward model: the AutoModelForSequenceClassification, where it came from, and the
    recipe key that named it (for error messages)."""

    model: Any
    source: str
    key: str


def resolve_reward_model(name: str, base_dir: Path, key: str) -> str:
    """Where `reward_model:` loads from: a local model directory (relative to the recipe) or a hub name.

    Checked before any model loads, so a typo fails at once.

    Raises:
        UserInputError: a path that does not exist, or a directory that is not a model.
    """
    path = Path(name).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserInputError(f"{key}: {path} is not a model directory (no config.json); point it at a "
                                 "directory written by save_pretrained of an AutoModelForSequenceClassification")
        return str(path)
    if path.exists():
        raise UserInputError(f"{key}: {path} is a file; point it at a model directory (config.json + weights)")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise UserInputError(f"{key}: directory not found: {name} (looked at {path}; relative paths start at the "
                             "recipe's directory)")
    return name  # a hub name: `load_reward_model` reports it when it cannot be loaded


def load_reward_model(source: str, model_spec: ModelSpec, dev: torch.device, key: str) -> RewardModel:
    """An AutoModelForSequenceClassification with one trained output, to initialise a critic from.

    Raises:
        UserInputError: cannot be loaded, has more than one label, or its score head is untrained.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from rlft.models import resolve_dtype

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report would list the head we check ourselves below
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, dtype=resolve_dtype(model_spec.dtype, dev), output_loading_info=True)
    except (OSError, ValueError, KeyError) as err:
        raise UserInputError(
            f"{key}: cannot load a reward model (AutoModelForSequenceClassification) from {source!r}: {err}; "
            "give a local directory (relative to the recipe) or a hub name available offline") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    name, head = score_head(model, key)
    untrained = [k for k in info.get("missing_keys", []) if k.split(".")[0] == name]
    if untrained:
        raise UserInputError(f"{key}: {source} has no trained score head ({', '.join(sorted(untrained))} missing "
                             "from its weights): it is not a reward model")
    if head.out_features != 1:
        raise UserInputError(f"{key}: {source} has {head.out_features} output labels; a critic needs a reward "
                             "model with one scalar output (num_labels: 1)")
    return RewardModel(model.to(dev).eval(), source, key)


def score_head(model: Any, key: str) -> tuple[str, torch.nn.Linear]:
    """The classification head of a sequence-classification model: its one top-level Linear
    beside the trunk (`score` for Qwen2/Llama, `classifier` for others)."""
    heads = [(n, m) for n, m in model.named_children()
             if n != model.base_model_prefix and isinstance(m, torch.nn.Linear)]
    if len(heads) != 1:
        raise UserInputError(f"{key}: cannot find the score head of {type(model).__name__} "
                             f"(top-level Linear layers: {[n for n, _ in heads]})")
    return heads[0]


def _copy_head(rm: RewardModel, head: torch.nn.Linear) -> None:
    _, score = score_head(rm.model, rm.key)
    if score.in_features != head.in_features:
        raise UserInputError(
            f"{rm.key}: the score head of {rm.source} reads hidden states of width {score.in_features}, the "
            f"policy's are {head.in_features}; use a reward model of the policy's size or `critic: separate`")
    with torch.no_grad():
        head.weight.copy_(score.weight.float())
        head.bias.copy_(score.bias.float() if score.bias is not None else torch.zeros_like(head.bias))  # pyright: ignore[reportUnnecessaryComparison]  (bias=False: None)


def _copy_trunk(rm: RewardModel, trunk_model: Any) -> None:
    """Load the reward model's trunk weights into a separate critic's trunk (before LoRA)."""
    source = rm.model.base_model.state_dict()
    target = decoder(trunk_model).state_dict()
    if set(source) != set(target):
        diff = sorted(set(source) ^ set(target))[:3]
        raise UserInputError(f"{rm.key}: the trunk of {rm.source} does not match the parent model's (differing "
                             f"weights: {diff}); a separate critic needs a reward model of the same architecture")
    bad = [k for k in source if source[k].shape != target[k].shape]
    if bad:
        k = bad[0]
        raise UserInputError(f"{rm.key}: the trunk of {rm.source} does not match the parent model's ({k}: "
                             f"{tuple(source[k].shape)} vs {tuple(target[k].shape)}); use a reward model "
                             "of the same size")
    decoder(trunk_model).load_state_dict(source)
