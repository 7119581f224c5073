"""Small real models shared by the registry and serving tests."""

from __future__ import annotations

from pathlib import Path

import torch

#: Pass as ``code_paths=`` when logging a TinyNet: MLflow ships this file with the pickled model,
#: so a process that loads it (a fresh interpreter, ``mlflow models serve``) can import the class.
CODE_PATHS = [str(Path(__file__))]


class TinyNet(torch.nn.Module):
    """A two-class CNN small enough to train and export in a second; takes images of any size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))
