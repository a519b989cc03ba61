"""`fl-sim report` on fake but consistent run directories: files, numbers, winners, skips,
the federated strategies against the pooled and local baselines."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fl_sim.config import RunConfig, run_name
from fl_sim.errors import FlSimError
from fl_sim.report import load_study, seed_table, write_report
from fl_sim.report.markdown import baselines_section, winner_line
from fl_sim.report.tables import METRIC_NAMES, versus_pooled, winners
from fl_sim.report.uncertainty import Bootstrap

HEADLINE = ("acc", "bacc", "precision", "recall", "f1")
METRICS = (*HEADLINE, "avg")
STRATEGIES = ({"name": "fedavg"}, {"name": "fedprox", "proximal_mu": 0.01})
BASELINES = ({"name": "pooled"}, {"name": "local"})
STRATEGY_EFFECT = {"fedprox": 0.1, "pooled": 0.15, "local": -0.1}  # above fedavg
CLIENTS, ROUNDS = 3, 3


def write_run(study: Path, strategy: dict, model: str, seed: int, seed_effect: float = 0.01,
              complete: bool = True, offset: float = 0.0, **settings) -> Path:
    """A run directory as FederatedRun (or the pooled / local baseline) writes it; scores
    are STRATEGY_EFFECT above fedavg plus `offset`, the second model 0.05 above the first,
    and the best round is 2 for seed 0, 3 for seed 1. A local run also writes each client's
    model on the global test set (split global_test), and its global row is their mean."""
    cfg = RunConfig(rounds=ROUNDS, model={"name": model}, strategy=strategy, seed=seed, **settings)
    run_dir = study / run_name(cfg)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(
        {"study": study.name, "run": run_dir.name, "data": {"dataset": "synthetic"},
         "run_config": cfg.model_dump(mode="json")}, sort_keys=False))
    local = strategy["name"] == "local"
    base = (0.4 + STRATEGY_EFFECT.get(strategy["name"], 0.0) + 0.05 * model.endswith("1")
            + seed_effect * seed + offset)

    def metrics(r: int, client: int | None, split: str) -> dict:
        shift = 0.02 * r + (split == "val") * 0.01 - (split == "global_test") * 0.04
        shift += 0.03 * (client + 1) if client is not None else 0
        m = {"n": 100, "loss": 1 - shift}
        m.update({k: round(base + shift - 0.01 * i, 6) for i, k in enumerate(HEADLINE)})
        m["avg"] = sum(m[k] for k in HEADLINE) / len(HEADLINE)
        return m

    def global_test(r: int) -> dict:
        if not local:
            return metrics(r, None, "test")
        clients = [metrics(r, c, "global_test") for c in range(CLIENTS)]
        return {k: statistics.mean(m[k] for m in clients) for k in clients[0]}

    rows = [{"round": 0, "scope": "global", "client": None, "split": "test", **global_test(0)}]
    for r in range(1, ROUNDS + 1):
        rows += [{"round": r, "scope": "client", "client": c, "split": "train", "n": 300,
                  "loss": 0.5} for c in range(CLIENTS)]
        splits = ("val", "test", "global_test") if local else ("val", "test")
        rows += [{"round": r, "scope": "client", "client": c, "split": s, **metrics(r, c, s)}
                 for c in range(CLIENTS) for s in splits]
        rows.append({"round": r, "scope": "federated", "client": None, "split": "val",
                     **metrics(r, None, "val")})
        rows.append({"round": r, "scope": "global", "client": None, "split": "test",
                     **global_test(r)})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    best = 2 + seed if complete else 1
    (run_dir / "summary.json").write_text(json.dumps(
        {"run": run_dir.name, "complete": complete, "rounds": ROUNDS, "best": {"round": best},
         "final": {"round": ROUNDS if complete else 1}, "wall_time_s": 12.5,
         "bytes_sent": 2_000_000}))
    return run_dir


def write_study(study: Path, models: tuple[str, ...] = ("tiny0", "tiny1"),
                strategies: tuple[dict, ...] = STRATEGIES, **kwargs) -> Path:
    for strategy in strategies:
        for model in models:
            for seed in (0, 1):
                write_run(study, strategy, model, seed, **kwargs)
    return study


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    study = write_study(tmp_path_factory.mktemp("out") / "fake")
    write_run(study, STRATEGIES[0], "tiny0", 7, complete=False)
    return write_report(study)


def expected(study: Path, run: str, test_set: str, split: str = "test") -> dict[str, list[float]]:
    """Per metric, the values of the seeds' runs (folders `<run>_s<seed>`), straight from
    metrics.jsonl at the best round."""
    values: dict[str, list[float]] = {m: [] for m in METRICS}
    for seed in (0, 1):
        run_dir = study / f"{run}_s{seed}"
        best = json.loads((run_dir / "summary.json").read_text())["best"]["round"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            where = "global" if row["scope"] == "global" else f"client {row['client']}"
            if row["round"] == best and row["split"] == split and where == test_set:
                for m in values:
                    values[m].append(row[m])
    return values


def test_writes_tables_and_figures(report: Path):
    out = report.parent
    assert report.name == "report.md" and report.exists()
    assert (out / "test_metrics.csv").exists()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["clients_tiny0_sgd.png", "clients_tiny1_sgd.png",
                    "convergence_tiny0_sgd.png", "convergence_tiny1_sgd.png",
                    "spider_fedavg_sgd.png", "spider_fedprox-mu0.01_sgd.png"]
    text = report.read_text()
    assert all(f"]({p})" in text for p in pngs)


def test_numbers_match_metrics_jsonl(report: Path):
    study = report.parent.parent
    table = pd.read_csv(report.parent / "test_metrics.csv")
    assert len(table) == 2 * 2 * (1 + CLIENTS)  # strategies x models x (global + clients)
    text = report.read_text()
    for _, row in table.iterrows():
        values = expected(study, f"{row['strategy']}_{row['model']}_sgd", row["test_set"])
        assert row["seeds"] == 2
        for metric, seeds in values.items():
            assert len(seeds) == 2
            assert row[f"{metric}_mean"] == pytest.approx(statistics.mean(seeds))
            assert row[f"{metric}_std"] == pytest.approx(statistics.stdev(seeds))
        cell = f"{statistics.mean(values['bacc']):.3f} ± {statistics.stdev(values['bacc']):.3f}"
        assert cell in text


def test_winners_name_the_better_strategy(report: Path):
    section = report.read_text().split("## Winners")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(lines) == 6
    for line in lines:
        # fedprox + the second model is best, fedprox + the first next: gap 0.05, std ~0.02.
        assert ": fedprox-mu0.01 · tiny1 · sgd (" in line
        assert "leads fedprox-mu0.01 · tiny0 · sgd" in line and "by 0.050" in line
        assert "which exceeds the seed spread" in line


def test_gap_within_seed_spread_is_said(tmp_path: Path):
    # A seed moves every score by 0.3: the 0.05 gap between the models is seed noise.
    report = write_report(write_study(tmp_path / "noisy", seed_effect=0.3))
    assert report.read_text().count("which is within the seed spread") == 6


def test_incomplete_runs_are_listed_as_skipped(report: Path):
    skipped = report.read_text().split("## Skipped runs")[1].split("\n## ")[0]
    assert "`fedavg_tiny0_sgd_s7`: not complete (1 of 3 rounds finished)" in skipped
    assert "fedavg_tiny0_sgd_s7" not in report.read_text().split("## Skipped runs")[0]


def test_single_seed_and_broken_runs(tmp_path: Path):
    study = tmp_path / "one_seed"
    for strategy in STRATEGIES:
        write_run(study, strategy, "tiny0", 0)
    (write_run(study, STRATEGIES[0], "tiny0", 5) / "summary.json").unlink()
    loaded = load_study(study)
    assert loaded.skipped == [("fedavg_tiny0_sgd_s5", "no summary.json")]
    line = winner_line(winners(seed_table(loaded.at_best()))[0])
    assert line.startswith("**ACC**: fedprox-mu0.01 · tiny0 · sgd (0.540) leads fedavg")
    assert line.endswith("seed spread unknown (a single seed)")


def test_settings_beyond_the_labels_are_not_mixed(tmp_path: Path):
    study = tmp_path / "epochs"
    for epochs in (1, 2):
        for seed in (0, 1):
            write_run(study, STRATEGIES[0], "tiny0", seed, local_epochs=epochs)
            # run_name leaves local_epochs out; the grid would add it to the folder name
            run_dir = study / f"fedavg_tiny0_sgd_s{seed}"
            run_dir.rename(study / f"{run_dir.name}_local_epochs{epochs}")
    table = pd.read_csv(write_report(study).parent / "test_metrics.csv")
    assert set(table["strategy"]) == {"fedavg [local_epochs=1]", "fedavg [local_epochs=2]"}
    assert set(table["seeds"]) == {2}


def test_three_backbones_make_a_spider_plot(tmp_path: Path):
    report = write_report(write_study(tmp_path / "three", models=("tiny0", "tiny1", "tiny2")))
    assert len(list(report.parent.glob("spider_*.png"))) == 2


def test_study_without_runs_is_an_error(tmp_path: Path):
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    with pytest.raises(FlSimError, match="no run in .*empty"):
        write_report(tmp_path / "empty")
    with pytest.raises(FlSimError, match="missing.* does not exist"):
        write_report(tmp_path / "missing")


@pytest.fixture(scope="module")
def baselines(tmp_path_factory) -> Path:
    """The report of fedavg, fedprox, pooled and local runs of one model, two seeds each."""
    study = write_study(tmp_path_factory.mktemp("out") / "baselines", models=("tiny0",),
                        strategies=(*STRATEGIES, *BASELINES))
    return write_report(study)


def md_table(text: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the markdown table right under `heading`."""
    block = text.split(f"\n{heading}\n\n")[1].split("\n\n")[0]
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()
             if not line.startswith("|---")]
    return lines[0], lines[1:]


def cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def signed(value: float) -> str:
    return f"{value:+.3f}".replace("-", "−")


def test_gap_to_pooled_is_the_difference_of_means(baselines: Path):
    study = baselines.parent.parent
    header, rows = md_table(baselines.read_text(), "### tiny0 · sgd")
    by_strategy = {row[0]: row for row in rows}
    assert list(by_strategy) == ["pooled", "fedavg", "fedprox-mu0.01", "local"]
    pooled = expected(study, "pooled_tiny0_sgd", "global")
    for strategy, row in by_strategy.items():
        values = expected(study, f"{strategy}_tiny0_sgd", "global")
        for m in METRICS:
            name = METRIC_NAMES[m]
            assert row[header.index(name)] == cell(values[m])
            gap = statistics.mean(values[m]) - statistics.mean(pooled[m])
            want = "—" if strategy == "pooled" else signed(gap)
            assert row[header.index(f"Δ {name}")] == want
    # fedprox sits 0.15 - 0.1 below pooled; local's mean client model 0.15 + 0.1 - 0.02 below.
    for strategy, gap in (("fedprox-mu0.01", "−0.050"), ("local", "−0.230")):
        row = by_strategy[strategy]
        assert {row[header.index(f"Δ {METRIC_NAMES[m]}")] for m in METRICS} == {gap}


