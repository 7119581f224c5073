"""Facts about the machine a run trained on: versions, CPU, memory and GPU.

Only hardware and software versions are read. Environment variables, host names, user
names and paths are never collected, so nothing secret can reach the tracking server.
"""

from __future__ import annotations

import os
import platform
from typing import Any


def system_facts() -> dict[str, Any]:
    """Python version, platform, CPU count, total memory, and torch/CUDA/GPU facts where present."""
    facts: dict[str, Any] = {
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_gb": _memory_gb(),
    }
    facts.update(_torch_facts())
    return {key: value for key, value in facts.items() if value is not None}


def _memory_gb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return round(psutil.virtual_memory().total / 1024**3, 2)


def _torch_facts() -> dict[str, Any]:
    try:
        import torch  # imported here: it costs seconds and is optional for this report
    except ImportError:
        return {}
    facts: dict[str, Any] = {"torch_version": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if not facts["cuda_available"]:
        return facts
    properties = torch.cuda.get_device_properties(0)
    facts.update(
        cuda_version=torch.version.cuda,
        cudnn_version=torch.backends.cudnn.version(),
        gpu_count=torch.cuda.device_count(),
        gpu_name=properties.name,
        gpu_memory_gb=round(properties.total_memory / 1024**3, 2),
    )
    return facts
