"""The settings search of a study: each stage a grid of trial runs on a held-out part of the training images
(never the test split); each stage's winner holds for the later stages and every run, or for its own run."""

from __future__ import annotations

import itertools
import json
import shutil
from typing import Any

from libkd.config import ExperimentConfig
from libkd.engine import RESUMABLE_TRAIN_KEYS
from libkd.fileio import write_json_atomic
from libkd.study.park import TrainingNeeded
from libkd.study.plan import HOW_BUILT, StudyState, TuneConfig, study_log, short_hash, with_overrides


def search(study: StudyState) -> dict[str, Any]:
    """Run every stage's grid on the held-out split; returns the chosen overrides (also in tune/tuning.json);
    the choices of run-scoped stages go to ``chosen_by_run``."""
    if study.parent:
        study_log(f"settings: those searched by '{study.cfg.extends}', then {study.cfg.set or 'nothing'} on top")
        chosen = study.parent.tune()
        study.chosen_by_run = study.parent.chosen_by_run
        study.parent.final_base = with_overrides(study.parent.base, chosen)
        if study.cfg.tune is not None and study.cfg.tune.stages:  # its own runs' searches, on top of all that
            _search_stages(study, study.cfg.tune, {**chosen, **study.cfg.set}, study.own_search)
        return {**chosen, **study.cfg.set}
    if study.cfg.tune is None or not study.cfg.tune.stages:
        return {}
    return _search_stages(study, study.cfg.tune, {}, study.chosen_by_run)


def _search_stages(study: StudyState, tune: TuneConfig, chosen: dict[str, Any], into: dict[str, dict[str, Any]]
                   ) -> dict[str, Any]:
    """Run (or reuse) every stage of ``tune`` from the settings ``chosen`` so far; returns the global choices and puts
    the run-scoped ones ``into`` the given dict (a study's ``chosen_by_run``, or its ``own_search`` when it extends
    another)."""
    chosen, record, by_run = dict(chosen), [], {}
    basis = search_basis(study, chosen)
    landed = study.results / "tuning.json" if study.results else None
    if not (study.out / "tune" / "tuning.json").is_file() and landed and landed.is_file():
        record = json.loads(landed.read_text())
        if _same_search(record, tune) and record.get("basis", basis) == basis:
            unknown = "" if "basis" in record else " (recorded without the fingerprint of the settings it searched from)"
            study_log(f"settings search: reusing the committed {landed}{unknown}: {record['chosen']}")
            into.update(record.get("chosen_by_run", {}))
            return record["chosen"]
        why = "another grid" if not _same_search(record, tune) else "from other base settings or teachers"
        study_log(f"settings search: {landed} searched {why}; searching again, reusing each landed trial whose config matches")
        record = []
    # Committed trials (a search can take hours): each reused when its whole config matches.
    trials_file = study.results / "tune-trials.json" if study.results else None
    done = json.loads(trials_file.read_text()) if trials_file and trials_file.is_file() else {}
    for s, stage in enumerate(tune.stages):
        spec = study.spec[stage.run]
        waiting = stage.scope == "run" and (study.dry or study.only is not None and stage.run not in study.only)
        if waiting:  # its landed trials are still shown; the rest run with the run they choose for
            study.unsearched.add(stage.run)
        trials, epochs = [], stage.epochs or tune.epochs
        for choice in itertools.product(*stage.grid):
            overrides = {k: v for part in choice for k, v in part.items()}
            trial_base = with_overrides(study.base, {**chosen, **by_run.get(stage.run, {}), **spec.set, **overrides,
                                           "data.holdout": tune.holdout, **({"train.epochs": epochs} if epochs else {})})
            name = f"stage{s}-{stage.run}-{short_hash(overrides)}"
            if not waiting:
                study_log(f"tuning stage {s} ({stage.run}), trial {len(trials) + 1}/{_grid_size(stage.grid)}: {overrides}")
            out = study.out / "tune" / name
            # A trial of E epochs reads views 0..E-1 only: a store of that many views gives the very same targets.
            views = min(spec.views, trial_base.train.epochs) if spec.views else None
            cfg = study.run_config(spec, study.cfg.seeds[0], trial_base, out, stores="tune/stores", build=False, views=views)
            config_sha, legacy_sha = trial_fingerprints(cfg, trial_base.train.workers)
            landed, here = done.get(name), (out / "student.safetensors").is_file()
            # A trial trained here is reused through its run folder below; an invocation that trains nothing for
            # this stage (a --park summary, another run's --runs) takes it from the trials file all the same.
            if landed and landed["config_sha"] in (config_sha, legacy_sha) and (waiting or not here):
                study_log(f"trial {name}: done, reusing it" +
                     ("" if here else f" (the committed trial in {trials_file})"))
                trials.append({k: landed[k] for k in ("trial", "overrides", "holdout_top1")})
                continue
            if waiting:
                continue
            if study.dry:  # before run_config: it would build the trial's store
                raise TrainingNeeded(f"search trial {name} is not done")
            if landed and landed["config_sha"] not in (config_sha, legacy_sha):
                # trained from other settings: the record goes, so that --park sees the trial as unfinished
                study_log(f"trial {name}: its committed record in {trials_file} was trained from other settings; "
                          "training it again")
                del done[name]
                write_json_atomic(trials_file, done)
            cfg = study.run_config(spec, study.cfg.seeds[0], trial_base, out, stores="tune/stores", views=views)
            with study.timed(f"tune {name}"):
                metrics = study.distill_and_evaluate(cfg, evaluate=False)
            trials.append({"trial": name, "overrides": overrides, "holdout_top1": metrics["val_top1"]})
            if trials_file:
                done[name] = {**trials[-1], "config_sha": config_sha}
                trials_file.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(trials_file, done)
        if waiting and len(trials) < _grid_size(stage.grid):
            study_log(f"tuning stage {s} ({stage.run}): {len(trials)} of {_grid_size(stage.grid)} trials landed, the rest left "
                 f"for an invocation that runs {stage.run} (--runs)")
            record.append({"stage": s, "run": stage.run, "scope": stage.scope, "trials": trials, "chosen": None,
                           "grid_size": _grid_size(stage.grid), **({"epochs": stage.epochs} if stage.epochs else {})})
            continue
        study.unsearched.discard(stage.run)  # every trial of it landed already: its choice is known
        best = max(trials, key=lambda t: t["holdout_top1"])  # the first of equals: grid order breaks ties
        (by_run.setdefault(stage.run, {}) if stage.scope == "run" else chosen).update(best["overrides"])
        record.append({"stage": s, "run": stage.run, "scope": stage.scope, "trials": trials, "chosen": best["trial"],
                       **({"epochs": stage.epochs} if stage.epochs else {})})
        study_log(f"tuning stage {s}: chose {best['overrides']} (held-out top-1 {best['holdout_top1']:.2f})")
    into.update(by_run)
    write_json_atomic(study.out / "tune" / "tuning.json", {"holdout": tune.holdout, "epochs": tune.epochs, "basis": basis,
                                                          "stages": record, "chosen": chosen, "chosen_by_run": by_run})
    if any(stage.run in study.unsearched for stage in tune.stages):
        return chosen  # an incomplete search is shown in the report, not committed as the study's (its trials are)
    if study.results:  # landed at once, not with the first run (which may land on another machine)
        study.results.mkdir(parents=True, exist_ok=True)
        shutil.copy2(study.out / "tune" / "tuning.json", study.results / "tuning.json")
    return chosen


