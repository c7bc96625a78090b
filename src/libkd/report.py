"""``libkd report RUN_DIR...``: one markdown file and PNG plots comparing distillation runs.

Each run folder is what ``libkd distill`` wrote (``run.json``, ``metrics.jsonl``,
``student.json``) plus, when ``libkd evaluate`` ran on it, ``student.eval.json``: calibration,
the teachers' own accuracy, their complementarity and each token's agreement with its teacher.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from libkd import LibkdError
from libkd.config import describe_data


def load_run(folder: str | Path) -> dict[str, Any]:
    """Everything a report needs from one run folder; a folder that is not a distill run is named."""
    folder = Path(folder)
    needed = [folder / "run.json", folder / "metrics.jsonl", folder / "student.json"]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise LibkdError(f"'{folder}' is not a finished `libkd distill` run (missing {', '.join(missing)}); "
                         "pass the --out folders of distill runs")
    run = json.loads((folder / "run.json").read_text())
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    planned = _planned_epochs(folder)
    if not history or [h["epoch"] for h in history] != list(range(1, len(history) + 1)) or (planned and len(history) != planned):
        raise LibkdError(f"'{folder}' is unfinished: metrics.jsonl holds {len(history)} of {planned or '?'} epochs; finish it "
                         f"with `libkd distill -c {folder / 'config.yaml'}` (it resumes) or leave it out of the report")
    meta = json.loads((folder / "student.json").read_text())
    evaluation = folder / "student.eval.json"
    return {"name": folder.name, "path": str(folder), "run": run, "history": history, "meta": meta,
            "eval": json.loads(evaluation.read_text()) if evaluation.is_file() else None}


def _planned_epochs(folder: Path) -> int | None:
    """train.epochs from the run's saved config, when it has one."""
    import yaml

    config = folder / "config.yaml"
    if not config.is_file():
        return None
    return (yaml.safe_load(config.read_text()) or {}).get("train", {}).get("epochs")


