"""The study's summary (study.md): mean and spread over seeds per run, test top-1 along training, the search's
trials and the claims with their verdicts."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from libkd.config import describe_data
from libkd.study.park import parked_folder
from libkd.study.plan import RunSpec, StudyState
from libkd.study.verdicts import results_by_run, claims, gain_changes


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _not_landed(study: StudyState, spec: RunSpec) -> str:
    """'not run yet', or how far its parked seeds have come (the saved epoch committed for it)."""
    from libkd.config import load_config

    notes = []
    for seed in study.cfg.seeds[:spec.seeds]:
        parked = parked_folder(study, study.out / "runs" / f"{spec.name}-s{seed}")
        if parked is None or not (parked / "metrics.jsonl").is_file():
            continue
        history = [json.loads(line) for line in (parked / "metrics.jsonl").read_text().splitlines() if line.strip()]
        scored = [h for h in history if h.get("val_top1") is not None]
        epochs = load_config(parked / "config.yaml").train.epochs if (parked / "config.yaml").is_file() else "?"
        notes.append(f"seed {seed} parked at epoch {history[-1]['epoch'] if history else 0}/{epochs}"
                     + (f" ({scored[-1]['val_top1']:.2f} at epoch {scored[-1]['epoch']})" if scored else ""))
    return "; ".join(notes) or "not run yet"


def summary_markdown(study: StudyState, finished: list[tuple[RunSpec, int, Path]]) -> str:
    """Mean and spread over seeds per run, the tuning record, and each claim checked against the figures."""
    by_run = results_by_run(finished)
    cfg = study.cfg
    base = study.final_base or cfg.base
    planned = {spec.name: study.base_for(spec) if study.final_base else base for spec in cfg.runs}
    schedules = {c.train.epochs for c in planned.values()}
    students = {c.student.name for c in planned.values()}
    per_run = [("student", lambda c: c.student.name)] if len(students) > 1 else []
    per_run += [("epochs", lambda c: str(c.train.epochs))] if len(schedules) > 1 else []
    lines = ["# Study summary", "",
             f"Training data: {describe_data(cfg.base.data.model_dump())}; "
             + (f"student {base.student.name}, " if len(students) == 1 else "")
             + (f"{base.train.epochs} epochs; " if len(schedules) == 1 else "")
             + f"top-1 on the test split ({cfg.base.data.val_split}), in percent; mean ± standard deviation over seeds.", "",
             *([f"Teachers, stores and searched settings: those of `{cfg.extends}`, with "
                f"{', '.join(f'{k}={v}' for k, v in cfg.set.items()) or 'nothing'} on top.", ""] if cfg.extends else []),
             "| run | mode | teachers | combine | " + "".join(f"{name} | " for name, _ in per_run)
             + "seeds | top-1 | per seed | ECE | train img/s | train time |",
             "|---|---|---|---|" + "---|" * len(per_run) + "---|---|---|---|---|---|"]
    for spec in cfg.runs:
        rows = by_run.get(spec.name)
        mode = spec.mode + (" (naive store)" if spec.naive_store else "") + (" (fresh views)" if spec.fresh_views else "")
        described = (f"| {spec.name} | {mode} | {', '.join(spec.teachers) or '—'} | {spec.combine if spec.teachers else '—'} | "
                     + "".join(f"{value(planned[spec.name])} | " for _, value in per_run))
        if not rows:
            lines.append(described + f"0/{spec.seeds} | {_not_landed(study, spec)} | | | | |")
            continue
        lines.append(
            described + f"{len(rows)}/{spec.seeds} | **{_mean_spread([r['top1'] for r in rows])}** | "
            f"{', '.join(format(r['top1'], '.2f') for r in rows)} | {statistics.mean(r['ece'] for r in rows):.3f} | "
            f"{statistics.mean(r['img_s'] for r in rows):.0f} | {statistics.mean(r['train_s'] for r in rows) / 60:.1f} min |")
    parent = results_by_run(study.parent.finished_runs()) if study.parent is not None and study.parent.final_base else None
    along = training_table(study, by_run, parent)
    if along:
        lines += ["", "## Along training", "", *along]
    lines += ["", "## Claims", "", *claims(study, by_run, parent)]
    timings = study.out / "timings.json"
    if not timings.is_file() and study.results:  # a machine that trained nothing here: the committed timings
        timings = study.results / "timings.json"
    if timings.is_file():
        spent: dict[str, float] = {}
        for key, seconds in json.loads(timings.read_text()).items():
            spent[key.split()[0]] = spent.get(key.split()[0], 0.0) + seconds
        lines += ["", "Wall time spent so far (summed over resumptions): " + ", ".join(
            f"{kind}s {seconds / 60:.0f} min" for kind, seconds in spent.items())
                  + f"; {sum(spent.values()) / 3600:.2f} h in all (`{timings}`)."]
    tuning = study.out / "tune" / "tuning.json"
    if not tuning.is_file() and study.results:  # a fresh machine reuses the committed search without running it
        tuning = study.results / "tuning.json"
    if tuning.is_file():
        lines += ["", "## Settings search (held-out part of the training images, never the test split)", "",
                  *tuning_table(json.loads(tuning.read_text()))]
    return "\n".join(lines) + "\n"


def _columns(epochs: list[int], most: int = 8) -> list[int]:
    """At most ``most`` of the scored epochs, evenly spread and always with the last."""
    if len(epochs) <= most:
        return epochs
    step = -(-len(epochs) // most)
    return epochs[::-1][::step][::-1]


def _schedule(rows: list[dict[str, Any]]) -> int | None:
    """A run's schedule: its last scored epoch (every run is scored after its last epoch)."""
    return max((max(r["curve"]) for r in rows if r.get("curve")), default=None)


