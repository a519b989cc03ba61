"""Issue 13, the input side: torn metric rows, failed and diverged runs in the report, empty
client splits, output paths under a file, header-only and non-UTF-8 metadata, empty grids,
and messages that name the file and the line without echoing the whole study."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from test_report import STRATEGIES, write_run

from fl_sim.cli import main
from fl_sim.config import DataConfig, expand_grid, load_study
from fl_sim.data_partition import inspect_data, prepare_data
from fl_sim.errors import FlSimError
from fl_sim.report import load_study as load_report
from fl_sim.report import write_report
from fl_sim.report.plots import slug
from fl_sim.server.checkpoints import keep_rows_up_to
from fl_sim.server.run_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TORN = '{"round": 3, "scope": "client", "client": 1, "spl'


def one_line(text: str) -> str:
    return " ".join(text.split())


def write_study_file(tmp_path: Path, obj: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(obj))
    return path


def cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Runs fl-sim, expects exit 2 and one paragraph; returns it on one line."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return one_line(err)


# ------------------------------------------------------------------ torn metrics.jsonl


def test_resume_drops_a_torn_last_line(tmp_path: Path) -> None:
    rows = [{"round": r, "scope": "global", "client": None, "split": "test"} for r in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + TORN)
    torn: list[int] = []
    assert read_metrics(tmp_path, torn.append) == rows and torn == [3]
    keep_rows_up_to(tmp_path, 2)  # what resume runs
    assert read_metrics(tmp_path) == rows
    assert (tmp_path / "metrics.jsonl").read_text().endswith('"split": "test"}\n')


def test_a_bad_line_before_the_last_is_damage(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n\n' + TORN + '\n{"round": 2}\n')
    with pytest.raises(FlSimError, match=f"{path} line 3 is not a JSON row, and it is not the "
                                         "last line"):
        read_metrics(tmp_path)


def torn_study(tmp_path: Path) -> tuple[Path, int]:
    """A study whose fedavg run has a torn last line; the number of its whole lines."""
    study = tmp_path / "torn"
    for strategy in STRATEGIES:
        write_run(study, strategy, "tiny0", 0)
    metrics = study / "fedavg_tiny0_sgd_s0" / "metrics.jsonl"
    lines = len(metrics.read_text().splitlines())
    with open(metrics, "a") as f:
        f.write(TORN)
    return study, lines


def test_report_reads_a_torn_run_and_says_what_it_left_out(tmp_path: Path) -> None:
    study, lines = torn_study(tmp_path)
    text = write_report(study).read_text()
    assert "2 complete run(s)" in text
    skipped = text.split("## Skipped runs")[1]
    assert (f"- `fedavg_tiny0_sgd_s0`: metrics.jsonl line {lines + 1} is torn (cut off in the "
            "middle of a write) and was left out") in skipped


def test_the_console_names_each_skipped_run_and_why(tmp_path: Path, capsys) -> None:
    """Issue #25, item 4: not only inside report.md."""
    study, lines = torn_study(tmp_path)
    (study / "fedprox-mu0.01_tiny0_sgd_s0" / "summary.json").write_text("{not json")
    assert main(["report", str(study)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"skipped fedavg_tiny0_sgd_s0: metrics.jsonl line {lines + 1} is torn" in out
    assert "skipped fedprox-mu0.01_tiny0_sgd_s0: summary.json" in out


# ------------------------------------------------------------------ failed and diverged runs


def test_failed_and_diverged_runs_are_listed_never_ranked(tmp_path: Path) -> None:
    study = tmp_path / "diverged"
    for strategy in STRATEGIES:
        write_run(study, strategy, "tiny0", 0)
    failed = write_run(study, STRATEGIES[0], "tiny1", 0, complete=False) / "summary.json"
    summary = json.loads(failed.read_text())
    summary["failed"] = {"round": 3, "client": 1,
                         "reason": "non-finite training loss at client 1 (nan)"}
    failed.write_text(json.dumps(summary))
    nan = write_run(study, STRATEGIES[1], "tiny1", 0) / "summary.json"
    nan.write_text(nan.read_text().replace('"wall_time_s": 12.5', '"wall_time_s": NaN'))
    loaded = load_report(study)
    assert dict(loaded.skipped) == {
        "fedavg_tiny1_sgd_s0": "failed in round 3: non-finite training loss at client 1 (nan)",
        "fedprox-mu0.01_tiny1_sgd_s0": "summary.json holds a bare NaN: the run diverged (a "
        "non-finite loss or metric) and cannot be ranked; run it again with other settings "
        "(a smaller learning rate, say)",
    }
    assert set(loaded.runs["model"]) == {"tiny0"}
    text = write_report(study).read_text()
    assert "tiny1" not in text.split("## Skipped runs")[0]


def test_a_failure_without_the_client_in_its_reason_names_it(tmp_path: Path) -> None:
    summary = write_run(tmp_path / "s", STRATEGIES[0], "tiny0", 0, complete=False) / "summary.json"
    summary.write_text(json.dumps({"complete": False, "failed": {
        "round": 2, "client": 0, "reason": "non-finite weights"}}))
    with pytest.raises(FlSimError, match=r"failed in round 2 \(client 0\): non-finite weights"):
        load_report(tmp_path / "s")


# ------------------------------------------------------------------ empty client splits


def test_empty_client_splits_refuse_the_run(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = {"dataset": "synthetic", "image_size": 16, "max_images": 100,
            "cache_dir": str(tmp_path / "cache"), "partition": {"num_clients": 40}}
    with pytest.raises(FlSimError) as info:
        prepare_data(DataConfig(**data), progress=False)
    message = str(info.value)
    assert "test is empty at 40 of 40 clients (0, 1, 2, 3, 4, ...)" in message
    assert "val is empty at 18 of 40 clients (22, 23, 24, 25, 26, ...)" in message
    assert ("Use fewer clients (partition.num_clients is 40), more images (max_images is 100), "
            "or other split fractions (partition.splits is train 0.6, val 0.2, test 0.2)"
            in message)
    # `data inspect` shows such a partition, with warnings.
    assert "client 39 has an empty test split" in inspect_data(DataConfig(**data))
    study = write_study_file(tmp_path, {"study": "s", "data": data, "out": str(tmp_path / "o"),
                                        "defaults": {"model": {"name": "test_convnext"}}})
    assert "test is empty at 40 of 40 clients" in cli_error(capsys, "run", str(study))
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ bad input, one paragraph


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_out_under_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     dry_run: list[str]) -> None:
    (tmp_path / "some_file").write_text("")
    err = cli_error(capsys, "run", str(ROOT / "examples/quickstart.yaml"),
                    "--out", str(tmp_path / "some_file" / "sub"), *dry_run)
    assert (f"cannot write runs to {tmp_path}/some_file/sub/quickstart: {tmp_path}/some_file is "
            "a file, not a folder") in err


def test_header_only_metadata_is_refused_without_a_cache_file(
    fake_ham: Callable[..., Path], tmp_path: Path
) -> None:
    root = fake_ham()
    csv = root / "HAM10000_metadata.csv"
    csv.write_text(csv.read_text().splitlines()[0] + "\n")
    cache_dir = tmp_path / "cache"
    with pytest.raises(FlSimError, match=f"{csv} holds a header but no rows"):
        prepare_data(DataConfig(dataset="ham10000", root=root, cache_dir=cache_dir,
                                image_size=16), progress=False)
    assert not list(cache_dir.glob("*.npy"))


def test_latin1_metadata_names_the_line(fake_ham: Callable[..., Path], tmp_path: Path) -> None:
    root = fake_ham()
    csv = root / "HAM10000_metadata.csv"
    lines = csv.read_text().splitlines()
    lines[4] = lines[4].replace("back", "dos é")
    csv.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    with pytest.raises(FlSimError) as info:
        prepare_data(DataConfig(dataset="ham10000", root=root, cache_dir=tmp_path / "cache",
                                image_size=16), progress=False)
    column = lines[4].index("é") + 1
    assert str(info.value).startswith(
        f"{csv} is not UTF-8 text: line 5, byte {column} is #xe9 (invalid continuation byte)")


def test_an_empty_list_of_grids_is_refused_an_empty_grid_is_one_run(tmp_path: Path) -> None:
    with pytest.raises(FlSimError, match="grid is an empty list of grids, so the study has no "
                                         "run: leave grid out"):
        load_study(write_study_file(tmp_path, {"study": "s", "grid": []}))
    for grid in ({}, [{}]):
        study = load_study(write_study_file(tmp_path, {"study": "s", "grid": grid}))
        assert [r.name for r in expand_grid(study)] == ["fedavg_convnext_t_sgd_s0"]


# ------------------------------------------------------------------ messages


@pytest.mark.parametrize("obj, line", [
    ({"study": "s", "grid": {"strategy": [{"name": "fedavg", "proximal_mu": 1}]}},
     "  - grid.strategy: proximal_mu is a fedprox parameter, not one of 'fedavg'"),
    ({"study": "s", "grid": {"model": []}}, "  - grid.model is an empty list"),
    ({"study": "s", "grid": {"seed": [0, "x" * 200]}},
     f"  - grid.seed: Input should be a valid integer, unable to parse string as an integer "
     f"(got '{'x' * 76}...)"),
])
def test_validation_errors_echo_short_values_only(tmp_path: Path, obj: dict, line: str) -> None:
    with pytest.raises(FlSimError) as info:
        load_study(write_study_file(tmp_path, obj))
    assert str(info.value).splitlines()[1:] == [line]


def test_yaml_errors_name_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text("study: s\ndefaults: {rounds: [1\n")
    with pytest.raises(FlSimError, match=f'in "{path}", line 2'):
        load_study(path)
    path.write_bytes("study: s\nout: caf\xe9\n".encode("latin-1"))
    with pytest.raises(FlSimError, match=f"{path} is not valid YAML: line 2 holds the byte "
                                         "#xe9, which is not utf-8"):
        load_study(path)


def test_figure_names_keep_the_sign_of_an_exponent() -> None:
    assert slug("fedavg [optimizer.lr=1e+30]", "sgd") != slug("fedavg [optimizer.lr=1e-30]", "sgd")
    assert slug("fedavg [optimizer.lr=1e+30]", "sgd") == "fedavg-optimizer.lr-1e+30-_sgd"


def test_a_file_given_for_a_folder_is_called_a_file(tmp_path: Path, capsys) -> None:
    """Issue #25, item 4: not "does not exist"."""
    a_file = tmp_path / "results.txt"
    a_file.write_text("")
    assert main(["report", str(a_file)]) == 2
    assert f"study folder {a_file} is a file, not a folder" in capsys.readouterr().err
    assert main(["probe", str(a_file)]) == 2
    assert f"run folder {a_file} is a file, not a folder" in capsys.readouterr().err



def test_run_prints_data_inspect_s_warnings_at_start(tmp_path: Path, capsys) -> None:
    """Issue #25, item 2: `max_images: 20` gave a 2-image global test set without a word."""
    data = {"dataset": "synthetic", "image_size": 32, "max_images": 90,
            "cache_dir": str(tmp_path / "cache"), "partition": {"num_clients": 2}}
    study = write_study_file(tmp_path, {"study": "s", "data": data, "out": str(tmp_path / "o"),
                                        "defaults": {"rounds": 1, "strategy": {"name": "pooled"},
                                                     "model": {"name": "test_convnext"}}})
    assert main(["run", str(study)]) == 0
    out = one_line(capsys.readouterr().out)
    assert "warning: the global test set holds 17 images: one image moves its ACC by 5.9" in out


def test_a_lesion_with_images_of_different_labels_is_named(tmp_path: Path) -> None:
    from fl_sim.data_partition.inspect import data_warnings

    cfg = DataConfig(dataset="synthetic", image_size=16, cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg, progress=False)
    assert not [w for w in data_warnings(cfg, data) if "lesion" in w]
    first = data.manifest.index[0]
    other = data.manifest.index[data.labels != data.labels[0]][0]
    data.manifest.loc[other, "lesion_id"] = data.manifest.loc[first, "lesion_id"]
    [warning] = [w for w in data_warnings(cfg, data) if "lesion" in w]
    assert warning.startswith(f"1 lesion(s) have images with different labels "
                              f"({data.manifest.loc[first, 'lesion_id']})")
