"""Which store a study's run builds: the window of views it holds, and the store it copies or grows from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from libkd.config import ExperimentConfig, load_config
from libkd.study.plan import HOW_BUILT, study_log


def window_to_build(path: Path, first_view: int, stop_view: int, verified: set[str]) -> tuple[int, int]:
    """The window of views (first, stop) to build or finish at ``path`` for a run that reads views first_view..
    stop_view-1: the window of the store there when it holds them all (complete, or begun with that end), else
    that run's, the store there removed (and struck from ``verified``)."""
    if not (path / "manifest.json").is_file():
        return first_view, stop_view
    manifest = json.loads((path / "manifest.json").read_text())
    held_from, held_to = manifest.get("first_view", 0), manifest.get("stop_view") or manifest["views"]
    if held_from <= first_view and stop_view <= held_to and (manifest.get("complete") or held_to == stop_view):
        return held_from, held_to  # every view the run reads is there: finish or reuse it as it was begun
    window = f"views {held_from}..{held_to - 1}"
    held = f"holds {window} only" if manifest.get("complete") else f"is an unfinished build of {window}"
    study_log(f"store {path.name} {held} and this run reads views {first_view}..{stop_view - 1}: rebuilding it")
    shutil.rmtree(path)
    verified.discard(str(path))
    return first_view, stop_view


def source_store(path: Path, cfg: ExperimentConfig) -> tuple[str | None, int]:
    """The complete store beside ``path`` built from the same data, recipe, seed and store settings that saves the
    most teacher work, and its views: the smallest with more views than ``cfg.store.views`` (its first views are
    copied, nothing is computed), else the one with the most views below it (a larger store grows from it)."""
    if (path / "manifest.json").is_file() or cfg.store.first_view or cfg.store.stop_view:
        return None, 0  # started already (precompute resumes it as it was begun), or a window of views
    same = {"exclude": {"path", "views", "teachers", *HOW_BUILT}}
    smaller: tuple[int, str | None] = (0, None)
    larger: tuple[float, str | None] = (float("inf"), None)
    for sibling in sorted(path.parent.glob("*/config.yaml")):
        manifest = sibling.parent / "manifest.json"
        if sibling.parent == path or not manifest.is_file():
            continue
        held = json.loads(manifest.read_text())
        if not held.get("complete") or held.get("first_view") or held.get("stop_view"):  # a window: not every first view
            continue
        other = load_config(sibling)
        if (other.seed, other.data, other.replay) != (cfg.seed, cfg.data, cfg.replay) or \
                other.store.model_dump(**same) != cfg.store.model_dump(**same) or other.store.teachers != cfg.store.teachers:
            continue
        if smaller[0] < other.store.views < cfg.store.views:
            smaller = (other.store.views, str(sibling.parent))
        elif cfg.store.views < other.store.views < larger[0]:
            larger = (other.store.views, str(sibling.parent))
    return (larger[1], int(larger[0])) if larger[1] else (smaller[1], smaller[0])
