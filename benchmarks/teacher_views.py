"""How sets of teachers answer a study's replayed training views (the views a store records), beside the same
training images shown clean: top-1 against each view's label (the larger-weight label of a mixed view), the mean top
probability at T=1, the entropy at the distillation temperature, and how often the teachers agree.

    .venv/bin/python benchmarks/teacher_views.py --json docs/results/cifar10-10pct-strong/teacher-views.json
    .venv/bin/python benchmarks/teacher_views.py --run both-m100-mild --json docs/results/cifar10-10pct-strong/teacher-views-mild.json

Defaults: the strong CIFAR-10 study's student recipe, 1,000 of its 5,000 training images, each at a random one of
300 views, the first teachers (docs/results/cifar10-10pct/teachers/) against the strong ones
(docs/results/cifar10-10pct-strong/teachers/). About 1 minute on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from libkd.config import ReplayConfig
from libkd.data import build_dataset
from libkd.data.batched_replay import render_views
from libkd.data.replay import ReplayAugment
from libkd.store.format import view_spec
from libkd.teachers import load_teachers, teacher_logits

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DEFAULT_SETS = [f"first={RESULTS}/cifar10-10pct/teachers/conv/teacher,{RESULTS}/cifar10-10pct/teachers/inv/teacher",
                f"strong={RESULTS}/cifar10-10pct-strong/teachers/conv/teacher,{RESULTS}/cifar10-10pct-strong/teachers/inv/teacher"]
CLEAN = ReplayConfig(crop_scale=[1.0, 1.0], hflip=0.0, auto_augment=None, erase_prob=0.0, mixup_alpha=0.0, cutmix_alpha=0.0)


def _relative(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (what a committed JSON records)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path


def answers(logits: torch.Tensor, labels: np.ndarray, tau: float) -> dict[str, float]:
    """One teacher's answers on a batch of views: top-1 against ``labels``, mean top probability, entropy at ``tau``."""
    soft = (logits / tau).softmax(-1)
    return {"top1": float((logits.argmax(-1).numpy() == labels).mean() * 100),
            "mean_top_p": float(logits.softmax(-1).max(-1).values.mean()),
            f"entropy_t{tau:g}": float(-(soft * soft.clamp_min(1e-12).log()).sum(-1).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "cifar10-10pct-strong.yaml"),
                        help="a study config: its base data, replay recipe and distillation temperature")
    parser.add_argument("--teachers", nargs="+", default=DEFAULT_SETS, metavar="LABEL=PATH[,PATH...]",
                        help="sets of teacher checkpoints to compare")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--views", type=int, default=300, help="view indices are drawn from 0..VIEWS-1")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--run", help="score the views of this run of the study (its set: on top of the base recipe, "
                                      "e.g. a milder replay; a settings search's choices are not applied)")
    parser.add_argument("--json")
    args = parser.parse_args()
    from libkd.study import load_study
    from libkd.study.plan import with_overrides

    study = load_study(args.config)
    # A run's recipe as the study builds it (the study's set:, then the run's), less any settings search's choices.
    overrides = dict(study.set)
    if args.run:
        specs = {spec.name: spec for spec in study.runs}
        if args.run not in specs:
            parser.error(f"--run {args.run}: no such run in {args.config} (its runs: {', '.join(specs)})")
        overrides.update(specs[args.run].set)
    base = with_overrides(study.base, overrides) if overrides else study.base
    dataset = build_dataset(base.data, "train", seed=base.seed)
    size, mean, std = view_spec(base.data, dataset)
    rng = np.random.default_rng(args.seed)
    picks = [(int(i), int(rng.integers(args.views))) for i in rng.choice(len(dataset), args.samples, replace=False)]
    own = dataset.labels[[i for i, _ in picks]]
    results: dict[str, dict] = {}
    for shown, recipe in (("student views", base.replay), ("clean", CLEAN)):
        augment = ReplayAugment(dataset, recipe, base.seed, size, mean, std, base.data.crop_pct)
        images, partners, lams = render_views(augment, picks)
        labels = np.where(np.asarray(lams) >= 0.5, own, dataset.labels[partners])
        for spec in args.teachers:
            label, paths = spec.split("=", 1)
            teachers = load_teachers(paths.split(","), dataset.classes, torch.device("cpu"))
            logits = teacher_logits(teachers, images, mean, std, size)
            row = {"teachers": [_relative(t.path) for t in teachers],
                   "answers": [answers(lg, labels, base.distill.tau) for lg in logits],
                   # of the first teacher's top-1 with each other's, averaged (100 for a single teacher)
                   "teachers_agree": float(np.mean([(lg.argmax(-1) == logits[0].argmax(-1)).float().mean().item()
                                                    for lg in logits[1:]] or [1.0]) * 100)}
            results[f"{label} / {shown}"] = row
            print(f"{label:>10} {shown:>14}: " + json.dumps({k: v for k, v in row.items() if k != "teachers"}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": _relative(args.config), "run": args.run, "samples": args.samples,
                                               "views": args.views, "seed": args.seed, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
