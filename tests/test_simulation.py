"""`fl-sim run` end to end: Flower's Simulation Engine on Ray, on the real HAM10000 copy."""

import csv
import json

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fl_sim.cli import main

pytestmark = pytest.mark.slow

ROUNDS = 2


@pytest.fixture(scope="module")
def study_dir(ham_root, tmp_path_factory):
    """One `fl-sim run` of a 4-run grid (fedavg, fedprox) x seeds (0, 1) on 3 clients,
    2 rounds each."""
    tmp = tmp_path_factory.mktemp("sim")
    config = {
        "study": "ham",
        "out": str(tmp / "runs"),
        "data": {"dataset": "ham10000", "root": str(ham_root), "image_size": 32,
                 "max_images": 600, "cache_dir": str(tmp / "cache"),
                 "partition": {"method": "random", "num_clients": 3}},
        "defaults": {"rounds": ROUNDS, "batch_size": 32, "optimizer": {"name": "adamw"},
                     "model": {"name": "test_convnext"}},
        "grid": {"strategy": [{"name": "fedavg"}, {"name": "fedprox", "proximal_mu": 0.1}],
                 "seed": [0, 1]},
    }
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    return tmp / "runs" / "ham"


@pytest.mark.parametrize("run", ["fedavg_test_convnext_adamw_s0", "fedprox-mu0.1_test_convnext_adamw_s0"])
def test_run_directory_contract(study_dir, run):
    run_dir = study_dir / run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in range(1, ROUNDS + 1):
        for client in range(3):
            for split in ("train", "val", "test"):
                found = [x for x in rows if (x["round"], x["scope"], x["client"], x["split"])
                         == (r, "client", client, split)]
                assert len(found) == 1, (r, client, split)
            val = next(x for x in rows if (x["round"], x["client"], x["split"]) == (r, client, "val"))
            assert val["n"] > 0 and 0 <= val["bacc"] <= 1
            assert val["avg"] == pytest.approx(sum(val[k] for k in ("acc", "bacc", "precision", "recall", "f1")) / 5)
        assert len([x for x in rows if (x["round"], x["scope"], x["split"]) == (r, "global", "test")]) == 1
    assert any(x["round"] == 0 and x["scope"] == "global" for x in rows)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] is True and 1 <= summary["best"]["round"] <= ROUNDS
    assert summary["bytes_sent"] > 0 and summary["bytes_received"] > 0
    for name, at in (("last", ROUNDS), ("best", summary["best"]["round"])):
        ckpt = torch.load(run_dir / "checkpoints" / f"{name}.pt", weights_only=False)
        assert ckpt["state_dict"] and ckpt["round"] == at
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["run"] == run
    with open(run_dir / "partition.csv") as f:
        manifest = list(csv.DictReader(f))
    assert list(manifest[0]) == ["image_id", "lesion_id", "label", "client", "split"]
    assert abs(len(manifest) - 600) <= 30  # max_images: about 600, whole lesions
    homes = {}
    for r in manifest:  # the audit the file is for: each lesion in one client and split
        assert homes.setdefault(r["lesion_id"], (r["client"], r["split"])) == (r["client"], r["split"])
    assert {r["client"] for r in manifest} == {"0", "1", "2", "global"}

    tags = EventAccumulator(str(run_dir)).Reload().Tags()["scalars"]
    for tag in ("global/test/bacc", "global/test/avg", "client_0/val/acc", "client_2/test/f1",
                "client_1/train/loss", "federated/val/avg"):
        assert tag in tags, tag


def test_best_round_is_chosen_on_validation(study_dir):
    run_dir = study_dir / "fedavg_test_convnext_adamw_s0"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = {x["round"]: x["avg"] for x in rows if x["scope"] == "federated" and x["split"] == "val"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best"]["round"] == max(val, key=val.get)


def test_finished_runs_are_skipped_on_rerun(study_dir, capsys):
    config = study_dir.parent.parent / "study.yaml"
    before = (study_dir / "fedavg_test_convnext_adamw_s0" / "metrics.jsonl").read_text()
    assert main(["run", str(config)]) == 0
    assert capsys.readouterr().out.count("finished before, skipped") == 4
    assert (study_dir / "fedavg_test_convnext_adamw_s0" / "metrics.jsonl").read_text() == before


def test_report_on_the_real_study_matches_metrics_jsonl(study_dir):
    from fl_sim.report import write_report

    report = write_report(study_dir)
    assert "## Winners on the global test set" in report.read_text()
    assert sorted(p.name for p in report.parent.glob("*.png"))  # figures were drawn
    table = {(r["strategy"], r["test_set"]): r
             for r in csv.DictReader(open(report.parent / "test_metrics.csv"))}
    for strategy, run_prefix in (("fedavg", "fedavg"), ("fedprox-mu0.1", "fedprox-mu0.1")):
        values = []
        for seed in (0, 1):
            run_dir = study_dir / f"{run_prefix}_test_convnext_adamw_s{seed}"
            best = json.loads((run_dir / "summary.json").read_text())["best"]["round"]
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            values.append(next(x["bacc"] for x in rows if (x["round"], x["scope"]) == (best, "global")))
        row = table[(strategy, "global")]
        assert int(row["seeds"]) == 2
        assert float(row["bacc_mean"]) == pytest.approx(sum(values) / 2)
