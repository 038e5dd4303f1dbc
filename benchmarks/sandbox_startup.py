"""Startup cost of the code_exec sandbox: wall time of running a trivial program.

    python benchmarks/sandbox_startup.py [runs]

Prints min / median / max over the runs, isolated (namespaces, read-only root, seccomp) and,
for reference, the unsafe mode (a plain subprocess with limits).
"""

from __future__ import annotations

import statistics
import sys
import time

from rlft.rewards import sandbox


def measure(runs: int, allow_unsafe: bool) -> list[float]:
    """Seconds per `run_python("pass")`, after one warm-up run."""
    times = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        res = sandbox.run_python("pass", timeout_s=10.0, memory_mb=512, max_procs=16, max_file_mb=16,
                                 allow_unsafe=allow_unsafe)
        if res.status != "ok":
            raise SystemExit(f"the trivial program failed: {res}")
        if i:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    """Print the table."""
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    print("| mode | runs | min ms | median ms | max ms |\n|---|---|---|---|---|")
    for name in ("isolated", "unsafe (no isolation)"):
        if name == "isolated" and not sandbox.isolation_available():
            continue
        if name.startswith("unsafe"):
            sandbox.isolation_available = lambda: False  # type: ignore[assignment]  # the unsafe path, for comparison
        t = [x * 1000 for x in measure(runs, allow_unsafe=name.startswith("unsafe"))]
        print(f"| {name} | {runs} | {min(t):.1f} | {statistics.median(t):.1f} | {max(t):.1f} |")


if __name__ == "__main__":
    main()
