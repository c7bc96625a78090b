"""Running a study: its teachers (or the committed ones), its stores (built, grown, verified), its runs and seeds,
resumed from what is done here or was committed to ``results``; the timings; the report and summary files."""

from __future__ import annotations

import json
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from libkd import LibkdError
from libkd.config import ExperimentConfig, load_config
from libkd.study.park import TrainingNeeded, epochs_done, saved_epoch, unpark
from libkd.study.plan import HOW_BUILT, RunSpec, StudyConfig, study_log, short_hash, with_overrides, load_study
from libkd.study.search import search
from libkd.study.stores import source_store, window_to_build
from libkd.study.summary import summary_markdown

RESULT_FILES = ("metrics.jsonl", "run.json", "student.json", "student.eval.json", "config.yaml")
TEACHER_FILES = ("teacher.json", "metrics.jsonl", "config.yaml")
TEACHER_WEIGHTS = "teacher.safetensors"
COMMIT_WEIGHTS_MAX_BYTES = 8 * 2**20  # a teacher this small goes into git with the results; a larger one is retrained

TIMING_FLUSH_S = 60.0  # how often a running step's wall time is written to timings.json
_TIMINGS_LOCK = threading.Lock()  # one read-modify-write of timings.json at a time


class Study:
    """The steps of one study, each skipped when its output is complete."""

    def __init__(self, cfg: StudyConfig, only: list[str] | None = None, workers: int | None = None,
                 views_ahead: int | None = None):
        self.cfg, self.out = cfg, Path(cfg.out)
        if views_ahead is not None and views_ahead < 1:
            raise LibkdError(f"--views-ahead {views_ahead}: give a number of views, 1 or more")
        # Build a run's store this many views at a time, as the run reaches them (None: every view before it starts).
        self.views_ahead = views_ahead
        if workers is not None and workers < 0:
            raise LibkdError(f"--workers {workers}: give a number of data-loading processes, 0 or more (0: load in the "
                             "training process)")
        # Data-loading processes on this machine, for stores and runs: part of no store's or run's identity.
        self.workers = workers
        unknown = [name for name in only or [] if name not in {r.name for r in cfg.runs}]
        if unknown:
            raise LibkdError(f"--runs names {', '.join(unknown)}, not a run of this study; its runs are "
                             f"{', '.join(r.name for r in cfg.runs)}")
        # Train only these runs (and the searches they need) in this invocation; the others wait for a later one.
        self.only = set(only) if only else None
        self.unsearched: set[str] = set()  # runs whose own search stage was left for a later invocation
        self.base = cfg.base
        self.spec = {r.name: r for r in cfg.runs}
        self.verified: set[str] = set()
        self.results = Path(cfg.results) if cfg.results else None
        self.final_base: ExperimentConfig | None = None  # the base with the search's choices, once known
        self.chosen_by_run: dict[str, dict[str, Any]] = {}  # choices of the run-scoped stages, per run
        self.own_search: dict[str, dict[str, Any]] = {}  # a study that extends another: its own stages' choices
        # whose teachers, stores and search
        self.parent = Study(load_study(cfg.extends), workers=workers) if cfg.extends else None
        # Train nothing (a --park rewriting study.md): a step that would train raises TrainingNeeded instead.
        self.dry = False

    @contextmanager
    def timed(self, key: str):
        """Add this step's wall time to OUT/timings.json (summed over resumptions; a reused step adds its check).

        The sum is rewritten every ``TIMING_FLUSH_S`` seconds while the step runs, not only when it ends, so a
        killed job (a job slot's end, the OOM killer) loses at most that much of its time instead of all of it."""
        from libkd.fileio import write_json_atomic

        path = self.out / "timings.json"
        committed = self.results / path.name if self.results else None
        if committed is not None and committed.is_file():  # other machines' time: never less than what they committed
            with _TIMINGS_LOCK:
                mine = json.loads(path.read_text()) if path.is_file() else {}
                theirs = json.loads(committed.read_text())
                merged = {**theirs, **{k: max(v, theirs.get(k, 0.0)) for k, v in mine.items()}}
                if merged != mine:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_json_atomic(path, merged)
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
        """Train each teacher, or take the one committed to ``results`` (weights and all), so a
        fresh machine learns from the very teachers the committed runs learned from instead of retraining them."""
        from libkd.train_teacher import train_teacher

        if self.parent:
            study_log(f"teachers: those of '{self.cfg.extends}'")
            self.parent.train_teachers()
            return
        for name, spec in self.cfg.teachers.items():
            teacher_cfg = self.base.model_copy(update={"teacher": spec.teacher, "augment": spec.augment, "train": spec.train,
                                                       "replay": spec.replay or self.base.replay,
                                                       "seed": self.cfg.seeds[0], "out": str(self.out / "teachers" / name)})
            folder = Path(teacher_cfg.out)
            landed = self.results / "teachers" / name if self.results else None
            if landed is not None and (landed / TEACHER_WEIGHTS).is_file():
                self._take_committed_teacher(name, teacher_cfg, landed)
                continue
            if self.dry and not (folder / TEACHER_WEIGHTS).is_file():
                raise TrainingNeeded(f"teacher '{name}' is not trained yet")
            study_log(f"teacher '{name}' ({spec.teacher.name}, {spec.train.epochs} epochs) -> {teacher_cfg.out}")
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
                study_log(f"teacher '{name}': weights of {size / 2**20:.0f} MiB are not copied to '{landed}' (over "
                     f"{COMMIT_WEIGHTS_MAX_BYTES // 2**20} MiB); another machine must retrain it to the same weights")

    def _take_committed_teacher(self, name: str, teacher_cfg: ExperimentConfig, landed: Path) -> None:
        """Use the teacher committed in ``landed`` (checked against this study's settings and its own checksum)."""
        from libkd.fileio import sha256_file

        folder = Path(teacher_cfg.out)
        _check_landed(landed, teacher_cfg, ("seed", "teacher", "augment", "train", "data")
                      + (("replay",) if teacher_cfg.augment.replay else ()))
        record = json.loads((landed / "teacher.json").read_text())
        theirs = record["weights_sha256"]
        if sha256_file(landed / TEACHER_WEIGHTS) != theirs:
            raise LibkdError(f"'{landed / TEACHER_WEIGHTS}' does not match the sha256 in its teacher.json (a partial "
                             f"copy, or a Git LFS pointer: run `git lfs pull`); restore it from git")
        if (folder / "teacher.json").is_file():
            mine = json.loads((folder / "teacher.json").read_text())["weights_sha256"]
            if mine == theirs:
                study_log(f"teacher '{name}': the committed one ({theirs[:16]}) is already in '{folder}'")
                return
            raise LibkdError(f"'{folder}' holds a teacher '{name}' with weights {mine[:16]}, not the {theirs[:16]} committed "
                             f"in '{landed}' that the study's runs learned from; delete '{folder}' to use the committed one")
        folder.mkdir(parents=True, exist_ok=True)
        for item in (*TEACHER_FILES, TEACHER_WEIGHTS):
            shutil.copy2(landed / item, folder / item)
        study_log(f"teacher '{name}': using the committed weights {theirs[:16]} from '{landed}' "
             f"(val top-1 {record.get('metrics', {}).get('val_top1', float('nan')):.2f}), not retraining")

    def store_path(self, base: ExperimentConfig, seed: int, naive: bool, where: str = "stores", build: bool = True,
                   views: int | None = None, first_view: int = 0, stop_view: int | None = None) -> str:
        """Where the store for these data, recipe, seed and views lives (built and verified on first use when ``build``;
        a store of more views than the study's is grown from the largest smaller one already built, one of fewer
        views is copied from the first views of a larger one). A run going on from a later epoch needs views from
        ``first_view`` only, and one built as it goes (--views-ahead) views up to ``stop_view`` - 1 only: a store
        missing there holds just those."""
        from libkd.store.precompute import precompute, verify_store

        if self.parent:  # the same teachers, data, recipe and store settings: the same store
            return self.parent.store_path(base, seed, naive, where, build, views, first_view, stop_view)

        if not naive:
            views = views or self.cfg.store.views or base.train.epochs  # unset: one view per epoch
        settings = self.cfg.store.model_copy(update={"views": views}) if views and not naive else self.cfg.store
        key = {"data": base.data.model_dump(mode="json"), "replay": None if naive else base.replay.model_dump(mode="json"),
               "store": settings.model_dump(mode="json", exclude={"path", "teachers", *HOW_BUILT})}
        if naive:  # one clean view: no seed enters it, so every run shares one store
            seed = self.cfg.seeds[0]
        path = self.out / where / (f"naive-{short_hash(key)}" if naive else f"seed{seed}-{short_hash(key)}")
        replay = base.replay.model_copy(update={"enabled": False}) if naive else base.replay
        store = settings.model_copy(update={"path": str(path), "views": 1 if naive else settings.views,
                                            "teachers": [self.teacher_path(t) for t in self.cfg.teachers],
                                            **({"workers": self.workers} if self.workers is not None else {})})
        if not build:
            return str(path)
        if not naive:
            first_view, stop_view = window_to_build(path, first_view, stop_view or store.views, self.verified)
            store.first_view, store.stop_view = first_view, stop_view if stop_view < store.views else None
            store.grow_from, source_views = source_store(
                path, base.model_copy(update={"seed": seed, "replay": replay, "store": store}))
        grown = ""
        if store.grow_from:
            grown = (f", grown from {Path(store.grow_from).name}" if source_views < store.views else
                     f", its views copied from {Path(store.grow_from).name} ({source_views} views; no teacher runs)")
        window = (f" (views {store.first_view}..{store.stop_view - 1} only: the next its run trains on, --views-ahead)"
                  if store.stop_view else
                  f" (views {store.first_view}..{store.views - 1} only: its run goes on from there)" if store.first_view else "")
        study_log(f"store {'naive single clean view' if naive else f'seed {seed}, {store.views} views'}{window}{grown} -> {path}")
        with self.timed(f"store {where}/{path.name}"):
            precompute(base.model_copy(update={"seed": seed, "replay": replay, "store": store}))
        if str(path) not in self.verified:  # checksums, and a sample of records recomputed by the teachers
            result = verify_store(path, self.cfg.store.verify_samples, base.device, seed)  # where it was built
            study_log(f"store {path.name} verified: {result['checked_records']} records recomputed, max |diff| {result['max_abs_diff']:.3g}")
            self.verified.add(str(path))
        return str(path)

    # ------------------------------------------------------------------ runs

    def run_config(self, spec: RunSpec, seed: int, base: ExperimentConfig, out: Path, stores: str = "stores",
                   build: bool = True, views: int | None = None, ahead: int | None = None) -> ExperimentConfig:
        """The run's config, its store built first when ``build`` (only the next ``ahead`` views its run reads, when
        given: the run stops where they end, ViewsNotHeld)."""
        teachers = [self.teacher_path(t) for t in spec.teachers]
        distill = base.distill.model_copy(update={"mode": spec.mode, "teachers": teachers, "combine": spec.combine,
                                                  "naive_store": spec.naive_store, "store": None})
        views = views or spec.views  # a search trial may ask for fewer: as many as it has epochs
        if spec.mode == "store":
            held = views or self.cfg.store.views or base.train.epochs
            done = saved_epoch(self, out) if build else 0  # unbuilt: only the store's path, its views unread here
            first_view = min((e % held for e in range(done, base.train.epochs)), default=0)
            stop_view = None
            if ahead and done < base.train.epochs:  # the next views the run reads, from its next epoch's
                first_view = done % held
                stop_view = min(first_view + ahead, held)
            # A run trained to its last epoch here reads no view: it is evaluated without building (or touching) its store.
            build = build and not trained_here(out, base.train.epochs)
            distill.store = self.store_path(base, seed, spec.naive_store, stores, build, views, first_view, stop_view)
        # Runs without a store replay the store's number of views, so every mode sees the same stream, unless they
        # ask for a fresh view every epoch.
        views = base.train.epochs if spec.fresh_views else views or self.cfg.store.views or base.train.epochs
        store = base.store.model_copy(update={"views": views})
        train = base.train.model_copy(update={"workers": self.workers}) if self.workers is not None else base.train
        return base.model_copy(update={"seed": seed, "out": str(out), "distill": distill, "store": store, "train": train})

    def train_run(self, spec: RunSpec, seed: int, out: Path) -> None:
        """Train and evaluate one run of the study; with --views-ahead, its store is built a window of views at a time
        as the run reaches them."""
        from libkd.store import ViewsNotHeld

        stopped_at = None
        while True:
            cfg = self.run_config(spec, seed, self.base_for(spec), out, ahead=self.views_ahead)
            try:
                with self.timed(f"run {out.name}"):  # its store's time apart, as without --views-ahead
                    self.distill_and_evaluate(cfg, evaluate=True)
                return
            except ViewsNotHeld as exc:
                if exc.epoch == stopped_at:  # the window just built does not hold it: never loop on it
                    raise
                stopped_at = exc.epoch
                study_log(f"{out.name}: saved at epoch {exc.epoch}, where its store's views end: building the next ones")

    def distill_and_evaluate(self, cfg: ExperimentConfig, evaluate: bool) -> dict[str, Any]:
        """Train (or reuse) one student; with ``evaluate``, score it with its teachers into student.eval.json."""
        from libkd.distill import distill
        from libkd.store import ViewsNotHeld
        from libkd.engine import resolve_device
        from libkd.evaluate import evaluate_checkpoint
        from libkd.fileio import write_json_atomic

        out = Path(cfg.out)
        if self.dry:
            raise TrainingNeeded(f"'{out}' is not finished")
        parked = unpark(self, out)
        if trained_here(out, cfg.train.epochs):  # trained, not yet evaluated: its settings checked, its store not needed
            _check_landed(out, cfg, ("seed", "student", "train", "distill", "replay"))
            study_log(f"'{out}' is trained ({cfg.train.epochs} epochs): reusing it, without its store")
            final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        else:
            try:
                final = distill(cfg)  # a finished run is only checked against this config (a changed setting is refused)
            except ViewsNotHeld:
                raise  # the end of its store's window: the run goes on once the next views are built
            except LibkdError as exc:
                if parked is None:
                    raise
                raise LibkdError(f"{exc}. That state came from '{parked}' (parked): delete that folder too (and "
                                 "commit the deletion) to start the run over") from exc
        target = out / "student.eval.json"
        if evaluate and not target.is_file():
            teachers = cfg.distill.teachers or None
            result = evaluate_checkpoint(str(out / "student"), None, teachers, resolve_device(cfg.device), cfg.train.eval_batch_size)
            write_json_atomic(target, result)
        if parked is not None:  # finished here: the parked state has served
            shutil.rmtree(parked)
            study_log(f"'{out}' finished: its parked state '{parked}' is removed (commit the removal with its results)")
        return final

    def base_for(self, spec: RunSpec) -> ExperimentConfig:
        """The base a run trains from: the study's base with the search's global choices and the run's own."""
        assert self.final_base is not None, "the settings search runs first"
        # One rule for runs and search trials: what a study inherits (an extended study's choices for this run), then
        # the study's set:, then the run's own set:, and last what this study's own search chose for this run, which
        # varied exactly those keys on top of all the rest (its trials apply their grid last), so the winner the tuning
        # table names is the setting the run uses.
        searched = self.own_search if self.parent else self.chosen_by_run
        inherited = self.chosen_by_run.get(spec.name, {}) if self.parent else {}
        own = {**inherited, **self.cfg.set, **spec.set, **searched.get(spec.name, {})}
        return with_overrides(self.final_base, own) if own else self.final_base

    def tune(self) -> dict[str, Any]:
        """Run the settings search (``libkd.study.search``); returns the chosen overrides, the choices of run-scoped
        stages go to ``chosen_by_run``."""
        return search(self)

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
        base = with_overrides(self.base, chosen)
        plan = self.planned_runs()
        self.final_base = base
        for n, (spec, seed, name) in enumerate(plan, 1):
            if self.only is not None and spec.name not in self.only:
                continue
            out = self.out / "runs" / name
            here = (out / "student.eval.json").is_file()
            landed = None if here else self.landed_run(spec, seed, name)
            state = ("done, reusing it" if here else
                     f"done, reusing the committed run in {landed}" if landed else "running")
            study_log(f"run {n}/{len(plan)}: {name} ({spec.mode}, teachers {spec.teachers or '-'}, {spec.combine}"
                 f"{', naive store' if spec.naive_store else ''}): {state}")
            if landed:
                continue
            self.train_run(spec, seed, out)
            self.write_results()
        summary = self.write_results()
        study_log(f"summary over seeds and the claims: {summary}")
        return summary.with_name("report.md")

    # ------------------------------------------------------------------ report

    def landed_run(self, spec: RunSpec, seed: int, name: str) -> Path | None:
        """``results/runs/NAME`` (or the run's ``reuse`` folder) when it holds this very run, finished (the small files
        committed there)."""
        folder = Path(spec.reuse) if spec.reuse else self.results / "runs" / name if self.results else None
        if spec.reuse and not all((folder / f).is_file() for f in RESULT_FILES):
            raise LibkdError(f"run '{spec.name}' reuses '{folder}', which does not hold a finished run (it needs "
                             f"{', '.join(RESULT_FILES)}); fix the path or drop reuse: to train it here")
        if folder is None or not all((folder / f).is_file() for f in RESULT_FILES):
            return None
        if spec.name in self.unsearched:  # its settings are not known until its search runs, which checks it then
            return folder
        expected = self.run_config(spec, seed, self.base_for(spec), self.out / "runs" / name, build=False)
        _check_landed(folder, expected, ("seed", "student", "train", "distill", "replay", "data"))
        return folder

    def finished_runs(self) -> list[tuple[RunSpec, int, Path]]:
        finished = []
        for spec, seed, name in self.planned_runs():
            if (self.out / "runs" / name / "student.eval.json").is_file():
                finished.append((spec, seed, self.out / "runs" / name))
            elif self.final_base is not None and (landed := self.landed_run(spec, seed, name)):
                finished.append((spec, seed, landed))
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
            for spec, _, folder in finished:
                target = results / "runs" / folder.name
                if target.resolve() == folder.resolve() or spec.reuse:  # another study's committed run stays there
                    continue
                target.mkdir(parents=True, exist_ok=True)
                for name in RESULT_FILES:
                    if (folder / name).is_file():
                        shutil.copy2(folder / name, target / name)
            for item in report_dir.iterdir():
                shutil.copy2(item, results / item.name)
            tuning = self.out / "tune" / "tuning.json"
            for extra in (tuning, self.out / "timings.json"):
                if extra == tuning and extra.is_file() and \
                        any(stage["chosen"] is None for stage in json.loads(extra.read_text())["stages"]):
                    continue  # a search with stages left for a later invocation (--runs) is not the study's search
                if extra.is_file():
                    shutil.copy2(extra, results / extra.name)
        return study_md


