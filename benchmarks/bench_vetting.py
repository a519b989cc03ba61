"""What vetting a train reply costs beside aggregating it, measured side by side.

    python benchmarks/bench_vetting.py [--clients 10] [--repeats 3]

For timm models fl-sim offers (their real state dicts, random weights), builds `--clients`
honest train replies as a round receives them, in simulation's layout and in a deployed
run's packed one (unpacked first, as the server does), then times per round: the vetting of
every reply (fl_sim.server.vetting.refusal) and FedAvg's aggregation of them (fl-sim's
weighted_mean). Prints a Markdown table; the best of `--repeats`.
"""

from __future__ import annotations

import argparse
import time

import timm
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_sim.arrays import pack, unpack, weighted_mean
from fl_sim.server.rows import TRAIN_METRICS
from fl_sim.server.vetting import refusal

MODELS = ("tf_efficientnet_lite0", "convnext_tiny", "resnet50")


def best_of(repeats: int, work) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    print(f"| model | parameters | layout | vet {args.clients} replies | aggregate them "
          "| vetting / aggregation |\n|---|---|---|---|---|---|")
    for name in MODELS:
        state = timm.create_model(name, pretrained=False, num_classes=7).state_dict()
        record = ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})
        n = sum(v.numel() for v in state.values())
        for layout in ("simulation", "deployment (packed)"):
            wire = pack(record) if layout.startswith("deployment") else record
            sent = Message(RecordDict({"arrays": wire}), dst_node_id=1, message_type="train")
            replies = []
            for client in range(args.clients):
                metrics = MetricRecord({"partition-id": client, "num-examples": 100,
                                        "unit-weight": 1.0, **dict.fromkeys(TRAIN_METRICS, 0.5)})
                replies.append(Message(RecordDict({"arrays": unpack(wire), "metrics": metrics}),
                                       reply_to=sent))
            vet = best_of(args.repeats, lambda: [refusal(r, sent, "train") for r in replies])
            assert all(refusal(r, sent, "train") is None for r in replies)
            mean = best_of(args.repeats, lambda: weighted_mean(
                [r.content for r in replies], "num-examples"))
            print(f"| {name} | {n / 1e6:.1f} M | {layout} | {vet * 1e3:.0f} ms | "
                  f"{mean * 1e3:.0f} ms | {vet / mean:.2f} |", flush=True)


if __name__ == "__main__":
    main()
