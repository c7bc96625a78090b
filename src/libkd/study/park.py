"""Carrying an unfinished run between machines: ``libkd study CONFIG --park`` copies the last saved epoch of each
unfinished run and search trial to ``results/parked/`` (committed with the results), and a fresh machine goes on from
there (a run longer than the time one machine is yours); the parked state is removed once its run finishes. The park also
rewrites the study's summary, training nothing, so the committed study.md says how far each parked run has come."""

from __future__ import annotations

import _thread
import json
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

from libkd import LibkdError
from libkd.config import load_config
from libkd.study.plan import StudyState, study_log, with_overrides

PARKED = "parked"  # results/parked/runs/NAME-sS or results/parked/tune/TRIAL: the folder's place in the study's OUT
PARKED_FILES = ("last_state.pt", "metrics.jsonl", "config.yaml")


class TrainingNeeded(LibkdError):
    """Raised by a study told to train nothing (``Study.dry``) at a step that would train: a teacher, a search trial
    or a run not finished here."""


def parked_folder(study: StudyState, out: Path) -> Path | None:
    """Where the run (or search trial) training in ``out`` is parked (None: the study has no results folder, or ``out``
    is outside the study's OUT, such as another study's run read as one of this study's)."""
    if study.results is None or not Path(out).is_relative_to(study.out):
        return None
    return study.results / PARKED / Path(out).relative_to(study.out)


def _state(folder: Path) -> Path:
    """The resume state distill saves in ``folder`` (imported here: libkd.distill pulls in torch)."""
    from libkd.distill import STATE_FILE

    return folder / STATE_FILE


def epochs_done(state: Path) -> int:
    """The number of finished epochs a resume state (``last_state.pt``) holds."""
    import torch

    from libkd.engine import load_resume_state

    return int(load_resume_state(state, torch.device("cpu"))["epoch"])


def saved_epoch(study: StudyState, out: Path) -> int:
    """Epochs done by the run training in ``out``: by its own saved state, else by the one parked
    for it (0: neither)."""
    for folder in (out, parked_folder(study, out)):
        if folder is not None and _state(folder).is_file():
            return epochs_done(_state(folder))
    return 0


def unfinished(study: StudyState) -> list[Path]:
    """The folders of the study's runs (of ``study.only``, when set) and search trials with a saved epoch, unfinished."""
    trials_file = study.results / "tune-trials.json" if study.results else None
    landed_trials = json.loads(trials_file.read_text()) if trials_file and trials_file.is_file() else {}
    folders = [study.out / "runs" / name for spec, _, name in study.planned_runs()
               if (study.only is None or spec.name in study.only) and not (study.out / "runs" / name / "student.eval.json").is_file()]
    # trial folders are named stage{S}-{RUN}-{HASH}
    folders += [trial for trial in sorted((study.out / "tune").glob("stage*")) if trial.name not in landed_trials
                and (study.only is None or trial.name.split("-", 1)[1].rsplit("-", 1)[0] in study.only)]
    return [folder for folder in folders if _state(folder).is_file()]


PARKED_DTYPE = "bfloat16"  # of the parked state's floating-point tensors: half the bytes committed per parked run


def _cast_floats(value: Any, source: tuple, dtype: Any) -> Any:
    """``value`` (a resume state or a part of one) with every tensor of a ``source`` dtype cast to ``dtype``."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.dtype in source else value
    if isinstance(value, dict):
        return {key: _cast_floats(item, source, dtype) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_floats(item, source, dtype) for item in value)
    return value


def write_parked_state(state: Path, parked: Path) -> None:
    """Park the resume state ``state`` at ``parked`` with its weights and optimiser moments rounded to bf16 (integer
    tensors, step counts, the schedule and the history as they are): a parked run resumes from weights within bf16's
    rounding (3 significant digits) of its own, not bit for bit; a local kill and resume stays exact."""
    import torch

    from libkd.engine import load_resume_state, save_resume_state

    full = load_resume_state(state, torch.device("cpu"))
    save_resume_state({**_cast_floats(full, (torch.float32, torch.float64), torch.bfloat16), "parked_dtype": PARKED_DTYPE},
                      parked)  # by temporary file and rename


def read_parked_state(parked: Path, state: Path) -> None:
    """Put the state parked at ``parked`` where a run resumes from (``state``), its bf16 tensors back in float32; a
    state parked whole (without ``parked_dtype``) is copied as it is."""
    import torch

    from libkd.engine import load_resume_state, save_resume_state

    small = load_resume_state(parked, torch.device("cpu"))
    if small.pop("parked_dtype", None) is None:
        shutil.copy2(parked, state)
        return
    save_resume_state(_cast_floats(small, (torch.bfloat16,), torch.float32), state)


def park(study: StudyState) -> list[Path]:
    """Copy the last saved epoch of every unfinished run and search trial to ``results/parked/``, with its curve so far
    and the study's timings, for a fresh machine to go on from once committed; returns the parked folders."""
    from libkd.fileio import write_json_atomic

    if study.results is None:
        raise LibkdError("--park copies unfinished runs to the study's results folder, and this study sets no "
                         "`results:`; set one (the folder committed with the study)")
    parked = []
    for out in unfinished(study):
        target = parked_folder(study, out)
        target.mkdir(parents=True, exist_ok=True)
        for item in PARKED_FILES:  # each by temporary file and rename: a kill leaves the former copy whole
            if item == PARKED_FILES[0]:
                write_parked_state(out / item, target / item)
            elif (out / item).is_file():
                shutil.copy2(out / item, target / f"{item}.tmp")
                (target / f"{item}.tmp").replace(target / item)
        epoch = epochs_done(_state(target))  # the copy's: the run may have saved another epoch since
        epochs = load_config(out / "config.yaml").train.epochs
        size = _state(target).stat().st_size
        study_log(f"parked {out.name} at epoch {epoch}/{epochs} ({size / 2**20:.1f} MiB) -> {target}: commit it, and "
             f"`libkd study` on another machine goes on from epoch {epoch}")
        parked.append(target)
    if parked and (study.out / "timings.json").is_file():  # the time the parked runs have spent so far
        write_json_atomic(study.results / "timings.json", json.loads((study.out / "timings.json").read_text()))
    if not parked:
        study_log("nothing to park: no unfinished run or trial with a saved epoch"
             + (f" among {', '.join(sorted(study.only))}" if study.only else ""))
    else:
        write_summary_training_nothing(study)
    return parked


