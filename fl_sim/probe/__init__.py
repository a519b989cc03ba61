"""`fl-sim probe RUN_DIR`: scikit-learn classifiers on a finished run's features, beside the
network's own head (Task 3 of Wu et al.: deep models as feature extractors for SVM / KNN).

    probe_run(Path("runs/quickstart/fedavg_convnext_t_sgd_s0"), classifiers=["svm", "knn"])

Reads only the run folder (config.yaml, partition.csv, checkpoints/) and the dataset it
names; writes RUN_DIR/probe/: probe.json, probe.csv, probe.md. See docs/probe.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from fl_sim.probe.features import extract_features
from fl_sim.probe.fits import (
    GRIDS,
    head_rows,
    parse_classifiers,
    per_client_fits,
    pooled_fits,
)
from fl_sim.probe.results import print_summary, summarise, write_outputs
from fl_sim.probe.source import CHECKPOINTS, load_run

__all__ = ["CHECKPOINTS", "GRIDS", "parse_classifiers", "probe_run"]

FITS = {
    "per_client": "each client fits on its own train features and picks hyper-parameters on "
                  "its own val features (private: what a hospital can do alone); scored on "
                  "its own val and test splits and on the global test set",
    "pooled": "one fit on every client's train features, hyper-parameters picked on all "
              "clients' val features (an upper bound: it needs the features in one place)",
    "head": "the network's own head on the same images",
}
NO_POOLED = ("No pooled fit: a local run has one model per client, so the clients' features "
             "lie in different spaces and cannot be pooled.")


def probe_run(run_dir: Path, checkpoint: str = "best", classifiers: Sequence[str] = tuple(GRIDS),
              data_root: Path | None = None, console: Console | None = None,
              allow_unfinished: bool = False) -> dict[str, Any]:
    """Probe the run in `run_dir` at checkpoints/<checkpoint>.pt; returns what probe.json
    holds. A run that is not complete is refused unless `allow_unfinished`."""
    console = console or Console()
    classifiers = parse_classifiers(",".join(classifiers))  # fail before any work
    run = load_run(Path(run_dir), checkpoint, data_root, allow_unfinished)
    if run.unfinished:
        console.print(f"[yellow]note:[/] {run.unfinished}: probing its {checkpoint} checkpoint "
                      f"(round {run.round}), not a final model")
    features = extract_features(run, console)
    cfg, clients, num_classes = run.cfg, range(run.data.num_clients), len(run.data.classes)
    # Validation picks the grid point by the metric that picked the run's best round.
    metric = "bacc" if cfg.selection_metric == "loss" else cfg.selection_metric
    rows = head_rows(features, clients, num_classes, run.per_client_models)
    skipped = {"pooled": NO_POOLED} if run.per_client_models else {}
    with console.status("fitting") as status:
        def on_fit(what: str) -> None:
            status.update(f"fitting {what}")

        own, chosen, skipped_clients = per_client_fits(features, clients, classifiers, metric,
                                                       num_classes, cfg.seed, on_fit)
        rows += own
        if "pooled" not in skipped:
            pooled, pooled_chosen = pooled_fits(features, clients, classifiers, metric,
                                                num_classes, cfg.seed, on_fit)
            rows, chosen = rows + pooled, chosen + pooled_chosen
    skipped.update(skipped_clients)
    dim = int(features[(0, "train")].x.shape[1])
    probe = {
        "run": run.run_dir.name, "checkpoint": checkpoint, "round": run.round,
        "unfinished": run.unfinished,  # null: a complete run
        "model": run.model_note,
        "features": (f"CLIP image features in the text space ({dim} dims)"
                     if cfg.training == "clip" else
                     f"penultimate (pre-logits) features of {cfg.model.name} ({dim} dims)"),
        "feature_dim": dim,
        "selection_metric": metric,
        "classifiers": classifiers,
        "grids": {name: [{"estimator": est.__name__, **grid} for est, grid in GRIDS[name]]
                  for name in classifiers},
        "fits": {fit: text for fit, text in FITS.items() if fit not in skipped},
        "skipped": skipped,
        "chosen": chosen,
        "summary": summarise(rows),
        "rows": rows,
    }
    write_outputs(run.run_dir / "probe", probe)
    print_summary(console, probe)
    return probe
