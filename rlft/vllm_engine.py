"""Sampling GRPO/PPO rounds with vLLM (`sampling.engine: vllm`), colocated in the training process.

UNVERIFIED: written against vLLM's documented offline API (`vllm.LLM`, `SamplingParams`,
`LoRARequest`, `LLM.sleep`/`wake_up`, `LLM.apply_model`) and tested here only against a fake
engine object (tests/test_vllm_engine.py); it has not run on a GPU with vLLM installed.

One round, as the RL stages drive it:
1. `sync(policy, step)`: the policy's current weights reach the engine. LoRA: the adapter is
   saved (safetensors) to `<scratch>/round-<step>` and used as a new `LoRARequest` (ids increase,
   so vLLM never serves a stale adapter); full fine-tuning: every tensor is loaded into the
   engine's model with its `load_weights`.
2. `generate(...)`: G completions per prompt, one request per prompt with its own seed, sampled
   tokens' log-probs recorded (`logprobs=0`, `logprobs_mode="processed_logprobs"`: after
   temperature). Returned as `rollout.Rollouts`, the same rows the built-in engine gives.
3. `sleep()`: with `vllm.sleep: true` the engine offloads its weights and frees its KV cache while
   the trainer runs; `sync` wakes it first.

On several processes (torchrun, strategy ddp) every rank runs its own engine on its own GPU
(`distributed_executor_backend="external_launcher"`, tensor parallel size 1; every rank builds
its engine at the same point of the stage), holds the full policy, pushes it to its engine and
samples its share of the round's prompts (rlft/rl/shard.py), one `generate` call a round; the seed of prompt b comes from prompt b's own generator,
so a prompt gets the same seed on any number of ranks. A rank > 0 keeps its adapters in its
scratch directory.

vLLM samples with its own kernels and precision, so its log-probs differ from the trainer's: the
learner reports the difference (`mismatch/kl`, `mismatch/ratio_max`) and `loss.tis_cap` corrects
for it (ALGORITHMS.md §10).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlft.errors import UserInputError
from rlft.rollout import Rollouts, SamplingParams


@dataclass(frozen=True)
class EngineSettings:
    """What the engine is built with (the recipe's `sampling.vllm`, the model and the LoRA rank)."""

    model: str  # a local directory or hub name of the base model
    lora_rank: int | None  # None = full fine-tuning
    gpu_memory_utilization: float = 0.3
    sleep: bool = True
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    external_launcher: bool = False  # True under torchrun with several processes: one engine per rank


def make_llm(settings: EngineSettings) -> Any:
    """The colocated `vllm.LLM` (raises a UserInputError when vLLM or a GPU is missing)."""
    try:
        from vllm import LLM
    except ImportError:
        raise UserInputError(
            "sampling.engine: vllm needs the vllm package on a CUDA machine (pip install vllm); "
            "use sampling.engine: hf (the built-in sampler) elsewhere") from None
    if not torch.cuda.is_available():
        raise UserInputError("sampling.engine: vllm needs a CUDA GPU; use sampling.engine: hf on this machine")
    kwargs: dict[str, Any] = {
        "model": settings.model, "dtype": settings.dtype, "seed": settings.seed,
        "gpu_memory_utilization": settings.gpu_memory_utilization, "enable_sleep_mode": settings.sleep,
        "logprobs_mode": "processed_logprobs",
    }
    if settings.max_model_len is not None:
        kwargs["max_model_len"] = settings.max_model_len
    if settings.external_launcher:  # one engine per torchrun rank, on that rank's GPU
        kwargs["distributed_executor_backend"] = "external_launcher"
    if settings.lora_rank is not None:
        kwargs |= {"enable_lora": True, "max_lora_rank": settings.lora_rank, "max_loras": 1}
    return LLM(**kwargs)


def _vllm_sampling(sampling: SamplingParams, n: int, seed: int) -> Any:
    from vllm import SamplingParams as VLLMSampling

    return VLLMSampling(
        n=n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k if sampling.top_k else -1,
        max_tokens=sampling.max_new_tokens, stop=list(sampling.stop) or None, include_stop_str_in_output=True,
        logprobs=0, seed=seed,
    )


def _lora_request(name: str, lora_id: int, path: str) -> Any:
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, lora_id, path)


