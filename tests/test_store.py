from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import confident_teachers

from libkd import LibkdError
from libkd.cli import main
from libkd.config import load_config
from libkd.data import build_dataset
from libkd.data.replay import ReplayAugment
from libkd.models import create_model, save_checkpoint
from libkd.store import LogitStore, StoreError, decode, encode, record_dtype
from libkd.store import precompute as precompute_module
from libkd.store.format import store_identity, view_spec
from libkd.store.precompute import load_teachers, precompute, verify_store

DATA = ["data.source=synthetic", "data.synthetic.per_class=12", "data.synthetic.image_size=16"]
STORE = ["store.views=3", "store.shard_size=20", "store.batch_size=8"]
CLASSES = [f"class{c}" for c in range(4)]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> list[str]:
    """Two small untrained teachers (a convolution and an involution net) saved as checkpoints."""
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    specs = [
        ("resnet18", {"channels": [8, 16, 32, 64], "stem_width": 8}, None),
        ("rednet26_cifar", {"base_width": 8, "stem_width": 16}, ([0.5] * 3, [0.25] * 3)),
    ]
    paths = []
    for name, kwargs, norm in specs:
        model = create_model(name, 4, **kwargs).eval()
        arch = {"name": name, "num_classes": 4, "cifar_stem": False, "kwargs": kwargs}
        meta = {"input_size": 16, "dataset": {"classes": CLASSES}}
        if norm:
            meta.update(mean=norm[0], std=norm[1])
        paths.append(str(save_checkpoint(model, root / name, arch, **meta).with_suffix("")))
    return paths


def config(tmp_path: Path, teachers: list[str], *extra: str, name: str = "store"):
    return load_config(None, DATA + STORE + [f"store.path={tmp_path / name}", f"store.teachers=[{', '.join(teachers)}]", *extra])


def store_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in (".npy", ".json")}


# ------------------------------------------------------------------ codec


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 300), st.integers(1, 6), st.floats(0.1, 40), st.integers(0, 2**31 - 1))
def test_fp16_round_trip(num_classes, rows, scale, seed):
    logits = torch.randn(rows, num_classes, generator=torch.Generator().manual_seed(seed)) * scale
    back = decode(encode(logits, "fp16", 0), num_classes)
    assert back.shape == logits.shape
    assert ((back - logits).abs() <= logits.abs() * 2**-11 + 2**-24).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 1000), st.integers(1, 20), st.floats(0.1, 20), st.integers(0, 2**31 - 1))
def test_topk_round_trip(num_classes, k, scale, seed):
    k = min(k, num_classes)
    logits = torch.randn(3, num_classes, generator=torch.Generator().manual_seed(seed)) * scale
    records = encode(logits, "topk", k)
    assert records.dtype == record_dtype("topk", num_classes, k)
    logp = decode(records, num_classes)
    assert torch.allclose(logp.exp().sum(1), torch.ones(3), atol=2e-3)
    true = torch.log_softmax(logits, 1)
    top = true.topk(k, 1)
    assert torch.allclose(logp.gather(1, top.indices), top.values, atol=2e-2, rtol=1e-3)
    # the decoded argmax is the true one up to fp16 rounding of the stored log-probabilities (two classes whose
    # log-probabilities differ by less than that round to one value, and either may come out on top)
    best = true.max(1).values
    picked = true.gather(1, logp.argmax(1, keepdim=True)).squeeze(1)
    assert (best - picked <= best.abs() * 2**-10 + 1e-6).all()


def test_codec_limits():
    with pytest.raises(LibkdError, match="int16"):
        record_dtype("topk", 40000, 5)
    with pytest.raises(LibkdError, match="store.topk"):
        record_dtype("topk", 10, 11)
    assert record_dtype("fp16", 10, 0).itemsize == 20 and record_dtype("topk", 1000, 10).itemsize == 44


# ------------------------------------------------------------------ building and reading


def test_records_are_the_teachers_outputs_on_the_replayed_views(tmp_path, teachers):
    cfg = config(tmp_path, teachers)
    stats = precompute(cfg)
    assert stats["images"] == 48 * 3
    store = LogitStore(cfg.store.path, verify="full")
    dataset = build_dataset(cfg.data, "train", seed=cfg.seed)
    size, mean, std = view_spec(cfg.data, dataset)
    augment = ReplayAugment(dataset, cfg.replay, cfg.seed, size, mean, std)
    loaded = load_teachers(cfg.store.teachers, dataset.classes, torch.device("cpu"))
    indices = np.array([0, 47, 19, 20, 33])
    for view in (0, 2, 4):  # view 4 is view 1 of a 3-view store
        images = torch.stack([augment(int(i), view % 3).image for i in indices])
        stored = store.read(indices, view)
        with torch.inference_mode():
            for t, teacher in enumerate(loaded):
                fresh = teacher.model(teacher.prepare(images, mean, std, size))
                torch.testing.assert_close(stored[t], fresh.half().float(), atol=2e-3, rtol=2e-3)
        (second,) = store.read(indices, view, teachers=[1])  # one teacher's column, as a single-teacher student reads
        assert torch.equal(second, stored[1])
    assert store.nbytes() > 48 * 3 * 2 * 8


