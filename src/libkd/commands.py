"""Subcommands of the ``libkd`` CLI (thin: each parses its config and calls the library)."""

from __future__ import annotations

import argparse
import json
import time

from libkd.cli import arg, command, duration, experiment_config
from libkd.deploy.export import DEFAULT_OPSET as DEFAULT_OPSET_CLI
from libkd.deploy.quantize import INT8_RECIPES

INT8_NAMES = list(INT8_RECIPES)
EXIT_PARKED = 75  # sysexits' EX_TEMPFAIL: stopped by --park-after with work left; the same command goes on


def _data_override(args: argparse.Namespace):
    """The data section from -c/--set when given; None lets a checkpoint's recorded data set stand."""
    return experiment_config(args).data if (args.config or args.overrides) else None


@command(
    "fit",
    help="The whole recipe on your own images: two teachers (convolution and involution), a store of one view per "
    "student epoch, the distilled ViT student, its evaluation with the teachers, a report and an ONNX export (fp32 + "
    "int8). DATA_DIR holds train/<class>/<images> and optionally val/ or test/ (else a tenth of every class of train is held out). "
    "Resumable: rerun the same command after a kill.",
    arguments=[arg("data_dir", help="ImageFolder tree: DATA_DIR/train/<class>/<image>, optionally DATA_DIR/val/<class>/..."),
               arg("--out", default="runs/fit", help="output folder (default runs/fit): fit.yaml, teachers, store, the "
                   "student run, report/, export/"),
               arg("--epochs", type=int, default=100, help="the student's epochs (default 100); the teachers train as "
                   "long and the store holds one view per epoch"),
               arg("--image-size", type=int, metavar="PX", help="model input size (default: the images' own size up to "
                   "64 px, else 64)"),
               arg("--device", default="cpu", help="cpu (default), cuda or cuda:N"),
               arg("--workers", type=int, help="data-loading processes (default: the config's)")],
    uses_config=False,
)
def fit_cmd(args: argparse.Namespace) -> int:
    from libkd.study.fit import advice, fit

    r = fit(args.data_dir, args.out, args.epochs, args.image_size, args.device, args.workers)
    scores = r["eval"]
    rows = [("student (ViT, one token per teacher)", scores["top1"])]
    rows += [(f"teacher {name}", t["top1"]) for name, t in zip(("conv (ResNet)", "inv (RedNet)"), scores.get("teachers", []))]
    if "teacher_ensemble" in scores:
        rows.append(("teachers' ensemble (mean probabilities)", scores["teacher_ensemble"]["top1"]))
    print(f"\n{'model':40s} {'val top-1':>9s}")
    for name, top1 in rows:
        print(f"{name:40s} {top1:9.2f}")
    print(f"\nreport: {r['report']}\nexport: {r['export']} (model.onnx, model.int8.onnx, MODEL_CARD.md)\n"
          f"config: {r['config']} (`libkd study {r['config']}` takes it further)")
    if tip := advice(scores):
        print(f"\nnote: {tip}")
    return 0


