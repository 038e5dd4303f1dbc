"""Lineage in `stage.done.json` and `rlft explain --run`: per stage its parents and the
fingerprints of what it read, its data with row counts, the base model, versions, threads,
device and times; old markers without lineage still skip and verify."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from forkserver import get_server
from helpers import done_marker, rlft, sft_recipe, write_recipe

from rlft.cli import main

ARITH = {"source": "tiny:arith", "num_examples": 48, "eval_size": 8, "max_length": 128}
SFT = {"batch_size": 8, "eval_samples": 8, "eval_max_new_tokens": 8}
STAGES = ["cold", "sample", "retrain", "eval"]


def lineage_recipe(output_dir: Path) -> dict[str, Any]:
    """cold start -> rejection sampling -> retrain on the samples + task data -> eval of both."""
    return {
        "run_name": "lin", "output_dir": str(output_dir), "model": {"name": "tiny:nano"}, "lora": {"r": 4, "alpha": 8},
        "stages": {
            "cold": {"kind": "sft", "data": ARITH, "max_steps": 3} | SFT,
            "sample": {"kind": "sample", "from": "cold", "data": ARITH | {"num_examples": 16, "eval_size": 4},
                       "rewards": ["tag_count"], "threshold": 0.0, "per_prompt": 2, "keep": "all",
                       "sampling": {"max_new_tokens": 8}},
            "retrain": {"kind": "sft", "data": [{"source": "sample", "eval_size": 2}, ARITH], "max_steps": 2} | SFT,
            "eval": {"kind": "eval", "data": ARITH | {"num_examples": 16}, "k": 2, "rewards": ["task_verifier"],
                     "sampling": {"max_new_tokens": 8}},
        },
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lineage")
    proc = rlft("run", str(write_recipe(out / "r.yaml", lineage_recipe(out))))
    assert proc.returncode == 0, proc.stderr
    return out / "lin"


def test_each_marker_names_its_parents_by_fingerprint(run: Path) -> None:
    lin = {s: done_marker(run / s)["lineage"] for s in STAGES}
    prints = {s: _artifact_fingerprint(run / s) for s in STAGES}
    base = lin["cold"]["model"]
    assert base["name"] == "tiny:nano" and Path(base["source"]).is_dir() and base["source"].startswith(str(run))

    def parents(stage: str) -> dict[str, tuple[list[str], str]]:
        return {p["stage"]: (p["roles"], p["fingerprint"]) for p in lin[stage]["parents"]}

    assert parents("cold") == {"base": (["from"], base["fingerprint"])}
    assert parents("sample") == {"cold": (["from"], prints["cold"])}
    assert parents("retrain") == {"base": (["from"], base["fingerprint"]), "sample": (["data"], prints["sample"])}
    assert parents("eval") == {"cold": (["models"], prints["cold"]), "retrain": (["models"], prints["retrain"])}
    assert all(m["model"] == base for m in lin.values())


def _artifact_fingerprint(stage_dir: Path) -> str:
    """What later stages pin: the fingerprint of the stage's output hashes (rlft/pipeline.py)."""
    from rlft.ckpt.manifest import fingerprint

    return fingerprint(done_marker(stage_dir)["outputs"])


def test_data_row_counts_are_the_ones_the_stages_used(run: Path) -> None:
    data = {s: done_marker(run / s)["lineage"]["data"] for s in STAGES}
    assert [(d["source"], d["train_rows"], d["held_out_rows"]) for d in data["cold"]] == [("tiny:arith", 40, 8)]
    assert [(d["train_rows"], d["held_out_rows"]) for d in data["sample"]] == [(12, 4)]
    sampled = len((run / "sample/final/data.jsonl").read_text().splitlines())
    assert sampled == done_marker(run / "sample")["artifact"]["metrics"]["rows_total"] == 12  # 12 prompts, one kept each
    sample_in, arith_in = data["retrain"]
    assert (sample_in["source"], sample_in["resolved"]) == ("sample", str(run / "sample/final/data.jsonl"))
    assert (sample_in["train_rows"], sample_in["held_out_rows"]) == (sampled - 2, 2)
    assert (arith_in["source"], arith_in["train_rows"], arith_in["held_out_rows"]) == ("tiny:arith", 40, 8)
    assert [(d["train_rows"], d["held_out_rows"]) for d in data["eval"]] == [(8, 8)]
    assert all(len(d["fingerprint"]) == 64 for rows in data.values() for d in rows)
    assert data["cold"][0]["fingerprint"] != data["sample"][0]["fingerprint"]  # 48 vs 16 examples


