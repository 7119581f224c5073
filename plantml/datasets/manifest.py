"""The manifest of an image set: every file with its size and SHA-256, the class names, one digest.

The digest is computed exactly like the content hash of a scanned local folder
(:func:`content_digest`: each file's relative path and SHA-256, classes in order, files
sorted within a class), so a set pushed to the object store and the folder it came from
carry the same digest, and a run's dataset input names the same data wherever it trained.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path, PurePosixPath
from typing import Any

from plantml.errors import DataError, os_reason
from plantml.text import name_text, safe_text, shown_text

#: Name of the manifest object stored beside a pushed set's files.
MANIFEST_NAME = "plantml-dataset.json"
MANIFEST_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_CHUNK = 1 << 20
#: A set is named after its folder, and a folder's name has at most 255 bytes.
MAX_NAME_LENGTH = 255


def content_digest(files: Iterable[tuple[str, str]]) -> str:
    """SHA-256 over ``(relative POSIX path, SHA-256 hex of the bytes)`` pairs, in the given order."""
    digest = hashlib.sha256()
    for relative, sha256 in files:
        digest.update(relative.encode("utf-8", "surrogateescape") + b"\0")
        digest.update(bytes.fromhex(sha256))
    return digest.hexdigest()


def file_hashes(path: Path) -> tuple[str, str]:
    """(SHA-256, MD5) of a file's bytes, read once: the manifest keeps the first, S3's ETag is the second."""
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    try:
        with open(path, "rb") as src:
            while chunk := src.read(_CHUNK):
                sha256.update(chunk)
                md5.update(chunk)
    except OSError as exc:
        raise DataError(f"image {path}: cannot be read ({os_reason(exc)})") from None
    return sha256.hexdigest(), md5.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """One file of a set: where it sits (``class/name.png``), its size, its hashes."""

    path: str
    size: int
    sha256: str
    md5: str

    @property
    def label(self) -> str:
        """The class the file belongs to (its top folder)."""
        return self.path.split("/", 1)[0]


@dataclass(frozen=True)
class Manifest:
    """An image set as pushed: its name, classes, files and digest."""

    name: str
    classes: tuple[str, ...]
    files: tuple[FileEntry, ...]
    digest: str

    def first_difference(self, other: Manifest) -> str | None:
        """The first file (in path order) that ``other`` lacks, adds or holds with other bytes; None when they hold the same files."""
        mine, theirs = {e.path: e.sha256 for e in self.files}, {e.path: e.sha256 for e in other.files}
        for path in sorted(mine.keys() | theirs.keys()):
            if path not in theirs:
                return f"{path} is missing"
            if path not in mine:
                return f"{path} is not in the manifest"
            if mine[path] != theirs[path]:
                return f"{path} differs from the manifest"
        return None

    @property
    def total_bytes(self) -> int:
        """The size of all files together."""
        return sum(entry.size for entry in self.files)

    def to_json(self) -> str:
        """The manifest as the JSON object stored next to the files."""
        return json.dumps({
            "plantml_dataset": MANIFEST_VERSION, "name": self.name, "classes": list(self.classes), "digest": self.digest,
            "files": [[e.path, e.size, e.sha256, e.md5] for e in self.files],
        }, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> Manifest:
        """Parse a stored manifest; a malformed one, or one whose digest does not match its files, names ``where``."""
        try:
            data: dict[str, Any] = json.loads(text)
            files = tuple(FileEntry(str(p), int(size), str(sha), str(md5)) for p, size, sha, md5 in data["files"])
            manifest = cls(str(data["name"]), tuple(map(str, data["classes"])), files, str(data["digest"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{where}: not a plantml data set manifest ({type(exc).__name__}: {exc})") from None
        if content_digest((e.path, e.sha256) for e in manifest.files) != manifest.digest:
            raise DataError(f"{where}: the manifest's digest does not match its file list (tampered or truncated)")
        _check_name(manifest.name, where)
        _check_files(manifest, where)
        return manifest


def _check_name(name: str, where: str) -> None:
    """Refuse a name no push writes (a push names a set after its folder): every run records it as its dataset
    input, which MLflow refuses empty or over 500 characters, and only once the run exists (left FAILED)."""
    if not name.strip() or len(name) > MAX_NAME_LENGTH or "/" in name or "\0" in name:
        raise DataError(f"{where}: its name {name[:40]!r} is not a folder's name, as a push writes it "
                        f"(empty, over {MAX_NAME_LENGTH} characters, or holding '/' or NUL)")


def _check_files(manifest: Manifest, where: str) -> None:
    """Refuse a file list that no push writes (edited by hand, another tool's): a pull would download it,
    then the scan of the cached folder would never match the manifest, and each training would blame the cache."""
    paths = [entry.path for entry in manifest.files]
    for path in paths:
        _check_relative(path, where)
    seen: set[str] = set()
    for path in paths:
        if path in seen:
            raise DataError(f"{where}: file {path!r} is listed twice")
        seen.add(path)
    if paths != sorted(paths, key=PurePosixPath):  # a scan hashes a folder in this order: the digest would differ
        raise DataError(f"{where}: its files are not in the order a push lists them (by class, then path)")
    classes = tuple(dict.fromkeys(entry.label for entry in manifest.files))
    if manifest.classes != classes:
        raise DataError(f"{where}: its classes ({', '.join(manifest.classes)}) are not its files' class folders "
                        f"({', '.join(classes)})")


def _check_relative(path: str, where: str) -> None:
    parts = path.split("/")
    if path.startswith("/") or ".." in parts or len(parts) < 2 or "" in parts:
        raise DataError(f"{where}: file {path!r} is not inside a class folder of the set")
    if any(part.startswith(".") for part in parts) or PurePosixPath(path).suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(f"{where}: file {path!r} is not an image a push lists (hidden, or not one of "
                        f"{', '.join(IMAGE_EXTENSIONS)})")


def is_image_file(path: Path) -> bool:
    """A file with an image extension, not hidden; a link to nothing is one too, so that reading it names it."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS or path.name.startswith("."):
        return False
    return path.is_file() or (path.is_symlink() and not path.exists())


def loose_files(root: Path) -> list[Path]:
    """The files at the top of an image folder, in no class folder (hidden ones and a pulled set's manifest aside), sorted."""
    try:
        return sorted(p for p in root.iterdir() if not p.name.startswith(".") and p.name != MANIFEST_NAME and not p.is_dir())
    except OSError as exc:
        raise _unreadable_folder(exc) from None


def class_folders(root: Path, left_out: list[Path] | None = None) -> list[tuple[Path, list[Path]]]:
    """The class sub-folders of an image folder (ImageFolder layout), sorted, each with its image
    files (nested ones included), sorted; a folder that is not a set of two classes or more raises.
    ``left_out``, when given, receives the files of the classes that are not images (other extensions;
    hidden files are not counted)."""
    if not root.exists():
        raise DataError(f"data folder {root}: not found")
    if not root.is_dir():
        raise DataError(f"data folder {root}: not a directory")
    try:
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not set_aside_folder(p.name))
    except OSError as exc:
        raise _unreadable_folder(exc) from None
    if len(class_dirs) < 2:
        found = ", ".join(p.name for p in class_dirs) or "none"
        raise DataError(f"data folder {root}: need at least two class sub-folders, found {len(class_dirs)} ({found})"
                        + _one_level_down(class_dirs))
    _refuse_classes_recorded_alike(root, class_dirs)
    _refuse_a_set_split_already(root, class_dirs)
    folders = []
    for class_dir in class_dirs:
        files = _files_under(class_dir)
        folders.append((class_dir, sorted(p for p in files if is_image_file(p))))
        if left_out is not None:
            left_out += sorted(p for p in files if not p.name.startswith(".") and not is_image_file(p))
    return folders


