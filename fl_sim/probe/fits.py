"""scikit-learn classifiers on the features: a small grid per classifier, the point of the
grid chosen on validation only, then scored on val, test and the global test set.

Two fits, and the network's own head beside them:
- per_client: each client fits on its own train features and selects on its own val
  features; nothing of another client reaches it (what a hospital could do alone);
- pooled: one fit on every client's train features, selected on all val features (an upper
  bound: it needs the clients' features in one place).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import ParameterGrid
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from fl_sim.errors import FlSimError
from fl_sim.metrics import classification_metrics
from fl_sim.probe.features import CLIENT_SPLITS, GLOBAL_TEST, Features, Split

# name -> [(estimator, its grid)]. The linear SVM is the hinge loss fitted by SGD: liblinear
# (LinearSVC) took minutes per fit on 1,700 standardised 1,280-d HAM10000 features on 2
# cores, libsvm's linear kernel grows with the square of the images.
GRIDS: dict[str, list[tuple[Callable[..., ClassifierMixin], dict[str, list[Any]]]]] = {
    "svm": [(SGDClassifier, {"loss": ["hinge"], "alpha": [1e-4, 1e-3, 1e-2],
                             "class_weight": [None, "balanced"]}),
            (SVC, {"kernel": ["rbf"], "C": [0.1, 1.0, 10.0], "class_weight": [None, "balanced"]})],
    "knn": [(KNeighborsClassifier, {"n_neighbors": [1, 3, 5, 9, 15, 25],
                                    "weights": ["uniform", "distance"]})],
    "logreg": [(LogisticRegression, {"C": [0.01, 0.1, 1.0, 10.0],
                                     "class_weight": [None, "balanced"]})],
    "rf": [(RandomForestClassifier, {"n_estimators": [200], "max_depth": [None, 12],
                                     "class_weight": [None, "balanced_subsample"]})],
}
FIXED = {SGDClassifier: {"max_iter": 200, "tol": 1e-4}, LogisticRegression: {"max_iter": 1000},
         RandomForestClassifier: {"n_jobs": -1}}


def parse_classifiers(text: str) -> list[str]:
    """'svm,knn' -> ['svm', 'knn']; FlSimError naming an unknown one."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in GRIDS]
    if unknown or not names:
        what = f"unknown {', '.join(unknown)}" if unknown else "no name given"
        raise FlSimError(f"--classifiers {text!r}: {what}; choose from {', '.join(GRIDS)} "
                         "(comma-separated, e.g. svm,knn).")
    return list(dict.fromkeys(names))


@dataclass
class Fit:
    """A fitted pipeline (standardise, classify) and the grid point validation chose."""

    classifier: str
    params: dict[str, Any]
    val_score: float
    model: Pipeline

    def predict(self, split: Split) -> np.ndarray:
        return self.model.predict(split.x)


def candidates(name: str, n_train: int, seed: int) -> list[tuple[dict[str, Any], Pipeline]]:
    """Every grid point of `name` as an unfitted pipeline; k-NN's k at most the train size."""
    out = []
    for estimator, grid in GRIDS[name]:
        for params in ParameterGrid(grid):
            if params.get("n_neighbors", 0) > n_train:
                continue
            clf = estimator(**params, **FIXED.get(estimator, {}))
            if "random_state" in clf.get_params():
                clf.set_params(random_state=seed)
            out.append(({"estimator": estimator.__name__, **params},
                        make_pipeline(StandardScaler(), clf)))
    return out


def select(name: str, train: Split, val: Split, metric: str, num_classes: int,
           seed: int) -> Fit:
    """Fit every grid point on `train`, keep the best on `val` by `metric` (the first of a
    tie). The scaler is fitted on `train` only, inside each pipeline."""
    best: Fit | None = None
    with warnings.catch_warnings():
        # An unconverged grid point is still scored on validation like any other.
        warnings.simplefilter("ignore", ConvergenceWarning)
        for params, pipeline in candidates(name, len(train.y), seed):
            pipeline.fit(train.x, train.y)
            score = classification_metrics(val.y, pipeline.predict(val.x), num_classes)[metric]
            if best is None or score > best.val_score:
                best = Fit(name, params, score, pipeline)
    assert best is not None  # every grid has a point for any train size >= 1
    return best


