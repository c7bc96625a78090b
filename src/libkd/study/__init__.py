"""``libkd study CONFIG``: the whole comparison in one resumable command.

A study trains its teachers, chooses settings on a held-out part of the training images (never
the test split), builds the augmentation-consistent stores (one per seed) and the naive
single-view store, distils every run with every seed it asks for, evaluates each student with
its teachers, and writes a report: the per-run table and curves of ``libkd report`` plus a
summary over seeds and a check of the method's claims. Every step is a ``libkd`` job that resumes
or is skipped when complete, so a killed study is resumed by running the same command; with
``results:`` set, the small files of each finished run are copied there as it finishes.
"""

from libkd.study.park import (PARKED, PARKED_FILES, DeadlineReached, ParkDeadline, TrainingNeeded, park, parked_folder,
                              unfinished, unpark, write_summary_training_nothing)
from libkd.study.plan import INHERITED, RunSpec, StudyConfig, TeacherSpec, TuneConfig, TuneStage, load_study
from libkd.study.runner import (COMMIT_WEIGHTS_MAX_BYTES, RESULT_FILES, TEACHER_FILES, TEACHER_WEIGHTS, Study, run_study)
from libkd.study.search import search
from libkd.study.summary import summary_markdown, training_table, tuning_table
from libkd.study.verdicts import (FAILS, HOLDS, NOISE_RULE, UNTESTED, WITHIN, beats, claims, equivalent, gain_changes,
                                  noise_threshold, pooled_sd, seed_noise, weakest)

__all__ = [
    "COMMIT_WEIGHTS_MAX_BYTES", "FAILS", "HOLDS", "INHERITED", "NOISE_RULE", "PARKED", "PARKED_FILES", "RESULT_FILES",
    "TEACHER_FILES", "TEACHER_WEIGHTS", "UNTESTED", "WITHIN", "DeadlineReached", "ParkDeadline", "RunSpec", "Study",
    "StudyConfig", "TeacherSpec", "TrainingNeeded", "TuneConfig", "TuneStage", "beats", "claims", "equivalent",
    "gain_changes", "load_study", "noise_threshold", "park", "parked_folder", "pooled_sd", "run_study", "search",
    "seed_noise", "summary_markdown", "training_table", "tuning_table", "unfinished", "unpark", "weakest",
    "write_summary_training_nothing",
]