def test_local_table_has_a_row_per_client(baselines: Path):
    study = baselines.parent.parent
    header, rows = md_table(baselines.read_text(), "#### local · tiny0 · sgd")
    names = [f"client {c}" for c in range(CLIENTS)]
    assert [row[0] for row in rows] == ["mean over clients", *names]
    clients = {c: (expected(study, "local_tiny0_sgd", c, "global_test"),
                   expected(study, "local_tiny0_sgd", c)) for c in names}
    # The mean over clients: the run's global row on the global test set; on the clients'
    # own test splits, the mean of the clients' values of each seed.
    own_mean = {m: [statistics.mean(own[m][i] for _, own in clients.values()) for i in (0, 1)]
                for m in METRICS}
    clients["mean over clients"] = (expected(study, "local_tiny0_sgd", "global"), own_mean)
    for row in rows:
        on_global, own = clients[row[0]]
        assert row[1] == "2"
        for m in METRICS:
            assert row[header.index(f"{METRIC_NAMES[m]} global")] == cell(on_global[m])
            assert row[header.index(f"{METRIC_NAMES[m]} own")] == cell(own[m])


def test_baselines_fit_the_other_tables_and_figures(baselines: Path):
    study, out = baselines.parent.parent, baselines.parent
    table = pd.read_csv(out / "test_metrics.csv")
    assert len(table) == 4 * (1 + CLIENTS) and set(table["seeds"]) == {2}
    # A local client's test set is its own split, never its model on the global test set.
    local_clients = table[(table["strategy"] == "local") & (table["test_set"] != "global")]
    assert len(local_clients) == CLIENTS
    for _, row in local_clients.iterrows():
        own = expected(study, "local_tiny0_sgd", row["test_set"])
        assert row["bacc_mean"] == pytest.approx(statistics.mean(own["bacc"]))
    text = baselines.read_text()
    section = text.split("## Winners")[1].split("\n## ")[0]
    # Pooled leads every metric here, but the baselines are references: not ranked.
    assert section.count("\n- ") == 6
    assert "pooled ·" not in section and "local ·" not in section
    pngs = {p.name for p in out.glob("*.png")}
    assert {"convergence_tiny0_sgd.png", "clients_tiny0_sgd.png", "vs_pooled_tiny0_sgd.png"} <= pngs
    assert all(f"]({p})" in text for p in pngs)


