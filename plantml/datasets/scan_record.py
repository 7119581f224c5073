"""What the last scan of an image folder found, so that the next one reads only the files changed since.

Before a training, :func:`plantml.training.data.scan_image_folder` reads, decodes and hashes every image of
its folder: about 0.5 ms a JPEG and 2 ms a PNG of 256 px on one core here, so a set of 50,000 photos costs
half a minute or more at every start. What it found for each image that decoded whole, the SHA-256 of its
bytes, is kept here under the file's stat (device, inode, size, modification and change times to the
nanosecond), as git's index and DVC keep theirs: a file written, replaced, renamed over, touched or
chmod-ed since has another change time, which no user can set back, and is read again. A file changed within
the clock tick of its scan could keep its stat through a second change, so one changed less than
:data:`SETTLE_NS` before the scan is not recorded (git's "racily clean" files). What a stat cannot see (bytes
rotting on a failing disk) ``plantml data inspect`` sees: it reads every file and renews the record.

One file per folder (named by its resolved path's hash) in ``$PLANTML_CACHE_DIR/scans``, written whole,
owner-only, and renamed into place; one that no scan used for 30 days is removed. A record that cannot be read, is damaged, of another format or folder, or
that another user could have written is ignored (every file is read); one that cannot be written is not
written. Neither stops a scan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat as stat_mod
import time
from pathlib import Path
from typing import Literal

from plantml.errors import PlantmlError
from plantml.settings import cache_dir
from plantml.stack.files import write_private

logger = logging.getLogger(__name__)

#: The layout of a record; a record of another is ignored.
FORMAT = 1
#: Where the records are, in plantml's cache folder.
FOLDER = "scans"
#: A file changed this recently before the scan (ns) is read again next time rather than recorded.
SETTLE_NS = 2_000_000_000
#: A record no scan used for this many days is removed.
UNUSED_DAYS = 30

#: A file's stat as recorded: device, inode, size, modification and change times (ns).
Stat = tuple[int, int, int, int, int]


def file_stat(path: Path) -> Stat | None:
    """``path``'s stat (its target's, for a link), or None when it cannot be had (the read then says why)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ScanRecord:
    """The SHA-256 of each image a folder's last scan read, by relative path and stat; and what this scan finds.

    ``mode``: ``use`` trusts the last scan's digests and records this one; ``renew`` records this one only (every
    file is read); ``off`` neither reads nor writes a record.
    """

    def __init__(self, root: Path, mode: Literal["off", "use", "renew"], *, folder: Path | None = None) -> None:
        self._folder_name = os.fsdecode(os.path.realpath(root))
        self._path: Path | None = None
        if mode != "off":
            try:
                folder = folder or cache_dir() / FOLDER
                self._path = folder / f"{hashlib.sha256(os.fsencode(self._folder_name)).hexdigest()[:32]}.json"
            except PlantmlError as exc:  # no home for the cache folder: nothing is recorded, nothing stops
                logger.debug("no scan record: %s", exc)
        self._known = _load(self._path, self._folder_name) if mode == "use" and self._path else {}
        self._found: dict[str, list] = {}
        self._settled_before = time.time_ns() - SETTLE_NS
        self.reused = 0

    def digest(self, relative: str, stat: Stat | None) -> bytes | None:
        """The recorded digest of the image at ``relative`` (a path under the folder) if its stat is the same."""
        entry = self._known.get(relative)
        if stat is None or entry is None or tuple(entry[:5]) != stat:
            return None
        self._found[relative] = entry
        self.reused += 1
        return bytes.fromhex(entry[5])

    def found(self, relative: str, stat: Stat | None, digest: bytes) -> None:
        """Record that the image at ``relative``, of ``stat`` when it was read, decoded whole and hashed to ``digest``."""
        if self._path is not None and stat is not None and max(stat[3], stat[4]) < self._settled_before:
            self._found[relative] = [*stat, digest.hex()]

    def save(self) -> None:
        """Write what this scan found (the files gone since are dropped), or mark the record used when it is the same;
        then remove the records no scan used for :data:`UNUSED_DAYS` (folders moved or deleted since)."""
        if self._path is None:
            return
        try:
            if self._found == self._known:
                os.utime(self._path)
            else:
                content = json.dumps({"format": FORMAT, "folder": self._folder_name, "files": self._found},
                                     separators=(",", ":"))
                self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                write_private(self._path, content)
        except OSError as exc:  # a full disk, a read-only cache: the next scan reads everything again
            logger.debug("scan record %s not written: %s", self._path, exc)
        _remove_unused(self._path.parent)


def _remove_unused(folder: Path) -> None:
    """Remove the records (and the halves of records a killed writer left) unused for :data:`UNUSED_DAYS`."""
    oldest = time.time() - UNUSED_DAYS * 86400
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith((".json", ".tmp")) and entry.stat(follow_symlinks=False).st_mtime < oldest:
                    os.unlink(entry.path)
    except OSError as exc:
        logger.debug("scan records in %s not swept: %s", folder, exc)


def _load(path: Path, folder_name: str) -> dict[str, list]:
    """The files of the record at ``path`` for ``folder_name``; {} for a record missing, damaged or not ours alone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return {}
    try:
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(handle.fileno())
            if not stat_mod.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
                logger.debug("scan record %s ignored: another user could have written it", path)
                return {}
            record = json.loads(handle.read())
        files = record["files"]
        if record["format"] != FORMAT or record["folder"] != folder_name or not isinstance(files, dict):
            return {}
        for entry in files.values():
            if not (isinstance(entry, list) and len(entry) == 6 and all(type(n) is int for n in entry[:5])
                    and isinstance(entry[5], str) and len(entry[5]) == 64):
                return {}
            bytes.fromhex(entry[5])
        return files
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as exc:  # cut short, garbage, not UTF-8
        logger.debug("scan record %s ignored: %s", path, exc)
        return {}
