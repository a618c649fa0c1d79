"""`python -m unifit.report RUN_DIR [RUN_DIR ...] --out DIR`: one report over several runs.

Use it for a multi-model sweep (Table 1 gets a row block per base model, Figure 4 a panel per run)
and for a ratio sweep (Figure 5: win rate against select.ratio).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unifit.report.report import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unifit.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="finished (or partial) run directories")
    parser.add_argument("--out", type=Path, required=True, help="directory for report.html, report.md and the figures")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.run_dirs if not d.is_dir()]
    if missing:
        print(f"unifit.report: error: not a directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    counts = build_report(args.run_dirs, args.out)
    print(f"report: {args.out / 'report.html'} ({counts['runs']} runs, {counts['images']} figures, {counts['notes']} notes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
