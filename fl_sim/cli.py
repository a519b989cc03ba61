"""The `fl-sim` command. Thin: parse, call, and turn FlSimError into a message and exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from rich.console import Console

from fl_sim.config import expand_grid, load_study
from fl_sim.deploy.cli import add_deploy_commands, run_deploy
from fl_sim.errors import FlSimError


def _study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a study file such as experiments.yaml")
    p.add_argument("--data-root", help="override data.root (the local dataset copy)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fl-sim", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run every run of a study in Flower's Simulation Engine")
    _study_args(run)
    run.add_argument("--out", help="override `out`, the output directory")
    run.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    run.add_argument("--only", nargs="+", metavar="RUN", help="run only these run names")
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")

    report = sub.add_parser("report", help="compare a study's runs: tables, winners, figures")
    report.add_argument("study_dir", help="<out>/<study>, the folder holding the run directories")

    probe = sub.add_parser("probe", help="scikit-learn classifiers on a finished run's "
                                         "features, beside the network's own head")
    probe.add_argument("run_dir", help="<out>/<study>/<run>, a run directory")
    probe.add_argument("--checkpoint", default="best", choices=["best", "last"],
                       help="best: the best-on-validation round (default); last: the last round")
    probe.add_argument("--classifiers", default="svm,knn,logreg,rf",
                       help="comma-separated, of svm, knn, logreg, rf (default: all four)")
    probe.add_argument("--data-root", help="override data.root (the local dataset copy)")
    probe.add_argument("--allow-unfinished", action="store_true",
                       help="probe a run that is not complete (probe.json says so)")

    bench = sub.add_parser("bench", help="fl-sim against the plain PyTorch loop and the hardware")
    bench.add_argument("--quick", action="store_true", help="small sizes: under 2 minutes on 2 cores")
    bench.add_argument("--latency", action="store_true",
                       help="a deployed round (loopback SuperLink, 3 SuperNodes) against a "
                            "simulated one, start-up per run, fixed cost per round")
    bench.add_argument("--ham-root", default="../shared/data/HAM10000-200x150",
                       help="a HAM10000 copy for the data row (JPEGs)")
    bench.add_argument("--output", default="BENCHMARKS.md", help="file the table is appended to")
    bench.add_argument("--no-write", action="store_true", help="print only")

    add_deploy_commands(sub)

    data = sub.add_parser("data", help="datasets and partitions")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    inspect = data_sub.add_parser("inspect", help="per client and split: image and class counts")
    _study_args(inspect)
    return ap


def cmd_run(args: argparse.Namespace, console: Console) -> None:
    study = load_study(args.config, data_root=args.data_root, out=args.out)
    check_writable(Path(study.out) / study.study)
    runs = expand_grid(study)
    if args.only:
        unknown = set(args.only) - {r.name for r in runs}
        if unknown:
            raise FlSimError(f"--only names {sorted(unknown)}, not runs of {args.config}; "
                             "`fl-sim run --dry-run` lists them.")
        runs = [r for r in runs if r.name in args.only]
    if args.dry_run:
        # Plain lines, not a table: names are what a user copies into --only.
        print(f"study {study.study}: {len(runs)} runs -> {study.out / study.study}")
        for r in runs:
            c = r.config
            work = f"{c.local_steps} steps" if c.local_steps else f"{c.local_epochs} epochs"
            print(f"  {r.name}  ({c.rounds} rounds x {work}, batch {c.batch_size})")
        return
    from fl_sim.simulation import run_study

    run_study(study, runs, console=console, verbose=args.verbose)


def check_writable(folder: Path) -> None:
    """Fail before any run (and in --dry-run) if `folder` cannot be made and written: its
    nearest existing ancestor must be a folder that we may write in."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise FlSimError(f"cannot write runs to {folder}: {existing} is a file, not a folder. "
                         "Set `out` (or --out) to a folder, or to a path where one can be made.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FlSimError(f"cannot write runs to {folder}: no permission to write in {existing}. "
                         "Set `out` (or --out) to a folder you may write in.")


def cmd_data_inspect(args: argparse.Namespace, console: Console) -> None:
    from fl_sim.data_partition.inspect import inspect_data

    study = load_study(args.config, data_root=args.data_root)
    inspect_data(study.data, console=console)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console()
    # fl-sim's own notes (e.g. which pretrained weights loaded) as plain lines.
    logging.basicConfig(format="%(message)s")
    logging.getLogger("fl_sim").setLevel(logging.INFO)
    try:
        if args.command == "run":
            cmd_run(args, console)
        elif args.command == "report":
            from fl_sim.report import write_report  # pandas/matplotlib: keep other commands fast

            report = write_report(Path(args.study_dir), note=lambda line: console.print(
                line, highlight=False, soft_wrap=True))
            console.print(f"report written: {report}")
        elif args.command == "probe":
            from fl_sim.probe import probe_run  # torch, sklearn: load on use

            probe_run(Path(args.run_dir), args.checkpoint, args.classifiers.split(","),
                      Path(args.data_root) if args.data_root else None, console,
                      args.allow_unfinished)
            console.print(f"probe written: {Path(args.run_dir) / 'probe' / 'probe.json'}")
        elif args.command == "bench":
            from fl_sim.bench import run_bench

            run_bench(args.quick, Path(args.ham_root), None if args.no_write else Path(args.output),
                      console, latency=args.latency)
        elif args.command == "deploy":
            return run_deploy(args)
        elif args.command == "data":
            cmd_data_inspect(args, console)
    except FlSimError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted: finished rounds and runs are kept on disk")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
