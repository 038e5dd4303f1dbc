"""Our side of the vLLM engine (`sampling.engine: vllm`), against a fake `vllm.LLM`.

The fake samples with the built-in engine on a copy of the model it was built from, with the
LoRA adapter of the request loaded from disk, or with the weights pushed through `apply_model`:
so a weight push that does not reach the engine shows up as a sampler/trainer mismatch. The
real engine is tested only on a GPU (`gpu` mark)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from rlft import rollout, vllm_engine
from rlft.rl import shard
from rlft.vllm_engine import EngineSettings, VLLMEngine
from tests.helpers import metrics, write_recipe
from tests.test_stage_grpo import grpo_recipe


class FakeLLM:
    """Just the parts of `vllm.LLM` rlft uses, backed by the built-in sampler."""

    def __init__(self, settings: EngineSettings, ignore_lora: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.settings, self.ignore_lora = settings, ignore_lora
        self.model = AutoModelForCausalLM.from_pretrained(settings.model).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model)
        self.calls: list[tuple[Any, ...]] = []
        self.seen: list[tuple[list[list[int]], list[int]]] = []  # (prompts, seeds) of each generate call

    def generate(self, prompts: list[dict], params: list[dict], lora_request: Any = None, use_tqdm: bool = True):
        self.calls.append(("generate", None if lora_request is None else lora_request.lora_int_id))
        self.seen.append(([p["prompt_token_ids"] for p in prompts], [p["seed"] for p in params]))
        model = self.model
        if lora_request is not None and not self.ignore_lora:
            from peft import PeftModel

            model = PeftModel.from_pretrained(copy.deepcopy(self.model), lora_request.lora_path).eval()
        out = []
        for prompt, p in zip(prompts, params, strict=True):
            sampling = rollout.SamplingParams(temperature=p["temperature"], top_p=p["top_p"], top_k=max(p["top_k"], 0),
                                              max_new_tokens=p["max_tokens"], stop=tuple(p["stop"] or ()))
            r = rollout.generate(model, self.tokenizer, [prompt["prompt_token_ids"]], sampling, p["n"],
                                 torch.Generator().manual_seed(p["seed"]))
            completions = []
            for g in range(p["n"]):
                ids = r.completion_ids[g, : int(r.completion_mask[g].sum())].tolist()
                lps = [{t: SimpleNamespace(logprob=float(r.sample_logp[g, j]))} for j, t in enumerate(ids)]
                completions.append(SimpleNamespace(token_ids=ids, logprobs=lps, text=r.texts[g],
                                                   finish_reason="length" if bool(r.truncated[g]) else "stop"))
            out.append(SimpleNamespace(outputs=completions))
        return out

    def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self) -> None:
        self.calls.append(("wake_up",))

    def apply_model(self, fn: Any) -> None:
        self.calls.append(("apply_model",))
        fn(self)

    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        self.model.load_state_dict(dict(weights))


def fake_sampling(sampling: rollout.SamplingParams, n: int, seed: int) -> dict[str, Any]:
    return {"n": n, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k else -1, "max_tokens": sampling.max_new_tokens,
            "stop": list(sampling.stop) or None, "seed": seed}


def fake_lora(name: str, lora_id: int, path: str) -> SimpleNamespace:
    return SimpleNamespace(lora_name=name, lora_int_id=lora_id, lora_path=path)


@pytest.fixture
def fake_vllm(monkeypatch):
    """Route the engine to FakeLLM; returns the list of fakes made (one per stage run)."""
    made: list[FakeLLM] = []
    options: dict[str, Any] = {}

    def make(settings: EngineSettings) -> FakeLLM:
        made.append(FakeLLM(settings, **options))
        return made[-1]

    monkeypatch.setattr(vllm_engine, "make_llm", make)
    monkeypatch.setattr(vllm_engine, "_vllm_sampling", fake_sampling)
    monkeypatch.setattr(vllm_engine, "_lora_request", fake_lora)
    return SimpleNamespace(made=made, options=options)


def _run(tmp_path: Path, **rl: Any) -> list[dict[str, Any]]:
    from rlft.cli import main

    recipe = grpo_recipe(tmp_path / "out", steps=3, **rl)
    # stop strings end completions at spread lengths, so the length reward differs within a group
    # from the first round on and every update moves the policy
    recipe["stages"]["rl"]["sampling"] = {**recipe["stages"]["rl"]["sampling"], "engine": "vllm",
                                          "stop": list("0123456789aeiou")}
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0
    return [r for r in metrics(next((tmp_path / "out").glob("*/rl"))) if "mismatch/kl" in r]


def test_grpo_with_the_engine_samples_from_the_pushed_adapter_each_round(tmp_path: Path, fake_vllm):
    rows = _run(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:  # the fake sampled from exactly the policy being trained: no mismatch
        assert abs(r["mismatch/kl"]) < 1e-5 and abs(r["mismatch/ratio_max"] - 1) < 1e-4, r
    fake = fake_vllm.made[0]
    assert fake.calls == [("generate", 1), ("sleep", 1), ("wake_up",), ("generate", 2), ("sleep", 1),
                          ("wake_up",), ("generate", 3), ("sleep", 1)]
    assert not (next((tmp_path / "out").glob("*/rl")) / "vllm").exists()  # scratch adapters removed at the end


def test_a_push_that_does_not_reach_the_engine_shows_as_mismatch(tmp_path: Path, fake_vllm):
    """Negative control: the fake ignores the adapter (samples from the base model). Round 1 still
    matches (the fresh adapter is the identity); once the policy moved, the metric sees it."""
    fake_vllm.options["ignore_lora"] = True
    rows = _run(tmp_path)
    assert abs(rows[0]["mismatch/kl"]) < 1e-5
    assert max(r["mismatch/ratio_max"] for r in rows[1:]) > 1.01


def test_full_fine_tuning_pushes_every_weight(tmp_path: Path, fake_vllm):
    rows = _run(tmp_path, lora="full", lr=1e-3)
    for r in rows:
        assert abs(r["mismatch/kl"]) < 1e-5, r
    assert fake_vllm.made[0].calls.count(("apply_model",)) == 3


def test_tis_runs_with_the_engine(tmp_path: Path, fake_vllm):
    rows = _run(tmp_path, loss={"tis_cap": 2.0})
    assert len(rows) == 3 and all(abs(r["mismatch/kl"]) < 1e-5 for r in rows)


def test_adapter_push_writes_the_policy_adapter_with_fresh_ids(tmp_path: Path):
    from rlft.models import attach_lora, load_model, prepare_base
    from rlft.recipe.schema import LoraSpec, ModelSpec

    mspec = ModelSpec(name="tiny:nano")
    source = prepare_base(mspec, tmp_path / "base")
    policy = attach_lora(load_model(source, mspec, torch.device("cpu")), LoraSpec(r=4))
    fake = SimpleNamespace(calls=[], wake_up=lambda: fake.calls.append("wake"),
                           sleep=lambda level: fake.calls.append(("sleep", level)))
    engine = VLLMEngine(EngineSettings(str(source), lora_rank=4), tmp_path / "scratch", llm=fake,
                        sampling_factory=fake_sampling, lora_factory=fake_lora)
    engine.sync(policy, 0)
    first = engine.lora
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    engine.sleep()
    engine.sync(policy, 1)
    assert (first.lora_int_id, engine.lora.lora_int_id) == (1, 2)
    assert not Path(first.lora_path).exists() and fake.calls == [("sleep", 1), "wake"]
    saved = load_file(str(Path(engine.lora.lora_path) / "adapter_model.safetensors"))
    trained = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert len(saved) == len(trained)
    b_saved = [v for k, v in saved.items() if "lora_B" in k]
    assert b_saved and all(torch.equal(v, torch.full_like(v, 0.5)) for v in b_saved)


def test_outputs_become_rollouts_with_stops_truncation_and_logprobs(tmp_path: Path):
    """Row b*G + g, left-padded prompts, right-padded completions, EOS counted, log-probs copied,
    `length` finishes flagged truncated, an empty completion kept as a zero-length row."""
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=9)

    def out(ids, reason, text):
        return SimpleNamespace(token_ids=ids, finish_reason=reason, text=text,
                               logprobs=[{t: SimpleNamespace(logprob=-0.1 * (j + 1))} for j, t in enumerate(ids)])

    llm = SimpleNamespace(generate=lambda prompts, params, lora_request=None, use_tqdm=False: [
        SimpleNamespace(outputs=[out([5, 6, 9], "stop", "ab"), out([7, 7, 7, 7], "length", "cccc")]),
        SimpleNamespace(outputs=[out([8], "stop", "x!"), out([], "stop", "")]),
    ])
    engine = VLLMEngine(EngineSettings("m", lora_rank=None), tmp_path, llm=llm, sampling_factory=fake_sampling,
                        lora_factory=fake_lora)
    gens = [torch.Generator().manual_seed(b) for b in range(2)]
    r = engine.generate(tok, [[1, 2, 3], [4]], rollout.SamplingParams(max_new_tokens=4), 2, gens, torch.device("cpu"))
    assert r.prompt_ids.tolist() == [[1, 2, 3], [1, 2, 3], [0, 0, 4], [0, 0, 4]]
    assert r.prompt_mask.tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 1], [0, 0, 1]]
    assert r.completion_ids.tolist() == [[5, 6, 9, 0], [7, 7, 7, 7], [8, 0, 0, 0], [0, 0, 0, 0]]
    assert r.completion_mask.sum(-1).tolist() == [3, 4, 1, 0]
    assert r.truncated.tolist() == [False, True, False, False]
    assert r.group_index.tolist() == [0, 0, 1, 1] and r.texts == ["ab", "cccc", "x!", ""]
    torch.testing.assert_close(r.sample_logp[1], torch.tensor([-0.1, -0.2, -0.3, -0.4]))
    assert float(r.sample_logp[0, 3]) == 0.0 and float(r.sample_logp[3].abs().sum()) == 0.0


def test_per_prompt_seeds_come_from_each_prompts_generator(tmp_path: Path):
    seen: list[list[int]] = []
    llm = SimpleNamespace(generate=lambda prompts, params, **k: seen.append([p["seed"] for p in params]) or [
        SimpleNamespace(outputs=[SimpleNamespace(token_ids=[1], logprobs=[{1: -1.0}], text="a", finish_reason="stop")])
        for _ in prompts])
    engine = VLLMEngine(EngineSettings("m", lora_rank=None), tmp_path, llm=llm, sampling_factory=fake_sampling,
                        lora_factory=fake_lora)
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    for seed in (0, 0, 1):
        gens = shard.prompt_generators(rollout.seed_generator(seed, 5), 3, 1, 2)
        engine.generate(tok, [[1], [2], [3]], rollout.SamplingParams(max_new_tokens=2), 1, gens, torch.device("cpu"))
    assert seen[0] == seen[1] != seen[2] and len(set(seen[0])) == 3


def test_missing_vllm_is_a_clear_error(monkeypatch):
    from rlft.errors import UserInputError

    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vllm and CUDA are here")
    with pytest.raises(UserInputError, match="sampling.engine: vllm needs"):
        vllm_engine.make_llm(EngineSettings("m", lora_rank=None))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
                    reason="needs CUDA and vllm")
def test_grpo_on_real_vllm(tmp_path: Path):  # pragma: no cover - GPU only
    """The tiny GRPO recipe with the real engine: trains, and sampler and trainer agree closely."""
    from rlft.cli import main

    recipe = grpo_recipe(tmp_path / "out", steps=3)
    recipe["stages"]["rl"]["sampling"] = {**recipe["stages"]["rl"]["sampling"], "engine": "vllm"}
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0
    rows = [r for r in metrics(next((tmp_path / "out").glob("*/rl"))) if "mismatch/kl" in r]
    assert len(rows) == 3 and all(abs(r["mismatch/kl"]) < 1e-2 for r in rows)


def _rank_with_fake_engine(rank: int, port: int, recipe: str, log: str) -> None:
    """One torchrun-like rank (RANK, WORLD_SIZE=2, gloo on 127.0.0.1) running `rlft run RECIPE`
    with the fake engine; every generate call appends (rank, prompts, seeds) to `log`."""
    import json
    import os

    os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    torch.set_num_threads(1)

    class LoggingFake(FakeLLM):
        def generate(self, prompts: list[dict], params: list[dict], lora_request: Any = None, use_tqdm: bool = True):
            with open(log, "a") as f:
                f.write(json.dumps([rank, [p["prompt_token_ids"] for p in prompts], [p["seed"] for p in params],
                                    self.settings.external_launcher]) + "\n")
            return super().generate(prompts, params, lora_request, use_tqdm)

    vllm_engine.make_llm = LoggingFake
    vllm_engine._vllm_sampling = fake_sampling
    vllm_engine._lora_request = fake_lora
    from rlft.cli import main

    os._exit(main(["run", recipe]))  # a rank > 0 leaves with os._exit after the final barrier anyway


def _vllm_recipe(tmp: Path) -> Path:
    """`_run`'s recipe with LoRA dropout 0 (dropout masks are each rank's own draws)."""
    tmp.mkdir(parents=True, exist_ok=True)
    recipe = grpo_recipe(tmp / "out", steps=3)
    recipe["lora"]["dropout"] = 0.0
    recipe["stages"]["rl"]["sampling"] = {**recipe["stages"]["rl"]["sampling"], "engine": "vllm",
                                          "stop": list("0123456789aeiou")}
    return write_recipe(tmp / "r.yaml", recipe)


def test_two_ranks_each_sample_their_share_with_their_own_engine(tmp_path: Path, fake_vllm):
    """On 2 processes each rank builds its own engine (external launcher) and samples half of the
    round's prompts with the seeds one process gives them; the run equals one process's run."""
    import json
    import multiprocessing
    import socket

    from rlft.cli import main

    assert main(["run", str(_vllm_recipe(tmp_path / "one"))]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "two.log"
    ctx = multiprocessing.get_context("spawn")
    recipe = str(_vllm_recipe(tmp_path / "two"))
    ranks = [ctx.Process(target=_rank_with_fake_engine, args=(r, port, recipe, str(log))) for r in (0, 1)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=300)
    assert [p.exitcode for p in ranks] == [0, 0]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    by_rank = [[c for c in calls if c[0] == r] for r in (0, 1)]
    assert [len(c) for c in by_rank] == [3, 3] and all(c[3] for c in calls)  # external launcher on both
    seen = fake_vllm.made[0].seen  # one process: all prompts of a round in one call
    assert len(seen) == 3
    for step, (prompts, seeds) in enumerate(seen):
        zero, one = by_rank[0][step], by_rank[1][step]
        assert len(zero[1]) == len(one[1]) == len(prompts) // 2
        assert zero[1] + one[1] == prompts and zero[2] + one[2] == seeds
    def rows(tmp: Path) -> list[dict[str, Any]]:
        return [r for r in metrics(next((tmp / "out").glob("*/rl"))) if "mismatch/kl" in r]

    rows_one, rows_two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == [1, 2, 3]
    for a, b in zip(rows_one, rows_two, strict=True):
        for key in ("reward/mean", "completion/len_mean", "mismatch/kl"):
            assert abs(a[key] - b[key]) <= 1e-5, (key, a[key], b[key])
    adapter = "final/adapter/adapter_model.safetensors"
    a = load_file(next((tmp_path / "one" / "out").glob("*/rl")) / adapter)
    b = load_file(next((tmp_path / "two" / "out").glob("*/rl")) / adapter)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert any(float(b[k].abs().max()) > 0 for k in b if "lora_B" in k)  # it trained (lora_B starts at 0)
