"""Verdicts of a study's claims by a stated noise rule: seed spread pooled over runs, Student's t, and the claims
(a), (a'), (b), (b'), (c) read off the runs' roles. Pure functions of the finished runs' figures."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from libkd.study.plan import RunSpec, StudyConfig, StudyState


def results_by_run(finished: list[tuple[RunSpec, int, Path]]) -> dict[str, list[dict[str, Any]]]:
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


def _roles(cfg: StudyConfig) -> dict[str, Any]:
    """Which runs play which part in the claims, read off their specs."""
    everyone = set(cfg.teachers)
    roles: dict[str, Any] = {"singles": []}
    for r in cfg.runs:
        if r.mode == "none":
            roles.setdefault("baseline", r.name)  # the first, as for every role (a study may add a longer one)
        elif set(r.teachers) == everyone and r.combine == "per-token" and len(everyone) > 1:
            key = "naive" if r.naive_store else "online-fresh" if r.fresh_views else r.mode
            roles.setdefault({"store": "method", "online": "online", "naive": "naive", "online-fresh": "online-fresh"}[key],
                             r.name)
        elif r.mode == "store" and len(r.teachers) == 1 and not r.naive_store:
            roles["singles"].append(r.name)
        elif r.mode == "store" and r.combine == "mean" and not r.naive_store:
            roles.setdefault("mean", r.name)
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


def _missing(study: StudyState, names: list[str | None], by_run: dict[str, list[dict[str, Any]]], what: str) -> str | None:
    """None when every named run has finished; else the 'not tested' line naming what is missing."""
    absent = [n for n in names if n is None]
    unfinished = [n for n in names if n is not None and n not in by_run]
    if not absent and not unfinished:
        return None
    parts = ([f"the study has no {what}"] if absent else []) + (
        [f"not finished: {', '.join(f'{n} ({study.spec[n].seeds} seed(s))' for n in unfinished)}"] if unfinished else [])
    return "; ".join(parts)


def seed_noise(study: StudyState, by_run: dict[str, list[dict[str, Any]]],
               parent: dict[str, list[dict[str, Any]]] | None = None) -> tuple[float | None, int, bool]:
    """(pooled seed standard deviation, its degrees of freedom, whether it was borrowed): with one seed per run here,
    the seed spread of the study this one extends (``parent``, its runs, read when not given), at its schedule."""
    sd, dof = pooled_sd(by_run)
    if sd is None and study.parent is not None and study.parent.final_base is not None:
        return (*pooled_sd(parent if parent is not None else results_by_run(study.parent.finished_runs())), True)
    return sd, dof, False


def claims(study: StudyState, by_run: dict[str, list[dict[str, Any]]],
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


def gain_changes(study: StudyState, by_run: dict[str, list[dict[str, Any]]], parent: dict[str, list[dict[str, Any]]],
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

