"""MLflow beside TensorBoard (issue #22, item 6): every run of a study an MLflow run in the
study's local store, params from the resolved config, metrics per round, the report's files
as artifacts; read back with a real MLflow client."""

import json
import logging

import mlflow
import pytest
import yaml
from pydantic import ValidationError

from fl_sim.cli import main
from fl_sim.config import StudyConfig
from fl_sim.server.run_log import RunLog, read_metrics
from fl_sim.tracking import REPORT_RUN, RUN_TAG, MlflowStudy, store_uri


def study_file(tmp_path, tracking, rounds=2, strategies=("pooled", "local")):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "study": "tracked", "out": str(tmp_path / "out"),
        **({"tracking": tracking} if tracking else {}),
        "data": {"dataset": "synthetic", "image_size": 32, "synthetic": {"num_images": 240},
                 "cache_dir": str(tmp_path / "cache"), "partition": {"num_clients": 3}},
        "defaults": {"rounds": rounds, "model": {"name": "test_convnext"}, "augment": False},
        "grid": {"strategy": list(strategies)},
    }))
    return path


def tracked_runs(study_dir):
    mlflow.set_tracking_uri(store_uri(study_dir))
    runs = mlflow.search_runs(experiment_names=["tracked"])
    return runs.set_index(f"tags.{RUN_TAG}")


def bacc_history(study_dir, run_id):
    client = mlflow.MlflowClient(tracking_uri=store_uri(study_dir))
    return {m.step: m.value for m in client.get_metric_history(run_id, "global/test/bacc")}


def global_bacc(run_dir):
    return {r["round"]: r["bacc"] for r in read_metrics(run_dir) if r["scope"] == "global"}


@pytest.mark.slow
def test_search_runs_finds_every_run_with_its_params_and_per_round_bacc(tmp_path):
    """The baselines in this process, FedAvg through the Simulation Engine."""
    assert main(["run", str(study_file(tmp_path, ["tensorboard", "mlflow"],
                                       strategies=("pooled", "local", "fedavg")))]) == 0
    study_dir = tmp_path / "out/tracked"
    runs = tracked_runs(study_dir)
    names = sorted(d.name for d in study_dir.iterdir() if (d / "summary.json").exists())
    assert sorted(runs.index) == names and len(names) == 3
    for name in names:
        run = runs.loc[name]
        assert run["status"] == "FINISHED"
        config = yaml.safe_load((study_dir / name / "config.yaml").read_text())
        assert run["params.run_config.strategy.name"] == config["run_config"]["strategy"]["name"]
        assert run["params.data.partition.num_clients"] == "3"
        assert bacc_history(study_dir, run["run_id"]) == pytest.approx(
            global_bacc(study_dir / name))  # rounds 0, 1, 2
        assert any(p.name.startswith("events.out") for p in (study_dir / name).iterdir())
    assert main(["report", str(study_dir)]) == 0
    [report] = mlflow.search_runs(experiment_names=["tracked"],
                                  filter_string=f"tags.`{RUN_TAG}` = '{REPORT_RUN}'",
                                  output_format="list")
    client = mlflow.MlflowClient(tracking_uri=store_uri(study_dir))
    artifacts = {a.path for a in client.list_artifacts(report.info.run_id)}
    assert {"report.md", "test_metrics.csv"} <= artifacts
    assert any(a.endswith(".png") for a in artifacts)
    # A second report replaces the first.
    assert main(["report", str(study_dir)]) == 0
    assert len(mlflow.search_runs(experiment_names=["tracked"],
                                  filter_string=f"tags.`{RUN_TAG}` = '{REPORT_RUN}'")) == 1


def test_runs_finished_before_mlflow_was_listed_are_exported_from_their_files(tmp_path):
    assert main(["run", str(study_file(tmp_path, None, rounds=1))]) == 0
    study_dir = tmp_path / "out/tracked"
    assert not (study_dir / "mlflow.db").exists()  # TensorBoard alone, by default
    assert main(["run", str(study_file(tmp_path, ["tensorboard", "mlflow"], rounds=1))]) == 0
    runs = tracked_runs(study_dir)
    assert len(runs) == 2
    for name, run in runs.iterrows():
        assert bacc_history(study_dir, run["run_id"]) == pytest.approx(
            global_bacc(study_dir / name))


def test_only_saved_rounds_reach_the_mirror():
    class Recorder:
        def __init__(self):
            self.points, self.closed = [], None

        def commit(self, points):
            self.points += points

        def close(self, finished):
            self.closed = finished

    import tempfile
    from pathlib import Path

    mirror = Recorder()
    log = RunLog(Path(tempfile.mkdtemp()), mirror=mirror)
    log.row(1, "global", None, "test", {"n": 5, "bacc": 0.5})
    log.commit()
    log.row(2, "global", None, "test", {"n": 5, "bacc": 0.7})
    log.rollback()  # round 2 was cut off: never saved, never mirrored
    log.row(2, "client", 1, "val", {"n": 3, "acc": 0.25})
    log.commit()
    log.close(finished=True)
    assert mirror.points == [(1, {"global/test/bacc": 0.5}), (2, {"client_1/val/acc": 0.25})]
    assert mirror.closed is True


def test_a_store_that_cannot_open_is_refused_before_any_run(tmp_path, capsys):
    store = tmp_path / "out/tracked/mlflow.db"
    store.parent.mkdir(parents=True)
    store.write_bytes(b"not a database" * 100)
    assert main(["run", str(study_file(tmp_path, ["tensorboard", "mlflow"], rounds=1))]) == 2
    err = capsys.readouterr().err
    assert "mlflow.db cannot be opened" in " ".join(err.split())
    assert not any(d.is_dir() for d in store.parent.iterdir())  # no run started


def test_an_mlflow_error_mid_run_warns_and_the_run_completes(tmp_path, caplog, monkeypatch):
    def refuse(self, run_id, points):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(MlflowStudy, "log_metrics", refuse)
    with caplog.at_level(logging.WARNING, logger="fl_sim.tracking"):
        assert main(["run", str(study_file(tmp_path, ["tensorboard", "mlflow"], rounds=1))]) == 0
    assert "database is locked" in caplog.text and "metrics.jsonl and TensorBoard carry on" in caplog.text
    runs = tracked_runs(tmp_path / "out/tracked")
    assert len(runs) == 2 and set(runs["status"]) == {"FAILED"}  # its record is incomplete
    for run_dir in runs.index:
        assert json.loads((tmp_path / "out/tracked" / run_dir / "summary.json").read_text())["complete"]


def test_tracking_names_its_trackers():
    base = {"study": "s"}
    assert StudyConfig.model_validate(base).tracking == ["tensorboard"]
    with pytest.raises(ValidationError, match="TensorBoard is always written"):
        StudyConfig.model_validate({**base, "tracking": ["mlflow"]})
    with pytest.raises(ValidationError, match="tensorboard"):
        StudyConfig.model_validate({**base, "tracking": ["tensorboard", "wandb"]})
