"""Personalized federated learning (issue #23, item 1): FedPer's and FedRep's private head
never leaves a client and each client evaluates with its own; Ditto's personal update is
the hand-computed one, and both its models are reported.

Whole runs go through tests/local_grid.py: fl-sim's real ClientApp in this process."""

import copy
import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from pydantic import ValidationError
from torch import nn

from local_grid import LocalGrid

from fl_sim.arrays import to_state_dict
from fl_sim.client import client_app, train
from fl_sim.client.node_state import state_key
from fl_sim.client.personal import train_personalized
from fl_sim.config import Run, RunConfig, StudyConfig
from fl_sim.evaluation import evaluate_splits
from fl_sim.models.finetune import head_keys
from fl_sim.server.loop import FederatedRun
from fl_sim.task import build_model, load_data


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def federated_run(tmp_path, strategy: dict, rounds: int = 2, **run) -> FederatedRun:
    study = StudyConfig.model_validate({
        "study": "s", "out": str(tmp_path / "out"),
        "data": {"dataset": "synthetic", "image_size": 32, "synthetic": {"num_images": 300},
                 "cache_dir": str(tmp_path / "cache"), "partition": {"num_clients": 3}}})
    cfg = RunConfig.model_validate({"rounds": rounds, "model": {"name": "test_resnet"},
                                    "optimizer": {"name": "adamw"}, "augment": False,
                                    "strategy": strategy, "round_timeout_s": 60, **run})
    return FederatedRun(study, Run(name=strategy["name"], config=cfg),
                        tmp_path / strategy["name"])


def rows_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["fedper", "fedrep"])
def test_the_private_head_never_leaves_a_client_and_each_evaluates_with_its_own(tmp_path, name):
    run = federated_run(tmp_path, {"name": name})
    head = head_keys(run.model)
    assert head == ["fc.weight", "fc.bias"]
    body = {k: v for k, v in run.model.state_dict().items() if k not in head}
    grid = LocalGrid(3)
    summary = run.execute(grid)
    assert summary["complete"] and "no global test row" in summary["global_model"]

    # Every message both ways: the body's tensors only, by key and by byte count.
    messages = [m for m in grid.sent + grid.seen if m.has_content()]
    assert {m.metadata.message_type for m in messages} == {"train", "evaluate"}
    body_bytes = sum(t.numel() * t.element_size() for t in body.values())
    for m in messages:
        arrays = m.content.array_records
        if m.metadata.message_type == "evaluate" and not arrays:
            continue  # an evaluation reply carries metrics only
        sent = to_state_dict(m.content["arrays"])
        assert set(sent) == set(body) and not set(sent) & set(head)
        assert sum(a.numel() * a.element_size() for a in sent.values()) == body_bytes

    # Each client kept a head of its own, trained away from the initial one and the others'.
    heads = [to_state_dict(grid.contexts[10 + c].state[state_key("head",
                                                                  run.cfg.model_dump_json())])
             for c in range(3)]
    initial = run.model.private_initial
    assert all(set(h) == set(head) for h in heads)
    assert not torch.equal(heads[0]["fc.weight"], heads[1]["fc.weight"])
    assert not any(torch.equal(h["fc.weight"], initial["fc.weight"]) for h in heads)

    # Its reported test metrics are those of the final body with its own head.
    rows = rows_of(run.run_dir)
    assert not [r for r in rows if r["scope"] == "global"]  # no global model to test
    final = to_state_dict(run._arrays_of(torch.load(run.run_dir / "checkpoints/last.pt",
                                                    weights_only=False)["state_dict"]))
    data = load_data(run.study.data.model_dump_json())
    for c in range(3):
        model, preprocess = build_model(run.cfg, data.class_names, 32)
        model.load_state_dict({**final, **heads[c]}, strict=False)
        mine = evaluate_splits(model, data, c, preprocess, 128, splits=("test",))
        [reported] = [r for r in rows if r["round"] == 2 and r["scope"] == "client"
                      and r["client"] == c and r["split"] == "test"]
        assert reported["bacc"] == pytest.approx(mine["test_bacc"], abs=1e-6)
    from fl_sim.report import write_report
    report = write_report(run.run_dir.parent).read_text()  # reported by client, not skipped
    label = {"fedper": "fedper", "fedrep": "fedrep-head1"}[name]
    assert f"| {label} | test_resnet | adamw | client 0 |" in report
    assert "## Skipped runs\n\nNone." in report
    assert not list((run.run_dir.parent / "report").glob("spider_*.png"))  # no global model


def test_fedrep_trains_the_head_alone_then_the_body_alone(tmp_path, monkeypatch):
    seen, real = [], train.train_local

    def watched(model, *args, **kwargs):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        before = copy.deepcopy(model.state_dict())
        result = real(model, *args, **kwargs)
        moved = {n for n, _ in model.named_parameters()
                 if not torch.equal(before[n], model.state_dict()[n])}
        seen.append((trainable, moved, args[4].local_epochs))
        return result

    monkeypatch.setattr(client_app, "train_local", watched)
    federated_run(tmp_path, {"name": "fedrep", "head_epochs": 3}, rounds=1).execute(LocalGrid(3))
    (head_turn, head_moved, epochs), (body_turn, body_moved, _) = seen[:2]  # client 0
    assert head_turn == {"fc.weight", "fc.bias"} and head_moved == head_turn and epochs == 3
    assert body_turn and not body_turn & head_turn and body_moved and body_moved <= body_turn


