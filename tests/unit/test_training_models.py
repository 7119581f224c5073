"""Backbones, heads, weights resolution and freezing."""

from __future__ import annotations

import pytest
import torch

from plantml.errors import UsageError
from plantml.training.models import (
    BACKBONES,
    WeightsChoice,
    build_model,
    count_parameters,
    head_module,
    resolve_weights,
    set_backbone_frozen,
)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """A torch hub cache with no checkpoints in it."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_head_is_replaced_for_the_number_of_classes(backbone):
    model = build_model(backbone, 3, WeightsChoice("none")).eval()

    with torch.no_grad():
        out = model(torch.zeros(2, 3, 32, 32))

    assert out.shape == (2, 3)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_freezing_leaves_only_the_head_trainable(backbone):
    model = build_model(backbone, 2, WeightsChoice("none"))
    head = {id(p) for p in head_module(model, backbone).parameters()}

    set_backbone_frozen(model, backbone, frozen=True)
    assert all(p.requires_grad == (id(p) in head) for p in model.parameters())
    total, trainable = count_parameters(model)
    assert trainable == sum(p.numel() for p in head_module(model, backbone).parameters()) < total

    set_backbone_frozen(model, backbone, frozen=False)
    assert all(p.requires_grad for p in model.parameters())


def test_imagenet_without_cached_weights_suggests_none_or_a_file(empty_hub):
    with pytest.raises(UsageError) as info:
        resolve_weights("resnet18", "imagenet")
    message = str(info.value)
    assert "--weights none" in message and "PATH" in message and "\n" not in message


def test_auto_falls_back_to_random_init_with_a_note(empty_hub):
    choice = resolve_weights("resnet18", "auto")

    assert choice.label == "none"
    assert "random" in choice.note


def test_auto_uses_imagenet_weights_found_in_the_cache(empty_hub):
    from torchvision.models import ResNet18_Weights

    model = build_model("resnet18", 1000, WeightsChoice("none"))
    checkpoints = empty_hub / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(model.state_dict(), checkpoints / ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[1])

    choice = resolve_weights("resnet18", "auto")
    loaded = build_model("resnet18", 2, choice)

    assert choice.label == "imagenet"
    assert torch.equal(loaded.conv1.weight, model.conv1.weight)


def test_a_missing_weights_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="nowhere.pth"):
        resolve_weights("resnet18", str(tmp_path / "nowhere.pth"))


def test_a_plantml_checkpoint_loads_as_weights(tmp_path):
    trained = build_model("mobilenet_v2", 2, WeightsChoice("none"))
    path = tmp_path / "best_model.pth"
    torch.save({"model_state_dict": trained.state_dict(), "backbone": "mobilenet_v2"}, path)

    loaded = build_model("mobilenet_v2", 2, resolve_weights("mobilenet_v2", str(path)))

    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))


def test_a_state_dict_with_another_head_loads_the_backbone_only(tmp_path):
    imagenet_like = build_model("resnet18", 1000, WeightsChoice("none"))
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet_like.state_dict(), path)

    loaded = build_model("resnet18", 4, resolve_weights("resnet18", str(path)))

    assert torch.equal(loaded.layer4[1].conv2.weight, imagenet_like.layer4[1].conv2.weight)
    assert loaded.fc.out_features == 4


def test_a_state_dict_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(build_model("mobilenet_v2", 2, WeightsChoice("none")).state_dict(), path)

    with pytest.raises(UsageError, match="does not match"):
        build_model("resnet18", 2, resolve_weights("resnet18", str(path)))


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(UsageError, match="resnet18, resnet50, efficientnet_b0, mobilenet_v2"):
        resolve_weights("vgg16", "none")
