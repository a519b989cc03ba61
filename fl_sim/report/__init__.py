"""`fl-sim report STUDY_DIR`: compare a study's runs in STUDY_DIR/report/.

Writes report.md (winners, tables, figures), test_metrics.csv (the same numbers,
unrounded) and PNG figures, from the files `fl-sim run` leaves in each run directory (and
the probe/probe.json of `fl-sim probe`, where a run has one).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fl_sim.report.collect import REPORT_DIR, Study, load_study
from fl_sim.report.cross_site import cross_site_section
from fl_sim.report.markdown import render
from fl_sim.report.plots import write_figures
from fl_sim.report.personalization import personalization_section
from fl_sim.report.privacy import privacy_section
from fl_sim.report.probes import probes_section
from fl_sim.report.sites import sites_section
from fl_sim.report.tables import seed_table, versus_pooled
from fl_sim.report.uncertainty import Bootstrap, with_intervals
from fl_sim.tracking import STORE, log_report

__all__ = ["Study", "load_study", "seed_table", "write_report"]


def write_report(study_dir: Path, note: Callable[[str], None] | None = None) -> Path:
    """Write the report of the study in `study_dir`; returns the path of report.md. `note`
    gets a line per run left out of it, naming the run and why (a torn line's number)."""
    study = load_study(Path(study_dir))
    for name, why in study.skipped if note is not None else []:
        note(f"skipped {name}: {why}")
    out = study.folder / REPORT_DIR
    out.mkdir(exist_ok=True)
    # An earlier report's figures may show configurations that are gone now.
    for old in out.glob("*.png"):
        old.unlink()
    boot = Bootstrap(study)
    table = with_intervals(seed_table(study.at_best()), boot)
    table.to_csv(out / "test_metrics.csv", index=False)
    versus = versus_pooled(table, study.runs)
    figures = write_figures(study.rows, table, versus, boot, out)
    extra = [*sites_section(study, table, boot, out), *personalization_section(study),
             *cross_site_section(study), *privacy_section(study, out), *probes_section(study)]
    (out / "report.md").write_text(render(study, table, versus, boot, figures, extra),
                                   encoding="utf-8")
    if (study.folder / STORE).exists():  # the study tracks with MLflow
        log_report(study.folder, study.name, sorted(p for p in out.iterdir() if p.is_file()))
    return out / "report.md"