@command(
    "data info",
    help="Print a data set's classes, counts, image size, mean/std and fingerprint.",
    arguments=[
        arg("dataset", nargs="?", help="SOURCE[:PATH], e.g. digits, synthetic, imagefolder:../shared/data/cifar10/train, "
            "cifar10:~/data (default: the config's data section)"),
        arg("--split", choices=["train", "val"], default="train", help="which split (default: train)"),
        arg("--json", action="store_true", help="print one JSON object instead of text"),
    ],
)
def data_info(args: argparse.Namespace) -> int:
    from libkd.data import build_dataset, parse_dataset_spec

    overrides = list(args.overrides)
    if args.dataset:
        overrides = [f"data.{k}={json.dumps(v)}" for k, v in parse_dataset_spec(args.dataset).items()] + overrides
    args.overrides = overrides
    config = experiment_config(args)
    start = time.perf_counter()
    ds = build_dataset(config.data, args.split, seed=config.seed)
    load_s = time.perf_counter() - start
    mean, std = ds.mean_std()
    size = ds.image_size
    info = {
        "source": config.data.source,
        "root": config.data.root,
        "split": args.split,
        "images": len(ds),
        "classes": ds.classes,
        "class_counts": ds.class_counts(),
        "image_size": list(size) if size else "mixed (decoded per item)",
        "mean": mean,
        "std": std,
        "fingerprint": ds.fingerprint,
        "skipped_corrupt": ds.skipped,
        "load_seconds": round(load_s, 3),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    where = f" ({config.data.root})" if config.data.root else ""
    print(f"data set     {config.data.source}{where}, split {args.split}")
    print(f"images       {len(ds)}")
    print(f"classes      {ds.num_classes}")
    for label, (name, count) in enumerate(zip(ds.classes, info["class_counts"])):
        print(f"  {label:>4}  {name:<20} {count}")
    print(f"image size   {'x'.join(map(str, size)) if size else info['image_size']}")
    print(f"mean         {mean}")
    print(f"std          {std}")
    print(f"fingerprint  {ds.fingerprint}")
    if info["skipped_corrupt"]:
        print(f"skipped      {len(info['skipped_corrupt'])} unreadable image(s): {', '.join(info['skipped_corrupt'][:5])}")
    print(f"loaded in    {load_s:.2f} s")
    return 0


@command(
    "train-teacher",
    help="Train a teacher (any timm CNN, rednet*, ...) with a standard recipe; resumable after a kill.",
)
def train_teacher_cmd(args: argparse.Namespace) -> int:
    from libkd.train_teacher import train_teacher

    config = experiment_config(args)
    final = train_teacher(config)
    if final:
        print(f"saved {config.out}/teacher.safetensors (+ .json): val top-1 {final['val_top1']:.2f}%")
    return 0


@command(
    "distill",
    help="Train the student ViT: distill.mode=none (no teachers), online (teachers run every step) or store "
    "(targets from a logit store; no teacher runs). One teacher token per teacher (distill.combine=per-token) "
    "or one token for their mean (mean). Loss: (1 - distill.alpha) * CE + distill.alpha * sum_t w_t KD_t, "
    "KD soft (KL at temperature distill.tau, times tau^2) or hard (distill.kind=hard: CE with the teacher's argmax). "
    "Resumable after a kill; metrics.jsonl, TensorBoard, student.safetensors + .json in --out.",
    arguments=[arg("--mode", choices=["none", "online", "store"], help="shortcut for --set distill.mode=..."),
               arg("--teachers", nargs="+", help="online mode: teacher checkpoints; store mode: which of the store's teachers "
                   "to learn from, e.g. one for a single-teacher student (default all; shortcut for distill.teachers)"),
               arg("--store", help="store mode: the store folder (shortcut for distill.store)")],
)
def distill_cmd(args: argparse.Namespace) -> int:
    from libkd.distill import distill

    extra = []
    if args.mode:
        extra.append(f"distill.mode={args.mode}")
    if args.teachers:
        extra.append(f"distill.teachers={json.dumps(args.teachers)}")
    if args.store:
        extra.append(f"distill.store={json.dumps(args.store)}")
    args.overrides = extra + list(args.overrides)
    config = experiment_config(args)
    final = distill(config)
    if final:
        print(f"saved {config.out}/student.safetensors (+ .json): val top-1 {final['val_top1']:.2f}% "
              f"(heads {', '.join(f'{t:.2f}' for t in final['val_heads_top1'])})")
    return 0


@command(
    "evaluate",
    help="Score a student or teacher checkpoint on its validation split: top-1/top-5 of every head and of the "
    "combined prediction, calibration (ECE, 15 bins), per-class accuracy, confusion matrix; with --teachers, the "
    "teachers' accuracy (each, and their ensemble: mean probabilities), their complementarity and each token's agreement with its teacher.",
    arguments=[arg("checkpoint", help="NAME of NAME.safetensors + NAME.json, e.g. runs/x/student"),
               arg("--teachers", nargs="+", help="teacher checkpoints, in the student's token order"),
               arg("--json", dest="json_out", help="write the full result here (default: CHECKPOINT.eval.json)"),
               arg("--flip", action="store_true",
                   help="score a teacher averaged over each image and its mirror image (its logits' mean), the "
                   "function a store built with store.teacher_flip=true records"),
               arg("--batch-size", type=int, default=256)],
)
def evaluate_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from libkd.engine import resolve_device
    from libkd.evaluate import evaluate_checkpoint
    from libkd.fileio import write_json_atomic

    data = _data_override(args)
    result = evaluate_checkpoint(args.checkpoint, data, args.teachers, resolve_device(args.device or "cpu"), args.batch_size,
                                 flip=args.flip)
    target = Path(args.json_out or f"{args.checkpoint}.eval.json")
    write_json_atomic(target, result)
    heads = ", ".join(f"{h['top1']:.2f}" for h in result["heads"])
    line = f"{result['model']}{' (flip-averaged)' if args.flip else ''}: top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  ECE {result['ece']:.4f}  heads [{heads}]"
    if "teachers" in result:
        line += "  teachers [" + ", ".join(f"{t['top1']:.2f}" for t in result["teachers"]) + "]"
        if "teacher_ensemble" in result:
            line += f"  ensemble {result['teacher_ensemble']['top1']:.2f}"
        line += "  agreement [" + ", ".join(f"{a:.1f}" for a in result["token_teacher_agreement"]) + "]"
    print(f"{line}  ({result['num_images']} images; {target})")
    return 0


@command(
    "report",
    help="Write a markdown report with PNG plots from one or more distill runs: results per run and head, "
    "calibration, training speed, the teachers' accuracy and complementarity, accuracy per epoch and against time.",
    arguments=[arg("runs", nargs="+", help="run folders (the --out of `libkd distill`)"),
               arg("--to", default="runs/report", help="folder for report.md and its plots (default runs/report)")],
    uses_config=False,
)
def report_cmd(args: argparse.Namespace) -> int:
    from libkd.report import write_report

    print(f"report: {write_report(args.runs, args.to)}")
    return 0


@command(
    "study",
    help="Run a whole study from one config: train its teachers, choose settings on held-out training images, build "
    "the stores, distil every run with every seed, evaluate, and write the report (summary over seeds, claims checked, "
    "per-run table and curves). Resumable: rerun the same command after a kill; finished steps are reused.",
    arguments=[arg("config", help="study config, e.g. configs/cifar10-10pct-study.yaml"),
               arg("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study key, e.g. --set base.train.epochs=2 (repeatable)"),
               arg("--runs", nargs="+", metavar="NAME",
                   help="train only these runs (with the searches they need), e.g. to spread a long study over "
                   "machines; the others are left for a later invocation, the report covers every finished run"),
               arg("--workers", type=int, metavar="N",
                   help="data-loading processes for the stores and runs on this machine (default: the config's); "
                   "part of no store's or run's identity, so results and stores stay reusable"),
               arg("--park", action="store_true",
                   help="train nothing: copy the last saved epoch (weights, optimiser, curve) of each unfinished run and "
                   "search trial to RESULTS/parked/, so that once committed a fresh machine goes on from there (for a "
                   "run longer than the time one machine is yours; safe beside a running study), and rewrite study.md with "
                   "how far each has come"),
               arg("--park-after", type=duration, metavar="DURATION",
                   help="train for at most this wall time (e.g. 2h30m, 150m, 9000), then stop and --park what is "
                   "unfinished, exiting with status 75 (a lease or job slot that ends: leave it time to commit); "
                   "the epoch under way is lost, every saved one kept"),
               arg("--views-ahead", type=int, metavar="N",
                   help="build each run's store N views at a time as the run reaches them (a window of the views it "
                   "trains on next), instead of every view before it starts: with --park-after, a machine computes "
                   "no teacher view it will not train on (at most N); part of no store's or run's identity")],
    uses_config=False,
)
def study_cmd(args: argparse.Namespace) -> int:
    from libkd.study import DeadlineReached, ParkDeadline, Study, load_study, park, run_study

    def parked() -> int:
        return len(park(Study(load_study(args.config, args.overrides), args.runs, args.workers)))

    if args.park:
        print(f"parked: {parked()} run(s)")
        return 0
    if args.park_after is None:
        print(f"report: {run_study(args.config, args.overrides, args.runs, args.workers, args.views_ahead)}")
        return 0
    try:
        with ParkDeadline(args.park_after):
            report = run_study(args.config, args.overrides, args.runs, args.workers, args.views_ahead)
    except DeadlineReached:  # a Ctrl-C of the user's is still an interrupt
        count = parked()
        if count:
            print(f"stopped by --park-after; parked: {count} run(s): commit the results folder, and the same command goes "
                  "on from there, on this machine or another")
        else:  # teachers or a store were under way: what they saved stays in OUT, on this machine
            print("stopped by --park-after before any run or search trial saved an epoch: nothing parked; the same command "
                  "goes on from what this machine saved (teachers and stores are not parked)")
        return EXIT_PARKED
    print(f"report: {report}")
    return 0


@command(
    "precompute",
    help="Run the teachers once over V replayable views of every training image and write the logit store "
    "(resumable; shards across processes under torchrun).",
)
def precompute_cmd(args: argparse.Namespace) -> int:
    from libkd.store.precompute import precompute

    config = experiment_config(args)
    stats = precompute(config)
    if stats.get("images"):
        print(f"store '{config.store.path}': {stats['images']} views in {stats['seconds']:.1f} s "
              f"({stats['images_per_s']:.0f} views/s)")
    return 0


@command(
    "store info",
    help="Print a store's manifest summary and size.",
    arguments=[arg("path", help="store folder"), arg("--json", action="store_true", help="print the whole manifest")],
    uses_config=False,
)
def store_info(args: argparse.Namespace) -> int:
    from libkd.store import LogitStore, read_manifest

    manifest = read_manifest(args.path)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    done = len(manifest.get("shards", []))
    print(f"store        {args.path} ({'complete' if manifest.get('complete') else 'INCOMPLETE: rerun precompute'})")
    print(f"data set     {manifest['dataset']['num_samples']} samples, {manifest['dataset']['num_classes']} classes, "
          f"fingerprint {manifest['dataset']['fingerprint'][:16]}")
    for t, teacher in enumerate(manifest["teachers"]):
        kind = manifest.get("teacher_kinds", ["?"] * (t + 1))[t]
        print(f"teacher {t}    {teacher['name']} ({kind}), weights {teacher['weights_sha256'][:16]}")
    held_from, held_to = manifest.get("first_view", 0), manifest.get("stop_view") or manifest["views"]
    window = f" (holds views {held_from}..{held_to - 1} only)" if (held_from, held_to) != (0, manifest["views"]) else ""
    print(f"views        {manifest['views']} per sample{window}, {manifest['image_size']} px, augmentation {manifest['augmentation']['sha256'][:16]}")
    enc = manifest["encoding"] + (f" k={manifest['topk']}" if manifest.get("topk") else "") + (
        f", tails at T = {', '.join(format(t, 'g') for t in manifest['topk_taus'])}" if manifest.get("topk_taus") else "")
    print(f"encoding     {enc}: {manifest['record_bytes']} bytes per sample per view per teacher")
    if manifest.get("complete"):
        size = LogitStore(args.path).nbytes()
        print(f"shards       {done} x {len(manifest['teachers'])} files, {size / 2**20:.2f} MiB")
    return 0


@command(
    "store verify",
    help="Check every shard checksum, then recompute a random sample of records with the teachers.",
    arguments=[arg("path", help="store folder"), arg("--samples", type=int, default=64, help="records to recompute (default 64)"),
               arg("--device", default="cpu"), arg("--seed", type=int, default=0)],
    uses_config=False,
)
def store_verify(args: argparse.Namespace) -> int:
    from libkd.store.precompute import verify_store

    result = verify_store(args.path, args.samples, args.device, args.seed)
    print(f"store '{args.path}' OK: {result['shard_files']} shard files match their checksums; "
          f"{result['checked_records']} recomputed records agree (max |diff| {result['max_abs_diff']:.3g})")
    return 0


@command(
    "export",
    help="Export a student or teacher checkpoint to ONNX (fp32, optionally int8) with preprocess.json and MODEL_CARD.md, "
    "checked against PyTorch with onnxruntime on the checkpoint's validation images (a mismatch is an error).",
    arguments=[arg("checkpoint", help="NAME of NAME.safetensors + NAME.json, e.g. runs/x/student"),
               arg("--int8", choices=INT8_NAMES, help="also write model.int8.onnx: dynamic (MatMul/Gemm weights int8, "
                   "activations at run time; -per-channel, -reduce-range (7-bit weights, for CPUs without VNNI) and -u8u8 "
                   "variants) or static (QDQ, calibrated on --calibration training images; -percentile, -entropy)"),
               arg("--opset", type=int, default=DEFAULT_OPSET_CLI, help=f"ONNX opset (default {DEFAULT_OPSET_CLI}; 23 and "
                   "later export attention as one Attention node)"),
               arg("--optimize", action="store_true", help="run onnxruntime's transformer optimizer on a ViT student "
                   "(fused LayerNorm/SkipLayerNorm, Gelu, Attention where the pattern matches; statistics in export.json)"),
               arg("--calibration", type=int, default=256, metavar="N", help="training images for static int8 (default 256)"),
               arg("--val-images", type=int, metavar="N", help="validate on N validation images evenly spread over the split (default all)"),
               arg("--threads", type=int, help="CPU threads for onnxruntime and PyTorch (default: all available)")],
)
def export_cmd(args: argparse.Namespace) -> int:
    from libkd.deploy import describe_command, export_checkpoint

    data = _data_override(args)
    r = export_checkpoint(args.checkpoint, args.out, args.int8, args.opset, args.calibration, data, args.val_images,
                          args.threads, command=describe_command(), optimize=args.optimize)
    v = r["validation"]
    print(f"onnx fp32: max |logit diff| {v['max_abs_logit_diff']:.2g} vs PyTorch (tolerance {v['tolerance']:.2g}), top-1 "
          f"agreement {v['top1_agreement_onnx_vs_pytorch']:.2f} %, top-1 {v['top1_onnx']:.2f} ({v['images']} images)")
    if r["int8"]:
        print(f"onnx int8 ({r['int8']['mode']}): top-1 {v['top1_int8']:.2f} ({v['top1_int8'] - v['top1_onnx']:+.2f}), "
              f"agreement with fp32 {v['top1_agreement_int8_vs_fp32']:.2f} %, {r['files_mb']['model.int8.onnx']:.2f} MB "
              f"against {r['files_mb']['model.onnx']:.2f} MB")
    if "timm_local_dir_max_abs_logit_diff" in v:
        print(f"timm: timm.create_model('local-dir:{r['folder']}', pretrained=True) rebuilds it (max |logit diff| "
              f"{v['timm_local_dir_max_abs_logit_diff']:.2g})")
    extra = ", model.int8.onnx" if r["int8"] else ""
    extra += ", config.json + model.safetensors (timm)" if "timm_local_dir_max_abs_logit_diff" in v else ""
    print(f"exported to {r['folder']} (model.onnx{extra}, preprocess.json, MODEL_CARD.md)")
    return 0


@command(
    "predict",
    help="Classify images (files or folders) with a checkpoint (PyTorch) or an export folder (onnxruntime), "
    "with the same preprocessing as evaluate. Unreadable images are named and skipped.",
    arguments=[arg("model", help="a checkpoint (NAME of NAME.safetensors + NAME.json) or an export folder"),
               arg("images", nargs="+", help="image files and/or folders (searched recursively)"),
               arg("--top-k", type=int, default=5, help="classes per image (default 5)"),
               arg("--json", action="store_true", help="print one JSON object (predictions, skipped files)"),
               arg("--batch-size", type=int, default=64),
               arg("--int8", action="store_true", help="use the export folder's model.int8.onnx"),
               arg("--exif-transpose", action="store_true",
                   help="turn each image upright as its EXIF orientation says (phone photos); off by default, as in "
                        "training and evaluate, which read pixels as stored"),
               arg("--threads", type=int, help="CPU threads (default: all available)")],
    uses_config=False,
)
def predict_cmd(args: argparse.Namespace) -> int:
    from libkd import LibkdError
    from libkd.predict import predict

    result = predict(args.model, args.images, args.top_k, args.batch_size, args.threads, args.int8, args.exif_transpose)
    if not result["predictions"]:
        names = ", ".join(s["file"] for s in result["skipped"][:3])
        raise LibkdError(f"none of the {result['num_images']} file(s) is a readable image ({names}); pass JPEG/PNG/... images")
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for p in result["predictions"]:
            print(f"{p['file']}: " + ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in p["top"]))
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} unreadable file(s): "
              + "; ".join(f"{s['file']} ({s['error'][:80]})" for s in result["skipped"][:10]), file=__import__("sys").stderr)
    return 0