def row(fit: str, client: int | None, classifier: str, split: str, y_true: np.ndarray,
        y_pred: np.ndarray, num_classes: int) -> dict[str, Any]:
    return {"fit": fit, "client": client, "classifier": classifier, "split": split,
            **classification_metrics(y_true, y_pred, num_classes)}


def unfittable(train: Split, val: Split) -> str | None:
    """Why no classifier can be fitted and selected on these splits, or None."""
    if len(np.unique(train.y)) < 2:
        return "its train split holds a single class"
    if len(val.y) == 0:
        return "its val split is empty: nothing to select on"
    return None


def per_client_fits(features: Features, clients: range, classifiers: list[str], metric: str,
                    num_classes: int, seed: int, on_fit: Callable[[str], None] = lambda what: None
                    ) -> tuple[list[dict], list[dict], dict[str, str]]:
    """Rows and chosen hyper-parameters of each client's own fits, and the clients skipped
    (e.g. a Dirichlet client with one class) with the reason; `on_fit` hears of each fit."""
    rows, chosen, skipped = [], [], {}
    for c in clients:
        own = {s: features[(c, s)] for s in (*CLIENT_SPLITS, GLOBAL_TEST)}
        if why := unfittable(own["train"], own["val"]):
            skipped[f"per_client client {c}"] = f"no fit: {why}"
            continue
        for name in classifiers:
            on_fit(f"per_client: client {c}, {name}")
            fit = select(name, own["train"], own["val"], metric, num_classes, seed)
            chosen.append({"fit": "per_client", "client": c, "classifier": name,
                           "params": fit.params, f"val_{metric}": fit.val_score})
            rows += [row("per_client", c, name, s, own[s].y, fit.predict(own[s]), num_classes)
                     for s in ("val", "test", GLOBAL_TEST)]
    return rows, chosen, skipped


def pooled_fits(features: Features, clients: range, classifiers: list[str], metric: str,
                num_classes: int, seed: int, on_fit: Callable[[str], None] = lambda what: None
                ) -> tuple[list[dict], list[dict]]:
    """Rows and chosen hyper-parameters of the fits on all clients' features together."""
    train = Split.concat([features[(c, "train")] for c in clients])
    val = Split.concat([features[(c, "val")] for c in clients])
    global_test = features[(clients[0], GLOBAL_TEST)]  # one model: the same for every client
    if why := unfittable(train, val):
        raise FlSimError(f"no pooled fit on the clients' features together: {why}.")
    rows, chosen = [], []
    for name in classifiers:
        on_fit(f"pooled: {name}")
        fit = select(name, train, val, metric, num_classes, seed)
        chosen.append({"fit": "pooled", "client": None, "classifier": name,
                       "params": fit.params, f"val_{metric}": fit.val_score})
        rows += [row("pooled", c, name, s, features[(c, s)].y, fit.predict(features[(c, s)]),
                     num_classes) for c in clients for s in ("val", "test")]
        rows.append(row("pooled", None, name, GLOBAL_TEST, global_test.y,
                        fit.predict(global_test), num_classes))
    return rows, chosen


def head_rows(features: Features, clients: range, num_classes: int,
              per_client_models: bool) -> list[dict]:
    """The network's own predictions on the same splits. One shared model has one row on
    the global test set; a local run has one per client's model."""
    rows = [row("head", c, "head", s, features[(c, s)].y, features[(c, s)].head, num_classes)
            for c in clients for s in ("val", "test")]
    if per_client_models:
        rows += [row("head", c, "head", GLOBAL_TEST, features[(c, GLOBAL_TEST)].y,
                     features[(c, GLOBAL_TEST)].head, num_classes) for c in clients]
    else:
        shared = features[(clients[0], GLOBAL_TEST)]
        rows.append(row("head", None, "head", GLOBAL_TEST, shared.y, shared.head, num_classes))
    return rows
