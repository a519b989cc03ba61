"""The feature-probe section of report.md, from the probe/probe.json that `fl-sim probe`
leaves in a run directory: probe classifiers against the network's own head."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fl_sim.report.collect import METRICS, Study
from fl_sim.report.markdown import gap, markdown_table
from fl_sim.report.tables import METRIC_NAMES

PROBE_FILE = Path("probe") / "probe.json"
PROBES_TEXT = (
    "Classifiers fitted on each run's features by `fl-sim probe` (hyper-parameters chosen on "
    "validation only), beside the network's own head on the same images. **per_client**: "
    "each client fits on its own train features only (private); **pooled**: one fit on all "
    "clients' train features (an upper bound that shares features). *global test*: the "
    "server's global test set (per_client: the mean over the clients' classifiers); *mean "
    "client test*: the unweighted mean over the clients' own test splits. Δ: minus the head "
    "on the same test set. Details per client: `<run>/probe/probe.md`.")


def probe_table(summary: list[dict[str, Any]]) -> str:
    """A row per fit × classifier × test set of probe.json's `summary`, with the gap to the
    head's row of the same test set."""
    head = {r["on"]: r for r in summary if r["fit"] == "head"}
    deltas = ("bacc", "avg")
    header = ["fit", "classifier", "test set", *(METRIC_NAMES[m] for m in METRICS),
              *(f"Δ {METRIC_NAMES[m]}" for m in deltas)]
    return markdown_table(header, [
        [r["fit"], r["classifier"], r["on"], *(f"{r[m]:.3f}" for m in METRICS),
         *("—" if r["fit"] == "head" or r["on"] not in head else gap(r[m] - head[r["on"]][m])
           for m in deltas)]
        for r in summary])


def probes_section(study: Study) -> list[str]:
    """A table per reported run that holds a probe; nothing where none does."""
    parts, broken = [], []
    for run in sorted(study.runs["run"]):
        path = study.folder / run / PROBE_FILE
        if not path.exists():
            continue
        try:
            probe = json.loads(path.read_text(encoding="utf-8"))
            parts += [f"### {run}",
                      (f"Checkpoint {probe['checkpoint']} (round {probe['round']}), "
                       f"{probe['model']}; {probe['features']}."),
                      probe_table(probe["summary"]), *probe["skipped"].values()]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            broken.append(f"`{run}` ({type(err).__name__}: {err})")
    if broken:
        parts.append(f"Unreadable {PROBE_FILE} (run `fl-sim probe` again): {', '.join(broken)}.")
    return ["## Feature probes", PROBES_TEXT, *parts] if parts else []
