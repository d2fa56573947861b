"""``fastfair summary``: the seeds of each experiment side by side, from run folders.

Reads the ``config.json`` and ``results.jsonl`` that ``fastfair train``/``compare`` wrote (runs
still in progress included), groups runs whose settings differ only in their seed, and prints
one markdown row per group: each seed's best evaluation (and round) and its mean over a window
of rounds, the mean of both over the seeds with its standard error, and the window mean per
tier (``fastfair.fl.summary``). ``--out`` also writes the table to a file. Every bad argument
ends with one line ``fastfair: error: ...`` and status 2.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from .cli import _one_line, _Parser, _UsageError
from .fl.summary import group, load_runs, metrics_in, parse_window, table


def build_parser() -> _Parser:
    p = _Parser(prog="fastfair summary", allow_abbrev=False,
                description="The seeds of each experiment side by side: best and window-mean "
                            "metric per seed, their mean and standard error, per tier.")
    p.add_argument("folders", nargs="+", metavar="RUN_DIR",
                   help="folders written by fastfair train or compare")
    p.add_argument("--metric", default=None,
                   help="a metric the runs evaluated, e.g. ndcg@20 or hr@10 (default: the "
                        "first NDCG recorded)")
    p.add_argument("--window", default="0:",
                   help="rounds A:B (or A: for A onwards) the window mean is taken over "
                        "(default: %(default)s, every evaluation)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the table here")
    return p


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        args = build_parser().parse_args(argv)
        window = parse_window(args.window)
        runs = load_runs(args.folders)
        if not runs:
            raise ValueError(f"no trainable run in {', '.join(args.folders)}")
        known = metrics_in(runs)
        if not known:
            raise ValueError("no run has an evaluation yet")
        metric = args.metric or next((m for m in known if m.startswith("ndcg@")), known[0])
        if metric not in known:
            raise ValueError(f"--metric {metric!r} is not among the evaluated metrics "
                             f"{', '.join(known)}")
        text = table(group(runs), metric, window)
        if args.out:
            out = Path(args.out)
            if out.is_dir():
                raise IsADirectoryError(f"--out {out} is a folder, not a file")
            out.write_text(f"{text}\n")
    except SystemExit as done:  # --help
        return done.code or 0
    except (_UsageError, ValueError, OSError) as err:
        print(f"fastfair: error: {_one_line(err)}", file=sys.stderr)
        return 2
    print(text)
    return 0
