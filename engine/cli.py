"""`collapse`: thin command-line wrappers over the engine's Python API."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def _run(args: argparse.Namespace) -> int:
    import engine
    from engine import results

    study = engine.load_study(args.study, args.set)
    if args.dry_run:
        from engine.plan import describe

        print(describe(study, gpu=args.gpu, mfu=args.mfu))
        return 0
    table = engine.run_study(study, address=args.address)
    print(f"results: {Path(study.out) / results.TABLE_FILE} ({len(table)} rows)")
    print(results.summary(table).to_string(float_format=lambda v: f"{v:.4g}"))
    return 0


def _table(args: argparse.Namespace) -> int:
    from engine import results

    table = results.load_results(args.dir)
    view = results.pivot(table, args.metric) if args.pivot else results.summary(table, args.metric)
    print(view.to_string(float_format=lambda v: f"{v:.4g}"))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from engine import results

    table = results.load_results(args.dir)
    out = Path(args.out) if args.out else Path(args.dir) / "plots"
    for path in results.plot(table, out, [args.metric] if args.metric else None):
        print(path)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="collapse", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run or resume a study")
    run.add_argument("study", help="study YAML file, e.g. studies/linear_regression.yaml")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a dotted key, e.g. --set family.d=7 (repeatable)")
    run.add_argument("--address", default=None,
                     help="Ray cluster address (default: resources.address, else local Ray)")
    run.add_argument("--dry-run", action="store_true",
                     help="print the plan (rows, tokens, FLOPs, GPU-hours) and exit")
    run.add_argument("--gpu", default="H100", choices=["H100", "H200", "A100", "L40S", "A10G",
                                                       "L4", "B200"],
                     help="GPU for the dry run's GPU-hours (default H100)")
    run.add_argument("--mfu", type=float, default=0.4,
                     help="model FLOPs utilisation for the dry run (default 0.4)")
    run.set_defaults(func=_run)

    table = sub.add_parser("table", help="print a study's results as a pivot table")
    table.add_argument("dir", help="the study's output directory")
    table.add_argument("--metric", default=None, help="metric (default: the family's headline)")
    table.add_argument("--pivot", action="store_true",
                       help="strategy × axes by generation, even where the family has a paper layout")
    table.set_defaults(func=_table)

    plot = sub.add_parser("plot", help="write PNG plots of a study's results")
    plot.add_argument("dir", help="the study's output directory")
    plot.add_argument("--metric", default=None, help="only this metric")
    plot.add_argument("--out", default=None, help="directory for PNGs (default: DIR/plots)")
    plot.set_defaults(func=_plot)
    return p


def main(argv: list[str] | None = None) -> int:
    from engine.spec import SpecError

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as e:
        print(e, file=sys.stderr)
        return EXIT_BAD_INPUT
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(e.args[0] if e.args else e, file=sys.stderr)
        return EXIT_BAD_INPUT
    except ConnectionError as e:  # raised by ray.init for an unreachable --address
        print(f"collapse: cannot reach the Ray cluster: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
