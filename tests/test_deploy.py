"""libkd export / predict / compare on the embedded digits set, with a tiny student and teacher trained here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import bomb_png
from libkd.cli import main
from libkd.config import DataConfig
from libkd.data import build_dataset
from libkd.deploy import (ExportError, OnnxModel, export_checkpoint, image_transform, load_model_for_inference,
                          preprocess_spec, quantize_int8)
from libkd.models import create_model, save_checkpoint
from libkd.predict import predict

DATA = DataConfig(source="digits", image_size=16)
# int8 must keep this share of the fp32 model's top-1 decisions on the 360 digits test images. Static QDQ int8
# measures worse than dynamic on these small ViTs (87.7 % on the CIFAR student, 88-91 % here), so its floor is lower.
INT8_AGREEMENT_FLOOR = 90.0
STATIC_INT8_AGREEMENT_FLOOR = 80.0


def _fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> torch.nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr)
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            b = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, str]:
    """A confident tiny teacher and a tiny one-token student, saved as libkd checkpoints with their digits metadata."""
    root = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    train = build_dataset(DATA, "train")
    mean, std = train.mean_std()
    spec = {"input_size": 16, "crop_pct": 1.0, "mean": mean, "std": std}
    transform = image_transform(spec)
    x = torch.stack([transform(train[i][0]) for i in range(len(train))])
    y = torch.as_tensor(train.labels)
    meta = dict(**spec, dataset={"classes": train.classes, "fingerprint": train.fingerprint, "source": "digits"},
                data_config=DATA.model_dump(mode="json"), metrics={"epoch": 6, "val_top1": 0.0})
    t_arch = {"name": "resnet18", "num_classes": 10, "cifar_stem": False, "kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}}
    teacher = _fit(create_model("resnet18", 10, **t_arch["kwargs"]), x, y, 3, 2e-3)
    teacher_path = str(save_checkpoint(teacher, root / "teacher", t_arch, **meta).with_suffix(""))
    s_kwargs = {"img_size": 16, "embed_dim": 48, "depth": 2, "num_heads": 2, "num_teachers": 1, "head_mode": "mean"}
    s_arch = {"name": "kdvit_mini_patch4_32", "num_classes": 10, "cifar_stem": False, "kwargs": s_kwargs}
    student = _fit(create_model("kdvit_mini_patch4_32", 10, **s_kwargs), x, y, 6, 2e-3)
    distill = {"mode": "online", "tokens": 1, "combine": "per-token", "teacher_checkpoints": [teacher_path],
               "teachers": ["resnet18"], "teacher_kinds": ["conv"]}
    student_path = str(save_checkpoint(student, root / "student", s_arch, distill=distill, **meta).with_suffix(""))
    return {"student": student_path, "teacher": teacher_path, "root": str(root)}


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("export") / "student"
    return export_checkpoint(trained["student"], out, int8="dynamic", threads=1)


def test_export_matches_pytorch_on_real_images_and_describes_itself(exported, trained):
    folder = Path(exported["folder"])
    v = exported["validation"]
    assert v["images"] == 360
    assert v["max_abs_logit_diff"] <= v["tolerance"] <= 1e-3 * 100
    assert v["top1_agreement_onnx_vs_pytorch"] == 100.0
    assert v["top1_pytorch"] > 50.0, "the fixture's student must be confident for the round trip to mean anything"
    assert abs(v["top1_onnx"] - v["top1_pytorch"]) < 1e-9
    assert v["top1_agreement_int8_vs_fp32"] >= INT8_AGREEMENT_FLOOR
    assert (folder / "model.onnx").is_file() and (folder / "model.int8.onnx").is_file()
    assert exported["files_mb"]["model.int8.onnx"] < 0.6 * exported["files_mb"]["model.onnx"]
    pre = json.loads((folder / "preprocess.json").read_text())
    assert pre["classes"] == build_dataset(DATA, "train").classes == [str(d) for d in range(10)]
    assert pre["input_size"] == 16 and pre["channel_order"] == "RGB" and pre["files"] == {"fp32": "model.onnx", "int8": "model.int8.onnx",
                                                                                                     "timm": "config.json"}
    card = (folder / "MODEL_CARD.md").read_text()
    for needle in ("kdvit_mini_patch4_32", "Parameters", "teacher 0: `resnet18` (conv)", "ONNX int8 (dynamic)", "libkd export"):
        assert needle in card
    # The ONNX model itself, fed by hand the way preprocess.json describes, gives the checkpoint's logits.
    from libkd.models import build_from_checkpoint

    model, _ = build_from_checkpoint(trained["student"])
    val = build_dataset(DATA, "val")
    batch = torch.stack([image_transform(pre)(val[i][0]) for i in range(32)])
    with torch.no_grad():
        torch.testing.assert_close(OnnxModel(folder / "model.onnx", 1)(batch), model.eval()(batch), atol=1e-4, rtol=1e-4)


def test_static_int8_calibrates_and_keeps_top1(trained, tmp_path):
    r = export_checkpoint(trained["student"], tmp_path / "s", int8="static", calibration=64, threads=1)
    assert r["int8"]["mode"] == "static" and r["int8"]["calibration_images"] == 64
    assert "LayerNorm" in r["int8"]["kept_fp32"] and "MatMul" in r["int8"]["quantized_ops"]
    assert r["validation"]["top1_agreement_int8_vs_fp32"] >= STATIC_INT8_AGREEMENT_FLOOR
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "s" / "model.int8.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "LayerNormalization" in ops and {"Softmax", "Attention"} & ops  # attention stays fp32


def test_teachers_export_the_same_way(trained, tmp_path):
    r = export_checkpoint(trained["teacher"], tmp_path / "t", threads=1)
    assert r["validation"]["top1_agreement_onnx_vs_pytorch"] == 100.0 and r["int8"] is None
    assert "(teacher)" in (tmp_path / "t" / "MODEL_CARD.md").read_text()


def test_involution_teacher_exports(tmp_path):
    model = create_model("rednet26_cifar", 10, base_width=8, stem_width=16).eval()
    from libkd.deploy import export_onnx

    export_onnx(model, 16, tmp_path / "rednet.onnx")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(OnnxModel(tmp_path / "rednet.onnx", 1)(x), model(x), atol=1e-4, rtol=1e-4)


def _user_folder(root: Path, count: int = 6) -> Path:
    from PIL import Image

    val = build_dataset(DATA, "val")
    folder = root / "mine"
    for i in range(count):  # the digits as a user would have them: 8x8 PNGs, some in a sub-folder
        where = folder / "sub" if i % 2 else folder
        where.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(val.load_image(i))).save(where / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not a png at all")
    return folder


def test_predict_gives_the_same_classes_from_checkpoint_and_export_and_skips_a_corrupt_image(exported, trained, tmp_path, capsys):
    folder = _user_folder(tmp_path)
    from_ckpt = predict(trained["student"], [str(folder)], top_k=3, threads=1)
    from_onnx = predict(exported["folder"], [str(folder)], top_k=3, threads=1)
    for r in (from_ckpt, from_onnx):
        assert r["num_images"] == 7 and len(r["predictions"]) == 6
        assert [s["file"] for s in r["skipped"]] == [str(folder / "broken.png")]
    assert [p["top"][0]["class"] for p in from_ckpt["predictions"]] == [p["top"][0]["class"] for p in from_onnx["predictions"]]
    for a, b in zip(from_ckpt["predictions"], from_onnx["predictions"]):
        assert len(a["top"]) == 3 and a["top"][0]["prob"] >= a["top"][1]["prob"]
        assert abs(a["top"][0]["prob"] - b["top"][0]["prob"]) < 1e-4
    assert main(["predict", exported["folder"], str(folder), "--json", "--top-k", "2"]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert len(printed["predictions"]) == 6 and len(printed["predictions"][0]["top"]) == 2
    assert "skipped 1 unreadable file(s)" in captured.err and "broken.png" in captured.err


def test_predict_int8_export_and_plain_output(exported, tmp_path, capsys):
    folder = _user_folder(tmp_path, 2)
    assert main(["predict", exported["folder"], str(folder / "img0.png"), "--int8", "--top-k", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(folder / "img0.png") + ": ") and line.endswith("%")


def test_bad_inputs_are_one_line_errors(trained, exported, tmp_path, capsys):
    not_ckpt = tmp_path / "nothing"
    no_pre = tmp_path / "export-without-preprocess"
    no_pre.mkdir()
    shutil.copy(Path(exported["folder"]) / "model.onnx", no_pre / "model.onnx")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    cases = [
        (["export", str(not_ckpt)], "is missing"),
        (["export", trained["student"], "--opset", "7", "--out", str(tmp_path / "e")], "opset 7 is not supported"),
        (["predict", str(not_ckpt), str(text)], "neither an export folder"),
        (["predict", str(no_pre), str(text)], "has no preprocess.json"),
        (["predict", exported["folder"], str(text)], "is a readable image"),
        (["predict", exported["folder"], str(tmp_path / "missing.png")], "does not exist"),
        (["predict", trained["student"], str(text), "--int8"], "--int8 needs an export folder"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err and "Traceback" not in err, (argv, err)


def test_a_wrong_export_is_an_error_not_a_warning(trained, tmp_path, monkeypatch):
    """An exporter bug (here: the exported graph of another model) fails the export instead of shipping it."""
    import libkd.deploy.export as deploy

    real = deploy.export_onnx

    def wrong(model, size, path, opset=18):
        torch.manual_seed(1)
        other = create_model("kdvit_mini_patch4_32", 10, img_size=16, embed_dim=48, depth=2, num_heads=2, num_teachers=1)
        real(other, size, path, opset)

    monkeypatch.setattr(deploy, "export_onnx", wrong)
    with pytest.raises(ExportError, match="differ from PyTorch"):
        export_checkpoint(trained["student"], tmp_path / "bad", threads=1)


def test_compare_measures_student_int8_teacher_and_ensemble_in_one_table(trained, tmp_path):
    second = Path(trained["root"]) / "teacher2"
    shutil.copy(trained["teacher"] + ".safetensors", str(second) + ".safetensors")
    shutil.copy(trained["teacher"] + ".json", str(second) + ".json")
    assert main(["compare", trained["student"], "--teachers", trained["teacher"], str(second), "--to", str(tmp_path / "c"),
                 "--threads", "1", "--repeats", "3", "--calibration", "32", "--fp32", "optimized",
                 "--int8", "dynamic", "static", "dynamic-reduce-range@optimized"]) == 0
    record = json.loads((tmp_path / "c" / "compare.json").read_text())
    names = [r["model"] for r in record["rows"]]
    assert names[:6] == ["student fp32 (PyTorch eager)", "student fp32 (onnxruntime)", "student fp32 optimized (onnxruntime)",
                         "student int8 dynamic (onnxruntime)", "student int8 static (onnxruntime)",
                         "student int8 dynamic-reduce-range@optimized (onnxruntime)"]
    assert names[6:10] == ["teacher 0: resnet18 (PyTorch eager)", "teacher 0: resnet18 (onnxruntime)",
                           "teacher 1: resnet18 (PyTorch eager)", "teacher 1: resnet18 (onnxruntime)"]
    assert names[-1].startswith("teacher ensemble (2") and record["threads"] == 1 and record["images"] == 360
    rows = {r["model"]: r for r in record["rows"]}
    eager, ort32 = rows["student fp32 (PyTorch eager)"], rows["student fp32 (onnxruntime)"]
    assert ort32["top1"] == eager["top1"] and ort32["agreement_with_student_fp32"] == 100.0
    # Every onnxruntime fp32 graph was checked against PyTorch, the teachers' too.
    checked = [r for r in record["rows"] if "max_abs_logit_diff_vs_pytorch" in r]
    assert {r["model"] for r in checked} == {n for n in names if "fp32" in n and "onnxruntime" in n} | {
        n for n in names if n.startswith("teacher ") and n.endswith("(onnxruntime)")}
    assert all(r["max_abs_logit_diff_vs_pytorch"] < 1e-3 for r in checked)
    assert rows["student fp32 optimized (onnxruntime)"]["fused"]  # the optimizer's statistics: something fused
    teachers = [r for r in record["rows"] if r["kind"] == "teacher"]
    ensemble = record["rows"][-1]
    # The ensemble takes each teacher at its faster runtime (by batch-64 throughput).
    members = [max((r for r in teachers if r["teacher"] == i), key=lambda r: r["throughput_b64"]) for i in (0, 1)]
    assert ensemble["members"] == [m["model"] for m in members]
    assert ensemble["top1"] == teachers[0]["top1"]  # two copies of one teacher: the mean is that teacher
    assert ensemble["latency_b1_ms"] == pytest.approx(sum(m["latency_b1_ms"] for m in members))
    assert ensemble["parameters"] == 2 * teachers[0]["parameters"]
    assert all(r["latency_b1_ms"] > 0 and r["throughput_b64"] > 0 and r["file_mb"] > 0 for r in record["rows"])
    md = (tmp_path / "c" / "compare.md").read_text()
    assert "| student int8 static (onnxruntime) |" in md and "Most accurate int8" in md and "Fastest onnxruntime fp32" in md
    assert "7-bit weights (reduce_range)" in md
    assert (tmp_path / "c" / "compare.png").stat().st_size > 5000


def test_compare_refuses_a_validation_split_whose_classes_are_in_another_order(trained, tmp_path, capsys):
    """A --set data.* override can point the check at data whose classes are reordered: refused, not scored."""
    shuffled = tmp_path / "digits"
    val = build_dataset(DATA, "val")
    from PIL import Image

    for split in ("train", "test"):
        for c in reversed(range(10)):
            folder = shuffled / split / f"c{9 - c}-{c}"
            folder.mkdir(parents=True)
            Image.fromarray(np.asarray(val.load_image(c))).save(folder / "x.png")
    args = ["compare", trained["student"], "--to", str(tmp_path / "c"), "--threads", "1", "--int8",
            "--set", "data.source=imagefolder", "--set", f"data.root={shuffled}", "--set", "data.image_size=16"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "classes" in err and "same order" in err and "Traceback" not in err


def test_quantize_rejects_an_unknown_mode(tmp_path):
    with pytest.raises(ExportError, match="int8 mode 'int4'"):
        quantize_int8(tmp_path / "a.onnx", tmp_path / "b.onnx", "int4")


def test_pinning_threads_for_a_measurement_leaves_the_callers_count(trained, tmp_path):
    before = torch.get_num_threads()
    predict(trained["student"], [str(_user_folder(tmp_path, 1))], threads=1)
    assert torch.get_num_threads() == before


def test_loading_a_checkpoint_for_inference_uses_its_recorded_preprocessing(trained):
    model, spec, described = load_model_for_inference(trained["student"], threads=1)
    assert described.startswith("PyTorch") and spec == preprocess_spec(json.loads(Path(trained["student"] + ".json").read_text()))


def test_predict_names_and_skips_a_decompression_bomb(exported, tmp_path, capsys):
    folder = _user_folder(tmp_path, 2)
    bomb_png(folder / "huge.png")
    result = predict(exported["folder"], [str(folder)], threads=1)
    assert len(result["predictions"]) == 2
    assert {Path(s["file"]).name for s in result["skipped"]} == {"huge.png", "broken.png"}
    assert "DecompressionBomb" in next(s["error"] for s in result["skipped"] if s["file"].endswith("huge.png"))
    assert main(["predict", exported["folder"], str(folder)]) == 0
    assert "skipped 2 unreadable file(s)" in capsys.readouterr().err


def test_sixteen_bit_images_are_scaled_not_clipped_and_exif_orientation_is_opt_in(tmp_path):
    from PIL import Image

    from libkd.data.datasets import decode_image

    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024).astype(np.uint16)  # 0 .. 64512 of 65535
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    with Image.open(tmp_path / "ramp16.png") as img:
        assert img.mode.startswith("I")  # Pillow opens a 16-bit PNG in an integer mode
    decoded = decode_image(tmp_path / "ramp16.png", None)
    assert decoded.shape == (8, 8, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded[..., 0], np.round(ramp / 65535 * 255).astype(np.uint8))
    assert len(np.unique(decoded)) == 64  # convert("RGB") alone clips all but the first pixel to 255
    # EXIF orientation 6 (rotate 90 degrees clockwise to view): applied only when asked for.
    pixels = np.zeros((4, 8, 3), np.uint8)
    pixels[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    assert decode_image(tmp_path / "phone.jpg", None).shape == (4, 8, 3)
    assert decode_image(tmp_path / "phone.jpg", None, exif_transpose=True).shape == (8, 4, 3)


def test_predict_on_an_image_file_gives_evaluates_logits_for_that_image(exported, trained, tmp_path):
    """The file path (decode, evaluate's transform, the model) and evaluate's own pipeline give the same logits."""
    from libkd.evaluate import val_loader
    from libkd.models import build_from_checkpoint

    folder = _user_folder(tmp_path, 4)
    files = sorted(folder.rglob("img*.png"), key=lambda p: int(p.stem[3:]))
    model, meta = build_from_checkpoint(trained["student"])
    loader, _ = val_loader(DATA, preprocess_spec(meta), batch_size=4)
    images, _ = next(iter(loader))
    with torch.no_grad():
        expected = model.eval()(images[:4]).softmax(-1)
    result = predict(trained["student"], [str(f) for f in files], top_k=10, threads=1)
    assert len(result["predictions"]) == len(expected) == 4
    for row, prediction in zip(expected, result["predictions"]):
        got = torch.zeros(10)
        for entry in prediction["top"]:
            got[entry["index"]] = entry["prob"]
        torch.testing.assert_close(got, row, atol=1e-6, rtol=1e-5)


def test_a_failed_re_export_leaves_the_previous_export_whole_and_in_use(trained, tmp_path, monkeypatch):
    import libkd.deploy.export as deploy

    folder = tmp_path / "ship"
    export_checkpoint(trained["student"], folder, int8="dynamic", threads=1)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real = deploy.export_onnx

    def wrong(model, size, path, opset=18):
        torch.manual_seed(1)
        real(create_model("kdvit_mini_patch4_32", 10, img_size=16, embed_dim=48, depth=2, num_heads=2, num_teachers=1),
             size, path, opset)

    monkeypatch.setattr(deploy, "export_onnx", wrong)
    with pytest.raises(ExportError, match="differ from PyTorch"):
        export_checkpoint(trained["student"], folder, threads=1)  # and without int8: the old int8 file must stay too
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing replaced
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left beside it
    assert predict(str(folder), [str(_user_folder(tmp_path, 1) / "img0.png")], threads=1)["predictions"]
    # A kill inside the swap (the old export moved aside, the new one not yet in its place; a staging folder left by
    # a SIGKILL): the next load or export puts the old export back whole and removes the leftovers.
    (folder.parent / ".ship.staging-999").mkdir()
    (folder.parent / ".ship.staging-999" / "model.onnx").write_bytes(b"half written")
    folder.rename(folder.parent / ".ship.old-998")
    assert predict(str(folder), [str(_user_folder(tmp_path, 1) / "img0.png")], threads=1)["predictions"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    # An export replaces its folder as a whole, so a folder holding anything else is refused, and nothing is lost.
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="holds other files than an export"):
        export_checkpoint(trained["student"], folder, threads=1)
    assert (folder / "notes.txt").read_text() == "mine"


def test_timm_opens_the_exported_student_with_the_onnx_models_logits(exported, trained):
    import timm

    import libkd  # noqa: F401 - what a user imports to register libkd's models in timm

    folder = Path(exported["folder"])
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "kdvit_mini_patch4_32" and config["model_args"]["num_teachers"] == 1
    assert config["pretrained_cfg"]["input_size"] == [3, 16, 16] and config["pretrained_cfg"]["num_classes"] == 10
    assert (folder / "model.safetensors").is_file()
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 16, 16) and list(cfg["mean"]) == pytest.approx(json.loads((folder / "preprocess.json").read_text())["mean"])
    val = build_dataset(DATA, "val")
    pre = json.loads((folder / "preprocess.json").read_text())
    batch = torch.stack([image_transform(pre)(val[i][0]) for i in range(16)])
    with torch.no_grad():
        torch.testing.assert_close(model(batch), OnnxModel(folder / "model.onnx", 1)(batch), atol=1e-4, rtol=1e-4)
    assert exported["validation"]["timm_local_dir_max_abs_logit_diff"] < 1e-5


def test_the_model_card_carries_hugging_face_metadata(exported):
    import yaml

    card = (Path(exported["folder"]) / "MODEL_CARD.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "timm" and "knowledge-distillation" in meta["tags"] and meta["datasets"] == ["digits"]
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    v = exported["validation"]
    assert [m["value"] for m in metrics] == [round(v["top1_onnx"], 2), round(v["top1_int8"], 2)]
    assert meta["base_teachers"][0]["name"] == "resnet18" and meta["base_teachers"][0]["kind"] == "conv"
    assert "# kdvit_mini_patch4_32 (student)" in card


def test_a_limited_validation_sample_spreads_over_every_class(image_folder):
    """An ImageFolder split is sorted by class: --val-images N must not mean its first N images."""
    from libkd.deploy import validation_batches

    root = image_folder(counts=(4, 4, 4))
    data = DataConfig(source="imagefolder", root=str(root.parent), train_split="unused", val_split=root.name)
    spec = {"input_size": 8, "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.25] * 3}
    loader, classes = validation_batches(data, spec, 2, limit=6)
    labels = torch.cat([y for _, y in loader]).tolist()
    assert len(labels) == 6 and sorted(set(labels)) == [0, 1, 2] and classes == ["class0", "class1", "class2"]


def test_a_flip_averaged_teacher_is_mirror_invariant_and_exports_as_one_graph(tmp_path):
    # compare times a student's flip-averaged teachers as they ran for it: both passes in one ONNX graph.
    from libkd.deploy import export_onnx
    from libkd.models import FlipAverage

    torch.manual_seed(0)
    teacher = create_model("resnet18", 4, channels=[8, 16, 32, 64], stem_width=8).eval()
    averaged = FlipAverage(teacher).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(averaged(x), averaged(x.flip(-1)))
        torch.testing.assert_close(averaged(x), 0.5 * (teacher(x) + teacher(x.flip(-1))))
        assert (averaged(x) - teacher(x)).abs().max() > 1e-2  # an untrained net is not mirror-invariant
    export_onnx(averaged, 16, tmp_path / "teacher.onnx")
    with torch.inference_mode():
        torch.testing.assert_close(torch.as_tensor(OnnxModel(tmp_path / "teacher.onnx", 1)(x)), averaged(x), atol=1e-5, rtol=1e-4)