def _check_comparable(runs: list[dict[str, Any]]) -> None:
    first = runs[0]
    for other in runs[1:]:
        for label, get in (("classes", lambda r: r["meta"]["dataset"]["classes"]),
                           ("training data (fingerprint)", lambda r: r["run"]["dataset"])):
            if get(other) != get(first):
                raise LibkdError(f"runs '{first['path']}' and '{other['path']}' differ in {label}; a report compares runs "
                                 "of one data set: make one report per data set")


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def results_table(runs: list[dict[str, Any]]) -> list[str]:
    heads = max(len(r["history"][-1]["val_heads_top1"]) for r in runs)
    header = ["run", "mode", "teachers", "combine", "epochs", "top-1", *[f"head {h} top-1" for h in range(heads)],
              "ECE", "train img/s", "wall time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        last, run = r["history"][-1], r["run"]
        mode = run["mode"] + (" (naive store)" if run.get("naive_store") else "")
        per_head = last["val_heads_top1"] + [None] * (heads - len(last["val_heads_top1"]))
        seconds = sum(h["train_seconds"] for h in r["history"])
        img_s = sum(h["images_per_s"] for h in r["history"]) / len(r["history"])
        ece = r["eval"]["ece"] if r["eval"] else None
        row = [r["name"], mode, ", ".join(run["teachers"]) or "—", run.get("combine") or "—", str(last["epoch"]),
               f"**{_fmt(last['val_top1'])}**", *[_fmt(v) for v in per_head], _fmt(ece, 4), f"{img_s:.0f}",
               f"{seconds / 60:.1f} min"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


PARTS = ("both_right", "only_first_right", "only_second_right", "neither_right")


def full_partition(pair: dict[str, float]) -> dict[str, float]:
    """The four-way split of a teacher pair; evaluations written before it was recorded hold only the 'only' parts
    and 'either right', from which the rest follows."""
    if "both_right" in pair:
        return pair
    return {**pair, "both_right": pair["either_right"] - pair["only_first_right"] - pair["only_second_right"],
            "neither_right": 100.0 - pair["either_right"]}


def teachers_of(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{checkpoint: its top-1 and top-5} over every run evaluated with ``--teachers``, each teacher once (runs may
    learn from different teachers: a single-teacher run beside the pair)."""
    teachers: dict[str, dict[str, float]] = {}
    for r in runs:
        if r["eval"] and "teachers" in r["eval"]:
            for path, t in zip(r["eval"]["teacher_checkpoints"], r["eval"]["teachers"]):
                teachers.setdefault(path, t)
    return teachers


def teacher_label(checkpoint: str) -> str:
    """A short name for a teacher checkpoint: its file name, or its folder's when the file is train-teacher's
    default ``teacher``."""
    path = Path(checkpoint)
    return path.parent.name if path.stem == "teacher" and path.parent.name else path.stem


def teacher_section(runs: list[dict[str, Any]]) -> list[str]:
    evaluated = [r for r in runs if r["eval"] and "teachers" in r["eval"]]
    if not evaluated:
        return ["No run was evaluated with `--teachers`: run `libkd evaluate RUN/student --teachers T...` for the "
                "teachers' accuracy, complementarity and token agreement."]
    teachers = teachers_of(evaluated)
    lines = ["| teacher | top-1 | top-5 |", "|---|---|---|"]
    lines += [f"| `{path}` | {t['top1']:.2f} | {t['top5']:.2f} |" for path, t in teachers.items()]
    ensemble = next((r["eval"]["teacher_ensemble"] for r in evaluated if r["eval"].get("teacher_ensemble")), None)
    if ensemble:
        lines.append(f"| ensemble (mean probabilities) | {ensemble['top1']:.2f} | {ensemble['top5']:.2f} |")
    paired = next((r["eval"] for r in evaluated if r["eval"].get("teacher_pair")), None)
    if paired:
        pair, (first, second) = paired["teacher_pair"], paired["teacher_checkpoints"]
        parts = full_partition(pair)
        lines += ["", f"Teacher complementarity on the validation split (percent of images; teacher 0 is `{first}`, "
                      f"teacher 1 `{second}`). The four parts add up to 100 %:", "",
                  "| both right | only teacher 0 right | only teacher 1 right | neither right |", "|---|---|---|---|",
                  "| " + " | ".join(f"{parts[k]:.1f}" for k in PARTS) + " |", "",
                  f"They predict the same class (right or wrong) on {pair['agreement']:.1f} % of the images; at least "
                  f"one is right on {parts['both_right'] + parts['only_first_right'] + parts['only_second_right']:.1f} %."]
    lines += ["", "Each student token against its own teacher (a mean token: against the teachers' mean distribution at its "
                  "temperature), in percent of images: the first four columns split the images "
                  "and add up to 100 %; agreement (same class, right or wrong) is apart:", "",
              "| run | token | both right | only token right | only teacher right | neither right | agreement |",
              "|---|---|---|---|---|---|---|"]
    for r in evaluated:
        agreement = r["eval"].get("token_teacher_agreement") or []
        split = r["eval"].get("token_teacher_partition") or [None] * len(agreement)
        if not agreement:
            lines.append(f"| {r['name']} | — | | | | | |")
        for i, (a, p) in enumerate(zip(agreement, split)):
            cells = " | ".join(f"{p[k]:.1f}" for k in PARTS) if p else "not recorded (re-run `libkd evaluate`) | | |"
            lines.append(f"| {r['name']} | {i} | {cells} | {a:.1f} |")
    return lines


def line_styles(names: list[str]) -> dict[str, tuple[str, str, str]]:
    """(colour, line style, marker) per run: the seeds of one run (``NAME-sS``, as ``libkd study`` names them)
    share a colour and a marker and differ in line style; past ten runs the marker changes, so no two runs look alike."""
    bases = [re.sub(r"-s\d+$", "", n) for n in names]
    looks = {b: (f"C{i % 10}", ("o", "s", "^", "D")[i // 10 % 4]) for i, b in enumerate(dict.fromkeys(bases))}
    styles, seen = {}, {}
    for name, base in zip(names, bases):
        colour, marker = looks[base]
        styles[name] = (colour, ("-", "--", ":", "-.")[seen.get(base, 0) % 4], marker)
        seen[base] = seen.get(base, 0) + 1
    return styles


def plot(runs: list[dict[str, Any]], out: Path) -> list[str]:
    """Accuracy per epoch and accuracy against wall-clock time, every run on one chart each, with the teachers'
    top-1 as black lines where the runs were evaluated with them (how far the students are from their teachers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    styles = line_styles([r["name"] for r in runs])
    for name, xlabel, xs in (("accuracy_per_epoch.png", "epoch", lambda h: [e["epoch"] for e in h]),
                             ("accuracy_vs_time.png", "training time (min)",
                              lambda h: [sum(e["train_seconds"] for e in h[: i + 1]) / 60 for i in range(len(h))])):
        fig, ax = plt.subplots(figsize=(8.0, 4.2))
        for r in runs:  # epochs without a score (train.eval_every > 1) are left out
            points = [(x, e["val_top1"]) for x, e in zip(xs(r["history"]), r["history"]) if e["val_top1"] is not None]
            colour, style, marker = styles[r["name"]]
            ax.plot(*zip(*points), marker=marker, markersize=3, color=colour, linestyle=style, label=r["name"])
        for (checkpoint, t), style in zip(teachers_of(runs).items(), (":", "--", "-.", (0, (1, 3)))):
            ax.axhline(t["top1"], color="black", linestyle=style, linewidth=1,
                       label=f"teacher {teacher_label(checkpoint)} ({t['top1']:.1f})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: curves stay visible
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        files.append(name)
    agreeing = [r for r in runs if any(e.get("val_token_agreement") for e in r["history"])]
    if agreeing:  # does the student learn its teachers' function beyond the views it was trained on?
        fig, ax = plt.subplots(figsize=(8.0, 4.2))
        for r in agreeing:
            colour, style, _ = styles[r["name"]]
            scored = [e for e in r["history"] if e.get("val_token_agreement")]
            for t, marker in zip(range(len(scored[0]["val_token_agreement"])), ("o", "^", "s", "D")):
                ax.plot([e["epoch"] for e in scored], [e["val_token_agreement"][t] for e in scored], marker=marker,
                        markersize=3, color=colour, linestyle=style, label=f"{r['name']}: token {t + 1}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("token's agreement with its teacher (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(out / "agreement_per_epoch.png", dpi=120)
        plt.close(fig)
        files.append("agreement_per_epoch.png")
    return files


def write_report(folders: list[str], out: str | Path) -> Path:
    """Write ``out/report.md`` and its plots; returns the markdown file's path."""
    if not folders:
        raise LibkdError("no run folders given; pass the --out folders of one or more `libkd distill` runs")
    runs = [load_run(f) for f in folders]
    _check_comparable(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pictures = plot(runs, out)
    data = runs[0]["meta"]["data_config"]
    lines = ["# libkd report", "",
             f"Data: {describe_data(data)}, "
             f"{len(runs[0]['meta']['dataset']['classes'])} classes; top-1 on the validation split, in percent. "
             "Head 0 is the class token's head, head t the token of teacher t; top-1 is the combined prediction.", "",
             *results_table(runs), "", "## Teachers", "", *teacher_section(runs), "", "## Curves", ""]
    lines += [f"![{p}]({p})" for p in pictures]
    target = out / "report.md"
    target.write_text("\n".join(lines) + "\n")
    return target
