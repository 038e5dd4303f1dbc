"""SFT end to end on the tiny model: it learns, only the adapter trains, outputs load with plain
transformers/peft, accumulation is exact (RELIABILITY.md test 13), NaN steps are guarded (14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import final_hashes, metrics, sft_recipe, step_losses, write_recipe

from rlft.cli import main


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short but real LoRA SFT run on arith (~1000 steps, about 30 s on one core)."""
    out = tmp_path_factory.mktemp("learn")
    recipe = sft_recipe(
        out,
        data={"source": "tiny:arith", "num_examples": 2000, "eval_size": 32, "max_length": 128},
        epochs=8, batch_size=16, micro_batch_size=16, lr=1e-2, warmup_steps=10, save_every=100,
        eval_every=0, eval_samples=32, eval_max_new_tokens=64,
    )
    recipe["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "all-linear", "modules_to_save": ["embed_tokens"]}
    assert main(["run", str(write_recipe(out / "r.yaml", recipe))]) == 0
    return out / "t" / "sft"


def test_sft_heldout_loss_falls_and_accuracy_rises(learned_run: Path) -> None:
    evals = [r for r in metrics(learned_run) if "eval/loss" in r]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] > 0
    assert last["eval/loss"] < 0.5 * first["eval/loss"], (first, last)
    assert last["eval/accuracy"] >= first["eval/accuracy"] + 0.2, (first, last)


