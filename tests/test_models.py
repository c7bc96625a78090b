from __future__ import annotations

import json

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled

from libkd.models import (
    CheckpointError,
    ModelError,
    build_from_checkpoint,
    count_parameters,
    create_model,
    load_weights,
    save_checkpoint,
    teacher_kind,
)


@pytest.mark.parametrize("name,millions", [("rednet26", 9.2), ("rednet50", 15.5), ("rednet101", 25.7)])
def test_rednet_parameter_counts_match_the_paper(name, millions):
    model = create_model(name, 1000)
    assert count_parameters(model) / 1e6 == pytest.approx(millions, abs=0.06)


def test_rednet_shapes_224_and_cifar():
    model = create_model("rednet26", 10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)
        assert model.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 2048, 7, 7)
    small = create_model("rednet26", 10, cifar_stem=True, base_width=16).eval()
    with torch.no_grad():
        assert small.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 512, 4, 4)
    assert teacher_kind(small) == "inv"


def test_rednet_pretrained_says_what_to_do():
    with pytest.raises(ModelError, match="train-teacher"):
        create_model("rednet26", 10, pretrained=True)


def test_timm_cnn_with_cifar_stem():
    model = create_model("resnet18", 10, cifar_stem=True, channels=(16, 32, 64, 128), stem_width=16).eval()
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3)
    with torch.no_grad():
        assert model.forward_features(torch.randn(2, 3, 32, 32)).shape[-2:] == (4, 4)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert teacher_kind(model) == "conv"


def test_unknown_model_name_suggests():
    with pytest.raises(ModelError, match="did you mean.*rednet26"):
        create_model("rednet62", 10)
    with pytest.raises(ModelError, match="does not take"):
        create_model("rednet26", 10, wings=2)


@pytest.mark.parametrize("teachers", [0, 1, 2, 3])
def test_student_has_one_token_and_head_per_teacher(teachers):
    model = create_model("kdvit_mini_patch4_32", 10, num_teachers=teachers, depth=2).eval()
    assert model.pos_embed.shape[1] == 1 + teachers + 64
    assert model.dist_tokens.shape[1] == teachers and len(model.heads_dist) == teachers
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        heads = model.forward_heads(x)
        assert len(heads) == 1 + teachers and all(h.shape == (2, 10) for h in heads)
        torch.testing.assert_close(model(x), torch.stack(heads).mean(0))
        torch.testing.assert_close(model.combine(heads, "cls"), heads[0])
        if teachers:
            torch.testing.assert_close(model.combine(heads, "teachers"), torch.stack(heads[1:]).mean(0))
            assert not torch.allclose(heads[0], heads[1])


def test_student_with_one_teacher_equals_timm_distilled_vit():
    torch.manual_seed(0)
    ours = create_model("kdvit_mini_patch4_32", 10, num_teachers=1, depth=3).eval()
    timm_vit = VisionTransformerDistilled(img_size=32, patch_size=4, embed_dim=192, depth=3, num_heads=3, num_classes=10).eval()
    renamed = {k.replace("dist_tokens", "dist_token").replace("heads_dist.0", "head_dist"): v for k, v in ours.state_dict().items()}
    timm_vit.load_state_dict(renamed, strict=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), timm_vit(x))
        timm_vit.set_distilled_training(True)
        timm_vit.train()
        ours.train()
        # dropout is off, so train-mode heads must match too
        cls, dist = timm_vit(x)
        heads = ours.forward_heads(x)
        torch.testing.assert_close(heads[0], cls)
        torch.testing.assert_close(heads[1], dist)


def test_aligned_stem_builds_one_stem_per_teacher_kind():
    model = create_model("kdvit_mini_patch4_32", 10, num_teachers=2, teacher_kinds=["conv", "inv"], stem="aligned", depth=1)
    assert len(model.token_stems) == 2
    assert teacher_kind(model.token_stems[1]) == "inv" and teacher_kind(model.token_stems[0]) == "conv"
    heads = model.forward_heads(torch.randn(2, 3, 32, 32))
    assert len(heads) == 3
    heads[1].sum().backward()
    assert model.token_stems[0].body[0].weight.grad is not None
    with pytest.raises(ModelError, match="teacher_kinds"):
        create_model("kdvit_mini_patch4_32", 10, num_teachers=2, stem="aligned")


ARCH = {"name": "resnet18", "num_classes": 4, "cifar_stem": True, "kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}}


def _small_resnet():
    return create_model(ARCH["name"], ARCH["num_classes"], cifar_stem=True, **ARCH["kwargs"]).eval()


def test_checkpoint_round_trip(tmp_path):
    model = _small_resnet()
    path = save_checkpoint(model, tmp_path / "t", ARCH, input_size=32, mean=[0.5] * 3, std=[0.25] * 3,
                           dataset={"fingerprint": "abc"}, metrics={"val_top1": 12.5})
    assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
    rebuilt, meta = build_from_checkpoint(tmp_path / "t.json")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model(x))
    assert meta["input_size"] == 32 and meta["dataset"]["fingerprint"] == "abc" and meta["metrics"]["val_top1"] == 12.5
    assert len(meta["weights_sha256"]) == 64 and meta["libkd_version"]


def test_wrong_checkpoint_errors(tmp_path):
    save_checkpoint(_small_resnet(), tmp_path / "t", ARCH)
    other = create_model("rednet26_cifar", 4, base_width=16)
    with pytest.raises(CheckpointError, match="holds resnet18 with 4 classes.*rednet26_cifar"):
        load_weights(other, tmp_path / "t", {"name": "rednet26_cifar", "num_classes": 4})
    more_classes = create_model("resnet18", 7, cifar_stem=True, **ARCH["kwargs"])
    with pytest.raises(CheckpointError, match="4 classes.*7 classes"):
        load_weights(more_classes, tmp_path / "t", {**ARCH, "num_classes": 7})
    wider = create_model("resnet18", 4, cifar_stem=True, channels=[16, 32, 64, 128], stem_width=8)
    with pytest.raises(CheckpointError, match="does not fit this model.*shape"):
        load_weights(wider, tmp_path / "t", ARCH)


def test_damaged_or_incomplete_checkpoint(tmp_path):
    save_checkpoint(_small_resnet(), tmp_path / "t", ARCH)
    weights = tmp_path / "t.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        build_from_checkpoint(weights)
    (tmp_path / "t.json").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        build_from_checkpoint(weights)
    (tmp_path / "u.json").write_text(json.dumps({"format": "other"}))
    (tmp_path / "u.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a libkd-checkpoint/1 file"):
        build_from_checkpoint(tmp_path / "u")
