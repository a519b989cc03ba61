"""From a DataConfig to FederatedData: the cached images plus who holds which of them.

The pipeline, the same for every dataset:
1. the dataset's table (one row per image), cut to a lesion-grouped, label-stratified subset
   of about max_images images when asked (always with seed 0, so every partition seed sees
   the same subset and shares one cache);
2. with global_test.source isic2018, the ISIC 2018 test images appended as extra rows;
3. the decoded-image cache of exactly those rows, in that order (built once, then mapped);
4. the global test set: the official test rows (ISIC 2018, DermaMNIST's test split), every
   lesion of one acquisition site (global_test.source site: an unseen domain), or a
   lesion-grouped hold-out of global_test.fraction;
5. the other rows partitioned into clients, then each client's rows split train/val/test,
   by lesion. Steps 4-5 are cheap and computed again by each process, identically.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd

from fl_sim.config import DataConfig
from fl_sim.data_partition import cache, dermamnist, ham10000, isic2018, synthetic
from fl_sim.data_partition.ham10000 import CLASS_NAMES, CLASSES, UNKNOWN_SITE
from fl_sim.data_partition.partitioners import (
    lesion_codes,
    partition_clients,
    split_lesions,
    sub_seed,
    subset_lesions,
)
from fl_sim.errors import FlSimError

# Each dataset module has load_table(cfg), identity(table) and iter_images(table, size, resize).
DATASETS: dict[str, ModuleType] = {
    "ham10000": ham10000,
    "dermamnist": dermamnist,
    "synthetic": synthetic,
}
SPLITS = ("train", "val", "test")
GLOBAL = "global"
MANIFEST_COLUMNS = ["image_id", "lesion_id", "label", "client", "split"]
SUBSET_SEED = 0


@dataclass(frozen=True, eq=False)
class FederatedData:
    """The images of a run and their partition. Row i of `images`, `labels` and `manifest`
    is the same image."""

    images: np.ndarray  # (N, S, S, 3) uint8, read-only memmap of the cache file
    labels: np.ndarray  # (N,) int64 indices into `classes`
    classes: list[str]  # short codes: akiec, bcc, bkl, df, mel, nv, vasc
    class_names: list[str]  # readable names, same order
    manifest: pd.DataFrame  # image_id, lesion_id, label, client ("0".. or "global"), split, site
    num_clients: int

    @functools.cached_property
    def digest(self) -> str:
        """A fingerprint of who holds what (image id, client, split): a SuperNode that
        partitions its own copy of the data checks it against the server's."""
        held = self.manifest[["image_id", "client", "split"]].to_csv(index=False)
        return hashlib.sha256(held.encode()).hexdigest()[:16]

    def indices(self, client: int | str, split: str) -> np.ndarray:
        """Sorted row indices of one client's split; ("global", "test") is the global test set."""
        client = str(client)
        is_client = client in {str(c) for c in range(self.num_clients)} and split in SPLITS
        if not (is_client or (client == GLOBAL and split == "test")):
            raise ValueError(
                f"no rows for client {client!r}, split {split!r}: clients are "
                f"0..{self.num_clients - 1} "
                f"with splits {', '.join(SPLITS)}, and 'global' with split 'test'"
            )
        rows = (self.manifest["client"] == client) & (self.manifest["split"] == split)
        return np.flatnonzero(rows.to_numpy()).astype(np.int64)

    def write_manifest(self, path: Path) -> None:
        """partition.csv: image_id, lesion_id, label, client, split (one row per image)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.manifest[MANIFEST_COLUMNS].to_csv(path, index=False)


def prepare_data(
    cfg: DataConfig, *, progress: bool = True, check_splits: bool = True
) -> FederatedData:
    """Load (building on first use) the decoded-image cache, then partition deterministically.

    Cheap once the cache exists, and safe to call from several processes at once. A client
    with an empty split is an error unless `check_splits` is False (`data inspect` warns).
    """
    _check_global_test(cfg)
    module = DATASETS[cfg.dataset]
    table = module.load_table(cfg)
    if cfg.max_images is not None:
        keep = subset_lesions(
            _label_indices(table), table["lesion_id"].to_numpy(), cfg.max_images, SUBSET_SEED
        )
        table = table[keep]
    name = cfg.dataset
    if cfg.global_test.source == "isic2018":
        assert cfg.global_test.root is not None  # GlobalTestConfig requires it
        table = pd.concat([table, isic2018.load_table(cfg.global_test.root)])
        name = f"{cfg.dataset}-isic2018"
    table = table.reset_index(drop=True)

    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache.default_cache_dir()
    path = cache.cache_path(cache_dir, name, cfg.image_size, cfg.resize, module.identity(table))
    images = cache.load_or_build(
        path,
        len(table),
        cfg.image_size,
        lambda: module.iter_images(table, cfg.image_size, cfg.resize),
        description={
            "dataset": name,
            "root": cfg.root,
            "global_test_root": cfg.global_test.root,
            "images": len(table),
            "image_size": cfg.image_size,
            "resize": cfg.resize,
            "max_images": cfg.max_images,
        },
        progress=progress,
    )
    labels = _label_indices(table)
    client, split = _partition(cfg, table, labels)
    manifest = pd.DataFrame(
        {
            "image_id": table["image_id"],
            "lesion_id": table["lesion_id"],
            "label": table["label"],
            "client": client,
            "split": split,
            "site": table["site"],
        }
    )
    num_clients = len(set(client) - {GLOBAL})
    data = FederatedData(images, labels, list(CLASSES), list(CLASS_NAMES), manifest, num_clients)
    if check_splits:
        check_client_splits(cfg, data)
    return data


def check_client_splits(cfg: DataConfig, data: FederatedData) -> None:
    """Every client trains on train, picks its best round on val and reports test: an empty
    one fails every round of every run, so refuse before any run starts."""
    held = set(zip(data.manifest["client"], data.manifest["split"], strict=True))
    empty = {
        split: [c for c in range(data.num_clients) if (str(c), split) not in held]
        for split in SPLITS
    }
    gaps = [
        f"{split} is empty at {len(clients)} of {data.num_clients} clients ({_first(clients)})"
        for split, clients in empty.items()
        if clients
    ]
    if not gaps:
        return
    fewer = (
        "another partition method ('site' makes one client per site)"
        if cfg.partition.method == "site"
        else f"fewer clients (partition.num_clients is {cfg.partition.num_clients})"
    )
    more = "more images" + (f" (max_images is {cfg.max_images})" if cfg.max_images else "")
    s = cfg.partition.splits
    raise FlSimError(
        f"The partition leaves clients without images in a split: {'; '.join(gaps)}. A lesion "
        "is never split, so a client with few lesions cannot fill train, val and test. Use "
        f"{fewer}, {more}, or other split fractions "
        f"(partition.splits is train {s.train:g}, val {s.val:g}, test {s.test:g})."
    )


def _first(clients: list[int], shown: int = 5) -> str:
    """'3, 7, 9, 12, 15, ...': the first few of a long list."""
    return ", ".join(map(str, clients[:shown])) + (", ..." if len(clients) > shown else "")


def _check_global_test(cfg: DataConfig) -> None:
    if cfg.global_test.source == "isic2018" and cfg.dataset != "ham10000":
        why = {
            "dermamnist": "DermaMNIST's own test split is its global test set",
            "synthetic": "a model trained on synthetic images says nothing on real ones",
        }[cfg.dataset]
        raise FlSimError(
            f"global_test.source 'isic2018' goes with dataset 'ham10000' only, not "
            f"'{cfg.dataset}' ({why}). Use global_test.source: holdout."
        )


def _site_rows(table: pd.DataFrame, site: str | None) -> np.ndarray:
    """The images of the lesions mostly photographed at `site` (a lesion stays whole: one
    seen at two sites must not sit in both the test set and a client's training data)."""
    sites = table["site"].to_numpy()
    known = sorted(set(sites) - {UNKNOWN_SITE})
    if site not in known:
        raise FlSimError(f"global_test.site {site!r} is not a site of this dataset; its sites: "
                         f"{', '.join(known) or 'none (no site column)'}.")
    codes, lesion_site = lesion_codes(table["lesion_id"].to_numpy(), sites)
    held_out = lesion_site[codes] == site
    if held_out.all():
        raise FlSimError(f"global_test.site {site!r} holds every image: nothing is left for "
                         "the clients.")
    return held_out


def _label_indices(table: pd.DataFrame) -> np.ndarray:
    return pd.Categorical(table["label"], categories=CLASSES).codes.astype(np.int64)


def _partition(
    cfg: DataConfig, table: pd.DataFrame, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(client, split) per row: "global"/"test" for the global test set, else "0".. and a split."""
    seed = cfg.partition.seed
    groups = table["lesion_id"].to_numpy()
    if cfg.dataset == "dermamnist" or cfg.global_test.source == "isic2018":
        is_global = table["official_test"].to_numpy(dtype=bool)
        if not is_global.any():
            raise FlSimError(
                f"max_images={cfg.max_images} kept no image of {cfg.dataset}'s official test "
                "split, so the server would have no test set. Raise max_images."
            )
    elif cfg.global_test.source == "none":  # a node's own data: none of it for the server
        is_global = np.zeros(len(table), dtype=bool)
    elif cfg.global_test.source == "site":
        is_global = _site_rows(table, cfg.global_test.site)
    else:  # hold out a fraction of the lesions
        fraction = cfg.global_test.fraction
        is_global = split_lesions(labels, groups, [1 - fraction, fraction], sub_seed(seed, 1)) == 1

    client = np.full(len(table), GLOBAL, dtype=object)
    split = np.full(len(table), "test", dtype=object)
    pool = np.flatnonzero(~is_global)
    owner = partition_clients(
        labels[pool], groups[pool], table["site"].to_numpy()[pool], cfg.partition
    )
    fractions = [cfg.partition.splits.train, cfg.partition.splits.val, cfg.partition.splits.test]
    for c in np.unique(owner):
        rows = pool[owner == c]
        part = split_lesions(labels[rows], groups[rows], fractions, sub_seed(seed, 2, int(c)))
        client[rows] = str(c)
        split[rows] = np.asarray(SPLITS, dtype=object)[part]
    return client, split
