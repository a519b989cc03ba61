"""The CLIP variant in a 2-round federated run: only the image side travels."""

import json

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fl_sim.cli import main

pytestmark = pytest.mark.slow


def test_two_rounds_end_to_end_and_the_text_tower_never_travels(tmp_path):
    tower = tmp_path / "tiny-clip"
    tower.mkdir()
    (tower / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }}))
    config = {
        "study": "clip", "out": str(tmp_path / "runs"),
        "data": {"dataset": "synthetic", "image_size": 32, "synthetic": {"num_images": 600},
                 "cache_dir": str(tmp_path / "cache")},
        "defaults": {"rounds": 2, "batch_size": 16, "training": "clip",
                     "model": {"name": "test_convnext"}, "optimizer": {"name": "adagrad", "lr": 0.01},
                     "clip": {"text_model": f"local-dir:{tower}", "text_pretrained": None,
                              "templates": ["a picture of a {class}", "a dermoscopy image of a {class}"]}},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0

    run_dir = tmp_path / "runs" / "clip" / "fedavg_test_convnext_adagrad-lr0.01_clip-tiny-clip_s0"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in (1, 2):
        assert {(x["client"], x["split"]) for x in rows if x["round"] == r and x["scope"] == "client"} == {
            (c, s) for c in range(3) for s in ("train", "val", "test")}
        assert any(x["round"] == r and x["scope"] == "global" for x in rows)

    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["state_dict"]
    assert {k.split(".")[0] for k in state} == {"encoder", "projection", "logit_scale"}
    array_bytes = sum(v.numel() * v.element_size() for v in state.values())
    # What came back from the clients: 2 rounds x 3 train replies of the image side (plus
    # small metric records), nothing the size of the 6.5 MB text tower.
    summary = json.loads((run_dir / "summary.json").read_text())
    per_train_reply = summary["bytes_received"] / (2 * 3)
    assert array_bytes < per_train_reply < array_bytes * 1.05 + 10_000
    assert "comm/bytes_sent" in EventAccumulator(str(run_dir)).Reload().Tags()["scalars"]
