"""`rlft report`: the page of a tiny GRPO run has each plot, and each plot shows the run's own
numbers (read back from the drawn lines); --compare overlays two runs; a headless Chromium
renders the page and takes a screenshot without errors (skipped when chromium is missing)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from helpers import metrics, rlft, write_recipe

from rlft.cli import main

GRPO_PANELS = ["reward", "accuracy", "entropy", "length", "truncation", "clip", "zero_variance",
               "grad_norm", "lr", "loss", "time"]


def tiny_grpo(output_dir: Path, **rl: Any) -> dict[str, Any]:
    spec = {
        "kind": "grpo",
        "data": {"source": "tiny:arith", "num_examples": 64, "eval_size": 4, "max_length": 128},
        "rewards": ["task_verifier", "digits.py:digit_share"],
        "steps": 4, "prompts_per_step": 2, "group_size": 4, "micro_batch_size": 8, "lr": 1e-2,
        "sampling": {"temperature": 1.0, "max_new_tokens": 16}, "save_every": 2,
        "eval_every": 2, "eval_samples": 4, "eval_max_new_tokens": 8, "log_samples_every": 1,
        "loss": {"beta": 0.05},
    } | rl
    return {"run_name": "rep", "output_dir": str(output_dir), "seed": 0, "model": {"name": "tiny:nano"},
            "lora": {"r": 4, "alpha": 8, "targets": "all-linear"}, "stages": {"rl": spec}}


# a dense reward on the random tiny base (which never answers), so the plotted numbers move
DIGITS = "def digit_share(prompts, completions, **kw):\n    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "digits.py").write_text(DIGITS)
    assert main(["run", str(write_recipe(tmp / "r.yaml", tiny_grpo(tmp / "runs")))]) == 0
    return tmp / "runs" / "rep"


def test_report_plots_the_runs_own_numbers(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "page"
    proc = rlft("report", str(run_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert str(out / "index.html") in proc.stdout
    rows = metrics(run_dir / "rl")
    plots = json.loads((out / "plots.json").read_text())
    page = (out / "index.html").read_text()
    for panel in [*GRPO_PANELS, "kl"]:
        png = out / f"rl-{panel}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, panel
        assert f'id="rl-{panel}"' in page and "data:image/png;base64," in page
        lines = plots[f"rl/{panel}"]["lines"]["rep"]
        for key, points in lines.items():  # every plotted point is the metrics.jsonl value at that step
            expected = [[r["step"], r[key]] for r in rows if isinstance(r.get(key), int | float)]
            assert [p[0] for p in points] == [e[0] for e in expected], (panel, key)
            assert [p[1] for p in points] == pytest.approx([e[1] for e in expected]), (panel, key)
    reward = plots["rl/reward"]["lines"]["rep"]
    assert reward["reward/mean"][-1] == [4, pytest.approx(rows[-1]["reward/mean"])]
    assert len({p[1] for p in reward["reward/mean"]}) > 1  # a reward that moves, so a mix-up would show
    assert {"reward/task_verifier", "reward/digits.py:digit_share"} <= set(reward)  # per reward function
    assert "reward/std" not in reward
    accuracy = [r for r in rows if "eval/accuracy" in r]
    assert [p[0] for p in plots["rl/accuracy"]["lines"]["rep"]["eval/accuracy"]] == [r["step"] for r in accuracy] == [0, 2, 4]
    # the pipeline table and sample completions of the run
    assert "<td>rl</td><td>grpo</td><td>base</td><td>done</td><td>4</td>" in page
    sample = json.loads((run_dir / "rl/samples.jsonl").read_text().splitlines()[-1])
    assert sample["completion"][:8].replace("<", "&lt;").replace(">", "&gt;") in page


def test_report_of_a_run_still_going_and_bad_input(run_dir: Path, tmp_path: Path) -> None:
    live = tmp_path / "live"
    shutil.copytree(run_dir, live)
    (live / "rl/stage.done.json").unlink()
    with open(live / "rl/metrics.jsonl", "a") as f:
        f.write('{"step": 5, "reward/me')  # a line the trainer is writing
    proc = rlft("report", str(live))
    assert proc.returncode == 0, proc.stderr
    page = (live / "report/index.html").read_text()
    assert "<td>running (step 4)</td>" in page
    bad = rlft("report", str(tmp_path / "nope"))
    assert bad.returncode == 2 and "not a run directory" in bad.stderr and "Traceback" not in bad.stderr
    two = rlft("report", str(run_dir), str(live))
    assert two.returncode == 2 and "--compare" in two.stderr


def test_compare_overlays_two_runs(run_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    recipe = (other / "recipe.yaml").read_text().replace("run_name: rep", "run_name: other")
    (other / "recipe.yaml").write_text(recipe)
    rows = metrics(other / "rl")
    for r in rows:
        if "reward/mean" in r:
            r["reward/mean"] += 1.0
    (other / "rl/metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cmp"
    proc = rlft("report", "--compare", str(run_dir), str(other), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = json.loads((out / "plots.json").read_text())["rl/reward"]["lines"]
    assert set(lines) == {"rep", "other"}
    assert [p[1] for p in lines["other"]["reward/mean"]] == pytest.approx([p[1] + 1.0 for p in lines["rep"]["reward/mean"]])
    assert "rlft report: rep vs other" in (out / "index.html").read_text()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SIZE = (1280, 4000)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


@needs_chromium
def test_headless_browser_screenshot(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "page"
    assert rlft("report", str(run_dir), "--out", str(out)).returncode == 0
    console = screenshot(out / "index.html", tmp_path / "shot.png", tmp_path / "profile")
    assert console == []  # no JS error, no console message of any kind
    check_image(tmp_path / "shot.png")


@needs_chromium
def test_the_browser_checks_see_a_console_error_and_a_blank_page(tmp_path: Path) -> None:
    """The checks above are not vacuous: a page with a console error and an uncaught exception is
    reported, and a blank page fails the image check."""
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><h1>x</h1><script>console.error("planted"); notDefined();</script></body></html>')
    console = screenshot(bad, tmp_path / "bad.png", tmp_path / "p1")
    assert len(console) == 2 and '"planted"' in console[0] and "notDefined is not defined" in console[1], console
    blank = tmp_path / "blank.html"
    blank.write_text("<html><body></body></html>")
    assert screenshot(blank, tmp_path / "blank.png", tmp_path / "p2") == []
    with pytest.raises(AssertionError, match="blank"):
        check_image(tmp_path / "blank.png")


def screenshot(page: Path, png: Path, profile: Path) -> list[str]:
    """Render `page` in headless Chromium (a fresh profile) and save a SIZE screenshot; returns the
    page's console messages (JS errors included); fails on a nonzero exit or no image."""
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", f"--window-size={SIZE[0]},{SIZE[1]}", f"--screenshot={png}",
           page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and png.is_file(), proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


def check_image(png: Path) -> None:
    """A valid PNG of SIZE that is not blank: its pixels vary, in many colours."""
    from PIL import Image, ImageStat  # pillow comes with matplotlib

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.size == SIZE, img.size
        stddev = ImageStat.Stat(img.convert("L")).stddev[0]
        colours = img.convert("RGB").getcolors(maxcolors=1 << 22)
    assert stddev > 10 and colours is not None and len(colours) > 50, f"blank page: stddev {stddev:.1f}, colours {colours and len(colours)}"


if __name__ == "__main__":  # python tests/test_report_html.py RUN_DIR SHOT.png: checked screenshot of a run's report
    from rlft.rundir.report import write_report

    index = write_report([Path(sys.argv[1])])
    shot = Path(sys.argv[2])
    console = screenshot(index, shot, Path(tempfile.mkdtemp(prefix="rlft-chromium-")))
    check_image(shot)
    assert console == [], console
    print(shot)