def search_basis(study: StudyState, chosen: dict[str, Any]) -> str:
    """The fingerprint of what a search starts from: the study's base (less where it runs and how it loads data), the
    settings chosen before it, its teachers and seed. A committed search from another basis is not reused."""
    base = study.base.model_dump(mode="json", exclude={"out": True, "device": True, "train": set(RESUMABLE_TRAIN_KEYS)})
    teachers = {name: spec.model_dump(mode="json") for name, spec in study.cfg.teachers.items()}
    return short_hash({"base": base, "chosen": chosen, "teachers": teachers, "seed": study.cfg.seeds[0]})


def trial_fingerprints(cfg: ExperimentConfig, config_workers: int) -> tuple[str, str]:
    """A search trial's identity: everything that decides its result, not where it runs or how it loads data (the
    train keys a run resumes across, ``--workers`` included). Second, the form trials were recorded under before
    (train.workers at the config's own value counted): a trial recorded so is still the same trial."""
    skip = {"out": True, "distill": {"store": True, "teachers": True}, "store": set(HOW_BUILT)}
    current = short_hash(cfg.model_dump(mode="json", exclude={**skip, "train": set(RESUMABLE_TRAIN_KEYS)}))
    legacy = cfg.model_copy(update={"train": cfg.train.model_copy(update={"workers": config_workers})})
    return current, short_hash(legacy.model_dump(mode="json", exclude=skip))


def _same_search(record: dict[str, Any], tune: TuneConfig) -> bool:
    """Whether a saved tuning record searched exactly this grid."""
    if record.get("holdout") != tune.holdout or record.get("epochs") != tune.epochs or len(record["stages"]) != len(tune.stages):
        return False
    for saved, stage in zip(record["stages"], tune.stages):
        grid = [{k: v for part in choice for k, v in part.items()} for choice in itertools.product(*stage.grid)]
        if saved["run"] != stage.run or saved.get("scope", "all") != stage.scope or saved.get("epochs") != stage.epochs or \
                [t["overrides"] for t in saved["trials"]] != json.loads(json.dumps(grid)):
            return False
    return True


def _grid_size(grid: list[list[dict[str, Any]]]) -> int:
    size = 1
    for axis in grid:
        size *= len(axis)
    return size