def write_summary_training_nothing(study: StudyState) -> Path | None:
    """Rewrite the study's report and study.md (copied to its results) over the runs finished here or committed, with
    the parked runs' progress, training nothing; None (logged) when a teacher or a global search stage is not done."""
    extended = study
    while extended is not None:  # a study that extends another trains that one's teachers and search through it
        extended.dry = True  # a search stage of one run with trials to go is shown as such (as for a run --runs leaves)
        extended = extended.parent
    try:
        study.train_teachers()
        study.final_base = with_overrides(study.base, study.tune())
    except TrainingNeeded as exc:
        study_log(f"study.md not rewritten: {exc}")
        return None
    summary = study.write_results()
    study_log(f"summary rewritten with the parked runs: {summary}")
    return summary


def unpark(study: StudyState, out: Path) -> Path | None:
    """Put the state parked for the run in ``out`` there when this machine has none of its own, or an older one
    (``distill`` then resumes from it, after checking it is the same run); returns where it came from."""
    parked = parked_folder(study, out)
    if parked is None or not _state(parked).is_file():
        return None
    mine = epochs_done(_state(out)) if _state(out).is_file() else None
    if mine is not None and epochs_done(_state(parked)) > mine:
        study_log(f"{out.name}: the parked state in '{parked}' is further along than this machine's (epoch "
             f"{epochs_done(_state(parked))} against {mine}): going on from it")
        mine = None
    if mine is None:
        out.mkdir(parents=True, exist_ok=True)
        for item in PARKED_FILES:
            if item == PARKED_FILES[0]:
                read_parked_state(parked / item, out / item)
            elif (parked / item).is_file():
                shutil.copy2(parked / item, out / item)
        study_log(f"{out.name}: going on from the parked state in '{parked}'")
    return parked


class DeadlineReached(KeyboardInterrupt):
    """Raised in the main thread when a ``ParkDeadline`` falls (a KeyboardInterrupt, so that everything a Ctrl-C
    unwinds, such as data-loading processes and timings, unwinds alike)."""


class ParkDeadline:
    """``libkd study --park-after``: at a wall-clock deadline, stop the study's training as Ctrl-C would (every file
    a stop can touch is written by temporary file and rename, so nothing is lost but the epoch under way) by raising
    DeadlineReached in the main thread, for the caller to park what it was training.

    The timer reaches the main thread through SIGUSR1's Python handler, not SIGINT's: a job started in the background
    (``nohup ... &``) ignores SIGINT, and Python then delivers no simulated SIGINT either."""

    SIGNAL = getattr(signal, "SIGUSR1", signal.SIGINT)  # SIGINT where there is no SIGUSR1 (Windows)

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._timer = threading.Timer(seconds, self.stop)
        self._timer.daemon = True
        self._previous: Any = None

    def __enter__(self) -> "ParkDeadline":
        self._previous = signal.signal(self.SIGNAL, self._raise)  # the main thread's: a study runs there
        self._timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._timer.cancel()
        signal.signal(self.SIGNAL, self._previous)

    def stop(self) -> None:
        """The deadline (called by the timer): have the main thread raise DeadlineReached at its next step."""
        study_log(f"--park-after: {self.seconds / 3600:.2f} h reached, stopping the study to park what it trains")
        _thread.interrupt_main(self.SIGNAL)

    def _raise(self, signum: int, frame: Any) -> None:
        raise DeadlineReached
