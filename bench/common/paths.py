"""Where the benchmarks live and write: the repository, bench/work (images, caches and run
dirs; gitignored), bench/results (the reports the README links) and the test helpers."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "bench" / "work"
RESULTS = REPO / "bench" / "results"
TESTS = REPO / "tests"