# The data keys that decide which images a run trains and is scored on.
DATA_IDENTITY = {"source", "root", "train_split", "val_split", "subset", "subset_seed", "holdout", "load_size", "synthetic"}


def trained_here(out: Path, epochs: int) -> bool:
    """Whether the run in ``out`` saved its last epoch and its student checkpoint here."""
    state = out / "last_state.pt"
    return state.is_file() and (out / "student.safetensors").is_file() and epochs_done(state) >= epochs


def _check_landed(folder: Path, expected: ExperimentConfig, sections: tuple[str, ...]) -> None:
    """Refuse a committed run whose recorded config differs from what this study asks for."""
    from libkd.engine import RESUMABLE_TRAIN_KEYS

    saved = load_config(folder / "config.yaml")
    for section in sections:
        mine, theirs = getattr(expected, section), getattr(saved, section)
        if section == "train":
            mine, theirs = (x.model_dump(mode="json", exclude=RESUMABLE_TRAIN_KEYS) for x in (mine, theirs))
        elif section == "data":  # which images, not the inputs a store fills in (size, normalisation)
            mine, theirs = (x.model_dump(mode="json", include=DATA_IDENTITY) for x in (mine, theirs))
        elif hasattr(mine, "model_dump"):
            mine, theirs = mine.model_dump(mode="json"), theirs.model_dump(mode="json")
        if mine != theirs:
            where = [k for k in mine if mine.get(k) != theirs.get(k)] if isinstance(mine, dict) else []
            raise LibkdError(f"'{folder}' was made with another {section} ({', '.join(f'{section}.{k}' for k in where) or section} "
                             "differ) than this study asks for; delete it (and commit the deletion) to redo it, or restore "
                             "the study's settings")


def run_study(path: str | Path, overrides: list[str] | None = None, only: list[str] | None = None,
              workers: int | None = None, views_ahead: int | None = None) -> Path:
    """Run (or resume) the study in config ``path`` (only the runs named in ``only``, when given; stores and runs
    loading data with ``workers`` processes, when given; each run's store built ``views_ahead`` views at a time, when
    given); returns the report's path."""
    return Study(load_study(path, overrides), only, workers, views_ahead).run()
