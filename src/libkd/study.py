"""``libkd study CONFIG``: the whole comparison in one resumable command.

A study trains its teachers, chooses settings on a held-out part of the training images (never
the test split), builds the augmentation-consistent stores (one per seed) and the naive
single-view store, distils every run with every seed it asks for, evaluates each student with
its teachers, and writes a report: the per-run table and curves of ``libkd report`` plus a
summary over seeds and a check of the method's claims. Every step is a ``libkd`` job that resumes
or is skipped when complete, so a killed study is resumed by running the same command; with
``results:`` set, the small files of each finished run are copied there as it finishes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import Field, model_validator

from libkd import LibkdError
from libkd.config import (AugmentConfig, ConfigError, ExperimentConfig, ModelConfig, Section, StoreConfig, TrainConfig, apply_override,
                          load_config, validate_config)

RESULT_FILES = ("metrics.jsonl", "run.json", "student.json", "student.eval.json", "config.yaml")
TEACHER_FILES = ("teacher.json", "metrics.jsonl", "config.yaml")
TEACHER_WEIGHTS = "teacher.safetensors"
COMMIT_WEIGHTS_MAX_BYTES = 5 * 2**20  # a teacher this small goes into git with the results; a larger one is retrained


class TeacherSpec(Section):
    """One teacher of the study: trained by ``libkd train-teacher`` on the study's training images."""

    teacher: ModelConfig
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()


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
    # The store's number of views for this run (default: the study's store.views). A store with more views is its
    # own store, grown from the largest smaller one of the same seed and recipe (its views are not recomputed).
    views: int | None = Field(None, ge=1)
    # Settings of this run on top of the study's and the search's (e.g. function matching: distill.alpha: 1.0).
    set: dict[str, Any] = {}
    seeds: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> "RunSpec":
        if (self.mode == "none") != (not self.teachers):
            raise ValueError(f"run '{self.name}': mode none takes no teachers, the other modes need some")
        if self.naive_store and self.mode != "store":
            raise ValueError(f"run '{self.name}': naive_store needs mode store")
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
    # with ``set`` applied on top (e.g. a longer schedule): its own base, teachers, store and tune are not given.
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


INHERITED = ("base", "teachers", "store")  # what a study that extends another takes from it


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    cfg = load_config(path, overrides, StudyConfig)
    if cfg.set and not cfg.extends:
        raise ConfigError(f"'{path}': set: applies on top of the study named in extends:, and there is none "
                          "(put the settings in base: instead)")
    if not cfg.extends:
        return cfg
    own = [key for key in (*INHERITED, "tune") if key in cfg.model_fields_set]
    if own:
        raise ConfigError(f"'{path}' extends '{cfg.extends}' and also gives {', '.join(own)}: a study that extends another "
                          "takes its base, teachers, store and searched settings; change those there, or use set: for "
                          "settings on top of them")
    parent = load_study(cfg.extends)
    if parent.extends:
        raise ConfigError(f"'{path}' extends '{cfg.extends}', which extends another study; extend that one directly")
    values = {**parent.model_dump(mode="json", include=set(INHERITED), exclude_unset=True),
              **cfg.model_dump(mode="json", exclude_unset=True)}  # unset stays unset (store mode checks what is set)
    merged = validate_config(values, StudyConfig, f" in '{path}' (with the base, teachers and store of '{cfg.extends}')")
    _with(merged.base, merged.set)  # a bad key in set: fails now, by name
    return merged


def _with(cfg: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """``cfg`` with dotted-key overrides such as {'train.lr': 1e-3}, validated like --set."""
    values = cfg.model_dump(mode="json", exclude_unset=True)
    for key, value in overrides.items():
        apply_override(values, [p for p in key.split(".") if p], value)
    return validate_config(values, origin=f" with {overrides}")


def _short_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]


TIMING_FLUSH_S = 60.0  # how often a running step's wall time is written to timings.json
_TIMINGS_LOCK = threading.Lock()  # one read-modify-write of timings.json at a time


