"""Rare-class synthesis in a run (issue #15, item 5): generated images join the clients'
train splits only, the server learns their cost and counts, and a sample grid per client
lands in TensorBoard."""

import json

import numpy as np
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fl_sim.client.train_split import Rows, client_synthesis, train_split
from fl_sim.config import DataConfig, RunConfig
from fl_sim.data_partition import prepare_data
from fl_sim.errors import FlSimError
from fl_sim.server.run_log import read_metrics

SYNTHESIS = {"per_class": 12, "steps": 10, "batch_size": 16, "classes": ["df", "vasc"]}


def test_rows_index_the_dataset_then_the_generated_images():
    base = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    extra = 200 + np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    rows = Rows(base, extra)
    assert len(rows) == 7 and rows.shape == (7, 2, 2, 3)
    np.testing.assert_array_equal(rows[np.array([1, 3])], base[[1, 3]])
    np.testing.assert_array_equal(rows[np.array([0, 5, 6])], np.stack([base[0], extra[0], extra[1]]))


def test_generated_images_join_the_train_split_of_their_own_client_only(tmp_path):
    data_cfg = DataConfig.model_validate({
        "dataset": "synthetic", "image_size": 16, "synthetic": {"num_images": 280},
        "cache_dir": str(tmp_path), "partition": {"num_clients": 2}})
    data = prepare_data(data_cfg, progress=False)
    run = RunConfig.model_validate({"synthesis": SYNTHESIS})
    images, labels, rows = train_split(data, [0], run, data_cfg, device="cpu")
    own = data.indices(0, "train")
    n = len(data.images)
    assert set(rows[rows < n]) == set(own)  # the client's own train rows, nothing of val/test
    generated = rows[rows >= n]
    assert len(generated) == 24 and len(images) == n + 24
    assert sorted(np.unique(labels[generated])) == [data.classes.index("df"),
                                                    data.classes.index("vasc")]
    # The pooled baseline trains on every client's own rows and generated images.
    _, pooled_labels, pooled = train_split(data, [0, 1], run, data_cfg, device="cpu")
    assert (pooled >= n).sum() == 48
    assert set(pooled[pooled < n]) == set(own) | set(data.indices(1, "train"))
    # A second use in this process is no new synthesis, and says so.
    again = client_synthesis(data, 0, run, data_cfg, device="cpu")
    assert again.from_cache and again.seconds == 0 and len(again.labels) == 24
    # No synthesis: the dataset as it is.
    plain = train_split(data, [0], RunConfig(), data_cfg, device="cpu")
    assert plain[0] is data.images and len(plain[2]) == len(own)


@pytest.mark.slow
def test_a_synthesis_run_reports_its_cost_and_puts_sample_grids_in_tensorboard(tmp_path):
    from fl_sim.cli import main

    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({
        "study": "s", "out": str(tmp_path / "out"),
        "data": {"dataset": "synthetic", "image_size": 32, "synthetic": {"num_images": 210},
                 "cache_dir": str(tmp_path / "cache"), "partition": {"num_clients": 3}},
        "defaults": {"rounds": 1, "batch_size": 8, "model": {"name": "test_convnext"},
                     "synthesis": SYNTHESIS},
        "grid": {"strategy": ["fedavg", "local"]},
    }))
    assert main(["run", str(study)]) == 0
    for strategy in ("fedavg", "local"):
        run_dir = next((tmp_path / "out/s").glob(f"{strategy}_*"))
        summary = json.loads((run_dir / "summary.json").read_text())
        assert set(summary["synthesis"]) == {"0", "1", "2"}
        for client in summary["synthesis"].values():
            assert client["generated"] == {"df": 12, "vasc": 12}
        rows = read_metrics(run_dir)
        for client in range(3):
            train = next(r for r in rows if r["client"] == client and r["split"] == "train")
            val = next(r for r in rows if r["client"] == client and r["split"] == "val")
            manifest = np.loadtxt(run_dir / "partition.csv", dtype=str, delimiter=",",
                                  skiprows=1, usecols=(3, 4))
            own = {split: int(((manifest[:, 0] == str(client)) & (manifest[:, 1] == split)).sum())
                   for split in ("train", "val")}
            # The generated images train (batches of 8), add no aggregation weight...
            steps = lambda n: n // 8 + (n % 8 >= 2)  # noqa: E731 (a last batch of one is skipped)
            assert train["steps"] == steps(own["train"] + 24) != steps(own["train"])
            assert train["n"] == own["train"]
            assert val["n"] == own["val"]  # ...and are never evaluated
        events = EventAccumulator(str(run_dir), size_guidance={"images": 0}).Reload()
        assert {f"synthesis/client{c}" for c in range(3)} <= set(events.Tags()["images"])
    # Federated and local clients trained the same GANs: the second run read the cache.
    cached = [all(c["from_cache"] for c in json.loads(d.joinpath("summary.json").read_text())
                  ["synthesis"].values()) for d in (tmp_path / "out/s").iterdir() if d.is_dir()]
    assert sorted(cached) == [False, True]


def test_synthesis_of_an_unknown_class_is_refused_with_the_classes_named(tmp_path):
    from fl_sim.server.loop import FederatedRun
    from fl_sim.config import Run, StudyConfig

    study = StudyConfig.model_validate({
        "study": "s", "data": {"dataset": "synthetic", "image_size": 16,
                               "synthetic": {"num_images": 140}, "cache_dir": str(tmp_path)}})
    cfg = RunConfig.model_validate({"model": {"name": "test_convnext"},
                                    "synthesis": {"classes": ["dff"]}})
    with pytest.raises(FlSimError, match=r"\['dff'\].*akiec, bcc"):
        FederatedRun(study, Run(name="r", config=cfg), tmp_path / "r")