def training_table(study: StudyState, by_run: dict[str, list[dict[str, Any]]],
                   parent: dict[str, list[dict[str, Any]]] | None = None) -> list[str]:
    """Test top-1 along training, mean over seeds, with each distilled run's gain over the run without teachers at
    the same epoch; the study this one extends (``parent``) gives its final figures as a last column; the share of the
    gap between the run without teachers and each teacher that each run closes; the teachers' own top-1 closes it.
    Runs of different schedules get a table each, and each run is compared with the run without teachers of its own
    schedule. Answers: does the gain grow or shrink with training, does the ordering hold, how close do the students
    get to their teachers."""
    names = [s.name for s in study.cfg.runs if s.name in by_run]
    if not names:
        return []
    groups: dict[int | None, list[str]] = {}
    for name in names:
        groups.setdefault(_schedule(by_run[name]), []).append(name)
    none_runs = {s.name for s in study.cfg.runs if s.mode == "none"}
    baselines = {epochs: next((n for n in group if n in none_runs), None) for epochs, group in groups.items()}
    several = len(groups) > 1
    lines: list[str] = []
    for epochs, group in sorted(groups.items(), key=lambda item: item[0] or 0):
        along = _along_training(study, {n: by_run[n] for n in group}, group, baselines[epochs], parent)
        if along:
            lines += ([f"### {epochs} epochs", ""] if several else []) + along + [""]
    teachers: dict[str, float] = {}
    for rows in by_run.values():
        for r in rows:
            for t, top1 in r["teachers"].items():
                teachers.setdefault(t, top1)
    compared = [n for n in names if baselines.get(_schedule(by_run[n]))]
    if teachers and compared:  # how much of the gap between the student alone and each teacher each run closes
        floors = {n: statistics.mean(r["top1"] for r in by_run[baselines[_schedule(by_run[n])]]) for n in compared}
        against = "; ".join(f"`{b}` {statistics.mean(r['top1'] for r in by_run[b]):.2f}" + (f" at {e} epochs" if several else "")
                            for e, b in sorted(baselines.items(), key=lambda item: item[0] or 0) if b)
        lines += [f"Share of the gap between the run without teachers ({against}) and each teacher that each run "
                  "closes" + (", each run against the one of its own schedule" if several else "")
                  + " (100 % reaches the teacher; over 100 % passes it):", "",
                  "| run | " + ("epochs | " if several else "") + "top-1 | "
                  + " | ".join(f"gap to {t} ({v:.2f}) closed" for t, v in teachers.items()) + " | passes |",
                  "|---|---|" + ("---|" if several else "") + "---|" * (len(teachers) + 1)]
        for name in compared:
            final, floor = statistics.mean(r["top1"] for r in by_run[name]), floors[name]
            shares = " | ".join(f"{100 * (final - floor) / (v - floor):.0f} %" if v != floor else "—" for v in teachers.values())
            passed = ", ".join(t for t, v in teachers.items() if final > v) or "none"
            lines.append(f"| {name} | " + (f"{_schedule(by_run[name])} | " if several else "") + f"{final:.2f} | {shares} | {passed} |")
        lines.append("")
    if teachers:
        best = max(names, key=lambda n: statistics.mean(r["top1"] for r in by_run[n]))
        final = statistics.mean(r["top1"] for r in by_run[best])
        lines += ["The teachers on the same split: " + ", ".join(f"{t} {v:.2f}" for t, v in teachers.items())
                  + f". The best student, `{best}` ({final:.2f}), is "
                  + ", ".join(f"{abs(final - v):.2f} points {'below' if final < v else 'above'} {t}" for t, v in teachers.items())
                  + "."]
    while lines and lines[-1] == "":
        lines.pop()
    return lines