def test_ditto_personal_update_is_the_hand_computation():
    """One SGD step of v on CE + λ/2·‖v − w‖², from the round's global w, by hand:
    v' = v − lr·(X^T(softmax(Xv^T + b) − Y)/B + λ(v − w)) for a linear model."""
    torch.manual_seed(0)
    lam, lr = 0.5, 0.1
    x = torch.randn(4, 3)
    y = torch.tensor([0, 1, 1, 0])
    cfg = RunConfig.model_validate({"optimizer": {"name": "sgd", "lr": lr, "weight_decay": 0.0},
                                    "strategy": {"name": "ditto", "ditto_lambda": lam},
                                    "batch_size": 4, "augment": False})
    global_model = nn.Linear(3, 2)
    personal = nn.Linear(3, 2)  # last round's personal model, away from the global one
    state = RecordDict()
    from fl_sim.client.node_state import keep_own
    keep_own(personal, state, "ditto", "r", personal.state_dict())

    def fit(net, cfg, stream, **options):  # one full-batch step, as train_local takes
        return train.train_local(net, x.numpy(), y.numpy(), np.arange(4), Identity(), cfg,
                                 rng=np.random.default_rng(stream), lr=lr, **options)

    w = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
    v = {k: t.detach().clone() for k, t in personal.state_dict().items()}
    train_personalized(global_model, fit, state, cfg, "r")
    kept = to_state_dict(state[state_key("ditto", "r")])

    p = torch.softmax(x @ v["weight"].T + v["bias"], 1)
    err = (p - torch.eye(2)[y]) / len(y)
    expected = {"weight": v["weight"] - lr * (err.T @ x + lam * (v["weight"] - w["weight"])),
                "bias": v["bias"] - lr * (err.sum(0) + lam * (v["bias"] - w["bias"]))}
    for k in expected:
        assert torch.allclose(kept[k], expected[k], atol=1e-6)
    # The global model's own update is plain local training: no pull toward anything.
    p = torch.softmax(x @ w["weight"].T + w["bias"], 1)
    err = (p - torch.eye(2)[y]) / len(y)
    assert torch.allclose(global_model.weight, w["weight"] - lr * err.T @ x, atol=1e-6)


class Identity:
    """A BatchPreprocessor for ready feature vectors."""

    device = torch.device("cpu")

    def __call__(self, batch, generator, augment):
        return torch.as_tensor(batch)


def test_a_ditto_run_reports_the_global_and_the_personal_models(tmp_path):
    run = federated_run(tmp_path, {"name": "ditto"})
    summary = run.execute(LocalGrid(3))
    assert summary["best"]["global_test"]["n"] > 0  # the global model, tested by the server
    rows = [x for x in rows_of(run.run_dir) if x["round"] == 2 and x["split"] != "train"]
    own = {(x["client"], x["split"]) for x in rows if x["scope"] == "client"}
    personal = [x for x in rows if x["scope"] == "personalized"]
    assert {(x["client"], x["split"]) for x in personal} == own == {
        (c, s) for c in range(3) for s in ("val", "test")}
    # Paired against the global model on the same test images; the two models differ.
    tests = {x["client"]: x for x in personal if x["split"] == "test"}
    assert all("bacc_delta_lo" in x for x in tests.values())
    assert any(x["loss"] != y["loss"] for x in tests.values() for y in rows
               if y["scope"] == "client" and y["split"] == "test" and y["client"] == x["client"])
    from fl_sim.report import write_report
    report = write_report(run.run_dir.parent)
    assert "## Personalization" in report.read_text()


@pytest.mark.parametrize("run, message", [
    ({"strategy": {"name": "fedper"}, "client_state": "keep"}, "fedper does not combine with "
                                                               "client_state: keep"),
    ({"strategy": {"name": "fedrep"}, "finetune": {"trainable": "head"}},
     "fedrep does not combine with finetune.trainable: head"),
    ({"strategy": {"name": "ditto"}, "personalize": {}}, "ditto does not combine with personalize"),
    ({"strategy": {"name": "fedper"}, "cross_site_eval": True}, "cross_site_eval"),
    ({"strategy": {"name": "fedavg", "ditto_lambda": 0.1}}, "ditto_lambda is a ditto parameter"),
    ({"strategy": {"name": "fedper", "head_epochs": 2}}, "head_epochs is a fedrep parameter"),
])
def test_what_a_personalized_method_cannot_do_is_refused(run, message):
    with pytest.raises(ValidationError, match=message):
        RunConfig.model_validate(run)


def test_personalized_runs_are_named_by_their_parameters():
    from fl_sim.config import run_name
    assert run_name(RunConfig.model_validate({"strategy": {"name": "ditto"}})).startswith(
        "ditto-lam0.1_")
    assert run_name(RunConfig.model_validate(
        {"strategy": {"name": "fedrep", "head_epochs": 5}})).startswith("fedrep-head5_")
