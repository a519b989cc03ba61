"""Who holds which lesions: the client partitioners and the lesion-grouped splits.

Everything works on lesions, never on images: each lesion (with all its images) goes to one
client and one split, so no lesion leaks across clients or across a client's train/val/test.
A lesion's label is its images' most common label (in HAM10000 every lesion has one label).

Stratified splits use scikit-learn's StratifiedKFold over the table of lesions, which is a
label-stratified, lesion-grouped split of the images. (StratifiedGroupKFold over the images
gives the same grouping but costs O(lesions x folds) Python steps: 11 s for 20 folds and 65 s
for 100 on HAM10000, paid again in every Ray client process; over lesions it takes
milliseconds.) Fold counts are balanced in lesions, so image counts match the fractions to
within the spread of images per lesion (about 1% on HAM10000).

A partitioner maps (labels, groups, sites, cfg) -> client index per image, 0..num_clients-1.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from fractions import Fraction

import numpy as np
import pandas as pd
from sklearn.model_selection import KFold, StratifiedKFold

from fl_sim.config import PartitionConfig
from fl_sim.data_partition.ham10000 import UNKNOWN_SITE
from fl_sim.errors import FlSimError

Partitioner = Callable[[np.ndarray, np.ndarray, np.ndarray, PartitionConfig], np.ndarray]

MAX_FOLDS = 100  # split fractions are honoured to 1/100 (exactly for 0.6/0.2/0.2, 0.15, ...)
SUBSET_MAX_FOLDS = 1000  # max_images down to 1/1000 of the data
DIRICHLET_DRAWS = 10  # redraws (as Flower Datasets does) before an empty client is an error


def sub_seed(seed: int, *tags: int) -> int:
    """An independent seed for one stage (and client) of the pipeline, fixed by `seed`.

    Tags in use: 1 global hold-out, (2, client) client splits, 10 random, 11 dirichlet.
    """
    return int(np.random.SeedSequence([seed, *tags]).generate_state(1)[0])


def lesion_codes(groups: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lesion index per image, most common value per lesion; ties go to the smaller value)."""
    codes, uniques = pd.factorize(pd.Series(groups), sort=True)
    counts = pd.DataFrame({"g": codes, "v": values}).value_counts().reset_index()
    counts = counts.sort_values(["g", "count", "v"], ascending=[True, False, True])
    per_lesion = counts.drop_duplicates("g").sort_values("g")["v"].to_numpy()
    assert len(per_lesion) == len(uniques)
    return codes, per_lesion


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index (0..k-1) per item, label-stratified where any label has k members."""
    if k == 1:
        return np.zeros(len(labels), dtype=np.int64)
    stratify = np.bincount(labels).max() >= k  # else StratifiedKFold refuses: plain folds
    splitter = (StratifiedKFold if stratify else KFold)(k, shuffle=True, random_state=seed)
    folds = np.empty(len(labels), dtype=np.int64)
    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits"
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
            folds[held] = fold
    return folds


def fold_plan(fractions: Sequence[float], n: int, max_folds: int = MAX_FOLDS) -> list[int]:
    """How many of k = min(n, the smallest common denominator <= max_folds) folds each part gets.

    Every part with a positive fraction gets at least one fold when there are enough, earlier
    parts first (a client's train split before its val and test).
    """
    denominators = [Fraction(f).limit_denominator(max_folds).denominator for f in fractions]
    k = min(math.lcm(*denominators), max_folds, n)
    exact = np.asarray(fractions, dtype=float) * k
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: k - counts.sum()]:
        counts[i] += 1  # largest remainders
    for i, f in enumerate(fractions):
        donor = int(np.argmax(counts))
        if f > 0 and counts[i] == 0 and (counts[donor] > 1 or donor > i):
            counts[i] += 1
            counts[donor] -= 1
    return counts.tolist()


def split_lesions(
    labels: np.ndarray,
    groups: np.ndarray,
    fractions: Sequence[float],
    seed: int,
    max_folds: int = MAX_FOLDS,
) -> np.ndarray:
    """Part index per image (0 = first fraction), lesion-grouped and label-stratified."""
    codes, lesion_labels = lesion_codes(groups, labels)
    counts = fold_plan(fractions, len(lesion_labels), max_folds)
    folds = stratified_folds(lesion_labels, sum(counts), seed)
    # Which folds form which part is drawn at random: a class rarer than k lands in a run of
    # consecutive folds, and a fixed mapping would always send it to the same part.
    part_of_fold = np.random.default_rng(seed).permutation(
        np.repeat(np.arange(len(counts)), counts)
    )
    return part_of_fold[folds][codes]


def subset_lesions(
    labels: np.ndarray, groups: np.ndarray, max_images: int, seed: int
) -> np.ndarray:
    """Mask of a lesion-grouped, label-stratified subset of about max_images images."""
    share = min(max_images / len(labels), 1.0)
    if share == 1.0:
        return np.ones(len(labels), dtype=bool)
    return split_lesions(labels, groups, [share, 1 - share], seed, SUBSET_MAX_FOLDS) == 0


# ----------------------------------------------------------------------------- partitioners


def random_partition(
    labels: np.ndarray, groups: np.ndarray, sites: np.ndarray, cfg: PartitionConfig
) -> np.ndarray:
    """FHAM: lesions dealt to num_clients clients of near-equal size, stratified by label."""
    codes, lesion_labels = lesion_codes(groups, labels)
    _check_enough_lesions(len(lesion_labels), cfg)
    return stratified_folds(lesion_labels, cfg.num_clients, sub_seed(cfg.seed, 10))[codes]


def dirichlet_partition(
    labels: np.ndarray, groups: np.ndarray, sites: np.ndarray, cfg: PartitionConfig
) -> np.ndarray:
    """Label skew: each class's lesions split over clients in proportions ~ Dirichlet(alpha).

    Small alpha gives each client few classes; large alpha approaches the random partition.
    A draw that leaves a client empty is redrawn, up to DIRICHLET_DRAWS times.
    """
    codes, lesion_labels = lesion_codes(groups, labels)
    _check_enough_lesions(len(lesion_labels), cfg)
    rng = np.random.default_rng(sub_seed(cfg.seed, 11))
    client = np.empty(len(lesion_labels), dtype=np.int64)
    for _ in range(DIRICHLET_DRAWS):
        for label in np.unique(lesion_labels):
            members = rng.permutation(np.flatnonzero(lesion_labels == label))
            share = rng.dirichlet(np.full(cfg.num_clients, cfg.alpha))
            cuts = np.round(np.cumsum(share)[:-1] * len(members)).astype(int)
            for c, part in enumerate(np.split(members, cuts)):
                client[part] = c
        if len(np.unique(client)) == cfg.num_clients:
            break
    return client[codes]


def site_partition(
    labels: np.ndarray, groups: np.ndarray, sites: np.ndarray, cfg: PartitionConfig
) -> np.ndarray:
    """One client per acquisition site, in sorted site order; num_clients is ignored.

    A lesion photographed at two sites (9 of HAM10000's 7,470) goes whole to the site of
    most of its images, so its odd image sits at another site's client.
    """
    if (sites == UNKNOWN_SITE).any():
        raise FlSimError(
            "Partition method 'site' needs the acquisition site of every image (HAM10000's "
            f"'dataset' column), but {int((sites == UNKNOWN_SITE).sum())} image(s) have none. "
            "Use partition.method 'random' or 'dirichlet', or a metadata file with the "
            "'dataset' column."
        )
    codes, lesion_sites = lesion_codes(groups, sites)
    return np.searchsorted(np.unique(sites), lesion_sites)[codes]


PARTITIONERS: dict[str, Partitioner] = {
    "random": random_partition,
    "dirichlet": dirichlet_partition,
    "site": site_partition,
}


def partition_clients(
    labels: np.ndarray, groups: np.ndarray, sites: np.ndarray, cfg: PartitionConfig
) -> np.ndarray:
    """Client index per image by cfg.method; an error if any client ends up empty."""
    client = PARTITIONERS[cfg.method](labels, groups, sites, cfg)
    num_clients = len(np.unique(sites)) if cfg.method == "site" else cfg.num_clients
    sizes = np.bincount(client, minlength=num_clients)
    if (sizes == 0).any():
        empty = int(np.flatnonzero(sizes == 0)[0])
        if cfg.method == "dirichlet":
            why = (
                f"in each of {DIRICHLET_DRAWS} draws of Dirichlet(alpha={cfg.alpha:g}): at "
                "small alpha each class goes to few clients. Use fewer clients or a larger alpha."
            )
        else:
            why = "(every lesion of its site went to another site). Use another partition method."
        raise FlSimError(
            f"Partition '{cfg.method}' (num_clients={num_clients}, seed={cfg.seed}) left "
            f"client {empty} with no image {why}"
        )
    return client


def label_skew(labels: np.ndarray, clients: np.ndarray, num_classes: int) -> float:
    """Mean over clients of the total-variation distance between the client's label mix and
    the pooled one: 0 = every client mirrors the whole, 1 = disjoint classes."""
    pooled = np.bincount(labels, minlength=num_classes) / len(labels)
    distances = []
    for c in np.unique(clients):
        mine = np.bincount(labels[clients == c], minlength=num_classes)
        distances.append(0.5 * np.abs(mine / mine.sum() - pooled).sum())
    return float(np.mean(distances))


def _check_enough_lesions(num_lesions: int, cfg: PartitionConfig) -> None:
    if cfg.num_clients > num_lesions:
        raise FlSimError(
            f"Partition '{cfg.method}' asks for {cfg.num_clients} clients but the data has only "
            f"{num_lesions} lesions, so client {num_lesions} would be empty (a lesion is never "
            "split between clients). Use fewer clients or more images (raise max_images)."
        )
