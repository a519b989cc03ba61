"""A run's checkpoints (checkpoints/last.pt and best.pt) and what resuming from them needs.

After every round, last.pt holds the whole model, the pickled strategy (FedAdam's moments,
FedAvgM's momentum, ...) and the RunState, written atomically; best.pt is a hard link to
the last.pt of the best-on-validation round. A run restarted after a crash continues from
last.pt, with metrics.jsonl and best.pt brought up to it first.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fl_sim.config import DataConfig, RunConfig, flatten
from fl_sim.errors import FlSimError
from fl_sim.server.failures import WRITE_ERRORS, failed_before, not_resumed, rounds_kept
from fl_sim.server.run_log import RunLog, json_line, read_metrics


@dataclass
class RunState:
    """Everything besides the weights and the strategy that a resumed run needs."""

    round: int = 0
    best_round: int = -1
    best_score: float = float("-inf")
    best: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    round_seconds: list[float] = field(default_factory=list)
    schedule: dict[str, Any] = field(default_factory=dict)  # LRSchedule.state()
    stopped: dict[str, Any] | None = None  # {"round", "reason"} of an early stop
    synthesis: dict[str, Any] = field(default_factory=dict)  # client -> cost and counts
    personalized: dict[str, Any] = field(default_factory=dict)  # final/best -> client metrics
    cross_site: dict[str, Any] = field(default_factory=dict)  # {round, models}
    privacy: dict[str, Any] = field(default_factory=dict)  # PrivacyLedger.summary, last round


def results_config(resolved: dict) -> dict:
    """What a resumed run must share with its checkpoint: all but `resources`, which only
    schedules clients (a run started with num_cpus 1 may resume under `auto`), and
    `data.cache_dir`, where decoded images are kept. Both sides pass through the current
    schema, so a checkpoint written before a key was added (or a value spelt another way:
    `augment: true`) compares by what it means."""
    def current(schema: type, key: str, exclude: str) -> Any:
        try:
            return schema.model_validate(resolved.get(key, {})).model_dump(
                mode="json", exclude={exclude})
        except ValueError:  # not of this schema: compared as written, so never equal
            return resolved.get(key)

    return {**resolved, "data": current(DataConfig, "data", "cache_dir"),
            "run_config": current(RunConfig, "run_config", "resources")}


def changed_settings(before: dict, now: dict) -> list[str]:
    """The settings (dotted keys) in which two resolved configs differ for the results."""
    old, new = flatten(results_config(before)), flatten(results_config(now))
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def another_configuration(run_dir: Path, changed: list[str]) -> str:
    """The refusal of a run folder that holds a run of other settings."""
    shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
    return (f"{run_dir} holds a run with other settings than the study's now (changed: "
            f"{shown}); put them back, or delete that folder or change `out`/`study` to keep "
            "both.")


def keep_rows_up_to(run_dir: Path, server_round: int) -> None:
    """Drop metric rows of a round that was cut off (it will be repeated)."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        rows = [r for r in read_metrics(run_dir) if r["round"] <= server_round]
        tmp = path.with_suffix(".jsonl.tmp")
        with RunLog.writing(path, tmp):
            tmp.write_text("".join(json_line(r) for r in rows))
            tmp.replace(path)


