"""The distill stage (ALGORITHMS.md section 7) end to end on tiny models, plus its kernels' wiring.

A teacher is an SFT stage trained briefly on arith (full fine-tuning of tiny:nano); the student is
tiny:student (hidden size 32, a third of nano's parameters). Each mode must lower its own loss,
write a loadable model, and resume bitwise after a kill; logit modes refuse mismatched tokenizers.
"""

from __future__ import annotations

import copy
import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from forkserver import get_server
from helpers import final_hashes, metrics, step_losses, write_recipe

from rlft.cli import main
from rlft.core import losses
from rlft.data import encode
from rlft.data.batch import collate, model_inputs
from rlft.data.rows import load_rows
from rlft.errors import UserInputError
from rlft.rl import distill

ARITH = {"source": "tiny:arith", "num_examples": 256, "eval_size": 16, "max_length": 128}
MODES = {
    "seq": {"mode": "sequence", "sampling": {"temperature": 0, "max_new_tokens": 64}},
    "logits": {"mode": "logits", "loss": "jsd", "beta": 0.5, "temperature": 2.0},
    "onp": {"mode": "on_policy", "loss": "forward_kl", "sampling": {"temperature": 1.0, "max_new_tokens": 48}},
}


def _teacher(max_steps: int) -> dict[str, Any]:
    return {
        "kind": "sft", "data": ARITH | {"num_examples": 640}, "max_steps": max_steps, "batch_size": 16,
        "lr": 3e-3, "warmup_steps": 4, "save_every": 100, "eval_samples": 8, "eval_max_new_tokens": 8,
    }


def _distill(mode: dict[str, Any], **over: Any) -> dict[str, Any]:
    return {
        "kind": "distill", "teacher": "teacher", "student": {"name": "tiny:student"}, "data": ARITH,
        "max_steps": 30, "batch_size": 16, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 3,
        "save_every": 100, "eval_samples": 16, "eval_max_new_tokens": 40,
    } | mode | over