def test_topk_store_reads_log_probabilities(tmp_path, teachers):
    cfg = config(tmp_path, teachers, "store.encoding=topk", "store.topk=2")
    precompute(cfg)
    store = LogitStore(cfg.store.path)
    logp = store.read(np.arange(10), 1)[0]
    assert logp.shape == (10, 4)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(10), atol=2e-3, rtol=0)
    assert store.manifest["record_bytes"] == 2 * 2 + 2 * 2 + 4 + 4 * 3  # tails at the default T = 2, 3, 4


def test_verify_passes_then_catches_a_tampered_record(tmp_path, teachers, capsys):
    cfg = config(tmp_path, teachers)
    precompute(cfg)
    assert main(["store", "verify", cfg.store.path, "--samples", "16"]) == 0
    assert "OK" in capsys.readouterr().out
    shard = Path(cfg.store.path) / "shards" / "t1-00001.npy"
    array = np.load(shard)
    array["logits"][:, :] += np.float16(3.0)  # a consistent but wrong shard: checksums re-signed
    np.save(shard, array)
    manifest = json.loads((Path(cfg.store.path) / "manifest.json").read_text())
    with pytest.raises(StoreError, match="fail their checksum"):
        verify_store(cfg.store.path, 16)
    from libkd.fileio import sha256_file

    manifest["shards"][1]["files"]["1"]["sha256"] = sha256_file(shard)
    (Path(cfg.store.path) / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="recomputed records differ"):
        verify_store(cfg.store.path, 48)


def test_a_flip_averaged_store_records_each_teachers_mean_over_the_view_and_its_mirror(tmp_path):
    teachers = confident_teachers(tmp_path, CLASSES)  # the view and its mirror give logits far apart
    cfg = config(tmp_path, teachers, "store.teacher_flip=true", "store.views=2")
    precompute(cfg)
    store = LogitStore(cfg.store.path, expected=_expected(cfg, teachers))
    assert store.manifest["teacher_flip"] is True
    dataset = build_dataset(cfg.data, "train", seed=cfg.seed)
    size, mean, std = view_spec(cfg.data, dataset)
    augment = ReplayAugment(dataset, cfg.replay, cfg.seed, size, mean, std)
    plain = load_teachers(cfg.store.teachers, dataset.classes, torch.device("cpu"))
    indices = np.array([0, 13, 47])
    images = torch.stack([augment(int(i), 1).image for i in indices])
    stored = store.read(indices, 1)
    with torch.inference_mode():
        for t, teacher in enumerate(plain):
            view = teacher.model(teacher.prepare(images, mean, std, size))
            mirror = teacher.model(teacher.prepare(images.flip(-1), mean, std, size))
            scale = view.abs().max().item()
            torch.testing.assert_close(stored[t], 0.5 * (view + mirror), atol=1e-3 * scale, rtol=1e-3)  # fp16 rounding
            assert (stored[t] - view).abs().max() > 20e-3 * scale  # not the plain teacher's record
    assert verify_store(cfg.store.path, 16)["checked_records"] == 32
    # A manifest that claims plain teachers: its probe recomputes unflipped records and finds them different.
    manifest_path = Path(cfg.store.path) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["teacher_flip"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="recomputed records differ from the store"):
        verify_store(cfg.store.path, 16)


def test_stores_without_flip_averaging_keep_their_identity_and_the_studys_folder_name():
    from libkd.config import StoreConfig
    from libkd.study.plan import short_hash

    # A key that did not exist when these stores were built: off, it is absent from the dump (the studies' store
    # folders are named by its hash) and from the identity (compared with older manifests).
    assert "teacher_flip" not in StoreConfig(views=3).model_dump(mode="json")
    assert short_hash(StoreConfig(views=3).model_dump(mode="json")) != short_hash(
        StoreConfig(views=3, teacher_flip=True).model_dump(mode="json"))
    assert StoreConfig(views=3, teacher_flip=True).model_dump(mode="json")["teacher_flip"] is True


def _noisy_recomputation(monkeypatch, relative: float, tamper: float = 0.0):
    """Recompute the probe's records with noise of ``relative`` x the logits' scale (what another reduction order,
    cuDNN algorithm or TF32 gives on a GPU), on the CPU; ``tamper`` moves one class of every record by that much."""
    real = precompute_module.teacher_logits

    def noisy(*args, **kwargs):
        out = []
        for logits in real(*args, **kwargs):
            scale = logits.abs().amax(dim=1, keepdim=True).clamp(min=1.0)
            signs = torch.randint(0, 2, logits.shape, generator=torch.Generator().manual_seed(1)).float() * 2 - 1
            moved = logits + relative * scale * signs
            moved[:, 0] += tamper
            out.append(moved)
        return out

    monkeypatch.setattr(precompute_module, "teacher_logits", noisy)


