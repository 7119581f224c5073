"""The four torchvision backbones, their classifier heads, weights and freezing.

``--weights`` is resolved here, without touching the network unless asked to:

* ``auto``: ImageNet weights when torch's hub cache already holds them, else random init;
* ``imagenet``: ImageNet weights from the cache (a clear error when absent);
* ``none``: random init;
* a path: a state dict (or a plantml ``best_model.pth`` checkpoint) from disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv_models

from plantml.errors import UsageError


@dataclass(frozen=True)
class Backbone:
    """How to build one torchvision model and where its classifier head lives."""

    builder: Callable[..., nn.Module]
    weights_enum: str  # attribute of torchvision.models, e.g. "ResNet18_Weights"
    head: str  # the attribute holding the classifier ("fc" or "classifier")

    @property
    def imagenet_weights(self):
        """torchvision's default ImageNet weights entry for this backbone."""
        return getattr(tv_models, self.weights_enum).DEFAULT


BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone(tv_models.resnet18, "ResNet18_Weights", "fc"),
    "resnet50": Backbone(tv_models.resnet50, "ResNet50_Weights", "fc"),
    "efficientnet_b0": Backbone(tv_models.efficientnet_b0, "EfficientNet_B0_Weights", "classifier"),
    "mobilenet_v2": Backbone(tv_models.mobilenet_v2, "MobileNet_V2_Weights", "classifier"),
}

WEIGHT_CHOICES = ("auto", "imagenet", "none")

#: Every backbone shrinks its input 32 times: at this size or less its last feature map is 1x1,
#: where batch norm cannot train on a batch of one image (one value per channel).
SMALLEST_FEATURE_MAP_PX = 32


@dataclass(frozen=True)
class WeightsChoice:
    """The weights a run will really start from: ``kind`` is imagenet, none or path."""

    kind: str
    path: Path | None = None
    note: str = ""  # why ``auto`` chose what it chose, for a warning

    @property
    def label(self) -> str:
        """The value recorded in the ``weights`` param."""
        return str(self.path) if self.kind == "path" else self.kind


def get_backbone(name: str) -> Backbone:
    """The :class:`Backbone` called ``name``, or a :class:`UsageError` listing the choices."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise UsageError(f"backbone {name!r}: choose one of {', '.join(BACKBONES)}") from None


def imagenet_cache_file(backbone: str) -> Path:
    """Where torch's hub cache keeps this backbone's ImageNet weights."""
    url = get_backbone(backbone).imagenet_weights.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def resolve_weights(backbone: str, weights: str) -> WeightsChoice:
    """Turn the ``--weights`` value into what will be loaded, failing fast on the unloadable."""
    get_backbone(backbone)
    if weights == "none":
        return WeightsChoice("none")
    if weights in ("auto", "imagenet"):
        cached = imagenet_cache_file(backbone)
        if cached.is_file():
            return WeightsChoice("imagenet")
        if weights == "auto":
            return WeightsChoice("none", note=f"ImageNet weights for {backbone} are not in {cached.parent}; starting from random weights")
        raise UsageError(
            f"--weights imagenet: {backbone}'s ImageNet weights are not in torch's cache ({cached}) and "
            "plantml does not download them; use --weights none, or --weights PATH to a local state dict"
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UsageError(f"--weights {weights}: not 'auto', 'imagenet', 'none' nor an existing file")
    return WeightsChoice("path", path=path)


def head_module(model: nn.Module, backbone: str) -> nn.Module:
    """The classifier head of ``model``."""
    return getattr(model, get_backbone(backbone).head)


def build_model(backbone: str, num_classes: int, weights: WeightsChoice) -> nn.Module:
    """A torchvision ``backbone`` with its head replaced for ``num_classes``, initialised per ``weights``."""
    spec = get_backbone(backbone)
    model = spec.builder(weights=None)
    if weights.kind == "imagenet":
        _load_cached_imagenet(model, backbone)
    _replace_head(model, spec, num_classes)
    if weights.kind == "path":
        load_state_file(model, weights.path, spec)
    return model


def _load_cached_imagenet(model: nn.Module, backbone: str) -> None:
    """Load the ImageNet weights torch's hub cache holds (never downloading them), or one line naming the file."""
    cached = imagenet_cache_file(backbone)
    try:
        model.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True))
    except Exception as exc:  # torch raises many types for a bad file: truncated, another model's, unreadable
        raise UsageError(f"the ImageNet weights of {backbone} in torch's cache, {cached}: cannot be loaded "
                         f"({exc.__class__.__name__}); remove the file and fetch it again, or use --weights none") from None


def _replace_head(model: nn.Module, spec: Backbone, num_classes: int) -> None:
    if spec.head == "fc":
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:
        last = model.classifier[-1]
        model.classifier[-1] = nn.Linear(last.in_features, num_classes)


def load_state_file(model: nn.Module, path: Path, spec: Backbone) -> None:
    """Load a state dict file into ``model``.

    Accepts a plain state dict or a plantml checkpoint (``{"model_state_dict": ...}``).
    When the head does not match (say ImageNet's 1000 classes), the backbone is loaded
    and the freshly initialised head kept.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise UsageError(f"--weights {path}: cannot be read as a PyTorch state dict ({exc.__class__.__name__})") from None
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]
    if not isinstance(state, dict):
        raise UsageError(f"--weights {path}: does not hold a state dict")
    own = model.state_dict()
    head_prefix = spec.head + "."
    mismatched_head = [k for k, v in state.items() if k.startswith(head_prefix) and k in own and own[k].shape != v.shape]
    if mismatched_head:
        state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (mismatched_head and k.startswith(head_prefix))]
    if missing or result.unexpected_keys:
        raise UsageError(
            f"--weights {path}: does not match {spec.builder.__name__} "
            f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected keys)"
        )


def set_backbone_frozen(model: nn.Module, backbone: str, frozen: bool) -> None:
    """Freeze (or unfreeze) every parameter outside the head; the head always trains."""
    head_params = {id(p) for p in head_module(model, backbone).parameters()}
    for param in model.parameters():
        param.requires_grad = (not frozen) or id(param) in head_params


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(total, trainable)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def image_batch_signature(num_classes: int):
    """The MLflow signature of a classifier: float32 ``(-1, 3, -1, -1)`` images in, ``(-1, num_classes)`` logits out.

    Batch size, height and width are left free, so the registered model (pyfunc, serving)
    accepts a batch of any size at any image size; an inferred signature would fix them
    to the input example's.
    """
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]),
    )
