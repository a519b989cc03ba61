"""`fl-sim data inspect`: the table, the warnings, and the errors it passes on."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml
from rich.console import Console

from fl_sim.config import DataConfig
from fl_sim.data_partition import inspect_data, prepare_data
from fl_sim.errors import FlSimError


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic cache for the module (these tests differ only in the partition)."""
    return tmp_path_factory.mktemp("synthetic-cache")


def inspect_text(cfg: DataConfig) -> tuple[str, list[str]]:
    console = Console(record=True, width=200, force_terminal=False)
    warnings = inspect_data(cfg, console)
    return console.export_text(), warnings


def test_table_counts(cache_dir: Path) -> None:
    cfg = DataConfig(cache_dir=cache_dir, image_size=16)
    text, warnings = inspect_text(cfg)
    data = prepare_data(cfg, progress=False)
    header = re.search(
        r"client\s+.\s+split\s+.\s+n\s+.\s+akiec\s+.\s+bcc\s+.\s+bkl\s+.\s+df\s+.\s+mel\s+.\s+nv\s+.\s+vasc",
        text,
    )
    assert header, text
    for client, split in [("0", "train"), ("global", "test")]:
        rows = data.indices(client, split)
        counts = [int((data.labels[rows] == k).sum()) for k in range(7)]
        pattern = r"\s+.\s+".join([split, str(len(rows)), *map(str, counts)])
        assert re.search(pattern, text), (client, split, pattern, text)
    assert "3 clients (random), 1189 client images, 211 global test images" in text
    assert warnings == []


def test_warns_about_missing_training_classes(cache_dir: Path) -> None:
    cfg = DataConfig(
        cache_dir=cache_dir,
        image_size=16,
        partition={"method": "dirichlet", "alpha": 0.1, "num_clients": 4},
    )
    text, warnings = inspect_text(cfg)
    assert warnings, "alpha 0.1 leaves some client without some class"
    assert all(
        re.fullmatch(
            r"client \d has no training image of class '(akiec|bcc|bkl|df|mel|nv|vasc)'", w
        )
        for w in warnings
    )
    for w in warnings:
        assert f"warning: {w}" in text


def test_site_rows_name_the_site(cache_dir: Path) -> None:
    text, _ = inspect_text(
        DataConfig(cache_dir=cache_dir, image_size=16, partition={"method": "site"})
    )
    for i, site in enumerate(["site_a", "site_b", "site_c", "site_d"]):
        assert f"{i} ({site})" in text
    assert "4 clients (site)" in text


def test_empty_client_is_an_error(cache_dir: Path) -> None:
    cfg = DataConfig(
        cache_dir=cache_dir,
        image_size=16,
        partition={"method": "dirichlet", "alpha": 0.001, "num_clients": 10},
    )
    with pytest.raises(
        FlSimError,
        match=r"Partition 'dirichlet' \(num_clients=10, seed=0\) left client \d+ with no image in "
        r"each of 10 draws of Dirichlet\(alpha=0.001\).*Use fewer clients or a larger alpha",
    ):
        inspect_data(cfg, Console(record=True))


def test_empty_split_is_a_warning(cache_dir: Path) -> None:
    # 51 lesions, 8 held out, 16 clients: the clients with 2 lesions have no test lesion.
    cfg = DataConfig(
        cache_dir=cache_dir, image_size=16, max_images=70, partition={"num_clients": 16}
    )
    _, warnings = inspect_text(cfg)
    assert "client 15 has an empty test split" in warnings


def _break_column(root: Path) -> str:
    csv = root / "HAM10000_metadata.csv"
    pd.read_csv(csv).drop(columns="dx").to_csv(csv, index=False)
    return f"{csv} has no column 'dx'"


def _break_label(root: Path) -> str:
    csv = root / "HAM10000_metadata.csv"
    meta = pd.read_csv(csv)
    meta.loc[0, "dx"] = "melanoma"
    meta.to_csv(csv, index=False)
    return f"{csv} has an unknown label 'melanoma' in column 'dx'"


def _remove_image(root: Path) -> str:
    path = sorted((root / "HAM10000_images_part_2").glob("*.jpg"))[0]
    path.unlink()
    return f"Image '{path.stem}' listed in {root}/HAM10000_metadata.csv was not found"


def _damage_image(root: Path) -> str:
    path = sorted((root / "HAM10000_images_part_1").glob("*.jpg"))[0]
    path.write_bytes(path.read_bytes()[:40])
    return f"Cannot read image {path}"


@pytest.mark.parametrize(
    "breaking", [_break_column, _break_label, _remove_image, _damage_image, None]
)
def test_cli_bad_input_exits_non_zero(
    breaking: Callable[[Path], str] | None,
    fake_ham: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cli = pytest.importorskip("fl_sim.cli")
    root = fake_ham()
    data = {"dataset": "ham10000", "root": str(root), "cache_dir": str(tmp_path / "cache")}
    if breaking is None:  # an empty client: 42 lesions cannot fill 60 clients
        data["partition"] = {"num_clients": 60}
        expected = "asks for 60 clients but the data has only"
    else:
        expected = breaking(root)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"study": "bad", "data": data}))
    assert cli.main(["data", "inspect", str(study)]) == 2
    err = capsys.readouterr().err
    assert expected in " ".join(err.split()), err