def _one_level_down(class_dirs: list[Path]) -> str:
    """For a lone sub-folder that itself holds two folders or more (``PlantVillage/PlantVillage/<classes>``, as many
    archives unpack), the folder meant; else ""."""
    if len(class_dirs) != 1:
        return ""
    try:
        inner = [p for p in class_dirs[0].iterdir() if p.is_dir() and not set_aside_folder(p.name)]
    except OSError:
        return ""
    return (f"; {class_dirs[0].name} holds {len(inner)} folders: is the set {shown_text(str(class_dirs[0]))}?"
            if len(inner) >= 2 else "")


def _refuse_classes_recorded_alike(root: Path, class_dirs: list[Path]) -> None:
    """Two class folders whose names are recorded as one (a byte that is not UTF-8 is written ``%XX``, so a Latin-1
    ``a\\xff`` and a plain ``a%FF`` are both class ``a%FF``): the model's output columns could not be told apart."""
    seen: dict[str, Path] = {}
    for class_dir in class_dirs:
        recorded = safe_text(name_text(class_dir.name))
        if recorded in seen:
            names = " and ".join(ascii(os.fsencode(folder.name)) for folder in (seen[recorded], class_dir))
            raise DataError(f"data folder {shown_text(str(root))}: class folders {names} would both be recorded as "
                            f"class {shown_text(recorded)!r} (a byte that is not UTF-8 is written %XX); rename one")
        seen[recorded] = class_dir


