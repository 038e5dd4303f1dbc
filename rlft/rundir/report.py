"""`rlft report`: one self-contained HTML page (and PNGs) of a run, finished or still going.

Per stage, matplotlib plots of what its metrics.jsonl holds (reward overall and per reward
function, held-out accuracy with 95% intervals, KL, entropy, completion length and truncation,
clip fractions, zero-variance groups, grad norm, learning rate, losses, the time split), with the
steps where an alarm fired marked; the pipeline (stages, what fed what, the results table); and
sample completions at a few steps. With several runs, each plot overlays them.

Everything is read from files: a run still going is read up to its last complete line. The
numbers each plot shows are read back from the plotted lines and saved in `plots.json`, so what
the page shows can be checked against metrics.jsonl.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from rlft.errors import UserInputError

# (panel id, title, keys): a key ending in "*" takes every key with that prefix; the first
# panel that claims a key plots it. Keys a stage does not log leave their panel out.
PANELS: list[tuple[str, str, list[str]]] = [
    ("reward", "reward (overall and per reward function)", ["reward/mean", "reward/*"]),
    ("accuracy", "held-out greedy accuracy (95% interval)", ["eval/accuracy"]),
    ("kl", "KL to the reference", ["kl", "kl/*"]),
    ("entropy", "entropy (per token)", ["entropy"]),
    ("length", "completion length (tokens)", ["completion/len_mean", "completion/len_max"]),
    ("truncation", "truncated completions (share)", ["completion/truncated"]),
    ("clip", "clip fractions", ["clip/*", "ratio/*"]),
    ("zero_variance", "zero-variance groups (share)", ["groups/zero_variance"]),
    ("grad_norm", "grad norm", ["grad_norm"]),
    ("lr", "learning rate", ["lr"]),
    ("loss", "losses", ["loss", "loss/*", "eval/loss", "value/*"]),
    ("time", "time split per step (s)", ["time/*"]),
]
# reward keys that are not a reward level, plotted elsewhere or not at all
_NOT_REWARD = ("reward/std", "reward/error_rate", "reward/unparsed")
SAMPLE_STEPS = 3  # sample completions are shown at the first, middle and last logged step


@dataclass
class StageData:
    """What one stage directory holds, read tolerantly (a run may still be writing it)."""

    name: str
    kind: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    alarms: list[dict[str, Any]] = field(default_factory=list)
    status: str = "not started"
    parents: list[str] = field(default_factory=list)
    eval_samples: int | None = None


@dataclass
class RunData:
    name: str
    path: Path
    stages: dict[str, StageData]
    results: list[dict[str, Any]]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file; reading stops at the first torn line (a run still writing)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_run(run_dir: Path) -> RunData:
    """Stages in recipe order with their metrics, samples, alarms, status and parents.

    Raises:
        UserInputError: `run_dir` is not a run directory (no recipe.yaml).
    """
    import yaml

    recipe_path = run_dir / "recipe.yaml"
    if not recipe_path.is_file():
        hint = "" if run_dir.is_dir() else " (no such directory)"
        raise UserInputError(f"{run_dir}: not a run directory{hint}; expected {recipe_path} written by `rlft run`")
    recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) or {}
    stages: dict[str, StageData] = {}
    for name, spec in (recipe.get("stages") or {}).items():
        spec = spec if isinstance(spec, dict) else {}
        sd = run_dir / name
        st = StageData(name, str(spec.get("kind", "?")), read_jsonl(sd / "metrics.jsonl"),
                       read_jsonl(sd / "samples.jsonl"), read_jsonl(sd / "alarms.jsonl"))
        st.eval_samples = spec.get("eval_samples") if isinstance(spec.get("eval_samples"), int) else None
        frm = spec.get("from")
        st.parents = [str(frm)] if isinstance(frm, str) else []
        data = spec.get("data")
        for d in data if isinstance(data, list) else [data]:
            src = d.get("source") if isinstance(d, dict) else d
            if isinstance(src, str) and src in (recipe.get("stages") or {}):
                st.parents.append(src)
        if (sd / "stage.done.json").is_file():
            st.status = "done"
        elif st.rows or any(sd.glob("step-*")):
            st.status = f"running (step {st.rows[-1].get('step')})" if st.rows else "running"
        if any(a.get("action") == "stop" for a in st.alarms):
            st.status = "stopped by alarm"
        stages[name] = st
    results = []
    if (run_dir / "results.json").is_file():
        try:
            results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            results = []
    return RunData(str(recipe.get("run_name") or run_dir.name), run_dir, stages, results)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def panel_keys(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Which logged keys each panel plots (panels with no key left out), in PANELS order."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k, v in row.items() if k != "step" and k not in keys and _number(v) is not None]
    claimed: set[str] = set()
    out: dict[str, list[str]] = {}
    for pid, _title, patterns in PANELS:
        mine = []
        for pat in patterns:
            for k in keys:
                hit = k.startswith(pat[:-1]) if pat.endswith("*") else k == pat
                if hit and k not in claimed and not (pid == "reward" and k in _NOT_REWARD):
                    mine.append(k)
                    claimed.add(k)
        if mine:
            out[pid] = mine
    return out


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, finite numbers only."""
    xs, ys = [], []
    for row in rows:
        v = _number(row.get(key))
        if v is not None and isinstance(row.get("step"), int):
            xs.append(row["step"])
            ys.append(v)
    return xs, ys


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion p over n trials."""
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def render(runs: list[RunData], out_dir: Path) -> dict[str, Any]:
    """Write the PNGs, plots.json and index.html into `out_dir`; return what plots.json holds.

    plots.json maps "<stage>/<panel>" to {run: {key: [[step, value], ...]}} read back from the
    drawn matplotlib lines, plus the alarm steps marked on the panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    titles = {pid: title for pid, title, _ in PANELS}
    stage_names: list[str] = []
    for run in runs:
        stage_names += [s for s in run.stages if s not in stage_names]
    plotted: dict[str, Any] = {}
    sections: list[str] = [_pipeline_html(runs)]
    for sname in stage_names:
        present = [(r, r.stages[sname]) for r in runs if sname in r.stages]
        kinds = sorted({st.kind for _, st in present})
        figs: list[str] = []
        all_panels: dict[str, None] = {}
        for _, st in present:
            all_panels |= dict.fromkeys(panel_keys(st.rows))
        for pid in [p for p, _, _ in PANELS if p in all_panels]:
            fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=90)
            record: dict[str, Any] = {"lines": {}, "alarms": []}
            for run, st in present:
                label_run = f"{run.name}: " if len(runs) > 1 else ""
                for key in panel_keys(st.rows).get(pid, []):
                    xs, ys = series(st.rows, key)
                    style = "o-" if len(xs) < 12 else "-"
                    (line,) = ax.plot(xs, ys, style, ms=3, lw=1.2, label=label_run + key)
                    if pid == "accuracy" and st.eval_samples:
                        lo, hi = zip(*(wilson(y, st.eval_samples) for y in ys), strict=True) if ys else ((), ())
                        ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
                    record["lines"].setdefault(run.name, {})[key] = [
                        [float(x), float(y)] for x, y in zip(cast(list[float], line.get_xdata()),
                                                             cast(list[float], line.get_ydata()), strict=True)]
                for alarm in st.alarms:
                    ax.axvline(alarm["step"], color="red" if alarm.get("action") == "stop" else "orange", ls="--", lw=1)
                    ax.annotate(alarm.get("alarm", "alarm"), (alarm["step"], 1), xycoords=("data", "axes fraction"),
                                fontsize=7, color="red", rotation=90, va="top", ha="right")
                    record["alarms"].append({"run": run.name, **alarm})
            ax.set_title(f"{sname}: {titles[pid]}", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
            fig.tight_layout()
            png = out_dir / f"{sname}-{pid}.png"
            fig.savefig(png)
            plt.close(fig)
            plotted[f"{sname}/{pid}"] = record
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            figs.append(f'<figure id="{html.escape(sname)}-{pid}"><img alt="{html.escape(sname)} {pid}" '
                        f'src="data:image/png;base64,{data}"></figure>')
        alarms = [(run.name, a) for run, st in present for a in st.alarms]
        parts = [f'<section id="stage-{html.escape(sname)}"><h2>{html.escape(sname)} '
                 f'<small>({html.escape(", ".join(kinds))})</small></h2>']
        if alarms:
            parts.append("<ul class=alarms>" + "".join(
                f"<li><b>{html.escape(str(a.get('action')))}</b> {html.escape(str(a.get('alarm')))} at step "
                f"{a.get('step')}: {html.escape(str(a.get('message', '')))}" + (f" ({html.escape(r)})" if len(runs) > 1 else "")
                + "</li>" for r, a in alarms) + "</ul>")
        parts.append('<div class=plots>' + "".join(figs) + "</div>" if figs else "<p>no metrics logged yet</p>")
        parts.append(_samples_html(present, len(runs) > 1))
        sections.append("".join(parts) + "</section>")
    title = " vs ".join(r.name for r in runs)
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>rlft report: {html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>rlft report: {html.escape(title)}</h1>"
            + "".join(sections) + "</body></html>")
    (out_dir / "index.html").write_text(page, encoding="utf-8")
    (out_dir / "plots.json").write_text(json.dumps(plotted, indent=1), encoding="utf-8")
    return plotted


_CSS = ("body{font-family:sans-serif;margin:1.5em;max-width:1400px}figure{display:inline-block;margin:4px}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px}"
        "pre{white-space:pre-wrap;background:#f6f6f6;padding:4px;font-size:12px}.alarms{color:#b00}"
        "img{max-width:100%}")


def _pipeline_html(runs: list[RunData]) -> str:
    out = ["<section id=pipeline><h2>pipeline</h2>"]
    for run in runs:
        out.append(f"<h3>{html.escape(run.name)} <small>{html.escape(str(run.path))}</small></h3>"
                   "<table><tr><th>stage</th><th>kind</th><th>fed by</th><th>status</th><th>logged steps</th></tr>")
        for st in run.stages.values():
            last = st.rows[-1].get("step") if st.rows else "-"
            out.append(f"<tr><td>{html.escape(st.name)}</td><td>{html.escape(st.kind)}</td>"
                       f"<td>{html.escape(', '.join(st.parents) or 'base')}</td><td>{html.escape(st.status)}</td>"
                       f"<td>{last}</td></tr>")
        out.append("</table>")
        if run.results:
            out.append("<p>results</p><table><tr><th>stage</th><th>model</th><th>metric</th><th>value</th></tr>")
            out += ["<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in ("stage", "model", "metric", "value"))
                    + "</tr>" for r in run.results]
            out.append("</table>")
    return "".join(out) + "</section>"


def _samples_html(present: list[tuple[RunData, StageData]], several: bool) -> str:
    out = []
    for run, st in present:
        steps = sorted({s["step"] for s in st.samples if isinstance(s.get("step"), int)})
        if not steps:
            continue
        picks = sorted({steps[0], steps[len(steps) // 2], steps[-1]})[:SAMPLE_STEPS]
        out.append(f"<details><summary>sample completions{' of ' + html.escape(run.name) if several else ''} "
                   f"at steps {', '.join(map(str, picks))}</summary>")
        for s in st.samples:
            if s.get("step") in picks:
                extra = f" (answer {html.escape(str(s['answer']))})" if "answer" in s else ""
                out.append(f"<p>step {s['step']}{extra}</p><pre>{html.escape(str(s.get('prompt', '')))}\n"
                           f"--&gt; {html.escape(str(s.get('completion', '')))}</pre>")
        out.append("</details>")
    return "".join(out)


def write_report(run_dirs: list[Path], out_dir: Path | None = None) -> Path:
    """Read each run and render the report; returns the index.html path (default <run>/report/)."""
    runs = [read_run(Path(d).expanduser().resolve()) for d in run_dirs]
    target = out_dir if out_dir is not None else runs[0].path / "report"
    render(runs, target)
    return target / "index.html"