def test_recipes_are_never_compared_across(tmp_path: Path):
    study = tmp_path / "recipes"
    wce = {"loss": {"name": "weighted_ce"}}
    for seed in (0, 1):
        write_run(study, STRATEGIES[0], "tiny0", seed)
        write_run(study, STRATEGIES[0], "tiny0", seed, offset=0.02, **wce)
        write_run(study, BASELINES[0], "tiny0", seed, offset=0.07, **wce)
    loaded = load_study(study)
    versus = versus_pooled(seed_table(loaded.at_best()), loaded.runs)
    text = "\n\n".join(baselines_section(loaded, versus, Bootstrap(loaded)))
    recipe = ' [wce]'
    assert text.count("\n### ") == 1
    header, rows = md_table(text, f"### tiny0 · sgd{recipe}")
    assert [row[0] for row in rows] == [f"pooled{recipe}", f"fedavg{recipe}"]
    fed, pooled = (expected(study, f"{s}_tiny0_sgd_wce", "global") for s in ("fedavg", "pooled"))
    for m in METRICS:
        gap = statistics.mean(fed[m]) - statistics.mean(pooled[m])
        assert rows[1][header.index(f"Δ {METRIC_NAMES[m]}")] == signed(gap) == "−0.200"
    assert ("Not compared, for want of a pooled run of the same model, optimizer and recipe: "
            'fedavg [ce] · tiny0 · sgd.') in text


def test_study_without_pooled_runs_says_so(report: Path):
    section = report.read_text().split("## Federated vs pooled vs local\n\n")[1].split("\n## ")[0]
    assert section.startswith("No complete pooled run in this study. Adding "
                              "`strategy: {name: pooled}` and `{name: local}` runs to the grid")
    assert "### " not in section


def test_recipe_tags_name_a_recipe_only_where_they_tell_recipes_apart(tmp_path: Path):
    study = tmp_path / "tags"
    write_run(study, STRATEGIES[0], "tiny0", 0, loss={"name": "weighted_ce"})
    write_run(study, STRATEGIES[0], "tiny0", 0, sampler="balanced")
    assert sorted(load_study(study).runs["strategy"]) == ["fedavg [balanced]", "fedavg [wce]"]
    # two cosine schedules share the tag `cosine`: the settings are spelled out instead
    study = tmp_path / "spelled"
    for warmup in (1, 2):  # seeds tell the folders apart
        write_run(study, STRATEGIES[0], "tiny0", warmup - 1, offset=warmup / 100,
                  lr_schedule={"name": "cosine", "warmup_rounds": warmup})
    assert sorted(load_study(study).runs["strategy"]) == [
        "fedavg [lr_schedule.warmup_rounds=1]", "fedavg [lr_schedule.warmup_rounds=2]"]


def test_probe_section_only_where_a_run_has_a_probe(report: Path, tmp_path: Path):
    assert "## Feature probes" not in report.read_text()
    study = write_study(tmp_path / "probed", models=("tiny0",), strategies=STRATEGIES[:1])
    run_dirs = sorted(d for d in study.iterdir() if d.is_dir())
    (run_dirs[0] / "probe").mkdir()
    (run_dirs[0] / "probe" / "probe.json").write_text("{not json")
    summary = [{"fit": fit, "classifier": name, "on": "global test", "averaged": 1,
                **{m: base + 0.01 * i for i, m in enumerate(METRICS)}}
               for fit, name, base in (("head", "head", 0.5), ("pooled", "svm", 0.6))]
    (run_dirs[1] / "probe").mkdir()
    (run_dirs[1] / "probe" / "probe.json").write_text(json.dumps(
        {"checkpoint": "best", "round": 2, "model": "the global model", "features": "f",
         "skipped": {}, "summary": summary}))
    text = write_report(study).read_text()
    section = text.split("## Feature probes")[1].split("\n## ")[0]
    assert f"### {run_dirs[1].name}" in section and f"### {run_dirs[0].name}" not in section
    assert f"Unreadable probe/probe.json (run `fl-sim probe` again): `{run_dirs[0].name}`" in section
    assert ("| pooled | svm | global test | 0.600 | 0.610 | 0.620 | 0.630 | 0.640 | 0.650 "
            "| +0.100 | +0.100 |") in section
    assert "| head | head | global test | 0.500 |" in section and "| — | — |" in section


def test_recipe_tags_read_a_sub_config_that_is_null_in_some_runs():
    """synthesis: null beside synthesis: {...} flattens to NaN cells (a real study's report
    failed on them)."""
    import numpy as np
    import pandas as pd

    from fl_sim.report.collect import _recipe_tags

    configs = [{"run_config": {}}, {"run_config": {"synthesis": {"per_class": 300}}}]
    settings = pd.DataFrame({"run_config.synthesis": [None, np.nan],
                             "run_config.synthesis.per_class": [np.nan, 300.0]})
    assert list(_recipe_tags(settings, configs)["recipe"]) == ["ce", "dcgan300"]