class Checkpoints:
    """checkpoints/ of the run in `run_dir` (`resolved`: its config.yaml), and how far it
    is saved: `saved_round` is the round last.pt holds, `pending_round` the round being run
    and not saved yet (None when none is). The round loop sets both as it starts, and
    `pending_round` as each round starts; `save` moves them on."""

    def __init__(self, run_dir: Path, resolved: dict, run_name: str, classes: list[str]) -> None:
        self.run_dir, self.resolved = run_dir, resolved
        self.run_name, self.classes = run_name, classes
        self.folder = run_dir / "checkpoints"
        self.last, self.best = self.folder / "last.pt", self.folder / "best.pt"
        self.saved_round = 0
        self.pending_round: int | None = None

    def load_last(self) -> dict | None:
        """last.pt, None on a fresh start; refuses a run that failed or one of another
        configuration."""
        if failed := failed_before(self.run_dir):
            raise FlSimError(not_resumed(self.run_dir, failed))
        if not self.last.exists():
            return None
        ckpt = self._load(self.last)
        if changed := changed_settings(ckpt.get("config") or {}, self.resolved):
            raise FlSimError(another_configuration(self.run_dir, changed))
        return ckpt

    def load_best(self) -> dict:
        return self._load(self.best)

    @staticmethod
    def _load(path: Path) -> dict:
        return torch.load(path, weights_only=False, map_location="cpu")

    def clear_temporaries(self) -> None:
        """What a crash may have left half-written (see `save`)."""
        for tmp in (*self.run_dir.glob("*.tmp"), *self.folder.glob("*.tmp")):
            tmp.unlink()

    def restore(self, ckpt: dict) -> RunState:
        """The RunState of `ckpt` (last.pt), with best.pt and metrics.jsonl brought up to it."""
        state = RunState(**ckpt["state"])
        if state.best_round == state.round and not (self.best.exists()
                                                    and self.best.samefile(self.last)):
            self._link_best(self.last)  # the crash came between last.pt and best.pt
        keep_rows_up_to(self.run_dir, state.round)
        return state

    def save(self, state_dict: dict[str, torch.Tensor], strategy: Any, state: RunState,
             is_best: bool) -> None:
        """Round `state.round` (the whole model `state_dict`, the strategy, the state) into
        checkpoints/: everything is written before anything is replaced, and renames commit
        it in an order that leaves the files consistent wherever a crash comes:

        1. last.pt.tmp, the whole checkpoint (a failed write removes it: nothing changed);
        2. on a best round, best.pt.tmp: a hard link to it (a large model is written once;
           the next round's last.pt is a new file and leaves best.pt as it is);
        3. last.pt.tmp -> last.pt: the commit, what a resume starts from;
        4. best.pt.tmp -> best.pt;
        5. summary.json (FederatedRun.execute), from the same state.

        best.pt only ever holds a round that last.pt's state calls the best, and summary.json
        never names a round before its files are in place. A crash between 3 and 4 leaves
        best.pt, one between 4 and 5 summary.json, a round behind: a restart brings both up
        to last.pt before anything else (`FederatedRun._start_or_resume`).
        """
        tmp, best_tmp = self.folder / "last.pt.tmp", self.folder / "best.pt.tmp"
        with RunLog.writing(self.last, tmp, best_tmp):
            # Through a Python file, a full disk raises OSError (torch's own raises RuntimeError).
            with open(tmp, "wb") as f:
                torch.save({"round": state.round, "run": self.run_name,
                            "classes": self.classes, "config": self.resolved,
                            "state_dict": state_dict,
                            "strategy": pickle.dumps(strategy),
                            "state": dataclasses.asdict(state)}, f)
            if is_best:
                os.link(tmp, best_tmp)
            os.replace(tmp, self.last)
        self.saved_round, self.pending_round = state.round, None
        if is_best:
            self._link_best(best_tmp)

    def _link_best(self, source: Path) -> None:
        """best.pt becomes (a hard link to) `source`, by rename."""
        tmp = self.best.with_suffix(".pt.tmp")
        with RunLog.writing(self.best, tmp):
            if source != tmp:
                os.link(source, tmp)
            os.replace(tmp, self.best)

    def write_error(self, err: OSError) -> str:
        """One paragraph: the file, what was not saved, what is intact, what to do."""
        reason = err.strerror or os.strerror(err.errno)
        what = f"{reason[:1].lower()}{reason[1:]} while writing {err.filename or self.run_dir}"
        remedy = WRITE_ERRORS[err.errno]
        if self.pending_round is None:
            return (f"{what}; {rounds_kept(self.saved_round)} (checkpoints/last.pt), but not "
                    f"every record after round {self.saved_round}: {remedy} and run the same "
                    "command again, it completes them.")
        return (f"{what}; round {self.pending_round} was not saved; "
                f"{rounds_kept(self.saved_round)}. {remedy[:1].upper()}{remedy[1:]} and run "
                f"the same command again: it resumes from round {self.pending_round}.")
