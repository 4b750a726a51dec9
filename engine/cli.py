"""`collapse`: thin command-line wrappers over the engine's Python API."""
from __future__ import annotations

import argparse
import logging
import sys

EXIT_BAD_INPUT = 2
EXIT_CHAIN_FAILED = 1


_stopped_by: list[int] = []  # the signal that interrupted the run


def _interrupt(signum, frame):
    """SIGINT or SIGTERM: stop now, as Ctrl-C does. A KeyboardInterrupt is what nothing
    on the way catches and what Ray's blocking calls pass on (as a plain
    KeyboardInterrupt: which signal it was is kept here)."""
    _stopped_by.append(signum)
    raise KeyboardInterrupt


def _run(args: argparse.Namespace) -> int:
    import engine
    from engine import results
    from engine.layout import RunLayout

    study = engine.load_study(args.study, args.set)
    if args.dry_run:
        from engine.plan import describe, parse_rates

        from engine.errors import BadInput, CollapseError

        try:
            plan = describe(study, parse_rates(args.gpu, args.decode_tps, args.mfu,
                                               args.rates, args.startup_seconds))
        except CollapseError as e:
            if str(e).startswith("family."):  # a field of the study: say which file
                raise BadInput(f"{args.study}: {e}") from None
            raise
        print(plan)
        return 0
    import signal

    # Ctrl-C or a SIGTERM (a scheduler's stop) ends the run at once, Ray with it; every
    # finished generation is on disk, and running the same command again resumes.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        table = engine.run_study(study, address=args.address, verbose=args.verbose)
    except KeyboardInterrupt:
        signum = _stopped_by[0] if _stopped_by else signal.SIGINT
        name = signal.Signals(signum).name
        again = " ".join(["collapse", "run", args.study, *(f"--set {s}" for s in args.set)])
        print(f"[{study.name}] stopped by {name}; finished generations are kept in "
              f"{study.out}: run `{again}` to resume", file=sys.stderr, flush=True)
        return 128 + signum
    print(f"results: {RunLayout.of(study.out).results_table} ({len(table)} rows)")
    print(results.summary(table).to_string(float_format=lambda v: f"{v:.4g}"))
    return 0


def _table(args: argparse.Namespace) -> int:
    from engine import results

    caption, view = results.table_view(results.load_results(args.dir), args.metric,
                                       as_pivot=args.pivot, diff=args.diff,
                                       as_profile=args.profile)
    if caption:
        print(caption)
    print(view.to_string(float_format=lambda v: f"{v:.4g}"))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from engine import results
    from engine.files import Location
    from engine.layout import RunLayout

    table = results.load_results(args.dir)
    out = Location.of(args.out) if args.out else RunLayout.of(args.dir).plots
    for path in results.plot(table, out, [args.metric] if args.metric else None):
        print(path)
    for path in results.plot_samples(args.dir, out) + results.plot_histograms(args.dir, out):
        print(path)
    return 0


def _report(args: argparse.Namespace) -> int:
    from engine.results.report import write_report

    print(write_report(args.dir, args.out))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from engine import jobs

    job = jobs.submit(args.study, args.set, args.address, args.working_dir)
    print(f"submitted job {job.job_id}: {job.entrypoint}", flush=True)
    if args.no_follow:
        return 0
    final = jobs.follow(job.job_id, args.address)
    print(f"job {job.job_id}: {final}")
    return jobs.exit_code(final)


def _status(args: argparse.Namespace) -> int:
    import pandas as pd

    from engine import jobs

    rows = jobs.status(args.address, args.job_id)
    print(pd.DataFrame(rows).to_string(index=False) if rows else "no jobs")
    return 0


def _logs(args: argparse.Namespace) -> int:
    from engine import jobs

    if args.follow:
        return jobs.exit_code(jobs.follow(args.job_id, args.address))
    print(jobs.logs(args.job_id, args.address), end="")
    return 0