def _along_training(study: StudyState, by_run: dict[str, list[dict[str, Any]]], names: list[str], baseline: str | None,
                    parent: dict[str, list[dict[str, Any]]] | None) -> list[str]:
    """The table along training of runs of one schedule, gains over ``baseline`` (of the same schedule)."""
    scored = sorted(set.intersection(*(set(r["curve"]) for n in names for r in by_run[n])))
    if not scored:
        return []
    columns = _columns(scored)

    def at(name: str, epoch: int) -> float:
        return statistics.mean(r["curve"][epoch] for r in by_run[name])

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
    changes = gain_changes(study, by_run, parent, baseline) if parent is not None and baseline and baseline in parent else []
    return lines + (["", *changes] if changes else [])


def tuning_table(record: dict[str, Any]) -> list[str]:
    lines = [f"Held out per class: {record['holdout']}; trial runs of {record['epochs'] or 'the study’s'} epochs. "
             "Each stage's winner holds for the later stages and for every run, or, marked 'its own', for that run only; "
             "a stage with its own trial length says so.", "",
             "| stage | run | settings | held-out top-1 | chosen |", "|---|---|---|---|---|"]
    for stage in record["stages"]:
        if stage["chosen"] is None:  # a run-scoped stage left for a later invocation (study --runs)
            lines.append(f"| {stage['stage']} | {stage['run']} (its own){', ' + str(stage['epochs']) + '-epoch trials' if stage.get('epochs') else ''} | "
                         f"{len(stage['trials'])} of {stage['grid_size']} trials landed; the rest run with `--runs {stage['run']}` | | not yet |")
        for t in stage["trials"]:
            settings = ", ".join(f"{k}={v}" for k, v in t["overrides"].items()) or "as configured (no override)"
            length = f", {stage['epochs']}-epoch trials" if stage.get("epochs") else ""
            lines.append(f"| {stage['stage']} | {stage['run']}{' (its own)' if stage.get('scope') == 'run' else ''}{length} | {settings} | "
                         f"{t['holdout_top1']:.2f} | "
                         f"{'yes' if t['trial'] == stage['chosen'] else ''} |")
    return lines

