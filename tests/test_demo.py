"""`make demo` is `libkd study configs/digits-demo.yaml`: here it runs at toy size, end to end."""

from __future__ import annotations

import json
from pathlib import Path

from libkd.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOY = ["base.train.epochs=2", "base.train.max_steps_per_epoch=2", "base.train.tensorboard=false",
       "teachers.conv.train.epochs=1", "teachers.conv.train.max_steps_per_epoch=2", "teachers.conv.train.tensorboard=false",
       "teachers.inv.train.epochs=1", "teachers.inv.train.max_steps_per_epoch=2", "teachers.inv.train.tensorboard=false",
       "store.verify_samples=4"]


def test_make_demo_runs_the_demo_study():
    import subprocess

    # What make would run (its dry run, after the virtual environment's rule), not the Makefile's text.
    # --no-print-directory: under `make test` this make is a sub-make, whose "Entering directory" lines name the
    # checkout's folder (often called libkd).
    dry = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "demo"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    demo = [line for line in dry.stdout.splitlines() if line.split() and line.split()[0].endswith("/libkd")]
    assert [line.split()[1] for line in demo] == ["data", "study", "export", "compare"]
    demo = "\n".join(demo)
    assert "libkd study configs/digits-demo.yaml" in demo
    # ...and ends with the exported, quantised student and its table against the teachers.
    assert "libkd export runs/digits-demo/runs/both-s0/student --int8 dynamic" in demo
    assert "libkd compare runs/digits-demo/runs/both-s0/student" in demo


def test_demo_pipeline_at_toy_size_ends_with_the_report_path(tmp_path, capsys):
    args = ["study", str(ROOT / "configs" / "digits-demo.yaml"), "--set", f"out={tmp_path / 'demo'}"]
    for item in TOY:
        args += ["--set", item]
    assert main(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    report = tmp_path / "demo" / "report" / "report.md"
    assert printed[-1] == f"report: {report}"
    text = report.read_text()
    assert "| none-s0 | none |" in text and "| both-s0 | store | resnet18, rednet26_cifar | per-token |" in text
    assert "Teacher complementarity" in text
    for png in ("accuracy_per_epoch.png", "accuracy_vs_time.png"):
        assert (report.parent / png).read_bytes()[:4] == b"\x89PNG"
    assert any("verified" in line for line in printed)
    evaluation = json.loads((tmp_path / "demo" / "runs" / "both-s0" / "student.eval.json").read_text())
    assert len(evaluation["teachers"]) == 2 and len(evaluation["heads"]) == 3
    # The demo's last two steps, as the Makefile runs them, on the toy student.
    student = str(tmp_path / "demo" / "runs" / "both-s0" / "student")
    assert main(["export", student, "--int8", "dynamic", "--out", str(tmp_path / "export"), "--threads", "1"]) == 0
    assert {"model.onnx", "model.int8.onnx", "preprocess.json", "MODEL_CARD.md"} <= {p.name for p in (tmp_path / "export").iterdir()}
    assert main(["compare", student, "--to", str(tmp_path / "compare"), "--threads", "1", "--repeats", "2", "--int8", "dynamic"]) == 0
    table = (tmp_path / "compare" / "compare.md").read_text()
    assert "teacher ensemble (2, mean probabilities; each at its faster runtime)" in table and "student int8 dynamic" in table
    capsys.readouterr()
    # A second run reuses every step and says so.
    assert main(args) == 0
    again = capsys.readouterr().out
    assert again.count("already complete") >= 2 and again.count("done, reusing it") == 2
