"""`resources.num_cpus: auto`: the clients of a round fill the machine's cores in full waves."""

import os

import pytest

from fl_sim.config import ResourcesConfig
from fl_sim.simulation import client_cpus, local_cores


@pytest.mark.parametrize(("clients", "cores", "share"), [
    (3, 2, 2 / 3),   # 3 actors on 2 cores: one wave, both cores busy throughout
    (10, 2, 1.0),    # 2 at a time, 5 full waves
    (4, 2, 1.0),
    (5, 2, 1.0),     # no divisor of 5 within 2..4: 2 at a time
    (1, 8, 8.0),     # a lone client gets the machine
    (3, 16, 16 / 3),
])
def test_auto_share(clients, cores, share):
    assert client_cpus("auto", clients, cores) == pytest.approx(share)


def test_flower_fits_exactly_the_planned_wave_of_actors():
    # Flower's Ray backend starts int(cores / share) actors; float error in cores / k used to
    # make that k - 1 (9 cores, 7 clients: 6 actors, so a second wave for one client).
    for cores in range(1, 65):
        for clients in range(1, 121):
            share = client_cpus("auto", clients, cores)
            wave = min(next((d for d in range(cores, 2 * cores + 1) if clients % d == 0), cores), clients)
            assert int(cores / share) == wave, (cores, clients, share)


def test_local_cores_are_the_ones_this_process_may_use():
    assert 1 <= local_cores() <= os.cpu_count()


def test_a_set_share_is_kept_and_a_cluster_gets_one_cpu():
    assert client_cpus(2, 3, 16) == 2.0
    assert client_cpus("auto", 3, None) == 1.0
    assert ResourcesConfig().num_cpus == "auto"
    with pytest.raises(ValueError):
        ResourcesConfig(num_cpus="fast")
