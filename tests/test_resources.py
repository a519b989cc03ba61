"""`resources.num_cpus: auto`: the clients of a round fill the machine's cores in full waves."""

import pytest

from fl_sim.config import ResourcesConfig
from fl_sim.simulation import client_cpus


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


def test_a_set_share_is_kept_and_a_cluster_gets_one_cpu():
    assert client_cpus(2, 3, 16) == 2.0
    assert client_cpus("auto", 3, None) == 1.0
    assert ResourcesConfig().num_cpus == "auto"
    with pytest.raises(ValueError):
        ResourcesConfig(num_cpus="fast")