class VLLMEngine:
    """The vLLM side of GRPO/PPO sampling. `llm`, `sampling_factory` and `lora_factory` are
    seams for tests (a fake engine); the defaults build the real vLLM objects."""

    def __init__(self, settings: EngineSettings, scratch: Path, llm: Any = None,
                 sampling_factory: Callable[[SamplingParams, int, int], Any] | None = None,
                 lora_factory: Callable[[str, int, str], Any] | None = None):
        self.settings, self.scratch = settings, scratch
        self.llm = llm if llm is not None else make_llm(settings)
        self.sampling_factory = sampling_factory or _vllm_sampling
        self.lora_factory = lora_factory or _lora_request
        self.lora: Any = None
        self.lora_id = 0
        self.asleep = False

    def sync(self, policy: Any, step: int) -> None:
        """Wake the engine and give it the policy's weights of generation round `step`."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        if self.settings.lora_rank is not None:
            self._push_adapter(policy, step)
        else:
            self._push_full(policy)

    def _push_adapter(self, policy: Any, step: int) -> None:
        path = self.scratch / f"round-{step}"
        if path.exists():
            shutil.rmtree(path)
        policy.save_pretrained(path, safe_serialization=True)
        self.lora_id += 1
        self.lora = self.lora_factory(f"round-{step}", self.lora_id, str(path))
        old = self.scratch / f"round-{step - 1}"
        if old.exists():  # the engine has loaded the newer one by id; keep one adapter on disk
            shutil.rmtree(old, ignore_errors=True)

    def _push_full(self, policy: Any) -> None:
        weights = [(name, t.detach()) for name, t in policy.state_dict().items()]

        def load(model: Any) -> None:
            model.load_weights(weights)

        apply_model = getattr(self.llm, "apply_model", None)
        if apply_model is None:
            raise UserInputError("this vLLM has no LLM.apply_model to push full fine-tuning weights; "
                                 "use LoRA (lora: {r: ...}) or a newer vLLM")
        apply_model(load)

    def generate(self, tokenizer: Any, prompt_ids: list[list[int]], sampling: SamplingParams, group_size: int,
                 generators: list[torch.Generator], device: torch.device) -> Rollouts:
        """G completions for each prompt as `rollout.Rollouts` (rows b*G + g), log-probs recorded;
        prompt b's request seed is drawn from `generators[b]`."""
        if len(generators) != len(prompt_ids):
            raise ValueError(f"{len(generators)} generators for {len(prompt_ids)} prompts")
        seeds = [int(torch.randint(0, 2**31 - 1, (1,), generator=g)) for g in generators]
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        params = [self.sampling_factory(sampling, group_size, s) for s in seeds]
        outputs = self.llm.generate(prompts, params, lora_request=self.lora, use_tqdm=False)
        rows = []
        for b, request in enumerate(outputs):
            if len(request.outputs) != group_size:
                raise RuntimeError(f"vLLM returned {len(request.outputs)} completions for prompt {b}, asked {group_size}")
            rows += [(b, c) for c in request.outputs]
        return _rollouts(rows, prompt_ids, tokenizer, device)

    def sleep(self) -> None:
        """Free the engine's GPU memory while the trainer runs (`vllm.sleep`)."""
        if self.settings.sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def _token_logprob(entry: Any, token: int) -> float:
    """The sampled token's log-prob from one position of a vLLM `CompletionOutput.logprobs`."""
    value = entry[token]
    return float(getattr(value, "logprob", value))


def _rollouts(rows: list[tuple[int, Any]], prompt_ids: list[list[int]], tokenizer: Any, device: torch.device) -> Rollouts:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n = len(rows)
    P = max(len(p) for p in prompt_ids)
    T = max(1, max(len(c.token_ids) for _, c in rows))
    p_ids = torch.full((n, P), pad, dtype=torch.long)
    p_mask = torch.zeros((n, P), dtype=torch.long)
    c_ids = torch.full((n, T), pad, dtype=torch.long)
    c_mask = torch.zeros((n, T), dtype=torch.long)
    logp = torch.zeros((n, T), dtype=torch.float32)
    truncated = torch.zeros(n, dtype=torch.bool)
    for i, (b, c) in enumerate(rows):
        prompt, tokens = prompt_ids[b], list(c.token_ids)
        p_ids[i, P - len(prompt):] = torch.tensor(prompt)
        p_mask[i, P - len(prompt):] = 1
        if tokens:
            c_ids[i, : len(tokens)] = torch.tensor(tokens)
            c_mask[i, : len(tokens)] = 1
            if c.logprobs is None or len(c.logprobs) != len(tokens):
                raise RuntimeError("vLLM returned no log-prob for some sampled tokens (logprobs=0 was asked)")
            logp[i, : len(tokens)] = torch.tensor([_token_logprob(e, t) for e, t in zip(c.logprobs, tokens, strict=True)])
        truncated[i] = c.finish_reason == "length"
    group_index = torch.tensor([b for b, _ in rows], dtype=torch.long)
    return Rollouts(p_ids.to(device), p_mask.to(device), c_ids.to(device), c_mask.to(device), logp.to(device),
                    truncated.to(device), [str(c.text) for _, c in rows], group_index.to(device))