def _built_on(root: str, device: str | None) -> None:
    path = Path(root) / "manifest.json"
    manifest = json.loads(path.read_text())
    if device is None:
        manifest.pop("built_on")
    else:
        manifest["built_on"] = {"device": device}
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("encoding", ["fp16", "topk"])
def test_probe_tolerance_follows_the_build_device_and_still_catches_a_tamper(tmp_path, teachers, monkeypatch, encoding):
    extra = ["store.encoding=topk", "store.topk=2"] if encoding == "topk" else []
    cfg = config(tmp_path, teachers, *extra)
    precompute(cfg)
    assert json.loads((Path(cfg.store.path) / "manifest.json").read_text())["built_on"] == {"device": "cpu"}
    gpu_noise = 0.75 * precompute_module.DEVICE_NOISE["cuda"]  # GPU-sized, below the CUDA allowance
    _noisy_recomputation(monkeypatch, gpu_noise)
    with pytest.raises(StoreError, match="recomputed records differ"):
        verify_store(cfg.store.path, 16)  # built on the CPU: that much noise is a difference
    _built_on(cfg.store.path, "cuda")
    assert verify_store(cfg.store.path, 16)["max_abs_diff"] > 0  # built on a GPU: the same noise passes
    _built_on(cfg.store.path, None)
    verify_store(cfg.store.path, 16)  # a store that does not say where it was built is given the GPU's allowance
    # A tamper just above the allowance: every record's class 0 moved by 1.5x the largest tolerance it could get.
    scale = 12.0  # above any logit of these untrained teachers (checked below), so the bound holds for every record
    _noisy_recomputation(monkeypatch, 0.0)
    assert verify_store(cfg.store.path, 16)["max_abs_diff"] < 1e-2
    stored = LogitStore(cfg.store.path).records(np.arange(8), 0, 0)["logits" if encoding == "fp16" else "values"]
    assert np.abs(stored.astype(np.float32)).max() < scale
    bound = precompute_module.probe_tolerance(scale, torch.full((4,), scale), precompute_module.DEVICE_NOISE["cuda"])
    _noisy_recomputation(monkeypatch, 0.0, tamper=1.5 * bound)
    with pytest.raises(StoreError, match="recomputed records differ"):
        verify_store(cfg.store.path, 16)


def test_topk_record_error_ignores_a_near_tie_ordered_the_other_way():
    from libkd.store.codec import record_error

    logits = torch.tensor([4.0, 1.0, 1.0 + 1e-4, -2.0, 0.5])
    record = encode(logits[None], "topk", 2, [2.0, 3.0])[0]  # keeps classes 0 and 2
    swapped = logits.clone()
    swapped[1], swapped[2] = 1.0 + 1e-4, 1.0  # the recomputation puts class 1 in the top 2 instead
    diff, _ = record_error(record, swapped, [2.0, 3.0])
    assert diff < 1e-3
    tampered = record.copy()
    tampered["log_rest_tau"] = tampered["log_rest_tau"] + 0.1
    assert record_error(tampered, logits, [2.0, 3.0])[0] > 0.09


def test_store_info_cli(tmp_path, teachers, capsys):
    cfg = config(tmp_path, teachers)
    precompute(cfg)
    assert main(["store", "info", cfg.store.path]) == 0
    out = capsys.readouterr().out
    assert "complete" in out and "rednet26_cifar (inv)" in out and "resnet18 (conv)" in out and "8 bytes" in out


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "change,field",
    [
        (["data.subset=6"], "dataset fingerprint"),
        (["replay.hflip=0.0"], "augmentation sha256"),
        (["seed=1"], "augmentation seed"),
        (["data.image_size=12"], "image_size"),
        (["data.mean=[0.4, 0.4, 0.4]", "data.std=[0.2, 0.2, 0.2]"], "mean"),
        (["store.views=2"], "views"),
        (["store.encoding=topk", "store.topk=2"], "encoding"),
        (["store.teacher_flip=true"], "teacher_flip"),
    ],
)
def test_a_store_built_for_something_else_is_refused(tmp_path, teachers, change, field):
    cfg = config(tmp_path, teachers)
    precompute(cfg)
    other = config(tmp_path, teachers, *change)
    dataset = build_dataset(other.data, "train", seed=other.seed)
    loaded = load_teachers(other.store.teachers, dataset.classes, torch.device("cpu"))
    expected = store_identity(other, dataset, loaded, *view_spec(other.data, dataset))
    with pytest.raises(StoreError, match=f"does not match this run: .*{field}.*Rebuild"):
        LogitStore(cfg.store.path, expected=expected)
    with pytest.raises(StoreError, match=f"built from something else: .*{field}"):
        precompute(other)


def test_a_store_of_other_teachers_names_both_sets(tmp_path, teachers):
    """A teacher added (as when a study gains one) is named with both sets, not as two truncated JSON lists."""
    precompute(config(tmp_path, teachers[:1]))
    with pytest.raises(StoreError, match=r"the store holds 1 teacher \(resnet18 [0-9a-f]{12}\), this run has 2 teachers "
                                         r"\(resnet18 [0-9a-f]{12}, rednet26_cifar [0-9a-f]{12}\).*delete that folder"):
        precompute(config(tmp_path, teachers))


def _expected(cfg, teachers):
    dataset = build_dataset(cfg.data, "train", seed=cfg.seed)
    loaded = load_teachers(teachers, dataset.classes, torch.device("cpu"))
    return store_identity(cfg, dataset, loaded, *view_spec(cfg.data, dataset))


