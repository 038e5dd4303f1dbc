"""Are two runs of the same recipe the same? Compares every stage's metrics.jsonl (exactly, but for
the `time/*` wall-clock keys) and the sha256 of every *.safetensors under each stage's `final/`.

    python benchmarks/compare_runs.py runs/A/tiny-r1 runs/B/tiny-r1

Prints one row per file and exits 1 when anything differs (a refactor that claims no behaviour
change runs the same recipe before and after, at the same thread count, and shows this table).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path


def _metrics(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare(a: Path, b: Path) -> list[tuple[str, str, bool]]:
    """(relative path, what was compared, equal) for every metrics file and final weight file."""
    names = sorted({p.relative_to(a) for p in a.glob("*/metrics.jsonl")}
                   | {p.relative_to(b) for p in b.glob("*/metrics.jsonl")})
    weights = sorted({p.relative_to(a) for p in a.glob("*/final/**/*.safetensors")}
                     | {p.relative_to(b) for p in b.glob("*/final/**/*.safetensors")})
    out = []
    for rel in names:
        both = (a / rel).is_file() and (b / rel).is_file()
        out.append((str(rel), "rows", both and _metrics(a / rel) == _metrics(b / rel)))
    for rel in weights:
        both = (a / rel).is_file() and (b / rel).is_file()
        out.append((str(rel), "sha256", both and _sha(a / rel) == _sha(b / rel)))
    return out


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    rows = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    width = max((len(r[0]) for r in rows), default=10)
    print(f"{'file':<{width}}  compared  same")
    for rel, what, same in rows:
        print(f"{rel:<{width}}  {what:<8}  {'yes' if same else 'NO'}")
    differ = sum(not r[2] for r in rows)
    print(f"{len(rows)} files, {differ} differ")
    return 1 if differ or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
