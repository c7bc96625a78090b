"""Planning a study: its config (teachers, runs, seeds, the settings search, ``extends``) and how each run's
experiment config is derived from the base, the search's choices and the run's own settings."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, ContextManager, Literal, Protocol, Union

from pydantic import Field, model_validator

from libkd.config import (AugmentConfig, ConfigError, ExperimentConfig, ModelConfig, ReplayConfig, Section, StoreConfig, TrainConfig,
                          apply_override, load_config, validate_config)


class StudyState(Protocol):
    """What the study's steps (search, park, summary, verdicts) read of a study in progress and call back on: its
    config, folders and choices so far, and the runner's steps they drive. The runner's ``Study`` is one; the steps
    know it only through this, so nothing below the runner imports it."""

    cfg: "StudyConfig"
    out: Path
    results: Path | None
    parent: "StudyState | None"
    only: set[str] | None
    dry: bool
    base: ExperimentConfig
    final_base: ExperimentConfig | None
    spec: dict[str, "RunSpec"]
    unsearched: set[str]
    chosen_by_run: dict[str, dict[str, Any]]
    own_search: dict[str, dict[str, Any]]

    def tune(self) -> dict[str, Any]: ...
    def train_teachers(self) -> None: ...
    def write_results(self) -> Path: ...
    def planned_runs(self) -> list[tuple["RunSpec", int, str]]: ...
    def finished_runs(self) -> list[tuple["RunSpec", int, Path]]: ...
    def base_for(self, spec: "RunSpec") -> ExperimentConfig: ...
    def run_config(self, spec: "RunSpec", seed: int, base: ExperimentConfig, out: Path, stores: str = "stores",
                   build: bool = True, views: int | None = None, ahead: int | None = None) -> ExperimentConfig: ...
    def distill_and_evaluate(self, cfg: ExperimentConfig, evaluate: bool) -> dict[str, Any]: ...
    def timed(self, key: str) -> ContextManager[None]: ...


class TeacherSpec(Section):
    """One teacher of the study: trained by ``libkd train-teacher`` on the study's training images."""

    teacher: ModelConfig
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    # The views the teacher trains on when augment.replay is true (None: the study's base replay recipe, the
    # student's). A teacher's recipe is its own: stronger augmentation suits a CNN trained alone for long.
    replay: ReplayConfig | None = None


class RunSpec(Section):
    """One kind of student run; it is repeated with the first ``seeds`` of the study's seeds."""

    name: str
    mode: Literal["none", "online", "store"]
    teachers: list[str] = []  # names from the study's teachers, in token order
    combine: Literal["per-token", "mean"] = "per-token"
    naive_store: bool = False  # learn from the single clean-view store (the study's negative control)
    # A new augmented view every epoch (V = epochs) instead of the store's V views: for online teachers, this
    # measures what the store's fixed views cost against what online distillation can do.
    fresh_views: bool = False
    # The store's number of views for this run (default: the study's store.views). A store with other views is its
    # own store, copied from the first views of a larger one of the same seed and recipe when one is built, else
    # grown from the largest smaller one (no view is computed twice).
    views: int | None = Field(None, ge=1)
    # Settings of this run on top of the study's and the search's (e.g. function matching: distill.alpha: 1.0); a
    # search of this run's own (scope: run) is applied after them, as its trials apply their grid last.
    set: dict[str, Any] = {}
    seeds: int = Field(1, ge=1)
    # The committed results folder of this very run in another study (e.g. the 60-epoch baseline of a study that
    # extends the schedule): read as a landed run, checked against this study's config for the run, never trained.
    reuse: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "RunSpec":
        if (self.mode == "none") != (not self.teachers):
            raise ValueError(f"run '{self.name}': mode none takes no teachers, the other modes need some")
        if self.naive_store and self.mode != "store":
            raise ValueError(f"run '{self.name}': naive_store needs mode store")
        if self.reuse and self.seeds != 1:
            raise ValueError(f"run '{self.name}': reuse names one run's folder, so it has one seed")
        if self.fresh_views and self.mode == "store":
            raise ValueError(f"run '{self.name}': fresh_views needs mode online or none (a store holds its V views)")
        return self


class TuneStage(Section):
    """A grid search over one run's settings; the winner's settings hold for the later stages and every run
    (``scope: all``), or for that run only (``scope: run``: e.g. alpha and tau searched for each arm on its own)."""

    run: str  # the name of a run in ``runs``
    scope: Literal["all", "run"] = "all"
    # Axes of the grid: each a list of choices, a choice being overrides such as {train.lr: 1.0e-3}.
    grid: list[list[dict[str, Any]]]
    # This stage's trial length (default: the search's ``epochs``): for a choice that only shows over a long
    # schedule, such as how much augmentation a 300-epoch run needs.
    epochs: int | None = Field(None, ge=1)


class TuneConfig(Section):
    """Settings search on a held-out part of the training images (data.holdout), trial runs of ``epochs``."""

    holdout: Union[int, float] = 0.2
    epochs: int | None = Field(None, ge=1)  # None: the study's own epochs
    stages: list[TuneStage] = []


