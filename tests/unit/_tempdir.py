"""What plantml left in a test's own temporary folder (see the ``killed_leftover`` fixture)."""

from __future__ import annotations

from pathlib import Path


def left_in(temp: Path) -> list[str]:
    """The names in ``temp``, less torch's compile cache folder (``torchinductor_USER``, empty), which torch makes there
    the first time a process imports its compiler, whatever test that is, and keeps."""
    return sorted(path.name for path in temp.iterdir() if not path.name.startswith("torchinductor_"))
