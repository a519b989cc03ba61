"""Reading a study file and expanding its grid into runs."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fl_sim.config.naming import NAMED_KEYS, run_labels, run_name
from fl_sim.config.schema import Run, RunConfig, StudyConfig
from fl_sim.errors import FlSimError


def load_study(
    path: str | Path, *, data_root: str | Path | None = None, out: str | Path | None = None
) -> StudyConfig:
    """Read and validate a study file; CLI overrides win over the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:  # a named stream: YAML's errors name the file
            raw = yaml.load(f, Loader=UniqueKeyLoader)
    except FileNotFoundError:
        raise FlSimError(f"config file {path} not found: check the path.") from None
    except OSError as err:
        raise FlSimError(f"cannot read config file {path}: {err.strerror}.") from None
    except yaml.reader.ReaderError as err:
        raise FlSimError(_reader_error(path, err)) from None
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
    if data_root is not None and study.data.dataset == "synthetic":
        raise FlSimError(f"--data-root {data_root}: {path}'s dataset is synthetic, whose images "
                         "are generated and read from no folder; drop --data-root, or set "
                         "data.dataset to the dataset that folder holds.")
    return study


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML would keep the
    last one without a word (`study: x` ... `study: y` runs study y)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Hashable, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # PyYAML refuses those itself
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping (lines "
                    f"{seen[key]} and {line}); YAML would keep the last one silently, so delete "
                    "the one you do not mean", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


def _make_paths_absolute(study: StudyConfig) -> None:
    """Client processes (Ray workers) may start in another working directory."""
    data = study.data
    for owner, key in ((data, "root"), (data, "cache_dir"), (data.global_test, "root"),
                       (study, "out")):
        value = getattr(owner, key)
        if value is not None:
            setattr(owner, key, Path(value).expanduser().absolute())


def _reader_error(path: Path, err: yaml.reader.ReaderError) -> str:
    """Name the line: YAML gives an offset, in bytes for text that does not decode, else in
    characters."""
    data = path.read_bytes()
    if err.encoding == "unicode":  # the text decoded, but holds a control character
        line = data.decode("utf-8", errors="replace")[: err.position].count("\n") + 1
        what = f"the control character #x{err.character:04x}, which YAML does not allow"
    else:
        line = data[: err.position].count(b"\n") + 1
        what = (f"the byte #x{err.character:02x}, which is not {err.encoding} ({err.reason}): "
                "save the file as UTF-8")
    return f"{path} is not valid YAML: line {line} holds {what}."


ECHO_CHARS = 80  # an echoed value longer than this is cut: the key path already locates it


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, each with its dotted key path and the value it got, if short."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling)"
        else:
            msg = e["msg"].removeprefix("Value error, ") + _echo(e.get("input"))
        lines.append(f"  - {loc + ': ' if loc else ''}{msg}")
    return "\n".join(lines)


def _echo(value: Any) -> str:
    """' (got ...)', short. Not for a mapping: a model's own check gets the whole block (the
    whole study, at the top), which says nothing the key path does not."""
    if isinstance(value, dict):
        return ""
    text = repr(value)
    return f" (got {text if len(text) <= ECHO_CHARS else text[: ECHO_CHARS - 3] + '...'})"



# What a scalar alternative of a sub-config sets (`model: [convnext_t, swin_t]`).
SCALAR_KEY = {"clip": "text_model", "resources": "num_cpus", "finetune": "trainable"}


def expand_grid(study: StudyConfig) -> list[Run]:
    """The product of each grid's alternatives over the defaults, with readable names."""
    base = study.defaults.model_dump()
    runs = []
    for grid in study.grids:
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            runs.append(_expand_one(base, keys, combo))
    runs = _named_by_params(runs)
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise FlSimError(f"the grid gives several runs the same name: {', '.join(dupes)}")
    return runs


def _named_by_params(runs: list[Run]) -> list[Run]:
    """Runs that share a name but not their `strategy.params` (two FedAdam rates) get the
    params in their strategy part, e.g. `fedadam-eta0.01_...`; other names stay as they
    were, so the folders of earlier studies keep theirs."""
    names = [r.name for r in runs]
    out = []
    for run in runs:
        params = run.config.strategy.params
        if names.count(run.name) > 1 and params:
            label = run_labels(run.config)["strategy"]
            tag = "-".join(f"{k}{v:g}" for k, v in sorted(params.items()))
            run = Run(name=f"{label}-{tag}{run.name[len(label):]}", config=run.config)
        out.append(run)
    return out


def _expand_one(base: dict[str, Any], keys: list[str], combo: tuple) -> Run:
    raw = dict(base)
    for key, value in zip(keys, combo):
        # A sub-config (model, optimizer, strategy, ...) is updated, not replaced: a scalar
        # alternative sets its name (see SCALAR_KEY), a mapping sets the keys it names; a
        # switch (`augment: [false, true]`) replaces it whole, as it would in `defaults`.
        if isinstance(base[key], dict) and not isinstance(value, bool):
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


def flatten(config: dict[str, Any], prefix: str = "",
            render: Callable[[Any], str] = json.dumps) -> dict[str, str]:
    """Dotted keys -> the values as text (JSON by default, so that lists and nulls compare
    as values). An empty mapping (`params: {}`) gives no key: it sets nothing."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}.", render))
        else:
            out[f"{prefix}{key}"] = render(value)
    return out