def test_a_store_whose_augmentation_no_longer_replays_is_refused(tmp_path, teachers, monkeypatch):
    cfg = config(tmp_path, teachers)
    precompute(cfg)
    manifest = LogitStore(cfg.store.path).manifest
    assert manifest["versions"]["numpy"] == np.__version__ and len(manifest["replay_probe"]) == 64
    LogitStore(cfg.store.path, expected=_expected(cfg, teachers))  # replays identically here
    real_box = ReplayAugment._random_resized_box

    def drifted_box(self, height, width, rng):  # what another NumPy release might do: a crop one pixel off
        box = real_box(self, height, width, rng)
        return box if box is None or box[2] < 2 else (box[0], box[1], box[2] - 1, box[3])

    monkeypatch.setattr(ReplayAugment, "_random_resized_box", drifted_box)
    with pytest.raises(StoreError, match="replay_probe: the stored augmentation does not replay to the same pixels here"):
        LogitStore(cfg.store.path, expected=_expected(cfg, teachers))
    with pytest.raises(StoreError, match="replay_probe"):
        verify_store(cfg.store.path, samples=2)


def test_every_identity_field_is_required_on_both_sides(tmp_path, teachers):
    cfg = config(tmp_path, teachers)
    precompute(cfg)
    partial = _expected(cfg, teachers)
    del partial["views"]
    with pytest.raises(StoreError, match="views: missing from this run's expected identity"):
        LogitStore(cfg.store.path, expected=partial)
    manifest_path = Path(cfg.store.path) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["replay_probe"]  # a store written before the probe existed
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="replay_probe: missing from the store"):
        LogitStore(cfg.store.path, expected=_expected(cfg, teachers))


