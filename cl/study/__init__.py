"""Studies: a seeded grid of runs over one base scenario, run on Ray and aggregated.

``adaptsim study STUDY.yaml`` calls :func:`run_study`. :mod:`.config` parses and resolves the
study file, :mod:`.grid` expands the grid and names the cells, :mod:`.execute` runs them (in
this process or on Ray) and resumes a killed study; ``aggregate`` writes the tables.
"""

from __future__ import annotations

from adaptsim.cl.study.config import Study, StudyConfig, load_study
from adaptsim.cl.study.execute import StudyResult, run_study

__all__ = ["run_study", "StudyResult", "load_study", "Study", "StudyConfig"]