def test_versions_threads_device_and_times(run: Path) -> None:
    import peft
    import torch
    import transformers

    import rlft

    for stage in STAGES:
        lin = done_marker(run / stage)["lineage"]
        assert lin["versions"] | {"python": "x"} == {"python": "x", "torch": torch.__version__, "peft": peft.__version__,
                                                     "transformers": transformers.__version__, "rlft": rlft.__version__}
        assert (lin["threads"], lin["device"], lin["resumed_from_step"]) == (1, "cpu", None)
        assert lin["started"] <= lin["finished"] and lin["finished"].endswith("Z") and lin["wall_s"] >= 0


def test_explain_run_shows_what_fed_what(run: Path) -> None:
    proc = rlft("explain", "--run", str(run))
    assert proc.returncode == 0, proc.stderr
    blocks = {b.split()[0]: b for b in proc.stdout.split("\n\n")[1:]}
    assert list(blocks) == STAGES
    assert "parent   cold (from)" in blocks["sample"] and "12 train / 4 held-out rows" in blocks["sample"]
    assert f"sample ({run}/sample/final/data.jsonl): 10 train / 2 held-out rows" in blocks["retrain"]
    assert "parent   cold (models)" in blocks["eval"] and "parent   retrain (models)" in blocks["eval"]
    assert "metrics  retrain: avg@2 " in blocks["eval"] and "greedy " in blocks["eval"]
    assert "train/loss " in blocks["cold"] and " -> " in blocks["cold"] and "wall " in blocks["cold"]
    assert "1 thread on cpu" in blocks["retrain"] and "torch " in blocks["retrain"]
    assert proc.stdout.splitlines()[1].startswith("base model tiny:nano -> ")


def test_old_markers_without_lineage_still_skip_and_explain(run: Path, tmp_path: Path) -> None:
    shutil.copytree(run, tmp_path / "lin")
    run = tmp_path / "lin"
    for stage in STAGES:  # as an rlft without lineage wrote them
        marker = done_marker(run / stage)
        del marker["lineage"]
        (run / stage / "stage.done.json").write_text(json.dumps(marker, indent=1, sort_keys=True))
    before = {s: (run / s / "stage.done.json").read_bytes() for s in STAGES}
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", lineage_recipe(tmp_path)))]) == 0
    assert {s: (run / s / "stage.done.json").read_bytes() for s in STAGES} == before  # every stage skipped
    proc = rlft("explain", "--run", str(run))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("no lineage recorded") == 4 and "metrics  cold: avg@2" in proc.stdout


def test_explain_needs_exactly_one_of_recipe_and_run(tmp_path: Path) -> None:
    for args in ([], ["r.yaml", "--run", "runs/x"]):
        proc = rlft("explain", *args)
        assert proc.returncode == 2 and "explain takes either a recipe" in proc.stderr, proc.stderr
    proc = rlft("explain", "--run", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "not a run directory" in proc.stderr and "Traceback" not in proc.stderr


def test_a_resumed_stage_records_the_step_it_resumed_at(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", sft_recipe(tmp_path, max_steps=4))
    assert get_server().start(main, (["run", str(recipe)],), env={"RLFT_FAULT": "kill_step:2"}).wait().returncode
    assert main(["run", str(recipe)]) == 0
    assert done_marker(tmp_path / "t" / "sft")["lineage"]["resumed_from_step"] == 2
