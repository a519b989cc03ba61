"""`resources.num_cpus: auto`: the clients of a round fill the machine's cores in full waves."""

import os
import sys
import time

import pytest
import yaml

from processes import left_in_group, run_in_own_group

from fl_sim.config import ResourcesConfig
from fl_sim.errors import FlSimError
from fl_sim.resources import check_resources, client_cpus, flower_federation_config, local_cores
from fl_sim.server.server_app import check_simulated_federation


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


def test_a_share_ray_has_no_room_for_is_refused_naming_what_it_has():
    check_resources(1.0, 0.5, {"CPU": 2.0, "GPU": 1.0}, cluster=False)
    with pytest.raises(FlSimError, match=r"num_gpus: each client asks for 1 GPU\(s\), and this "
                                         r"machine has 0"):
        check_resources(1.0, 1.0, {"CPU": 2.0}, cluster=False)
    with pytest.raises(FlSimError, match=r"num_cpus: each client asks for 64 CPU\(s\), and the "
                                         r"Ray cluster \(FL_SIM_RAY_ADDRESS\) has 16"):
        check_resources(64.0, 0.0, {"CPU": 16.0}, cluster=True)


@pytest.mark.slow
@pytest.mark.parametrize("resources", [{"num_gpus": 1}, {"num_cpus": 64}])
def test_a_study_asking_for_what_the_machine_lacks_exits_at_once_and_leaves_no_ray(
        tmp_path, resources, capsys):
    """Issue #25, item 1: Flower's "ActorPool is empty", and then a process that never exits."""
    if resources.get("num_gpus") and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({
        "study": "s", "out": str(tmp_path / "out"),
        "data": {"dataset": "synthetic", "image_size": 32, "synthetic": {"num_images": 120},
                 "cache_dir": str(tmp_path / "cache"), "partition": {"num_clients": 2}},
        "defaults": {"rounds": 1, "model": {"name": "test_convnext"}, "resources": resources}}))
    start = time.monotonic()
    done, pgid = run_in_own_group([sys.executable, "-m", "fl_sim.cli", "run", str(study)])
    assert time.monotonic() - start < 15  # before the data, before Ray
    assert done.returncode == 2, done.stderr
    key = next(iter(resources))
    assert f"resources.{key}: each client asks for" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr
    assert not left_in_group(pgid), "a process outlived the study"


@pytest.mark.slow
def test_whatever_flowers_engine_raises_fl_sim_exits_naming_it(tmp_path):
    """Issue #25, item 1: an engine that fails leaves the ServerApp thread waiting for
    replies, which kept the process alive; now it is stopped and the study exits 2."""

    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({
        "study": "s", "out": str(tmp_path / "out"),
        "data": {"dataset": "synthetic", "image_size": 32, "synthetic": {"num_images": 120},
                 "cache_dir": str(tmp_path / "cache"), "partition": {"num_clients": 2}},
        "defaults": {"rounds": 1, "model": {"name": "test_convnext"}}}))
    broken_engine = (
        "import sys\n"
        "from flwr.server.superlink.fleet import vce\n"
        "def start_vce(**kwargs):\n"
        "    raise RuntimeError('the backend lost its actors')\n"
        "vce.start_vce = start_vce\n"
        "from fl_sim.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    start = time.monotonic()
    done, pgid = run_in_own_group([sys.executable, "-c", broken_engine, "run", str(study)])
    assert done.returncode == 2, done.stderr
    said = " ".join(done.stderr.split())
    assert ("Flower's Simulation Engine stopped (RuntimeError: the backend lost its actors)"
            in said), said
    assert "Traceback" not in done.stderr
    assert time.monotonic() - start < 120  # no wait for replies that never come
    assert not left_in_group(pgid), "a process (Ray's) outlived the study"


def test_flowers_federation_config_runs_fl_sims_wave():
    """Issue #25, item 5: Flower takes whole CPUs a client; the config fl-sim names for
    `flwr run .` starts as many clients at once as `num_cpus: auto` does."""
    for cores in range(1, 33):
        for clients in range(1, 41):
            config = flower_federation_config(ResourcesConfig(), clients, cores)
            assert config["num-supernodes"] == clients
            ray_cpus = config.get("init-args-num-cpus", cores)
            flower_wave = int(ray_cpus / config["client-resources-num-cpus"])
            planned = int(cores / client_cpus("auto", clients, cores))
            assert min(flower_wave, clients) == min(planned, clients), (cores, clients, config)
    assert flower_federation_config(ResourcesConfig(), 3, 2) == {
        "num-supernodes": 3, "client-resources-num-cpus": 1, "init-args-num-cpus": 3}
    assert flower_federation_config(ResourcesConfig(num_cpus=2, num_gpus=0.5), 4, 16) == {
        "num-supernodes": 4, "client-resources-num-cpus": 2, "client-resources-num-gpus": 0.5}


class Nodes:
    def __init__(self, count):
        self.count = count

    def get_node_ids(self):
        return range(self.count)


def test_a_simulated_federation_of_another_size_is_refused_naming_what_fits(caplog):
    with pytest.raises(FlSimError, match=r"has 2 SuperNodes, and the study splits its data for "
                                         r"3 clients.*--federation-config \"num-supernodes=3 "):
        check_simulated_federation(Nodes(2), 3, ResourcesConfig(), settle_s=0.1)
    with pytest.raises(FlSimError, match="has 0 SuperNodes"):  # none registered in time
        check_simulated_federation(Nodes(0), 3, ResourcesConfig(), settle_s=0.1)
    with caplog.at_level("INFO", logger="flwr"):
        check_simulated_federation(Nodes(3), 3, ResourcesConfig(), settle_s=0.1)
    assert "3 SuperNodes, one a client" in caplog.text