def _recipe(out: Path, stages: dict[str, Any], lora: Any = "full") -> dict[str, Any]:
    return {"run_name": "t", "output_dir": str(out), "seed": 0, "model": {"name": "tiny:nano"}, "lora": lora,
            "stages": stages}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Teacher (40 SFT steps) and one 30-step distill stage per mode: about 15 s on one core."""
    out = tmp_path_factory.mktemp("distill")
    stages = {"teacher": _teacher(40)} | {name: _distill(mode) for name, mode in MODES.items()}
    assert main(["run", str(write_recipe(out / "r.yaml", _recipe(out, stages)))]) == 0
    return out / "t"


def _first_last(values: list[float]) -> tuple[float, float]:
    k = max(1, len(values) // 10)
    return sum(values[:k]) / k, sum(values[-k:]) / k


@pytest.mark.parametrize("stage", list(MODES))
def test_each_mode_lowers_its_loss_and_heldout_loss(run_dir: Path, stage: str) -> None:
    losses_ = [loss for _, loss in step_losses(run_dir / stage)]
    assert len(losses_) == 30 and all(isinstance(x, float) for x in losses_)
    first, last = _first_last(losses_)
    assert last < 0.8 * first, (stage, first, last)
    evals = [r["eval/loss"] for r in metrics(run_dir / stage) if "eval/loss" in r]
    assert len(evals) == 2 and evals[1] < 0.85 * evals[0], (stage, evals)
    summary = json.loads((run_dir / stage / "final/metrics.json").read_text())
    assert summary["train/loss_first"] == pytest.approx(first) and summary["train/loss_last"] == pytest.approx(last)


@pytest.mark.parametrize("stage", list(MODES))
def test_student_artifact_loads_and_is_the_student(run_dir: Path, stage: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / stage / "final/model")
    tok = AutoTokenizer.from_pretrained(run_dir / stage / "final/model")
    assert model.config.hidden_size == 32  # tiny:student, not the teacher's 64
    base = AutoModelForCausalLM.from_pretrained(next((run_dir / "models").glob("tiny-student-*")))
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed, "no student weight changed"
    ids = tok("What is 1+2?", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_sequence_mode_teacher_data(run_dir: Path) -> None:
    """One teacher completion per training prompt, greedy, pinned by a key and a sha256."""
    rows = [json.loads(line) for line in (run_dir / "seq/teacher_data.jsonl").read_text().splitlines()]
    meta = json.loads((run_dir / "seq/teacher_data.json").read_text())
    assert len(rows) == meta["rows"] == 240  # 256 generated, 16 held out
    assert all(set(r) >= {"prompt", "completion", "answer"} for r in rows)
    # the teacher's text, not the reference solution (a 40-step teacher is not that good)
    assert sum(r["completion"] != r["solution"] for r in rows) > len(rows) // 2
    assert all(r["completion"].startswith("<think>") for r in rows)  # it learnt the format
    step0 = metrics(run_dir / "seq")[0]
    assert step0["step"] == 0 and "teacher/accuracy" in step0 and "teacher/truncated" in step0


def test_on_policy_logs_student_completions(run_dir: Path) -> None:
    rows = [r for r in metrics(run_dir / "onp") if "loss" in r]
    assert all(0 < r["completion/len_mean"] <= 48 for r in rows)


# --------------------------------------------------------------------------- tokenizer check


def _student_with_other_tokenizer(tmp: Path) -> Path:
    from transformers import AutoTokenizer

    from rlft.models import prepare_base
    from rlft.recipe.schema import ModelSpec

    src = Path(prepare_base(ModelSpec(name="tiny:student"), tmp / "models"))
    dst = tmp / "other-student"
    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.add_tokens(["<|tool|>"])
    tok.save_pretrained(dst)
    return dst


def test_logit_modes_refuse_a_different_tokenizer_sequence_accepts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    student = _student_with_other_tokenizer(tmp_path)
    stages = {
        "teacher": _teacher(2) | {"lora": "full"},
        "d": _distill(MODES["logits"], student={"name": str(student)}, max_steps=2, eval_samples=2,
                      data=ARITH | {"long_rows": "truncate"}),  # a 2-step teacher's text is long garbage
    }
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tmp_path, stages, lora={"r": 4, "alpha": 8}))
    for mode in ("logits", "on_policy"):
        assert main(["run", str(recipe), "--set", f"stages.d.mode={mode}"]) == 2
        err = capsys.readouterr().err
        assert "stages.d.mode" in err and "mode: sequence" in err and "vocabularies differ" in err, err
        assert "<|tool|>" in err
    assert not any((tmp_path / "t" / "d").glob("step-*"))
    assert main(["run", str(recipe), "--set", "stages.d.student.name=tiny:stdent"]) == 2
    assert "stages.d.student.name: unknown tiny preset 'stdent'" in capsys.readouterr().err
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i}+1?", "answer": str(i + 1)}) + "\n"
                               for i in range(20)))
    only_prompts = ["--set", "stages.d.student.name=tiny:student", "--set", f"stages.d.data={prompts}"]
    assert main(["run", str(recipe), *only_prompts]) == 2  # found by the data check, before any model loads
    err = capsys.readouterr().err
    assert f"{prompts}:row 1: has only a prompt; SFT needs" in err, err
    assert "distill mode logits scores the data's own completions" in err and "`mode: on_policy`" in err
    assert main(["run", str(recipe), "--set", "stages.d.mode=sequence"]) == 0
    assert (tmp_path / "t/d/final/adapter/adapter_model.safetensors").exists()  # a LoRA student


def test_same_tokenizer_passes_and_vocab_width_is_checked() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlft.tiny import build_tokenizer

    tok = build_tokenizer()
    distill.check_same_tokenizer(tok, build_tokenizer(), "d", "logits")  # no error

    def model(vocab: int) -> Any:
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, intermediate_size=32))

    assert distill.shared_vocab(model(264), model(272), len(tok), "d") == 264  # padded output layers
    with pytest.raises(UserInputError, match=r"stages\.d\.mode: .*256 output logits.*260 tokens"):
        distill.shared_vocab(model(256), model(264), len(tok), "d")


# --------------------------------------------------------------------------- the loss on one batch


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """Random tiny:nano teacher and tiny:student, and a padded batch of 4 arith rows."""
    from rlft.models import load_model, load_tokenizer, prepare_base
    from rlft.recipe.schema import DataSpec, ModelSpec

    tmp = tmp_path_factory.mktemp("pair")
    models, tok = [], None
    for name, seed in (("tiny:nano", 1), ("tiny:student", 2)):
        spec = ModelSpec(name=name, seed=seed)
        source = prepare_base(spec, tmp)
        tok = load_tokenizer(source, spec)
        models.append(load_model(source, spec, torch.device("cpu")))
    rows, _ = load_rows(DataSpec(source="tiny:arith", num_examples=8, eval_size=2), tmp, 0)
    batch = collate(encode.tokenize_sft(rows[:4], tok, 128, "error", "arith"), tok.pad_token_id)
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: padding is exercised
    teacher, student = models
    teacher.eval().requires_grad_(False)
    return teacher, student, batch


@pytest.mark.parametrize(("loss", "kernel"), [
    ("forward_kl", lambda s, t: losses.forward_kl(s, t, 2.0)),
    ("reverse_kl", lambda s, t: losses.reverse_kl(s, t, 2.0)),
    ("jsd", lambda s, t: losses.generalized_jsd(s, t, 0.3, 2.0)),
])
def test_per_token_loss_is_the_kernel_on_shifted_logits(pair: tuple, loss: str, kernel: Any) -> None:
    teacher, student, batch = pair
    per_token, mask = distill.token_divergence(student, teacher, batch, distill.Divergence(loss, 0.3, 2.0))
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        by_hand = kernel(student(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1])  # (N, L-1)
    target = batch["loss_mask"][:, 1:].bool()
    assert torch.equal(mask, batch["loss_mask"][:, 1:])
    torch.testing.assert_close(per_token[target], by_hand[target], atol=1e-6, rtol=1e-5)
    assert (per_token[~target] == 0).all() and (per_token[target] > 0).all()
    assert per_token.requires_grad


def test_distill_step_is_the_token_mean_and_exact_under_micro_batching(pair: tuple) -> None:
    from types import SimpleNamespace

    from rlft.training import NanGuard

    teacher, student0, batch = pair
    spec = SimpleNamespace(loss="forward_kl", beta=0.5, temperature=1.0, max_grad_norm=None)
    with torch.no_grad():
        full = losses.forward_kl(student0(**model_inputs(batch)).logits[:, :-1],
                                 teacher(**model_inputs(batch)).logits[:, :-1])
        mask = batch["loss_mask"][:, 1:].float()
        expected = float((full * mask).sum() / mask.sum())
    grads = []
    for split in (4, 2, 1):
        student = copy.deepcopy(student0).requires_grad_(True)
        optimizer = _GradCapture(student)
        micro = [{k: v[i : i + split] for k, v in batch.items()} for i in range(0, 4, split)]
        stats = distill.distill_step(student, teacher, optimizer, micro, NanGuard("abort", 1), spec, 1)
        assert stats["loss"] == pytest.approx(expected, rel=1e-5)
        assert stats["tokens"] == int(mask.sum())
        grads.append(optimizer.grads)
    assert grads[0] and all(p.grad is None for p in teacher.parameters())
    for other in grads[1:]:
        for name, g in grads[0].items():
            torch.testing.assert_close(other[name], g, atol=1e-6, rtol=1e-4)


class _GradCapture:
    """Stands in for the optimizer: records the accumulated gradients instead of stepping."""

    def __init__(self, model: Any) -> None:
        self.model, self.grads = model, {}

    def step(self) -> None:
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)


def test_teacher_data_is_reused_only_for_the_same_inputs_and_bytes(tmp_path: Path) -> None:
    rows = [{"prompt": "What is 1+2?", "completion": "<answer>3</answer>", "answer": "3"}]
    distill.write_teacher_data(tmp_path, "k1", rows, {"teacher/accuracy": 1.0})
    got, stats = distill.read_teacher_data(tmp_path, "k1")
    assert got == [rows[0] | {"_source": str(tmp_path / distill.TEACHER_DATA), "_row": 1}]
    assert stats == {"teacher/accuracy": 1.0}
    assert distill.read_teacher_data(tmp_path, "k2") is None  # other teacher/data/sampling/seed
    path = tmp_path / distill.TEACHER_DATA
    path.write_text(path.read_text().replace("3", "4"))
    assert distill.read_teacher_data(tmp_path, "k1") is None  # edited or torn


def test_with_completion_keeps_context_and_columns() -> None:
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "old"}], "answer": "1", "_row": 3}
    assert distill.with_completion(row, "new") == {
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                     {"role": "assistant", "content": "new"}], "answer": "1"}
    assert distill.with_completion({"prompt": "q", "answer": "1"}, "new") == {"prompt": "q", "completion": "new",
                                                                            "answer": "1"}


# --------------------------------------------------------------------------- exact resume


def _resume_recipe(tmp: Path, name: str) -> Path:
    small = ARITH | {"num_examples": 72, "eval_size": 8, "long_rows": "truncate"}
    stages = {"teacher": _teacher(6)} | {
        stage: _distill(mode, data=small, max_steps=8, batch_size=8, micro_batch_size=4, save_every=3,
                        eval_samples=4, eval_max_new_tokens=8)
        for stage, mode in MODES.items()
    }
    return write_recipe(tmp / f"{name}.yaml", _recipe(tmp / name, stages))


def _outcome(out: Path) -> dict[str, Any]:
    return {s: (final_hashes(out / "t" / s), step_losses(out / "t" / s)) for s in ("teacher", *MODES)}


def test_kill_and_resume_each_mode_is_bitwise(tmp_path: Path) -> None:
    """RLFT_FAULT=kill_step:5 kills the first unfinished distill stage after step 5 (checkpoint at
    3); `rlft stage <name> --resume` finishes it; every stage ends bitwise the uninterrupted run
    (final weights and per-step losses)."""
    server = get_server()
    ref = server.start(main, (["run", str(_resume_recipe(tmp_path, "ref"))],)).wait()
    assert ref.returncode == 0, ref.output
    recipe = _resume_recipe(tmp_path, "k")
    assert server.start(main, (["stage", "teacher", "--recipe", str(recipe)],)).wait().returncode == 0
    for stage in MODES:
        killed = server.start(main, (["run", str(recipe)],), env={"RLFT_FAULT": "kill_step:5"}).wait()
        assert killed.returncode == -signal.SIGKILL, killed.output
        stage_dir = tmp_path / "k" / "t" / stage
        assert sorted(p.name for p in stage_dir.glob("step-*")) == ["step-00000003"]
        assert max(s for s, _ in step_losses(stage_dir)) == 5  # steps 4-5 are lost work
        stamp = (stage_dir / distill.TEACHER_DATA).stat().st_mtime_ns if stage == "seq" else None
        # kill_step:2 proves the resume starts after the checkpoint: a run from step 0 would die there
        resumed = server.start(main, (["stage", stage, "--recipe", str(recipe), "--resume"],),
                               env={"RLFT_FAULT": "kill_step:2"}).wait()
        assert resumed.returncode == 0, resumed.output
        if stamp is not None:  # the teacher's completions were read back, not generated again
            assert (stage_dir / distill.TEACHER_DATA).stat().st_mtime_ns == stamp
    ref_outcome = _outcome(tmp_path / "ref")
    assert all("model.safetensors" in hashes and len(losses_) == 8 for hashes, losses_ in
               (ref_outcome[s] for s in MODES))
    assert _outcome(tmp_path / "k") == ref_outcome


def test_teacher_data_round_trips_any_text(tmp_path: Path) -> None:
    """A weak teacher writes anything: line separators other than \\n must stay inside their row."""
    texts = ["a\u2028b", "c\x85d\x1ce", "f\r\ng", "h\u00e9\U0001f600", ""]
    rows = [{"prompt": str(i), "completion": t} for i, t in enumerate(texts)]
    distill.write_teacher_data(tmp_path, "k", rows, {})
    got, _ = distill.read_teacher_data(tmp_path, "k")
    assert [r["completion"] for r in got] == texts
