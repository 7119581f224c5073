"""A run's spool: local copies of the files it logs, kept until the server has them.

Each artifact (a file, a folder, a figure, a dict, a text) and each model is written into
``<journal_dir>/spool/<run_id>/<n>/`` before its journal entry is, so the caller may
delete or change its own file at once, and a recovery after a crash still finds it. File
names that are not UTF-8 (a byte Python could not decode) are written with
:func:`~plantml.text.safe_text`, as the object store needs. A copy the disk
refuses raises a one-line :class:`~plantml.tracking.journal_io.JournalWriteError` naming the
folder and its free space, and leaves nothing half-written behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from plantml.errors import PlantmlError, TrackingError, ValidationError, one_line
from plantml.text import quoted, safe_text
from plantml.tracking.journal_io import write_error


class Spool:
    """The spool folder of one run."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._count = 0

    @classmethod
    def of_run(cls, journal_dir: Path, run_id: str) -> Spool:
        """``<journal_dir>/spool/<run_id>``."""
        return cls(journal_dir / "spool" / run_id)

    def copy_file(self, src: Path) -> Path:
        """A copy of the file ``src``, under its own (safe) name."""
        with self._new(src.name) as dest:
            _copy_file(src, dest)
        return dest

    def copy_tree(self, src: Path) -> Path:
        """A copy of the folder ``src``, every name made safe."""
        with self._new("dir") as dest:
            for folder, _, files in os.walk(src):
                target = dest / _safe_relative(Path(folder).relative_to(src))
                target.mkdir(parents=True, exist_ok=True)
                for name in files:
                    _copy_file(Path(folder) / name, target / safe_text(name))
        return dest

    def write(self, name: str, writer: Callable[[Path], None], what: str = "artifact", shown: str | None = None) -> Path:
        """A new file (or folder) ``name``, written by ``writer(path)``; its failure is a one-line
        :class:`TrackingError` naming ``what`` it was, and ``shown`` (the name the user gave) or ``name``."""
        with self._new(name) as dest:
            try:
                writer(dest)
            except (OSError, PlantmlError):
                raise
            except Exception as exc:
                raise TrackingError(f"{what} {shown or name!r}: could not be saved: {one_line(exc)}") from exc
        return dest

    def remove(self) -> None:
        """Delete the whole spool folder of the run."""
        shutil.rmtree(self.folder, ignore_errors=True)

    @contextmanager
    def _new(self, name: str) -> Iterator[Path]:
        """A fresh path ``<folder>/<n>/<name>``; removed again if writing it fails."""
        self._count += 1
        slot = self.folder / f"{self._count:06d}"
        dest = slot / safe_text(name)
        try:
            # owner-only, as the journal (0600): the copies are the run's artifacts and models, whatever the
            # modes of their sources (a log_dict or log_text file is written with the umask's 0644)
            self.folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # spool/, in the journal folder
            self.folder.mkdir(mode=0o700, exist_ok=True)
            slot.mkdir(exist_ok=True)
            yield dest
        except OSError as exc:
            shutil.rmtree(slot, ignore_errors=True)
            raise write_error(self.folder, exc) from None
        except BaseException:
            shutil.rmtree(slot, ignore_errors=True)
            raise


def _copy_file(src: Path, dest: Path) -> None:
    """``shutil.copy2``; a source that is no regular file (a dangling link, a pipe, a socket) is a
    ValidationError naming it, not a spool the disk refused."""
    if not src.is_file():
        raise ValidationError(f"artifact {quoted(str(src))}: not a regular file (a dangling link, a pipe or a device)")
    shutil.copy2(src, dest)


def _safe_relative(path: Path) -> Path:
    return Path(*(safe_text(part) for part in path.parts)) if path.parts else Path()


def figure_writer(fig: Any, name: str) -> Callable[[Path], None]:
    """What saves a matplotlib (``savefig``) or plotly (``write_html``/``write_image``) figure to a path."""
    if hasattr(fig, "savefig"):  # the format named: without one, matplotlib adds ``.png`` to the path it writes
        return lambda path: fig.savefig(path, format=Path(name).suffix[1:] or fig.canvas.get_default_filetype())
    return fig.write_html if name.endswith(".html") else fig.write_image


def dict_text(data: Any, name: str) -> str:
    """``data`` as the artifact ``name`` holds it: YAML for ``.yaml``/``.yml``, JSON otherwise."""
    if name.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_dump(data, default_flow_style=False)
    return json.dumps(data, indent=2)