def test_outputs_load_with_plain_transformers_and_peft(learned_run: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(learned_run / "final/model")
    tok = AutoTokenizer.from_pretrained(learned_run / "final/model")
    base_dir = next((learned_run.parent / "models").iterdir())
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    adapted = PeftModel.from_pretrained(base, learned_run / "final/adapter")
    ids = tok("What is 12+34?", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)
        # the adapter is what changed: with it disabled the outputs are the base model's
        with adapted.disable_adapter():
            torch.testing.assert_close(adapted(ids).logits, base(ids).logits)
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at 0: every one trained
    for name, value in adapted.get_base_model().state_dict().items():
        key = name.replace(".base_layer", "")
        if "lora_" not in name and key in base_sd:
            assert torch.equal(value, base_sd[key]), name


def test_only_adapter_params_train_and_base_stays_bitwise(tmp_path: Path) -> None:
    from rlft import training
    from rlft.data import encode
    from rlft.data.batch import collate
    from rlft.models import attach_lora, load_model, load_tokenizer, prepare_base
    from rlft.recipe.schema import LoraSpec, ModelSpec
    from rlft.training import NanGuard, sft_step

    spec = ModelSpec(name="tiny:nano")
    source = prepare_base(spec, tmp_path)
    tok = load_tokenizer(source, spec)
    model = attach_lora(load_model(source, spec, torch.device("cpu")), LoraSpec(r=4, targets="all-linear"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [{"prompt": "What is 1+2?", "completion": "<answer>3</answer>"}] * 4
    batch = collate(encode.tokenize_sft(rows, tok, 64, "error", "mem"), tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sft_step(model, opt, [batch], NanGuard("skip", 3), 1.0, 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert not torch.equal(p, before[name]), name
        elif "lora_" not in name:
            assert torch.equal(p, before[name]), name
    assert training.sft_loss_sum(model, batch)[1] > 0


def test_microbatch_accumulation_invariance(tmp_path: Path) -> None:
    """RELIABILITY.md test 13: batch 8 as 1x8, 2x4 and 4x2 micro-batches, 10 steps."""
    runs = {}
    for micro in (8, 4, 2):
        out = tmp_path / f"m{micro}"
        recipe = sft_recipe(out, micro_batch_size=micro, epochs=1, save_every=100,
                            data={"source": "tiny:arith", "num_examples": 88, "eval_size": 8, "max_length": 128})
        recipe["lora"]["dropout"] = 0.0  # dropout masks would differ with the micro-batch shape
        assert main(["run", str(write_recipe(tmp_path / f"m{micro}.yaml", recipe))]) == 0
        runs[micro] = out / "t" / "sft"
    ref = [loss for _, loss in step_losses(runs[8])]
    assert len(ref) == 10
    for micro in (4, 2):
        other = [loss for _, loss in step_losses(runs[micro])]
        assert max(abs(a - b) for a, b in zip(ref, other, strict=True)) <= 1e-5, (micro, ref, other)
        weights = [_adapter(r) for r in (runs[8], runs[micro])]
        for k in weights[0]:
            torch.testing.assert_close(weights[0][k], weights[1][k], atol=1e-5, rtol=0)


def _adapter(stage_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(stage_dir / "final/adapter/adapter_model.safetensors")


def test_log_every_writes_every_nth_step_the_last_and_the_evals(tmp_path: Path) -> None:
    """`log_every: 3` over 7 steps: rows for steps 3 and 6 and the last (7), plus the held-out evals
    (start, every 2 steps, end); the summary's step count is the last step."""
    recipe = sft_recipe(tmp_path, max_steps=7, log_every=3, eval_every=2, save_every=100)
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0
    stage = tmp_path / "t" / "sft"
    assert [s for s, _ in step_losses(stage)] == [3, 6, 7]
    assert [r["step"] for r in metrics(stage) if "eval/loss" in r] == [0, 2, 4, 6, 7]
    assert json.loads((stage / "final" / "metrics.json").read_text())["steps"] == 7


def test_same_seed_same_weights_other_seed_differs(tmp_path: Path) -> None:
    """RELIABILITY.md test 12 for SFT: same seed bitwise equal; another seed differs."""
    hashes = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        recipe = sft_recipe(tmp_path / name, max_steps=3, save_every=100)
        recipe["seed"] = seed
        assert main(["run", str(write_recipe(tmp_path / f"{name}.yaml", recipe))]) == 0
        hashes.append(final_hashes(tmp_path / name / "t" / "sft"))
    assert hashes[0] == hashes[1]
    assert hashes[0] != hashes[2]


def test_nan_loss_is_skipped_counted_and_never_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RELIABILITY.md test 14 (skip policy): the poisoned step is logged as NaN and skipped."""
    from rlft.ckpt import faults

    monkeypatch.setenv("RLFT_FAULT", "nan_loss:3")
    faults.reset()
    recipe = sft_recipe(tmp_path, max_steps=5)
    try:
        assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0
    finally:
        monkeypatch.delenv("RLFT_FAULT")
        faults.reset()
    stage = tmp_path / "t" / "sft"
    rows = {r["step"]: r for r in metrics(stage) if "loss" in r}
    assert rows[3]["loss"] == "nan" and rows[3]["skipped"] == 1
    assert all(isinstance(rows[s]["loss"], float) for s in (1, 2, 4, 5))
    for ckpt in stage.glob("step-*"):
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "params.safetensors").values())


def test_nan_abort_policy_exits_4_with_clean_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from rlft.ckpt import faults

    monkeypatch.setenv("RLFT_FAULT", "nan_loss:3")
    faults.reset()
    recipe = sft_recipe(tmp_path, max_steps=5, nan_policy="abort")
    try:
        assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 4
    finally:
        monkeypatch.delenv("RLFT_FAULT")
        faults.reset()
    assert "step 3" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "t" / "sft").glob("step-*"))[-1] == "step-00000002"


def test_attaching_lora_leaves_the_recipe_spec_untouched() -> None:
    """peft extends modules_to_save in place for tied layers; the recipe object must not change
    (else resume pinning sees a 'changed' recipe in a process that ran an earlier stage)."""
    from rlft.models import attach_lora, load_model, prepare_base
    from rlft.recipe.schema import LoraSpec, ModelSpec

    spec = ModelSpec(name="tiny:nano")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        source = prepare_base(spec, Path(tmp))
        lora = LoraSpec(r=4, targets=["q_proj", "v_proj"], modules_to_save=["embed_tokens"])
        before = lora.model_dump()
        attach_lora(load_model(source, spec, torch.device("cpu")), lora)
        assert lora.model_dump() == before
