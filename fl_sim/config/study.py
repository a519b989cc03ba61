"""Reading a study file and expanding its grid into runs."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fl_sim.config.naming import NAMED_KEYS, run_name
from fl_sim.config.schema import Run, RunConfig, StudyConfig
from fl_sim.errors import FlSimError


def load_study(
    path: str | Path, *, data_root: str | Path | None = None, out: str | Path | None = None
) -> StudyConfig:
    """Read and validate a study file; CLI overrides win over the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FlSimError(f"config file {path} not found: check the path.") from None
    except yaml.YAMLError as err:
        raise FlSimError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise FlSimError(f"{path} must hold a mapping with keys study, data, defaults, grid.")
    if data_root is not None:
        raw.setdefault("data", {})["root"] = str(data_root)
    if out is not None:
        raw["out"] = str(out)
    try:
        study = StudyConfig.model_validate(raw)
        expand_grid(study)  # every grid value must make a valid run
        _make_paths_absolute(study)
    except ValidationError as err:
        raise FlSimError(f"{path} is not a valid study:\n{format_validation_error(err)}") from None
    return study


def _make_paths_absolute(study: StudyConfig) -> None:
    """Client processes (Ray workers) may start in another working directory."""
    data = study.data
    for owner, key in ((data, "root"), (data, "cache_dir"), (data.global_test, "root"),
                       (study, "out")):
        value = getattr(owner, key)
        if value is not None:
            setattr(owner, key, Path(value).expanduser().absolute())


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, each with its dotted key path."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = "unknown key (check its spelling)" if e["type"] == "extra_forbidden" else e["msg"]
        value = "" if e["type"] == "extra_forbidden" else f" (got {e.get('input')!r})"
        lines.append(f"  - {loc or '<top>'}: {msg}{value}")
    return "\n".join(lines)



# What a scalar alternative of a sub-config sets (`model: [convnext_t, swin_t]`).
SCALAR_KEY = {"clip": "text_model", "resources": "num_cpus"}


def expand_grid(study: StudyConfig) -> list[Run]:
    """The product of each grid's alternatives over the defaults, with readable names."""
    base = study.defaults.model_dump()
    runs = []
    for grid in study.grids:
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            runs.append(_expand_one(base, keys, combo))
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise FlSimError(f"the grid gives several runs the same name: {', '.join(dupes)}")
    return runs


def _expand_one(base: dict[str, Any], keys: list[str], combo: tuple) -> Run:
    raw = dict(base)
    for key, value in zip(keys, combo):
        # A sub-config (model, optimizer, strategy, ...) is updated, not replaced: a scalar
        # alternative sets its name (see SCALAR_KEY), a mapping sets the keys it names.
        if isinstance(base[key], dict):
            update = value if isinstance(value, dict) else {SCALAR_KEY.get(key, "name"): value}
            raw[key] = {**base[key], **update}
        else:
            raw[key] = value
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ValidationError.from_exception_data(
            "grid", [{**e, "loc": ("grid", *e["loc"])} for e in err.errors()]
        ) from None
    extras = [f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in zip(keys, combo)
              if k not in NAMED_KEYS and not isinstance(v, (dict, list))]
    return Run(name="_".join([run_name(config), *extras]), config=config)