def _stop(args: argparse.Namespace) -> int:
    from engine import jobs

    stopped = jobs.stop(args.job_id, args.address)
    print(f"job {args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def _params(args: argparse.Namespace) -> int:
    from engine.families import FAMILIES, get_family
    from engine.families.base import describe_params, summary

    if args.family is None:
        width = max(map(len, FAMILIES))
        for name in FAMILIES:
            print(f"{name:<{width}}  {summary(get_family(name))}")
        print("\n`collapse params FAMILY` lists a family's parameters (the study file's "
              "`family:` block); `collapse params strategies` the strategies and a data "
              "workflow's keys (its `strategies:`).")
        return 0
    if args.family == "strategies":
        return _strategy_params()
    family = get_family(args.family)  # KeyError: one line naming the known families
    params = describe_params(family)
    print(f"{args.family}: {summary(family)}\n")
    name_w = max(len("parameter"), *(len(p.name) for p in params))
    type_w = max(len("type"), *(len(p.type) for p in params))
    default_w = min(24, max(len("default"), *(len(repr(p.default)) for p in params)))
    print(f"{'parameter':<{name_w}}  {'type':<{type_w}}  {'default':<{default_w}}  meaning")
    for p in params:
        print(f"{p.name:<{name_w}}  {p.type:<{type_w}}  {repr(p.default):<{default_w}}  "
              f"{p.meaning}")
    return 0


def _strategy_params() -> int:
    """The built-in strategies, and the keys of a study's own data workflow (the table
    in strategies.workflow's docstring, so the two cannot drift apart)."""
    import inspect

    from engine import strategies

    width = max(map(len, strategies.STRATEGIES))
    print("strategies: what each generation trains on (a study's `strategies:` list)\n")
    for name, strategy in strategies.STRATEGIES.items():
        print(f"{name:<{width}}  {strategy.description}")
    print("\nor a data workflow, a mapping with a `name` and:\n")
    table = [line for line in inspect.getdoc(strategies.workflow).splitlines()
             if line.startswith("    ")]
    print("\n".join(line[4:] for line in table))
    return 0


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="the head's job server, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="collapse", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    _results_parsers(sub)
    _job_parsers(sub)
    return p


def _run_parser(sub) -> None:
    run = sub.add_parser("run", help="run or resume a study")
    run.add_argument("study", help="study YAML file, e.g. studies/linear_regression.yaml")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a dotted key, e.g. --set family.d=7 (repeatable)")
    run.add_argument("--address", default=None,
                     help="Ray cluster address (default: resources.address, else local Ray)")
    run.add_argument("--verbose", action="store_true",
                     help="also show Ray's and Tune's own log lines")
    run.add_argument("--dry-run", action="store_true",
                     help="print the plan (rows, tokens, FLOPs, GPU-hours) and exit")
    run.add_argument("--gpu", default="H100", choices=["H100", "H200", "A100", "L40S", "A10G",
                                                       "L4", "B200"],
                     help="GPU for the dry run's GPU-hours (default H100)")
    run.add_argument("--decode-tps", default=None, metavar="N|MODEL=N,...",
                     help="sampling tokens/s per GPU for the dry run, for every model or "
                          "per model (default: measured with --rates, else assumed by size)")
    run.add_argument("--mfu", default=None, metavar="X|MODEL=X,...",
                     help="training's model FLOPs utilisation for the dry run, for every "
                          "model or per model (default: measured with --rates, else assumed "
                          "by size: 15%% up to 20M parameters, 25%% to 50M, 40%% above)")
    run.add_argument("--rates", default=None, metavar="GPU_CHECK.json",
                     help="decode rates and MFU measured by bench/gpu_check.py --json")
    run.add_argument("--startup-seconds", type=float, default=None,
                     help="fixed seconds per generation for the dry run (default: the "
                          "engine's start-ups measured on a CPU, engine/plan.py)")
    run.set_defaults(func=_run)


def _results_parsers(sub) -> None:
    table = sub.add_parser("table", help="print a study's results as a pivot table")
    table.add_argument("dir", help="the study's output directory")
    table.add_argument("--metric", default=None, help="metric (default: the family's headline)")
    table.add_argument("--pivot", action="store_true",
                       help="strategy × axes by generation, even where the family has a paper layout")
    table.add_argument("--diff", nargs=2, metavar=("A", "B"), default=None,
                       help="strategy A minus strategy B, paired seed by seed, with its 95%% "
                            "interval, e.g. --diff replace accumulate")
    table.add_argument("--profile", action="store_true",
                       help="how the metric grows over generations per strategy: linear, "
                            "logarithmic or bounded, with the fit's numbers")
    table.set_defaults(func=_table)

    plot = sub.add_parser("plot", help="write PNG plots of a study's results")
    plot.add_argument("dir", help="the study's output directory")
    plot.add_argument("--metric", default=None, help="only this metric")
    plot.add_argument("--out", default=None, help="directory for PNGs (default: DIR/plots)")
    plot.set_defaults(func=_plot)

    report = sub.add_parser("report", help="write one self-contained HTML page of a study's "
                                           "results: tables, plots, samples, run facts")
    report.add_argument("dir", help="the study's output directory")
    report.add_argument("--out", default=None, help="HTML file (default: DIR/report.html)")
    report.set_defaults(func=_report)

    params = sub.add_parser("params", help="list the families, or one family's parameters "
                                           "with their type, default and meaning")
    params.add_argument("family", nargs="?", default=None,
                        help="e.g. lm; `strategies`: the strategies and a workflow's keys")
    params.set_defaults(func=_params)


def _job_parsers(sub) -> None:
    submit = sub.add_parser("submit", help="run a study as a Ray Job on a cluster")
    submit.add_argument("study", help="study YAML file inside the working directory")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a dotted key (repeatable); out must be shared storage")
    _add_address(submit)
    submit.add_argument("--working-dir", default=".",
                        help="directory uploaded with the job (default: .)")
    submit.add_argument("--no-follow", action="store_true",
                        help="print the job id and return instead of following the logs")
    submit.set_defaults(func=_submit)

    status = sub.add_parser("status", help="list study jobs, or one job's status")
    status.add_argument("job_id", nargs="?", default=None)
    _add_address(status)
    status.set_defaults(func=_status)

    logs = sub.add_parser("logs", help="print a job's logs")
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true", help="stream until the job ends")
    _add_address(logs)
    logs.set_defaults(func=_logs)

    stop = sub.add_parser("stop", help="stop a running job")
    stop.add_argument("job_id")
    _add_address(stop)
    stop.set_defaults(func=_stop)


def main(argv: list[str] | None = None) -> int:
    from engine.errors import CollapseError

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except CollapseError as e:  # what the user acts on: one line (a chain that stopped: 1)
        print(e, file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `collapse params lm | head`: the reader left, nothing wrong
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    # Anything else is a bug, in the engine or a library: its traceback, exit 1.


if __name__ == "__main__":
    sys.exit(main())