def _log(message: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Study:
    """The steps of one study, each skipped when its output is complete."""

    def __init__(self, cfg: StudyConfig):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.base = cfg.base
        self.spec = {r.name: r for r in cfg.runs}
        self.verified: set[str] = set()
        self.results = Path(cfg.results) if cfg.results else None
        self.final_base: ExperimentConfig | None = None  # the base with the search's choices, once known
        self.chosen_by_run: dict[str, dict[str, Any]] = {}  # choices of the run-scoped stages, per run
        self.parent = Study(load_study(cfg.extends)) if cfg.extends else None  # whose teachers, stores and search

    @contextmanager
    def timed(self, key: str):
        """Add this step's wall time to OUT/timings.json (summed over resumptions; a reused step adds its check).

        The sum is rewritten every ``TIMING_FLUSH_S`` seconds while the step runs, not only when it ends, so a
        killed job (a session's end, the OOM killer) loses at most that much of its time instead of all of it."""
        from libkd.fileio import write_json_atomic

        path = self.out / "timings.json"
        if not path.is_file() and self.results and (self.results / path.name).is_file():  # another machine's
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.results / path.name, path)
        before = json.loads(path.read_text()).get(key, 0.0) if path.is_file() else 0.0
        start = time.perf_counter()

        def flush() -> None:
            with _TIMINGS_LOCK:
                timings = json.loads(path.read_text()) if path.is_file() else {}
                timings[key] = round(before + time.perf_counter() - start, 1)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(path, timings)

        def heartbeat() -> None:
            while not done.wait(TIMING_FLUSH_S):
                flush()

        done = threading.Event()
        beat = threading.Thread(target=heartbeat, name=f"timings {key}", daemon=True)
        beat.start()
        try:
            yield
        finally:
            done.set()
            beat.join()
            flush()

    # ------------------------------------------------------------------ teachers and stores

    def teacher_path(self, name: str) -> str:
        if self.parent:
            return self.parent.teacher_path(name)
        return str(self.out / "teachers" / name / "teacher")

    def train_teachers(self) -> None:
        """Train each teacher, or take the one an earlier session committed to ``results`` (weights and all), so a
        fresh machine learns from the very teachers the committed runs learned from instead of retraining them."""
        from libkd.train_teacher import train_teacher

        if self.parent:
            _log(f"teachers: those of '{self.cfg.extends}'")
            self.parent.train_teachers()
            return
        for name, spec in self.cfg.teachers.items():
            teacher_cfg = self.base.model_copy(update={"teacher": spec.teacher, "augment": spec.augment, "train": spec.train,
                                                       "seed": self.cfg.seeds[0], "out": str(self.out / "teachers" / name)})
            folder = Path(teacher_cfg.out)
            landed = self.results / "teachers" / name if self.results else None
            if landed is not None and (landed / TEACHER_WEIGHTS).is_file():
                self._take_committed_teacher(name, teacher_cfg, landed)
                continue
            _log(f"teacher '{name}' ({spec.teacher.name}, {spec.train.epochs} epochs) -> {teacher_cfg.out}")
            with self.timed(f"teacher {name}"):
                train_teacher(teacher_cfg)
            if landed is None:
                continue
            mine = json.loads((folder / "teacher.json").read_text())["weights_sha256"]
            if (landed / "teacher.json").is_file():  # committed without its weights (too large, or an older study)
                theirs = json.loads((landed / "teacher.json").read_text())["weights_sha256"]
                if mine != theirs:
                    raise LibkdError(
                        f"teacher '{name}' trained here has weights {mine[:16]}, not the {theirs[:16]} of the teacher the "
                        f"committed runs in '{self.results}' learned from (another CPU or thread count rounds differently). "
                        f"Mixing them would compare students of different teachers: copy the original '{folder}' here, "
                        f"or delete '{self.results}' to redo the study with these teachers")
            landed.mkdir(parents=True, exist_ok=True)
            for item in TEACHER_FILES:
                shutil.copy2(folder / item, landed / item)
            size = (folder / TEACHER_WEIGHTS).stat().st_size
            if size <= COMMIT_WEIGHTS_MAX_BYTES:
                shutil.copy2(folder / TEACHER_WEIGHTS, landed / TEACHER_WEIGHTS)
            else:
                _log(f"teacher '{name}': weights of {size / 2**20:.0f} MiB are not copied to '{landed}' (over "
                     f"{COMMIT_WEIGHTS_MAX_BYTES // 2**20} MiB); another machine must retrain it to the same weights")

    def _take_committed_teacher(self, name: str, teacher_cfg: ExperimentConfig, landed: Path) -> None:
        """Use the teacher committed in ``landed`` (checked against this study's settings and its own checksum)."""
        from libkd.fileio import sha256_file

        folder = Path(teacher_cfg.out)
        _check_landed(landed, teacher_cfg, ("seed", "teacher", "augment", "train", "data"))
        record = json.loads((landed / "teacher.json").read_text())
        theirs = record["weights_sha256"]
        if sha256_file(landed / TEACHER_WEIGHTS) != theirs:
            raise LibkdError(f"'{landed / TEACHER_WEIGHTS}' does not match the sha256 in its teacher.json (a partial "
                             f"copy, or a Git LFS pointer: run `git lfs pull`); restore it from git")
        if (folder / "teacher.json").is_file():
            mine = json.loads((folder / "teacher.json").read_text())["weights_sha256"]
            if mine == theirs:
                _log(f"teacher '{name}': the committed one ({theirs[:16]}) is already in '{folder}'")
                return
            raise LibkdError(f"'{folder}' holds a teacher '{name}' with weights {mine[:16]}, not the {theirs[:16]} committed "
                             f"in '{landed}' that the study's runs learned from; delete '{folder}' to use the committed one")
        folder.mkdir(parents=True, exist_ok=True)
        for item in (*TEACHER_FILES, TEACHER_WEIGHTS):
            shutil.copy2(landed / item, folder / item)
        _log(f"teacher '{name}': using the committed weights {theirs[:16]} from '{landed}' "
             f"(val top-1 {record.get('metrics', {}).get('val_top1', float('nan')):.2f}), not retraining")

    def store_path(self, base: ExperimentConfig, seed: int, naive: bool, where: str = "stores", build: bool = True,
                   views: int | None = None) -> str:
        """Where the store for these data, recipe, seed and views lives (built and verified on first use when ``build``;
        a store of more views than the study's is grown from the largest smaller one already built)."""
        from libkd.store.precompute import precompute, verify_store

        if self.parent:  # the same teachers, data, recipe and store settings: the same store
            return self.parent.store_path(base, seed, naive, where, build, views)

        settings = self.cfg.store.model_copy(update={"views": views}) if views and not naive else self.cfg.store
        key = {"data": base.data.model_dump(mode="json"), "replay": None if naive else base.replay.model_dump(mode="json"),
               "store": settings.model_dump(mode="json", exclude={"path", "teachers", "grow_from"})}
        if naive:  # one clean view: no seed enters it, so every run shares one store
            seed = self.cfg.seeds[0]
        path = self.out / where / (f"naive-{_short_hash(key)}" if naive else f"seed{seed}-{_short_hash(key)}")
        replay = base.replay.model_copy(update={"enabled": False}) if naive else base.replay
        store = settings.model_copy(update={"path": str(path), "views": 1 if naive else settings.views,
                                            "teachers": [self.teacher_path(t) for t in self.cfg.teachers]})
        if not build:
            return str(path)
        if not naive:
            store.grow_from = _smaller_store(path, base.model_copy(update={"seed": seed, "replay": replay, "store": store}))
        grown = f", grown from {Path(store.grow_from).name}" if store.grow_from else ""
        _log(f"store {'naive single clean view' if naive else f'seed {seed}, {store.views} views'}{grown} -> {path}")
        with self.timed(f"store {where}/{path.name}"):
            precompute(base.model_copy(update={"seed": seed, "replay": replay, "store": store}))
        if str(path) not in self.verified:  # checksums, and a sample of records recomputed by the teachers
            result = verify_store(path, self.cfg.store.verify_samples, self.base.device, seed)
            _log(f"store {path.name} verified: {result['checked_records']} records recomputed, max |diff| {result['max_abs_diff']:.3g}")
            self.verified.add(str(path))
        return str(path)

    # ------------------------------------------------------------------ runs

    def run_config(self, spec: RunSpec, seed: int, base: ExperimentConfig, out: Path, stores: str = "stores",
                   build: bool = True) -> ExperimentConfig:
        teachers = [self.teacher_path(t) for t in spec.teachers]
        distill = base.distill.model_copy(update={"mode": spec.mode, "teachers": teachers, "combine": spec.combine,
                                                  "naive_store": spec.naive_store, "store": None})
        if spec.mode == "store":
            distill.store = self.store_path(base, seed, spec.naive_store, stores, build, spec.views)
        # Runs without a store replay the store's number of views, so every mode sees the same stream, unless they
        # ask for a fresh view every epoch.
        views = base.train.epochs if spec.fresh_views else spec.views or self.cfg.store.views
        store = base.store.model_copy(update={"views": views})
        return base.model_copy(update={"seed": seed, "out": str(out), "distill": distill, "store": store})

    def distill_and_evaluate(self, cfg: ExperimentConfig, evaluate: bool) -> dict[str, Any]:
        """Train (or reuse) one student; with ``evaluate``, score it with its teachers into student.eval.json."""
        from libkd.distill import distill
        from libkd.engine import resolve_device
        from libkd.evaluate import evaluate_checkpoint
        from libkd.fileio import write_json_atomic

        out = Path(cfg.out)
        final = distill(cfg)  # a finished run is only checked against this config (a changed setting is refused) and reused
        target = out / "student.eval.json"
        if evaluate and not target.is_file():
            teachers = cfg.distill.teachers or None
            result = evaluate_checkpoint(str(out / "student"), None, teachers, resolve_device(cfg.device), cfg.train.eval_batch_size)
            write_json_atomic(target, result)
        return final

    def base_for(self, spec: RunSpec) -> ExperimentConfig:
        """The base a run trains from: the study's base with the search's global choices and the run's own."""
        assert self.final_base is not None, "the settings search runs first"
        # set: (a study that extends another) wins over the search, and the run's own set: over both
        own = {**self.chosen_by_run.get(spec.name, {}), **self.cfg.set, **spec.set}
        return _with(self.final_base, own) if own else self.final_base

    def tune(self) -> dict[str, Any]:
        """Run every stage's grid on the held-out split; returns the chosen overrides (also in tune/tuning.json);
        the choices of run-scoped stages go to ``chosen_by_run``."""
        if self.parent:
            _log(f"settings: those searched by '{self.cfg.extends}', then {self.cfg.set or 'nothing'} on top")
            chosen = self.parent.tune()
            self.chosen_by_run = self.parent.chosen_by_run
            self.parent.final_base = _with(self.parent.base, chosen)
            return {**chosen, **self.cfg.set}
        tune = self.cfg.tune
        chosen: dict[str, Any] = {}
        by_run: dict[str, dict[str, Any]] = {}
        record: list[dict[str, Any]] = []
        if tune is None or not tune.stages:
            return chosen
        landed = self.results / "tuning.json" if self.results else None
        if not (self.out / "tune" / "tuning.json").is_file() and landed and landed.is_file():
            record = json.loads(landed.read_text())
            if _same_search(record, tune):
                _log(f"settings search: reusing {landed} (committed by an earlier session): {record['chosen']}")
                self.chosen_by_run = record.get("chosen_by_run", {})
                return record["chosen"]
            _log(f"settings search: {landed} searched another grid; searching again")
        # Trials an earlier session finished (the search takes hours here): each reused when its whole config matches.
        trials_file = self.results / "tune-trials.json" if self.results else None
        done = json.loads(trials_file.read_text()) if trials_file and trials_file.is_file() else {}
        for s, stage in enumerate(tune.stages):
            spec = self.spec[stage.run]
            trials = []
            for choice in itertools.product(*stage.grid):
                overrides = {k: v for part in choice for k, v in part.items()}
                trial_base = _with(self.base, {**chosen, **by_run.get(stage.run, {}), **overrides, "data.holdout": tune.holdout,
                                               **({"train.epochs": tune.epochs} if tune.epochs else {})})
                name = f"stage{s}-{stage.run}-{_short_hash(overrides)}"
                _log(f"tuning stage {s} ({stage.run}), trial {len(trials) + 1}/{_grid_size(stage.grid)}: {overrides}")
                out = self.out / "tune" / name
                cfg = self.run_config(spec, self.cfg.seeds[0], trial_base, out, stores="tune/stores", build=False)
                config_sha = _short_hash(cfg.model_dump(mode="json", exclude={"out": True, "distill": {"store": True, "teachers": True},
                                                                               "store": {"grow_from"}}))
                landed = done.get(name)
                if landed and landed["config_sha"] == config_sha and not (out / "student.safetensors").is_file():
                    _log(f"trial {name}: done, reusing it (from {trials_file}, committed by an earlier session)")
                    trials.append({k: landed[k] for k in ("trial", "overrides", "holdout_top1")})
                    continue
                cfg = self.run_config(spec, self.cfg.seeds[0], trial_base, out, stores="tune/stores")
                with self.timed(f"tune {name}"):
                    metrics = self.distill_and_evaluate(cfg, evaluate=False)
                trials.append({"trial": name, "overrides": overrides, "holdout_top1": metrics["val_top1"]})
                if trials_file:
                    from libkd.fileio import write_json_atomic

                    done[name] = {**trials[-1], "config_sha": config_sha}
                    trials_file.parent.mkdir(parents=True, exist_ok=True)
                    write_json_atomic(trials_file, done)
            best = max(trials, key=lambda t: t["holdout_top1"])  # the first of equals: grid order breaks ties
            (by_run.setdefault(stage.run, {}) if stage.scope == "run" else chosen).update(best["overrides"])
            record.append({"stage": s, "run": stage.run, "scope": stage.scope, "trials": trials, "chosen": best["trial"]})
            _log(f"tuning stage {s}: chose {best['overrides']} (held-out top-1 {best['holdout_top1']:.2f})")
        from libkd.fileio import write_json_atomic

        write_json_atomic(self.out / "tune" / "tuning.json", {"holdout": tune.holdout, "epochs": tune.epochs,
                                                              "stages": record, "chosen": chosen, "chosen_by_run": by_run})
        if self.results:  # landed at once, not with the first run (which may be a session away)
            self.results.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.out / "tune" / "tuning.json", self.results / "tuning.json")
        self.chosen_by_run = by_run
        return chosen

    def planned_runs(self) -> list[tuple[RunSpec, int, str]]:
        """(spec, seed, folder name), the first seed of every run before the extra seeds of any."""
        plan = []
        for i, seed in enumerate(self.cfg.seeds):
            plan += [(spec, seed, f"{spec.name}-s{seed}") for spec in self.cfg.runs if i < spec.seeds]
        return plan

    def run(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        self.train_teachers()
        chosen = self.tune()
        base = _with(self.base, chosen)
        plan = self.planned_runs()
        self.final_base = base
        for n, (spec, seed, name) in enumerate(plan, 1):
            out = self.out / "runs" / name
            here = (out / "student.eval.json").is_file()
            landed = None if here else self.landed_run(spec, seed, name)
            state = ("done, reusing it" if here else
                     f"done, reusing it (from {landed}, committed by an earlier session)" if landed else "running")
            _log(f"run {n}/{len(plan)}: {name} ({spec.mode}, teachers {spec.teachers or '-'}, {spec.combine}"
                 f"{', naive store' if spec.naive_store else ''}): {state}")
            if landed:
                continue
            cfg = self.run_config(spec, seed, self.base_for(spec), out)
            with self.timed(f"run {name}"):
                self.distill_and_evaluate(cfg, evaluate=True)
            self.write_results()
        summary = self.write_results()
        _log(f"summary over seeds and the claims: {summary}")
        return summary.with_name("report.md")

    # ------------------------------------------------------------------ report

    def landed_run(self, spec: RunSpec, seed: int, name: str) -> Path | None:
        """``results/runs/NAME`` when it holds this very run, finished (the small files an earlier session committed)."""
        folder = self.results / "runs" / name if self.results else None
        if folder is None or not all((folder / f).is_file() for f in RESULT_FILES):
            return None
        expected = self.run_config(spec, seed, self.base_for(spec), self.out / "runs" / name, build=False)
        _check_landed(folder, expected, ("seed", "student", "train", "distill", "replay"))
        return folder

    def finished_runs(self) -> list[tuple[RunSpec, int, Path]]:
        finished = []
        for spec, seed, name in self.planned_runs():
            if (self.out / "runs" / name / "student.eval.json").is_file():
                finished.append((spec, seed, self.out / "runs" / name))
            elif self.final_base is not None and self.landed_run(spec, seed, name):
                finished.append((spec, seed, self.results / "runs" / name))
        return finished

    def write_results(self) -> Path:
        """report/ (libkd report over every finished run) and report/study.md; copied to ``results`` when set."""
        from libkd.report import write_report

        report_dir = self.out / "report"
        finished = self.finished_runs()
        if finished:
            write_report([str(p) for _, _, p in finished], report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        study_md = report_dir / "study.md"
        study_md.write_text(summary_markdown(self, finished))
        if self.cfg.results:
            results = Path(self.cfg.results)
            for _, _, folder in finished:
                target = results / "runs" / folder.name
                if target.resolve() == folder.resolve():
                    continue
                target.mkdir(parents=True, exist_ok=True)
                for name in RESULT_FILES:
                    if (folder / name).is_file():
                        shutil.copy2(folder / name, target / name)
            for item in report_dir.iterdir():
                shutil.copy2(item, results / item.name)
            tuning = self.out / "tune" / "tuning.json"
            for extra in (tuning, self.out / "timings.json"):
                if extra.is_file():
                    shutil.copy2(extra, results / extra.name)
        return study_md


def _smaller_store(path: Path, cfg: ExperimentConfig) -> str | None:
    """The complete store beside ``path`` built from the same data, recipe, seed and store settings with the most
    views below ``cfg.store.views``: a larger store grows from it instead of recomputing its views."""
    if (path / "manifest.json").is_file():
        return None  # started already: precompute resumes it as it was begun
    same = {"exclude": {"path", "views", "grow_from", "teachers"}}
    best, best_views = None, 0
    for sibling in sorted(path.parent.glob("*/config.yaml")):
        manifest = sibling.parent / "manifest.json"
        if sibling.parent == path or not manifest.is_file() or not json.loads(manifest.read_text()).get("complete"):
            continue
        other = load_config(sibling)
        if (other.seed, other.data, other.replay) != (cfg.seed, cfg.data, cfg.replay) or \
                other.store.model_dump(**same) != cfg.store.model_dump(**same) or other.store.teachers != cfg.store.teachers:
            continue
        if best_views < other.store.views < cfg.store.views:
            best, best_views = str(sibling.parent), other.store.views
    return best


def _check_landed(folder: Path, expected: ExperimentConfig, sections: tuple[str, ...]) -> None:
    """Refuse a committed run whose recorded config differs from what this study asks for."""
    from libkd.engine import RESUMABLE_TRAIN_KEYS

    saved = load_config(folder / "config.yaml")
    for section in sections:
        mine, theirs = getattr(expected, section), getattr(saved, section)
        if section == "train":
            mine, theirs = (x.model_dump(mode="json", exclude=RESUMABLE_TRAIN_KEYS) for x in (mine, theirs))
        elif hasattr(mine, "model_dump"):
            mine, theirs = mine.model_dump(mode="json"), theirs.model_dump(mode="json")
        if mine != theirs:
            where = [k for k in mine if mine.get(k) != theirs.get(k)] if isinstance(mine, dict) else []
            raise LibkdError(f"'{folder}' was made with another {section} ({', '.join(f'{section}.{k}' for k in where) or section} "
                             "differ) than this study asks for; delete it (and commit the deletion) to redo it, or restore "
                             "the study's settings")


def _same_search(record: dict[str, Any], tune: TuneConfig) -> bool:
    """Whether a saved tuning record searched exactly this grid."""
    if record.get("holdout") != tune.holdout or record.get("epochs") != tune.epochs or len(record["stages"]) != len(tune.stages):
        return False
    for saved, stage in zip(record["stages"], tune.stages):
        grid = [{k: v for part in choice for k, v in part.items()} for choice in itertools.product(*stage.grid)]
        if saved["run"] != stage.run or saved.get("scope", "all") != stage.scope or \
                [t["overrides"] for t in saved["trials"]] != json.loads(json.dumps(grid)):
            return False
    return True


def _grid_size(grid: list[list[dict[str, Any]]]) -> int:
    size = 1
    for axis in grid:
        size *= len(axis)
    return size


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def summary_markdown(study: Study, finished: list[tuple[RunSpec, int, Path]]) -> str:
    """Mean and spread over seeds per run, the tuning record, and each claim checked against the figures."""
    by_run = _by_run(finished)
    cfg = study.cfg
    base = study.final_base or cfg.base
    lines = ["# Study summary", "",
             f"Training data: {cfg.base.data.source} {cfg.base.data.root or ''} (subset {cfg.base.data.subset}); "
             f"student {cfg.base.student.name}, {base.train.epochs} epochs; top-1 on the test split "
             f"({cfg.base.data.val_split}), in percent; mean ± standard deviation over seeds.", "",
             *([f"Teachers, stores and searched settings: those of `{cfg.extends}`, with "
                f"{', '.join(f'{k}={v}' for k, v in cfg.set.items()) or 'nothing'} on top.", ""] if cfg.extends else []),
             "| run | mode | teachers | combine | seeds | top-1 | per seed | ECE | train img/s | train time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for spec in cfg.runs:
        rows = by_run.get(spec.name)
        mode = spec.mode + (" (naive store)" if spec.naive_store else "") + (" (fresh views)" if spec.fresh_views else "")
        described = f"| {spec.name} | {mode} | {', '.join(spec.teachers) or '—'} | {spec.combine if spec.teachers else '—'} | "
        if not rows:
            lines.append(described + f"0/{spec.seeds} | not run yet | | | | |")
            continue
        lines.append(
            described + f"{len(rows)}/{spec.seeds} | **{_mean_spread([r['top1'] for r in rows])}** | "
            f"{', '.join(format(r['top1'], '.2f') for r in rows)} | {statistics.mean(r['ece'] for r in rows):.3f} | "
            f"{statistics.mean(r['img_s'] for r in rows):.0f} | {statistics.mean(r['train_s'] for r in rows) / 60:.1f} min |")
    parent = _by_run(study.parent.finished_runs()) if study.parent is not None and study.parent.final_base else None
    along = training_table(study, by_run, parent)
    if along:
        lines += ["", "## Along training", "", *along]
    lines += ["", "## Claims", "", *claims(study, by_run, parent)]
    timings = study.out / "timings.json"
    if timings.is_file():
        spent: dict[str, float] = {}
        for key, seconds in json.loads(timings.read_text()).items():
            spent[key.split()[0]] = spent.get(key.split()[0], 0.0) + seconds
        lines += ["", "Wall time spent so far (summed over resumptions): " + ", ".join(
            f"{kind}s {seconds / 60:.0f} min" for kind, seconds in spent.items())
                  + f"; {sum(spent.values()) / 3600:.2f} h in all (`{study.out}/timings.json`)."]
    tuning = study.out / "tune" / "tuning.json"
    if tuning.is_file():
        lines += ["", "## Settings search (held-out part of the training images, never the test split)", "",
                  *tuning_table(json.loads(tuning.read_text()))]
    return "\n".join(lines) + "\n"


def _by_run(finished: list[tuple[RunSpec, int, Path]]) -> dict[str, list[dict[str, Any]]]:
    """Each run's finished seeds: test top-1, ECE, training time and speed."""
    from libkd.report import load_run

    by_run: dict[str, list[dict[str, Any]]] = {}
    for spec, seed, folder in finished:
        run = load_run(folder)
        history = run["history"]
        by_run.setdefault(spec.name, []).append({
            "seed": seed, "top1": run["eval"]["top1"], "ece": run["eval"]["ece"],
            "train_s": sum(h["train_seconds"] for h in history), "img_s": statistics.mean(h["images_per_s"] for h in history),
            "curve": {h["epoch"]: h["val_top1"] for h in history if h["val_top1"] is not None},
            "teachers": {name: t["top1"] for name, t in zip(spec.teachers, run["eval"].get("teachers") or [])}})
    return by_run


def _columns(epochs: list[int], most: int = 8) -> list[int]:
    """At most ``most`` of the scored epochs, evenly spread and always with the last."""
    if len(epochs) <= most:
        return epochs
    step = -(-len(epochs) // most)
    return epochs[::-1][::step][::-1]


def gain_changes(study: Study, by_run: dict[str, list[dict[str, Any]]], parent: dict[str, list[dict[str, Any]]],
                 baseline: str) -> list[str]:
    """Whether each run's final gain over ``baseline`` grew or shrank against the study this one extends, judged by
    the noise rule: the change of gain against t SE, SE = s * sqrt(1/n + 1/n_base + 1/n' + 1/n'_base)."""
    sd, dof, _ = seed_noise(study, by_run, parent)
    lines = []
    for name in [s.name for s in study.cfg.runs if s.name in by_run and s.name != baseline and s.name in parent]:
        groups = [[r["top1"] for r in rows] for rows in (by_run[name], by_run[baseline], parent[name], parent[baseline])]
        here, there = (statistics.mean(groups[0]) - statistics.mean(groups[1]),
                       statistics.mean(groups[2]) - statistics.mean(groups[3]))
        change = here - there
        if sd is None:
            verdict, judged = UNTESTED, "no seed spread to judge it"
        else:
            threshold = _t95(dof) * sd * sum(1 / len(g) for g in groups) ** 0.5
            verdict = (f"grows, {HOLDS}" if change > threshold else f"shrinks, {HOLDS}" if change < -threshold else WITHIN)
            judged = f"t SE {threshold:.2f}"
        lines.append(f"- `{name}`'s gain over `{baseline}`: {there:+.2f} in `{study.cfg.extends}`, {here:+.2f} here "
                     f"(change {change:+.2f}, {judged}): **{verdict}**.")
    return lines


def training_table(study: Study, by_run: dict[str, list[dict[str, Any]]],
                   parent: dict[str, list[dict[str, Any]]] | None = None) -> list[str]:
    """Test top-1 along training, mean over seeds, with each distilled run's gain over the run without teachers at
    the same epoch; the study this one extends (``parent``) gives its final figures as a last column; the teachers'
    own top-1 closes it. Answers: does the gain grow or shrink with training, does the ordering hold, how close do
    the students get to their teachers."""
    names = [s.name for s in study.cfg.runs if s.name in by_run]
    if not names:
        return []
    scored = sorted(set.intersection(*(set(r["curve"]) for n in names for r in by_run[n])))
    if not scored:
        return []
    columns = _columns(scored)

    def at(name: str, epoch: int) -> float:
        return statistics.mean(r["curve"][epoch] for r in by_run[name])

    baseline = _roles(study.cfg).get("baseline")
    baseline = baseline if baseline in by_run else None
    parent_epochs = study.parent.final_base.train.epochs if study.parent is not None and study.parent.final_base else None
    extra = [f"{parent_epochs or 'final'} epochs (`{study.cfg.extends}`)"] if parent is not None else []
    lines = ["Test top-1 at the epochs every finished seed scored (`train.eval_every`), mean over seeds"
             + (f"; in brackets the gain over `{baseline}` at the same epoch" if baseline else "")
             + (f"; the last column is the same run in `{study.cfg.extends}`, whose schedule this study lengthens or "
                "shortens" if parent is not None else "") + ".", "",
             "| run | " + " | ".join(f"epoch {e}" for e in columns) + "".join(f" | {x}" for x in extra) + " |",
             "|---|" + "---|" * (len(columns) + len(extra))]
    for name in names:
        cells = []
        for e in columns:
            gain = f" ({at(name, e) - at(baseline, e):+.2f})" if baseline and name != baseline else ""
            cells.append(f"{at(name, e):.2f}{gain}")
        if parent is not None:
            rows, base_rows = parent.get(name), parent.get(baseline) if baseline else None
            if rows:
                mean = statistics.mean(r["top1"] for r in rows)
                gain = (f" ({mean - statistics.mean(r['top1'] for r in base_rows):+.2f})"
                        if base_rows and name != baseline else "")
                cells.append(f"{mean:.2f}{gain} ({len(rows)} seed{'s' if len(rows) > 1 else ''})")
            else:
                cells.append("not run")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if parent is not None and baseline and baseline in parent:
        lines += ["", *gain_changes(study, by_run, parent, baseline)]
    teachers: dict[str, float] = {}
    for rows in by_run.values():
        for r in rows:
            for t, top1 in r["teachers"].items():
                teachers.setdefault(t, top1)
    if teachers:
        best = max(names, key=lambda n: statistics.mean(r["top1"] for r in by_run[n]))
        final = statistics.mean(r["top1"] for r in by_run[best])
        lines += ["", f"The teachers on the same split: " + ", ".join(f"{t} {v:.2f}" for t, v in teachers.items())
                  + f". The best student, `{best}` ({final:.2f}), is "
                  + ", ".join(f"{abs(final - v):.2f} points {'below' if final < v else 'above'} {t}" for t, v in teachers.items())
                  + "."]
    return lines


def tuning_table(record: dict[str, Any]) -> list[str]:
    lines = [f"Held out per class: {record['holdout']}; trial runs of {record['epochs'] or 'the study’s'} epochs. "
             "Each stage's winner holds for the later stages and for every run, or, marked 'its own', for that run only.", "",
             "| stage | run | settings | held-out top-1 | chosen |", "|---|---|---|---|---|"]
    for stage in record["stages"]:
        for t in stage["trials"]:
            settings = ", ".join(f"{k}={v}" for k, v in t["overrides"].items())
            lines.append(f"| {stage['stage']} | {stage['run']}{' (its own)' if stage.get('scope') == 'run' else ''} | {settings} | {t['holdout_top1']:.2f} | "
                         f"{'yes' if t['trial'] == stage['chosen'] else ''} |")
    return lines


def _roles(cfg: StudyConfig) -> dict[str, Any]:
    """Which runs play which part in the claims, read off their specs."""
    everyone = set(cfg.teachers)
    roles: dict[str, Any] = {"singles": []}
    for r in cfg.runs:
        if r.mode == "none":
            roles["baseline"] = r.name
        elif set(r.teachers) == everyone and r.combine == "per-token" and len(everyone) > 1:
            key = "naive" if r.naive_store else "online-fresh" if r.fresh_views else r.mode
            roles.setdefault({"store": "method", "online": "online", "naive": "naive", "online-fresh": "online-fresh"}[key],
                             r.name)
        elif r.mode == "store" and len(r.teachers) == 1 and not r.naive_store:
            roles["singles"].append(r.name)
        elif r.mode == "store" and r.combine == "mean" and not r.naive_store:
            roles["mean"] = r.name
    return roles


def _same_seed(by_run: dict[str, list[dict[str, Any]]], a: str | None, b: str | None) -> list[tuple[dict, dict]]:
    """(run a's record, run b's record) for every seed both have finished."""
    if a not in by_run or b not in by_run:
        return []
    of_a = {r["seed"]: r for r in by_run[a]}
    return [(of_a[r["seed"]], r) for r in by_run[b] if r["seed"] in of_a]


NOISE_RULE = ("Verdicts: the margin m (difference of the two runs' means over seeds) against t SE, where "
              "SE = s * sqrt(1/n1 + 1/n2), s is the seed standard deviation pooled over every run of the study with two "
              "or more seeds (seed noise is taken to be alike across runs; pooling gives it more degrees of freedom than "
              "any one run's three seeds), and t is the two-sided 95 % quantile of Student's t with s's degrees of "
              "freedom (12.71 at 1, 2.57 at 5, 2.23 at 10, near 2 with many), so a spread measured on few seeds asks "
              "for a wider margin. A claim that one run beats another **holds beyond seed noise** when m > t SE, is "
              "**within seed noise** when |m| <= t SE and **does not hold** when m < -t SE. The store-vs-online claim "
              "(|m| <= 0.5 points) holds beyond seed noise when |m| + t SE <= 0.5, does not hold when |m| - t SE > 0.5, "
              "and is within seed noise otherwise. A claim whose runs are missing is **not tested** and names them.")
HOLDS, WITHIN, FAILS, UNTESTED = "holds beyond seed noise", "within seed noise", "does not hold", "not tested"


def pooled_sd(by_run: dict[str, list[dict[str, Any]]]) -> tuple[float | None, int]:
    """(pooled seed standard deviation of top-1 over runs with >= 2 seeds, its degrees of freedom)."""
    ss, dof = 0.0, 0
    for rows in by_run.values():
        if len(rows) > 1:
            ss += statistics.variance([r["top1"] for r in rows]) * (len(rows) - 1)
            dof += len(rows) - 1
    return ((ss / dof) ** 0.5, dof) if dof else (None, 0)


def _t95(dof: int) -> float:
    """The two-sided 95 % quantile of Student's t with ``dof`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def noise_threshold(a: list[float], b: list[float], sd: float, dof: int) -> float:
    """t SE: the margin between the means of ``a`` and ``b`` that seed noise explains at 95 % (two-sided)."""
    return _t95(dof) * sd * (1 / len(a) + 1 / len(b)) ** 0.5


def beats(a: list[float], b: list[float], sd: float | None, dof: int) -> tuple[str, float, float | None]:
    """(verdict, margin, t SE) for the claim 'mean(a) > mean(b)' under the noise rule."""
    margin = statistics.mean(a) - statistics.mean(b)
    if sd is None:
        return UNTESTED, margin, None
    k = noise_threshold(a, b, sd, dof)
    return (HOLDS if margin > k else FAILS if margin < -k else WITHIN), margin, k


def equivalent(a: list[float], b: list[float], sd: float | None, dof: int, bound: float) -> tuple[str, float, float | None]:
    """(verdict, margin, t SE) for the claim '|mean(a) - mean(b)| <= bound'."""
    margin = statistics.mean(a) - statistics.mean(b)
    if sd is None:
        return UNTESTED, margin, None
    k = noise_threshold(a, b, sd, dof)
    return (HOLDS if abs(margin) + k <= bound else FAILS if abs(margin) - k > bound else WITHIN), margin, k


def weakest(verdicts: list[str]) -> str:
    """A claim made of several comparisons is as strong as its weakest one."""
    for v in (UNTESTED, FAILS, WITHIN):
        if v in verdicts:
            return v
    return HOLDS


def _missing(study: Study, names: list[str | None], by_run: dict[str, list[dict[str, Any]]], what: str) -> str | None:
    """None when every named run has finished; else the 'not tested' line naming what is missing."""
    absent = [n for n in names if n is None]
    unfinished = [n for n in names if n is not None and n not in by_run]
    if not absent and not unfinished:
        return None
    parts = ([f"the study has no {what}"] if absent else []) + (
        [f"not finished: {', '.join(f'{n} ({study.spec[n].seeds} seed(s))' for n in unfinished)}"] if unfinished else [])
    return "; ".join(parts)


def seed_noise(study: Study, by_run: dict[str, list[dict[str, Any]]],
               parent: dict[str, list[dict[str, Any]]] | None = None) -> tuple[float | None, int, bool]:
    """(pooled seed standard deviation, its degrees of freedom, whether it was borrowed): with one seed per run here,
    the seed spread of the study this one extends (``parent``, its runs, read when not given), at its schedule."""
    sd, dof = pooled_sd(by_run)
    if sd is None and study.parent is not None and study.parent.final_base is not None:
        return (*pooled_sd(parent if parent is not None else _by_run(study.parent.finished_runs())), True)
    return sd, dof, False


def claims(study: Study, by_run: dict[str, list[dict[str, Any]]],
           parent: dict[str, list[dict[str, Any]]] | None = None) -> list[str]:
    """The method's claims, each with a noise-aware verdict (see NOISE_RULE) and the figures that decide it;
    ``parent``: the runs of the study this one extends, when already read."""
    roles = _roles(study.cfg)
    top1 = {name: [r["top1"] for r in rows] for name, rows in by_run.items()}
    sd, dof, borrowed = seed_noise(study, by_run, parent)

    def fmt(name: str) -> str:
        return f"{name} {statistics.mean(top1[name]):.2f} ({len(top1[name])} seed{'s' if len(top1[name]) > 1 else ''})"

    def figures(margin: float, threshold: float | None) -> str:
        return f"m {margin:+.2f}" + (f", t SE {threshold:.2f}" if threshold is not None else ", no seed spread to judge it")

    lines = []
    method = roles.get("method")
    # (a) needs a single-teacher run for every teacher of the method, and the run without teachers.
    singles = {tuple(study.spec[n].teachers): n for n in roles["singles"]}
    needed = [roles.get("baseline")] + [singles.get((t,)) for t in study.cfg.teachers]
    title = "- (a) both teachers, one token each, beat every single-teacher student and the student without teachers"
    gap = _missing(study, [method, *needed], by_run, "single-teacher run for every teacher" if None in needed[1:] else "such run")
    if gap:
        lines.append(f"{title}: **{UNTESTED}**: {gap}.")
    else:
        parts = [(n, *beats(top1[method], top1[n], sd, dof)) for n in needed]
        lines.append(f"{title}: **{weakest([p[1] for p in parts])}**. {fmt(method)} against "
                     + "; ".join(f"{fmt(n)}: {v} ({figures(m, thr)})" for n, v, m, thr in parts) + ".")
    title = "- (a') one token per teacher beats one token for the teachers' mean"
    gap = _missing(study, [method, roles.get("mean")], by_run, "mean-token run")
    if gap:
        lines.append(f"{title}: **{UNTESTED}**: {gap}.")
    else:
        v, m, thr = beats(top1[method], top1[roles["mean"]], sd, dof)
        lines.append(f"{title}: **{v}**: {fmt(method)} against {fmt(roles['mean'])} ({figures(m, thr)}).")
    title = "- (b) the store reaches the online accuracy within 0.5 points"
    gap = _missing(study, [method, roles.get("online")], by_run, "online run")
    pairs = _same_seed(by_run, method, roles.get("online"))
    if gap or not pairs:
        lines.append(f"{title}: **{UNTESTED}**: {gap or 'no seed run in both modes'}.")
    else:
        store, online = [m["top1"] for m, _ in pairs], [o["top1"] for _, o in pairs]
        v, m, thr = equivalent(online, store, sd, dof, 0.5)
        cost = statistics.mean(m["train_s"] / o["train_s"] for m, o in pairs)
        lines.append(f"{title}: **{v}**: online minus store {m:+.2f} points on {len(pairs)} same-seed pair(s)"
                     + (f" (t SE {thr:.2f})" if thr is not None else "")
                     + f"; the store run's training time is {cost:.2f}x the online run's.")
    title = "- (b') the store's V fixed views cost at most 0.5 points against online teachers on a fresh view every epoch"
    fresh = roles.get("online-fresh")
    gap = _missing(study, [method, fresh], by_run, "online run with fresh views (fresh_views: true)")
    if gap:
        lines.append(f"{title}: **{UNTESTED}**: {gap}.")
    else:
        v, m, thr = equivalent(top1[fresh], top1[method], sd, dof, 0.5)
        lines.append(f"{title}: **{v}**: {fmt(fresh)} against {fmt(method)} (online-fresh minus store {m:+.2f}"
                     + (f", t SE {thr:.2f})." if thr is not None else ")."))
    title = "- (c) the naive single-view store is worse than the augmentation-consistent store"
    gap = _missing(study, [method, roles.get("naive")], by_run, "naive-store run")
    pairs = _same_seed(by_run, method, roles.get("naive"))
    if gap or not pairs:
        lines.append(f"{title}: **{UNTESTED}**: {gap or 'no seed run in both modes'}.")
    else:
        v, m, thr = beats([p["top1"] for p, _ in pairs], [n["top1"] for _, n in pairs], sd, dof)
        lines.append(f"{title}: **{v}**: consistent minus naive on {len(pairs)} same-seed pair(s): {figures(m, thr)}.")
    noise = (f"pooled seed standard deviation s = {sd:.2f} points ({dof} degrees of freedom, t {_t95(dof):.2f})" if sd is not None
             else "no run has two seeds, so seed noise is unknown and no difference can be judged")
    if borrowed and sd is not None:
        noise += (f", taken from `{study.cfg.extends}` (no run here has two seeds; it assumes the seed spread at this "
                  "schedule is like that one's)")
    return lines + ["", f"Seed noise: {noise}. {NOISE_RULE}"]


def run_study(path: str | Path, overrides: list[str] | None = None) -> Path:
    """Run (or resume) the study in config ``path``; returns the report's path."""
    return Study(load_study(path, overrides)).run()