#: Folder names of a set split before it reached plantml (Kaggle's and torchvision's layouts: train/CLASS, val/CLASS).
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing", "eval", "dev"})


def _refuse_a_set_split_already(root: Path, class_dirs: list[Path]) -> None:
    """``train/healthy``, ``val/healthy``…: taken as it is, the set's classes would be ``train`` and ``val`` (every
    image of a split counted as one class, as torchvision's ``ImageFolder`` would), and the model would learn which
    split a photo came from. Refused in one line when two or more such folders hold class folders of the same names."""
    splits: dict[str, set[str]] = {}
    for folder in class_dirs:
        if folder.name.lower() in SPLIT_NAMES:
            try:
                splits[folder.name] = {p.name for p in folder.iterdir() if p.is_dir() and not set_aside_folder(p.name)}
            except OSError as exc:
                raise _unreadable_folder(exc) from None
    shared = sorted({name for a, b in combinations(splits.values(), 2) for name in a & b})
    if not shared:
        return
    ordered = sorted(splits)
    names, first = ", ".join(ordered), ordered[0]
    raise DataError(f"data folder {shown_text(str(root))}: {names} hold the same class folders ("
                    f"{', '.join(shown_text(name) for name in shared[:5])}{', …' if len(shared) > 5 else ''}): a set split "
                    f"already, whose classes would be {names}; give one split (--data-dir "
                    f"{shown_text(str(root / first))}), or merge them into one folder per class: plantml splits each "
                    "class itself (--val-split, --test-split)")


#: Folders that are no class and hold no image of one: macOS's archive metadata (``._NAME`` twins of each file), which
#: a zip made in the Finder carries and ``unzip`` writes out.
ARCHIVE_METADATA = "__MACOSX"


def set_aside_folder(name: str) -> bool:
    """Whether a folder named ``name`` is left out of a set, and out of the class folders: hidden, or archive metadata."""
    return name.startswith(".") or name == ARCHIVE_METADATA


def _files_under(class_dir: Path) -> list[Path]:
    """Every file under ``class_dir``, hidden folders (``.thumbs/``, ``.Trashes/``: what file managers
    and NAS boxes leave) and ``__MACOSX`` left out; a linked folder is not followed (it could lead back up) but listed as it is,
    so that the set's warnings name it; a folder that cannot be listed raises, naming it, rather than its images
    silently missing from the set."""
    found: list[Path] = []
    for folder, folders, files in os.walk(class_dir, onerror=_raise_unreadable):
        folders[:] = [name for name in folders if not set_aside_folder(name)]
        found += [Path(folder) / name for name in files]
        found += [Path(folder) / name for name in folders if (Path(folder) / name).is_symlink()]
    return found


def _unreadable_folder(exc: OSError) -> DataError:
    return DataError(f"folder {exc.filename}: cannot be read ({os_reason(exc)})")


def _raise_unreadable(exc: OSError) -> None:
    raise _unreadable_folder(exc)


def no_images(class_dir: Path, unreadable: int = 0) -> DataError:
    """The error for a class folder with no image (or only ``unreadable`` ones)."""
    why = f" ({unreadable} unreadable)" if unreadable else ""
    return DataError(f"class folder {class_dir}: no images{why} (extensions: {', '.join(IMAGE_EXTENSIONS)})")


def image_files(root: Path) -> list[tuple[str, Path]]:
    """The set's images as ``(class/relative path, path)``, classes sorted, files sorted in each class."""
    found: list[tuple[str, Path]] = []
    for class_dir, files in class_folders(root):
        if not files:
            raise no_images(class_dir)
        found += [(name_text(p.relative_to(root).as_posix()), p) for p in files]
    return found


def build_manifest(root: str | os.PathLike[str], name: str | None = None, workers: int = 8) -> Manifest:
    """Hash every image of ``root`` (ImageFolder layout), in parallel, into a :class:`Manifest`."""
    root = Path(root).expanduser()
    found = image_files(root)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # hashlib releases the GIL on large buffers
        hashes = list(pool.map(lambda item: file_hashes(item[1]), found))
    files = tuple(FileEntry(rel, path.stat().st_size, sha, md5) for (rel, path), (sha, md5) in zip(found, hashes))
    classes = tuple(dict.fromkeys(entry.label for entry in files))
    return Manifest(name or name_text(root.name), classes, files, content_digest((e.path, e.sha256) for e in files))