@command(
    "compare",
    help="Measure a student against the teachers it replaces, in one run on one machine: parameters, file size, batch-1 "
    "latency, batch-64 throughput and top-1 for the student (PyTorch and onnxruntime fp32, int8 dynamic and static), each "
    "teacher and the teacher ensemble; writes compare.md, compare.json and compare.png.",
    arguments=[arg("student", help="student checkpoint (NAME of NAME.safetensors + NAME.json)"),
               arg("--teachers", nargs="+", help="teacher checkpoints (default: those the student recorded)"),
               arg("--to", default="runs/compare", help="output folder (default runs/compare)"),
               arg("--threads", type=int, help="CPU threads, pinned for every model (default: all available)"),
               arg("--repeats", type=int, default=50, help="batch-1 calls timed per model (median; default 50)"),
               arg("--val-images", type=int, metavar="N", help="score N validation images evenly spread over the split (default all)"),
               arg("--int8", nargs="*", default=["dynamic", "static"], metavar="RECIPE",
                   help="int8 recipes to build (default dynamic and static; none: --int8 with no value); NAME@VARIANT "
                        "quantises that --fp32 variant's graph (after fusion)"),
               arg("--fp32", nargs="*", default=[], metavar="VARIANT",
                   help="more onnxruntime fp32 graphs of the student to measure: opset23 (Attention op), optimized "
                        "(onnxruntime's transformer optimizer), opset23-optimized"),
               arg("--calibration", type=int, default=256, metavar="N", help="training images for static int8")],
)
def compare_cmd(args: argparse.Namespace) -> int:
    from libkd.deploy import compare

    data = _data_override(args)
    report = compare(args.student, args.teachers, args.to, args.threads, args.repeats, args.val_images, tuple(args.int8),
                     args.calibration, data=data, fp32=tuple(args.fp32))
    print(f"compare: {report}")
    return 0