def test_other_teacher_weights_are_refused(tmp_path, teachers):
    cfg = config(tmp_path, teachers)
    precompute(cfg)
    retrained = create_model("resnet18", 4, channels=[8, 16, 32, 64], stem_width=8)
    arch = {"name": "resnet18", "num_classes": 4, "cifar_stem": False, "kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}}
    new = str(save_checkpoint(retrained, tmp_path / "retrained", arch, input_size=16, dataset={"classes": CLASSES}).with_suffix(""))
    with pytest.raises(StoreError, match="teacher 0 weights_sha256"):
        precompute(config(tmp_path, [new, teachers[1]]))


def test_teachers_of_other_classes_are_refused(tmp_path, teachers):
    with pytest.raises(LibkdError, match="predicts 4 classes.*data set has 5"):
        precompute(config(tmp_path, teachers, "data.synthetic.num_classes=5"))
    with pytest.raises(LibkdError, match="store.teachers is empty"):
        precompute(load_config(None, DATA + [f"store.path={tmp_path / 'x'}"]))


def test_corrupted_and_truncated_shards_are_named(tmp_path, teachers):
    cfg = config(tmp_path, teachers)
    precompute(cfg)
    shard = Path(cfg.store.path) / "shards" / "t0-00002.npy"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x55
    shard.write_bytes(bytes(data))
    LogitStore(cfg.store.path, verify="size")  # same size: only the checksum can tell
    with pytest.raises(StoreError, match="t0-00002.npy' is corrupted"):
        LogitStore(cfg.store.path, verify="full")
    shard.write_bytes(bytes(data[:-40]))
    with pytest.raises(StoreError, match="t0-00002.npy' is truncated"):
        LogitStore(cfg.store.path)


def test_incomplete_store_is_refused(tmp_path, teachers):
    cfg = config(tmp_path, teachers)
    precompute(cfg)
    manifest = json.loads((Path(cfg.store.path) / "manifest.json").read_text())
    manifest["complete"] = False
    (Path(cfg.store.path) / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="incomplete.*rerun"):
        LogitStore(cfg.store.path)
    with pytest.raises(StoreError, match="no store at"):
        LogitStore(tmp_path / "nowhere")


# ------------------------------------------------------------------ crash safety and distribution


def test_full_disk_keeps_complete_shards_and_resumes(tmp_path, teachers, monkeypatch):
    reference = config(tmp_path, teachers, name="reference")
    precompute(reference)
    cfg = config(tmp_path, teachers)
    real_save = np.save
    calls = {"n": 0}

    def failing_save(fh, array):
        calls["n"] += 1
        if calls["n"] == 3:  # the first teacher's file of the second shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(fh, array)

    monkeypatch.setattr(precompute_module.np, "save", failing_save)
    with pytest.raises(StoreError, match="disk full while writing shard 1.*1 shard\\(s\\) completed before it are intact"):
        precompute(cfg)
    shards = Path(cfg.store.path) / "shards"
    assert (shards / "00000.done.json").is_file() and not (shards / "00001.done.json").exists()
    assert not list(shards.glob("*.tmp"))
    monkeypatch.setattr(precompute_module.np, "save", real_save)
    precompute(cfg)
    assert store_bytes(Path(cfg.store.path)) == store_bytes(Path(reference.store.path))


def _cli_args(cfg_overrides: list[str]) -> list[str]:
    args = []
    for item in cfg_overrides:
        args += ["--set", item]
    return args


def _overrides(store_path: Path, teachers: list[str], *extra: str) -> list[str]:
    return DATA + STORE + [f"store.path={store_path}", f"store.teachers=[{', '.join(teachers)}]", "store.shard_size=8", *extra]


def test_killed_precompute_resumes_to_identical_bytes(tmp_path, teachers):
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "libkd", "precompute", *_cli_args(_overrides(ref, teachers))], check=True, capture_output=True)
    victim_path = tmp_path / "killed"
    victim = subprocess.Popen([sys.executable, "-m", "libkd", "precompute", *_cli_args(_overrides(victim_path, teachers))],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (victim_path / "shards" / "00001.done.json").exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = subprocess.run([sys.executable, "-m", "libkd", "precompute", *_cli_args(_overrides(victim_path, teachers))],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    assert store_bytes(ref) == store_bytes(victim_path)


def test_two_process_torchrun_equals_one_process(tmp_path, teachers):
    """Same bytes at the same pinned thread count, whatever the machine's core count."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run([sys.executable, "-m", "libkd", "precompute", *_cli_args(_overrides(single, teachers, "store.threads=1"))],
                   check=True, capture_output=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    run = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "libkd", "precompute",
                          *_cli_args(_overrides(multi, teachers, "store.threads=1"))], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = store_bytes(single), store_bytes(multi)
    assert len([k for k in a if k.endswith(".npy")]) == 2 * 6
    assert a == b
    assert json.loads(a["manifest.json"])["threads"] == 1


def test_other_thread_count_agrees_within_fp16_rounding(tmp_path, teachers):
    one = config(tmp_path, teachers, "store.threads=1", name="one")
    three = config(tmp_path, teachers, "store.threads=3", name="three")
    threads_before = torch.get_num_threads()
    try:
        precompute(one)
        precompute(three)
    finally:
        torch.set_num_threads(threads_before)
    a, b = LogitStore(one.store.path), LogitStore(three.store.path)
    assert (a.manifest["threads"], b.manifest["threads"]) == (1, 3)
    for view in range(a.views):
        for x, y in zip(a.read(np.arange(a.num_samples), view), b.read(np.arange(b.num_samples), view)):
            assert ((x.float() - y.float()).abs() <= 2 * 2.0**-10 * x.float().abs().clamp(min=1)).all()


def test_mixed_size_folder_end_to_end_through_train_teacher_and_precompute(tmp_path):
    """Images of several sizes and aspect ratios: teacher training, evaluation and the store all work."""
    from conftest import write_image
    from libkd.train_teacher import train_teacher

    root = tmp_path / "mixed"
    sizes = [(20, 16), (24, 30), (18, 18), (40, 22)]
    for split, count in (("train", 6), ("test", 2)):
        for c in range(2):
            for i in range(count):
                write_image(root / split / f"class{c}" / f"{i}.png", sizes[(i + c) % len(sizes)], seed=100 * c + i)
    data = ["data.source=imagefolder", f"data.root={root}", "data.image_size=16"]
    teacher_cfg = load_config(None, data + [f"out={tmp_path / 'teacher'}", "teacher.name=resnet18",
                                            "teacher.kwargs={channels: [8, 8, 8, 8], stem_width: 8}", "train.epochs=1",
                                            "train.batch_size=4", "train.tensorboard=false"])
    stats = train_teacher(teacher_cfg)
    assert 0 <= stats["val_top1"] <= 100
    store_cfg = load_config(None, data + [f"store.path={tmp_path / 'store'}", f"store.teachers=[{tmp_path / 'teacher' / 'teacher'}]",
                                          "store.views=2", "store.batch_size=4"])
    precompute(store_cfg)
    store = LogitStore(store_cfg.store.path, expected=_expected(store_cfg, store_cfg.store.teachers))
    (logits,) = store.read(np.arange(12), 1)
    assert logits.shape == (12, 2) and torch.isfinite(logits).all()


def _many_shard_store(root: Path, shards: int, classes: int = 3) -> Path:
    """A complete fp16 store of one view and ``shards`` one-sample shards per teacher, written directly."""
    from libkd.fileio import sha256_file
    from libkd.store.format import FORMAT, shard_file

    dtype = record_dtype("fp16", classes, 0)
    entries = []
    (root / "shards").mkdir(parents=True)
    for s in range(shards):
        files = {}
        for t in range(2):
            records = encode(torch.full((1, classes), float(s % 1000) + t), "fp16", 0).reshape(1, 1)
            path = shard_file(root, t, s)
            np.save(path, records.astype(dtype))
            files[str(t)] = {"name": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
        entries.append({"index": s, "start": s, "stop": s + 1, "files": files})
    manifest = {"format": FORMAT, "complete": True, "views": 1, "shard_size": 1, "encoding": "fp16", "topk": None,
                "dataset": {"num_samples": shards, "num_classes": classes}, "teachers": [{}, {}], "shards": entries}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_thousands_of_shards_read_within_a_small_descriptor_limit(tmp_path):
    root = _many_shard_store(tmp_path / "big", 2000)
    script = (
        "import resource, numpy as np\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))\n"
        "from libkd.store import LogitStore\n"
        f"store = LogitStore({str(root)!r})\n"
        "for start in range(0, 2000, 100):\n"
        "    a, b = store.read(np.arange(start, start + 100), 0)\n"
        "    assert (a[:, 0] == np.arange(start, start + 100) % 1000).all() and (b == a + 1).all()\n"
        "print('read', len(store._open))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["read", "64"]


class _StoreReader(torch.utils.data.Dataset):
    def __init__(self, store: LogitStore):
        self.store = store

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int):
        return self.store.read(np.array([i]), 0)[0][0]


def test_logit_store_is_cheap_to_pickle_and_works_in_spawned_workers(tmp_path):
    import pickle

    store = LogitStore(_many_shard_store(tmp_path / "s", 40))
    store.read(np.arange(40), 0)  # every shard mapped here
    assert len(pickle.dumps(store)) < 20_000  # manifest and paths only
    loader = torch.utils.data.DataLoader(_StoreReader(store), batch_size=8, num_workers=1, multiprocessing_context="spawn")
    rows = torch.cat(list(loader))
    assert torch.equal(rows[:, 0], torch.arange(40, dtype=rows.dtype))


def test_topk_tails_are_exact_at_every_stored_temperature():
    """Decoding at T keeps the top-k part and the tail's total of the tempered distribution exact (only the split of
    the tail among its classes is lost); spreading the T=1 tail evenly and then tempering inflates it."""
    num_classes, k, taus = 100, 10, [2.0, 3.0, 4.0]
    logits = torch.randn(64, num_classes, generator=torch.Generator().manual_seed(0)) * 3
    records = encode(logits, "topk", k, taus)
    assert records.dtype.itemsize == record_dtype("topk", num_classes, k).itemsize + 4 * len(taus)
    top = logits.topk(k, 1).indices
    for tau in (1.0, *taus):
        full = torch.softmax(logits / tau, 1)
        exact = torch.softmax(decode(records, num_classes, tau, taus) / tau, 1)
        spread = torch.softmax(decode(records[["values", "indices", "log_rest"]], num_classes) / tau, 1)  # no tails kept
        torch.testing.assert_close(exact.gather(1, top), full.gather(1, top), atol=2e-3, rtol=2e-3)  # fp16 values
        torch.testing.assert_close(exact.sum(1), torch.ones(64))
        kl_exact = (full * (full.log() - exact.log())).sum(1).mean().item()
        kl_spread = (full * (full.log() - spread.log())).sum(1).mean().item()
        tail = full.sum(1) - full.gather(1, top).sum(1)
        torch.testing.assert_close(exact.sum(1) - exact.gather(1, top).sum(1), tail, atol=2e-3, rtol=2e-3)
        if tau > 1:  # the even T=1 spread, tempered, inflates the tail and is further from the truth
            assert (spread.sum(1) - spread.gather(1, top).sum(1) - tail).min() > 0.01
            assert kl_exact < 0.95 * kl_spread, (tau, kl_exact, kl_spread)
    with pytest.raises(LibkdError, match=r"not at distill.tau=2.5.*store.topk_taus"):
        decode(records, num_classes, 2.5, taus)


def test_topk_store_keeps_tempered_tails_and_verifies_them(tmp_path, teachers, capsys):
    cfg = config(tmp_path, teachers, "store.encoding=topk", "store.topk=2", "store.topk_taus=[3.0]")
    precompute(cfg)
    store = LogitStore(cfg.store.path)
    assert store.taus == [3.0] and store.manifest["record_bytes"] == 2 * 2 + 2 * 2 + 4 + 4
    at3 = store.read(np.arange(10), 1, tau=3.0)[0]
    torch.testing.assert_close(torch.softmax(at3 / 3, 1).sum(1), torch.ones(10))
    assert verify_store(cfg.store.path, 8)["checked_records"] == 16
    assert main(["store", "info", cfg.store.path]) == 0
    assert "encoding     topk k=2, tails at T = 3: 16 bytes" in capsys.readouterr().out
    # A store with other tails is another store: the run that expects them is refused by name.
    other = config(tmp_path, teachers, "store.encoding=topk", "store.topk=2", "store.topk_taus=[2.0]")
    with pytest.raises(StoreError, match="topk_taus"):
        precompute(other)


def count_teacher_images(monkeypatch) -> list[int]:
    """The sizes of the batches precompute runs its teachers on from now on (appended as they run)."""
    seen: list[int] = []
    original = precompute_module.teacher_logits

    def counting(ts, images, *args):
        seen.append(len(images))
        return original(ts, images, *args)

    monkeypatch.setattr(precompute_module, "teacher_logits", counting)
    return seen


def test_a_store_grows_to_more_views_computing_only_the_new_ones_with_the_bytes_of_a_fresh_build(tmp_path, teachers, monkeypatch):
    precompute(config(tmp_path, teachers, "store.views=2", name="small"))
    precompute(config(tmp_path, teachers, "store.views=5", name="fresh"))
    seen = count_teacher_images(monkeypatch)
    precompute(config(tmp_path, teachers, "store.views=5", f"store.grow_from={tmp_path / 'small'}", name="grown"))
    assert sum(seen) == 48 * 3  # 48 samples x the 3 new views; the source's 2 views are copied, not recomputed
    grown, fresh = store_bytes(tmp_path / "grown"), store_bytes(tmp_path / "fresh")
    assert {k: v for k, v in grown.items() if k.endswith(".npy")} == {k: v for k, v in fresh.items() if k.endswith(".npy")}
    manifest = json.loads((tmp_path / "grown" / "manifest.json").read_text())
    assert manifest["views"] == 5 and manifest["grown_from"] == {"path": str(tmp_path / "small"), "views": 2}
    assert manifest["replay_probe"] == json.loads((tmp_path / "fresh" / "manifest.json").read_text())["replay_probe"]
    assert verify_store(tmp_path / "grown", samples=8)["max_abs_diff"] < 1e-2
    # A growth killed before its last shard resumes from the same source with the same command (no grow_from needed
    # then): it computes only that shard's new views and ends with the same bytes.
    (tmp_path / "grown" / "shards" / "00002.done.json").unlink()
    (tmp_path / "grown" / "shards" / "t0-00002.npy").unlink()
    manifest["complete"] = False
    (tmp_path / "grown" / "manifest.json").write_text(json.dumps(manifest))
    seen.clear()
    precompute(config(tmp_path, teachers, "store.views=5", name="grown"))
    assert sum(seen) == 8 * 3  # the last shard's 8 samples x the 3 new views
    assert {k: v for k, v in store_bytes(tmp_path / "grown").items() if k.endswith(".npy")} == \
        {k: v for k, v in fresh.items() if k.endswith(".npy")}


def test_a_store_of_fewer_views_is_copied_from_a_larger_one_without_running_a_teacher(tmp_path, teachers, monkeypatch):
    """store.grow_from may name a store of more views: its first V views are the records, byte for byte those of a
    store built with V views (view v of sample i is seeded by (seed, i, v)), and no teacher runs."""
    precompute(config(tmp_path, teachers, "store.views=5", name="large"))
    precompute(config(tmp_path, teachers, "store.views=2", name="fresh"))
    seen = count_teacher_images(monkeypatch)
    precompute(config(tmp_path, teachers, "store.views=2", f"store.grow_from={tmp_path / 'large'}", name="copied"))
    assert seen == []
    copied, fresh = store_bytes(tmp_path / "copied"), store_bytes(tmp_path / "fresh")
    assert {k: v for k, v in copied.items() if k.endswith(".npy")} == {k: v for k, v in fresh.items() if k.endswith(".npy")}
    manifest = json.loads((tmp_path / "copied" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["views"] == 2
    assert manifest["grown_from"] == {"path": str(tmp_path / "large"), "views": 5}
    assert manifest["replay_probe"] == json.loads((tmp_path / "fresh" / "manifest.json").read_text())["replay_probe"]
    assert verify_store(tmp_path / "copied", samples=8)["max_abs_diff"] < 1e-2
    assert LogitStore(tmp_path / "copied").views == 2


def test_growing_from_a_store_of_another_recipe_or_as_many_views_is_refused_by_name(tmp_path, teachers):
    precompute(config(tmp_path, teachers, "store.views=2", name="small"))
    with pytest.raises(StoreError, match=r"augmentation sha256"):
        precompute(config(tmp_path, teachers, "store.views=4", "replay.hflip=0.0", f"store.grow_from={tmp_path / 'small'}",
                          name="other"))
    with pytest.raises(StoreError, match=r"already has the 2 views"):
        precompute(config(tmp_path, teachers, "store.views=2", f"store.grow_from={tmp_path / 'small'}", name="same"))
    with pytest.raises(StoreError, match=r"no store at"):
        precompute(config(tmp_path, teachers, "store.views=4", f"store.grow_from={tmp_path / 'missing'}", name="none"))
    assert not (tmp_path / "other" / "manifest.json").exists()  # nothing half-made is left to resume by mistake


def test_a_store_of_the_last_views_holds_the_full_stores_records_for_them_and_refuses_the_others(tmp_path, teachers,
                                                                                                   monkeypatch, capsys):
    """store.first_view=k computes views k..V-1 only, each record the full store's bytes; the manifest and replay probe
    still describe all V views (a run's identity is the same), and a read, a resume or a growth that needs another view
    is refused by name."""
    precompute(config(tmp_path, teachers, "store.views=5", name="full"))
    seen = count_teacher_images(monkeypatch)
    precompute(config(tmp_path, teachers, "store.views=5", "store.first_view=3", name="last"))
    assert sum(seen) == 48 * 2  # 48 samples x views 3 and 4
    full, last = LogitStore(tmp_path / "full"), LogitStore(tmp_path / "last")
    for view in (3, 4, 8):  # 8 mod 5 = 3
        for t in range(2):
            assert last.records(np.arange(48), view, t).tobytes() == full.records(np.arange(48), view, t).tobytes()
    m_full, m_last = (json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("full", "last"))
    assert m_last["first_view"] == 3 and m_last["views"] == 5 and m_last["replay_probe"] == m_full["replay_probe"]
    with pytest.raises(StoreError, match=r"holds views 3\.\.4 only \(store.first_view=3.*not view 2; build it with store.first_view=2"):
        last.records(np.arange(4), 7, 0)
    assert verify_store(tmp_path / "last", samples=8)["max_abs_diff"] < 1e-2  # samples only the views it holds
    assert main(["store", "info", str(tmp_path / "last")]) == 0
    assert "5 per sample (holds views 3..4 only)" in capsys.readouterr().out
    with pytest.raises(StoreError, match=r"holds a store of views 3\.\.4 and this build asks for views 1\.\.4"):
        precompute(config(tmp_path, teachers, "store.views=5", "store.first_view=1", name="last"))
    with pytest.raises(StoreError, match=r"holds views 3\.\.4 only; grow a store that holds every view"):
        precompute(config(tmp_path, teachers, "store.views=6", f"store.grow_from={tmp_path / 'last'}", name="grown"))
    with pytest.raises(LibkdError, match=r"store.first_view=5 leaves no view of the 5"):
        config(tmp_path, teachers, "store.views=5", "store.first_view=5")


def test_a_store_of_a_window_of_views_holds_the_full_stores_records_for_them_and_refuses_the_others(
        tmp_path, teachers, monkeypatch, capsys):
    """store.first_view=k with store.stop_view=s computes views k..s-1 only, each record the full store's bytes (the
    manifest and probe describe all V views); a read, a build of another window or a growth outside it is refused by
    name, and the window must hold a view."""
    precompute(config(tmp_path, teachers, "store.views=5", name="full"))
    seen = count_teacher_images(monkeypatch)
    precompute(config(tmp_path, teachers, "store.views=5", "store.first_view=1", "store.stop_view=3", name="window"))
    assert sum(seen) == 48 * 2  # 48 samples x views 1 and 2
    full, window = LogitStore(tmp_path / "full"), LogitStore(tmp_path / "window")
    for view in (1, 2, 6):  # 6 mod 5 = 1
        for t in range(2):
            assert window.records(np.arange(48), view, t).tobytes() == full.records(np.arange(48), view, t).tobytes()
    manifest = json.loads((tmp_path / "window" / "manifest.json").read_text())
    assert (manifest["first_view"], manifest["stop_view"], manifest["views"]) == (1, 3, 5)
    assert [window.holds(v) for v in range(5)] == [False, True, True, False, False]
    with pytest.raises(StoreError, match=r"holds views 1\.\.2 only \(store.first_view=1, store.stop_view=3, .*not view 3; "
                                         r"build it with store.stop_view above 3"):
        window.records(np.arange(4), 3, 0)
    with pytest.raises(StoreError, match=r"not view 0; build it with store.first_view=0"):
        window.records(np.arange(4), 0, 0)
    assert verify_store(tmp_path / "window", samples=8)["max_abs_diff"] < 1e-2  # samples only the views it holds
    assert main(["store", "info", str(tmp_path / "window")]) == 0
    assert "5 per sample (holds views 1..2 only)" in capsys.readouterr().out
    with pytest.raises(StoreError, match=r"holds a store of views 1\.\.2 and this build asks for views 1\.\.3 .*set "
                                         r"store.first_view=1 and store.stop_view=3 to finish it"):
        precompute(config(tmp_path, teachers, "store.views=5", "store.first_view=1", "store.stop_view=4", name="window"))
    with pytest.raises(StoreError, match=r"holds views 1\.\.2 only; grow a store that holds every view"):
        precompute(config(tmp_path, teachers, "store.views=6", f"store.grow_from={tmp_path / 'window'}", name="grown"))
    with pytest.raises(StoreError, match=r"with a window of views"):
        precompute(config(tmp_path, teachers, "store.views=6", "store.stop_view=2", f"store.grow_from={tmp_path / 'full'}",
                          name="grown"))
    for bad in ("store.stop_view=1", "store.stop_view=6"):  # at or below first_view 1; beyond the 5 views
        with pytest.raises(LibkdError, match=r"store.stop_view=\d must be above store.first_view=1 and at most the 5 views"):
            config(tmp_path, teachers, "store.views=5", "store.first_view=1", bad)


def test_a_store_built_with_compiled_teachers_agrees_with_the_eager_build_within_fp16_rounding(tmp_path, teachers):
    """store.compile runs the teachers through torch.compile, one shape (the short last batch is padded)."""
    precompute(config(tmp_path, teachers[:1], name="eager"))
    precompute(config(tmp_path, teachers[:1], "store.compile=true", name="compiled"))
    eager, compiled = LogitStore(tmp_path / "eager"), LogitStore(tmp_path / "compiled")
    assert compiled.manifest["compiled"] is True and eager.manifest["compiled"] is False
    assert identity_fields(compiled.manifest) == identity_fields(eager.manifest)  # the same store, for every run
    everyone = np.arange(eager.num_samples)  # 48 samples, batches of 8: the compiled teacher saw one shape only
    for view in range(eager.views):
        a, b = eager.read(everyone, view)[0], compiled.read(everyone, view)[0]
        torch.testing.assert_close(b, a, atol=4 * 2.0**-10 * max(1.0, a.abs().max().item()), rtol=0)
    assert verify_store(tmp_path / "compiled", samples=8)["max_abs_diff"] < 1e-2


def identity_fields(manifest: dict) -> dict:
    from libkd.store.format import IDENTITY_FIELDS

    return {k: manifest[k] for k in IDENTITY_FIELDS}


def test_a_store_build_in_a_log_reports_progress_between_shards(tmp_path, teachers, monkeypatch, capsys):
    """Off a terminal the bar is off; a long shard still prints a progress line at least every LOG_EVERY_S."""
    import libkd.store.precompute as module

    monkeypatch.setattr(module, "LOG_EVERY_S", 0.0)  # a line after every batch
    precompute(config(tmp_path, teachers, "store.batch_size=16", "store.shard_size=1000"))  # one shard of 48 images
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("precompute:")]
    progress = [x for x in lines if "shards written" in x]
    assert len(progress) == 48 * 3 // 16 and progress[0].startswith("precompute: 16 of 144 views,")
    assert progress[-2].endswith("0/1 shards written") and progress[-1].endswith("1/1 shards written")
    assert sum("shard 1/1 written" in x for x in lines) == 1