class StudyConfig(Section):
    """A study: the base experiment, its teachers, its store, its runs and seeds, and its settings search."""

    out: str = "runs/study"
    results: str | None = None  # folder for the small results of every finished run (e.g. under docs/)
    base: ExperimentConfig = ExperimentConfig()  # data, student, train, replay and distill defaults of every run
    teachers: dict[str, TeacherSpec] = {}
    store: StoreConfig = StoreConfig()  # views, encoding, batch size, workers (path and teachers are the study's)
    seeds: list[int] = [0, 1, 2]
    runs: list[RunSpec] = []
    tune: TuneConfig | None = None
    # Another study config whose teachers (committed weights included), stores and searched settings this one reuses,
    # with ``set`` applied on top (e.g. a longer schedule): its own base, teachers and store are not given, and its
    # tune may only add run-scoped stages for its own runs (on the parent's held-out split).
    extends: str | None = None
    set: dict[str, Any] = {}

    @model_validator(mode="after")
    def _references(self) -> "StudyConfig":
        names = [r.name for r in self.runs]
        if len(set(names)) != len(names):
            raise ValueError(f"run names must be unique: {names}")
        for r in self.runs:
            unknown = [t for t in r.teachers if t not in self.teachers]
            if unknown and not (self.extends and not self.teachers):  # checked again once the teachers are merged in
                raise ValueError(f"run '{r.name}' names unknown teacher(s) {unknown}; the study's teachers are {list(self.teachers)}")
            if r.seeds > len(self.seeds):
                raise ValueError(f"run '{r.name}' asks for {r.seeds} seeds; the study lists {len(self.seeds)} in seeds")
        for stage in self.tune.stages if self.tune else []:
            if stage.run not in names:
                raise ValueError(f"tune stage names run '{stage.run}', which is not in runs ({names})")
        return self


# Store settings that change no record a store holds (how it is built; which of its views it keeps, first_view and stop_view): they
# never enter a store's key (its folder), so a run reads the same store path however its store was built.
HOW_BUILT = ("grow_from", "compile", "first_view", "stop_view")
INHERITED = ("base", "teachers", "store")  # what a study that extends another takes from it


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    cfg = load_config(path, overrides, StudyConfig)
    if cfg.set and not cfg.extends:
        raise ConfigError(f"'{path}': set: applies on top of the study named in extends:, and there is none "
                          "(put the settings in base: instead)")
    if not cfg.extends:
        return cfg
    own = [key for key in INHERITED if key in cfg.model_fields_set]
    if own:
        raise ConfigError(f"'{path}' extends '{cfg.extends}' and also gives {', '.join(own)}: a study that extends another "
                          "takes its base, teachers, store and searched settings; change those there, or use set: for "
                          "settings on top of them")
    parent = load_study(cfg.extends)
    if parent.extends:
        raise ConfigError(f"'{path}' extends '{cfg.extends}', which extends another study; extend that one directly")
    if cfg.tune is not None:  # its own runs' searches, on the parent's held-out split and trial length
        shared = [k for k in ("holdout", "epochs") if k in cfg.tune.model_fields_set and parent.tune is not None
                  and getattr(cfg.tune, k) != getattr(parent.tune, k)]
        wide = [s.run for s in cfg.tune.stages if s.scope != "run"]
        if shared or wide:
            raise ConfigError(f"'{path}' extends '{cfg.extends}': its tune: may only add stages with scope: run for its own "
                              "runs, on the held-out split and trial length of the study it extends (every other setting "
                              f"comes from that study's search){'; drop ' + ', '.join(shared) if shared else ''}"
                              f"{'; stages without scope: run: ' + ', '.join(wide) if wide else ''}")
        if parent.tune is not None:
            cfg.tune = cfg.tune.model_copy(update={"holdout": parent.tune.holdout, "epochs": parent.tune.epochs})
    values = {**parent.model_dump(mode="json", include=set(INHERITED), exclude_unset=True),
              **cfg.model_dump(mode="json", exclude_unset=True)}  # unset stays unset (store mode checks what is set)
    merged = validate_config(values, StudyConfig, f" in '{path}' (with the base, teachers and store of '{cfg.extends}')")
    with_overrides(merged.base, merged.set)  # a bad key in set: fails now, by name
    return merged


def with_overrides(cfg: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """``cfg`` with dotted-key overrides such as {'train.lr': 1e-3}, validated like --set."""
    values = cfg.model_dump(mode="json", exclude_unset=True)
    for key, value in overrides.items():
        apply_override(values, [p for p in key.split(".") if p], value)
    return validate_config(values, origin=f" with {overrides}")


def short_hash(value: Any) -> str:
    """The first 8 hex digits of the sha256 of ``value``'s canonical JSON: a folder name's fingerprint."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]


def study_log(message: str) -> None:
    """One timestamped line of a study's progress."""
    print(f"[study {time.strftime('%H:%M:%S')}] {message}", flush=True)
