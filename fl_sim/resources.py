"""How much of the machine each client gets: `resources.num_cpus: auto`, the refusal of a
share no machine has, and the same plan in the terms of Flower's own federation config."""

from __future__ import annotations

import math
import os

import torch

from fl_sim.config import ResourcesConfig
from fl_sim.errors import FlSimError


def client_cpus(requested: float | str, num_clients: int, cores: int | None) -> float:
    """Ray's CPU share per client. `auto` runs k clients at a time on `cores` cores, k the
    smallest divisor of `num_clients` from `cores` to twice that (else `cores`): every wave
    is full and no core idles. Separate processes scale better than intra-op threads (3
    clients on 2 cores: 3 actors beat 2 actors and 1 two-thread actor; BENCHMARKS.md)."""
    if requested != "auto":
        return float(requested)
    if cores is None:  # a Ray cluster: its size is not known before Ray starts
        return 1.0
    k = next((d for d in range(cores, 2 * cores + 1) if num_clients % d == 0), cores)
    # A hair under cores / k: Flower starts int(cores / share) actors, which float error in
    # cores / k can make k - 1 (9 cores, 7 clients: 6 actors, and a second wave for one).
    return cores / min(k, num_clients) * (1 - 1e-9)


def check_resources(cpus: float, gpus: float, available: dict[str, float],
                    cluster: bool) -> None:
    """Refuse a client's share of CPUs or GPUs that Ray has none of room for."""
    where = "the Ray cluster (FL_SIM_RAY_ADDRESS)" if cluster else "this machine"
    for name, asked, key in (("num_cpus", cpus, "CPU"), ("num_gpus", gpus, "GPU")):
        has = float(available.get(key, 0))
        if asked > has:
            raise FlSimError(
                f"resources.{name}: each client asks for {asked:g} {key}(s), and {where} has "
                f"{has:g}, so Ray could start no client. Lower resources.{name} (num_cpus: "
                f"auto fits the cores; num_gpus: 0 trains on the CPU).")


def local_resources() -> dict[str, float]:
    """What a local Ray will have: this process's cores and the GPUs CUDA shows it."""
    return {"CPU": float(local_cores()), "GPU": float(torch.cuda.device_count())}


def local_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one (Linux)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def flower_federation_config(resources: ResourcesConfig, num_clients: int,
                             cores: int) -> dict[str, int | float]:
    """`flwr run . --federation-config` for Flower's simulation runtime: one SuperNode per
    client, and the wave of clients `client_cpus` plans. Flower takes whole CPUs a client, so a
    share under one is one CPU of a Ray told it has as many CPUs as the wave has clients."""
    cpus = client_cpus(resources.num_cpus, num_clients, cores)
    if (whole := math.floor(cpus + 1e-6)) >= 1:  # `auto` is a hair under cores / k
        config: dict[str, int | float] = {"client-resources-num-cpus": whole}
    else:
        config = {"client-resources-num-cpus": 1, "init-args-num-cpus": round(cores / cpus)}
    if resources.num_gpus:
        config["client-resources-num-gpus"] = resources.num_gpus
    return {"num-supernodes": num_clients, **config}
