"""A probe's outputs: the summary of its rows, probe/probe.json, probe.csv, probe.md and the
console table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from fl_sim.probe.features import GLOBAL_TEST
from fl_sim.report.collect import METRICS
from fl_sim.report.markdown import markdown_table
from fl_sim.report.probes import probe_table
from fl_sim.report.tables import METRIC_NAMES
from fl_sim.server.run_log import RunLog, write_json_atomic


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per fit × classifier: the global test set (a shared row, else the unweighted mean of
    the clients' rows) and the unweighted mean over the clients' own test splits."""
    out = []
    for fit, classifier in dict.fromkeys((r["fit"], r["classifier"]) for r in rows):
        of = [r for r in rows if (r["fit"], r["classifier"]) == (fit, classifier)]
        on_global = [r for r in of if r["split"] == GLOBAL_TEST]
        shared = [r for r in on_global if r["client"] is None]
        for on, chosen in (("global test", shared or on_global),
                           ("mean client test", [r for r in of if r["split"] == "test"])):
            out.append({"fit": fit, "classifier": classifier, "on": on, "averaged": len(chosen),
                        **{m: float(np.mean([r[m] for r in chosen])) for m in METRICS}})
    return out


def write_outputs(folder: Path, probe: dict[str, Any]) -> Path:
    """probe.csv (every row), probe.md (summary, chosen hyper-parameters), then probe.json,
    each written whole or not at all; returns probe.json's path."""
    folder.mkdir(exist_ok=True)
    write_text_atomic(folder / "probe.csv", pd.DataFrame(probe["rows"]).to_csv(index=False))
    write_text_atomic(folder / "probe.md", markdown(probe))
    write_json_atomic(folder / "probe.json", probe)
    return folder / "probe.json"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with RunLog.writing(path, tmp):
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def markdown(probe: dict[str, Any]) -> str:
    metric = probe["selection_metric"]
    chosen = markdown_table(
        ["fit", "client", "classifier", "hyper-parameters", f"val {METRIC_NAMES[metric]}"],
        [[c["fit"], "all" if c["client"] is None else str(c["client"]), c["classifier"],
          ", ".join(f"{k}={v}" for k, v in c["params"].items()), f"{c[f'val_{metric}']:.3f}"]
         for c in probe["chosen"]])
    parts = [f"# Feature probe: {probe['run']}",
             (f"Checkpoint {probe['checkpoint']} (round {probe['round']}), {probe['model']}; "
              f"{probe['features']}. Standardised features; hyper-parameters chosen on "
              f"validation {METRIC_NAMES[metric]}, never on test. Every row: probe.csv."),
             *(f"- **{fit}**: {text}" for fit, text in probe["fits"].items()),
             *probe["skipped"].values(),
             "## Test metrics", probe_table(probe["summary"]),
             "## Chosen hyper-parameters", chosen]
    return "\n\n".join(parts) + "\n"


def print_summary(console: Console, probe: dict[str, Any]) -> None:
    table = Table(title=f"probe of {probe['run']} ({probe['checkpoint']}, round {probe['round']})")
    for column in ("fit", "classifier", "test set", *(METRIC_NAMES[m] for m in METRICS)):
        table.add_column(column, justify="left" if column in ("fit", "classifier", "test set")
                         else "right")
    for r in probe["summary"]:
        table.add_row(r["fit"], r["classifier"], r["on"], *(f"{r[m]:.3f}" for m in METRICS))
    console.print(table)
