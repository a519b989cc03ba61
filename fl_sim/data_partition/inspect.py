"""`fl-sim data inspect`: who holds what, as a table, and the gaps worth knowing before a run."""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.table import Table

from fl_sim.config import DataConfig
from fl_sim.data_partition.federated import GLOBAL, SPLITS, FederatedData, prepare_data
from fl_sim.data_partition.partitioners import label_skew


def inspect_data(cfg: DataConfig, console: Console | None = None) -> list[str]:
    """Print image and class counts per client and split plus the global test set; print and
    return the warnings: a client with no training image of a class, an empty split, a class
    missing from the global test set."""
    console = console or Console()
    data = prepare_data(cfg, progress=True, check_splits=False)  # an empty split: a warning
    console.print(_table(cfg, data))
    pool = data.manifest["client"].to_numpy() != GLOBAL
    skew = label_skew(
        data.labels[pool], data.manifest["client"].to_numpy()[pool], len(data.classes)
    )
    console.print(
        f"{data.num_clients} clients ({cfg.partition.method}), {int(pool.sum())} client images, "
        f"{len(data.indices(GLOBAL, 'test'))} global test images"
        + (f" (site {cfg.global_test.site}, held out whole: no client sees it)"
           if cfg.global_test.source == "site" else "")
        + "; label skew "
        f"(mean total-variation distance to the pooled label mix): {skew:.3f}"
    )
    warnings = data_warnings(cfg, data)
    for line in warnings:
        console.print(f"[yellow]warning:[/yellow] {line}")
    return warnings


def _table(cfg: DataConfig, data: FederatedData) -> Table:
    table = Table(title=f"{cfg.dataset}: {len(data.labels)} images, {cfg.image_size}px")
    for col in ("client", "split", "n", *data.classes):
        table.add_column(
            col, justify="left" if col in ("client", "split") else "right", no_wrap=True
        )
    sites = data.manifest.groupby("client")["site"].agg(lambda s: s.mode().iloc[0])
    groups = [(str(c), s) for c in range(data.num_clients) for s in SPLITS] + [(GLOBAL, "test")]
    for client, split in groups:
        rows = data.indices(client, split)
        counts = np.bincount(data.labels[rows], minlength=len(data.classes))
        name = client
        if cfg.partition.method == "site" and client != GLOBAL:
            name = f"{client} ({sites[client]})"
        table.add_row(
            name if split == "train" or client == GLOBAL else "",
            split,
            str(len(rows)),
            *map(str, counts),
            end_section=split == "test",
        )
    return table


SMALL_TEST_SET = 100  # global test images below which one image moves ACC by over a point


def data_warnings(cfg: DataConfig, data: FederatedData) -> list[str]:
    """The gaps worth knowing before a run (`data inspect` and `fl-sim run` print them)."""
    out = []
    for c in range(data.num_clients):
        train = np.bincount(data.labels[data.indices(c, "train")], minlength=len(data.classes))
        for code, n in zip(data.classes, train, strict=True):
            if n == 0:
                out.append(f"client {c} has no training image of class '{code}'")
        for split in ("val", "test"):
            wanted = getattr(cfg.partition.splits, split) > 0
            if wanted and len(data.indices(c, split)) == 0:
                out.append(f"client {c} has an empty {split} split")
    held_out = np.bincount(data.labels[data.indices(GLOBAL, "test")], minlength=len(data.classes))
    for code, n in zip(data.classes, held_out, strict=True):
        if n == 0:
            out.append(f"the global test set has no image of class '{code}'")
    if 0 < (n := int(held_out.sum())) < SMALL_TEST_SET:
        out.append(f"the global test set holds {n} images: one image moves its ACC by "
                   f"{100 / n:.1f} points, and the report's intervals will say how little it "
                   "can tell apart (raise max_images or global_test.fraction)")
    out += _mixed_lesions(data)
    return out


def _mixed_lesions(data: FederatedData) -> list[str]:
    """Lesions whose images carry different labels: a partition by lesion keeps them on one
    client, so the client trains on contradicting labels of one lesion."""
    labels = data.manifest.assign(label=data.labels).groupby("lesion_id")["label"].nunique()
    mixed = labels[labels > 1].index.tolist()
    if not mixed:
        return []
    more = f" and {len(mixed) - 5} more" if len(mixed) > 5 else ""
    shown = ", ".join(map(str, mixed[:5])) + more
    return [f"{len(mixed)} lesion(s) have images with different labels ({shown}): check the "
            "metadata; they are trained on as labelled"]
