"""Render the evidence tables in docs/evidence/ from the run records kept in the repository.

    python bench/render_evidence.py            # rewrite docs/evidence/<name>/report.md
    python bench/render_evidence.py --check    # exit 1 if a committed report differs

Each `docs/evidence/<name>/store/` is a results store (the JSON records of the benchmark runs
that produced the README's and docs' evidence: `bench/synth_world.py`, `bench/baselines.py`;
their trainable states are not kept). The tables are a pure function of those records, rendered
by `peftbench report`; `tests/test_evidence.py` re-renders them and diffs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see peftbench/__init__.py

import argparse
import sys
import tempfile
from pathlib import Path

from peftbench.report import write_report

EVIDENCE = Path(__file__).resolve().parents[1] / "docs" / "evidence"


def render(store: Path) -> str:
    """The Markdown report of one evidence store."""
    with tempfile.TemporaryDirectory() as tmp:
        write_report(store, tmp, formats=("md",))
        return (Path(tmp) / "report.md").read_text()


def stores() -> list[Path]:
    return sorted(p for p in EVIDENCE.glob("*/store") if p.is_dir())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = ap.parse_args(argv)
    stale = []
    for store in stores():
        target = store.parent / "report.md"
        text = render(store)
        if args.check:
            if not target.is_file() or target.read_text() != text:
                stale.append(str(target))
        else:
            target.write_text(text)
            print(f"wrote {target}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python bench/render_evidence.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
