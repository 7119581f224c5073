"""Image-folder data: scan and validate, split (seeded, stratified), transform, load.

The folder has one sub-folder per class (torchvision's ``ImageFolder`` layout). Every
check runs in :func:`scan_image_folder`, before any tracking run exists, and raises
:class:`plantml.errors.DataError` with the offending path.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from plantml.datasets.manifest import IMAGE_EXTENSIONS, class_folders, loose_files, no_images
from plantml.datasets.scan_record import ScanRecord, file_stat
from plantml.errors import DataError, UsageError, os_reason
from plantml.text import name_text, safe_text, shown_text
from plantml.training.distributed import Ranks

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageFolderScan:
    """A validated image folder: class names, labelled files and a content hash."""

    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[Path, int], ...]
    content_hash: str
    skipped: tuple[Path, ...] = ()
    #: Images not read again: unchanged since the folder's last recorded scan.
    unchanged: int = 0

    @property
    def name(self) -> str:
        """The data set's name: the folder's name."""
        return self.root.name

    def class_counts(self) -> dict[str, int]:
        """Number of images per class."""
        counts = dict.fromkeys(self.classes, 0)
        for _, label in self.samples:
            counts[self.classes[label]] += 1
        return counts


@dataclass(frozen=True)
class Split:
    """Sample indices of the train, validation and test subsets."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    def sizes(self) -> dict[str, int]:
        """``{"train_size": ..., "val_size": ..., "test_size": ...}``."""
        return {"train_size": len(self.train), "val_size": len(self.val), "test_size": len(self.test)}


def scan_image_folder(root: str | os.PathLike[str], *, skip_bad_images: bool = False,
                      name_of: Callable[[Path], str] = str,
                      bad_image_hint: str = "use --skip-bad-images to leave it out",
                      record: Literal["off", "use", "renew"] = "off",
                      progress: Callable[..., Iterable] | None = None) -> ImageFolderScan:
    """Validate ``root`` as an image-folder data set and hash its content.

    Every image is read once: to prove PIL can decode it and to feed the hash (relative
    path and bytes of each file, in sorted order), so two folders with the same hash hold
    the same data. An unreadable image raises, or with ``skip_bad_images`` is left out
    and listed in ``skipped`` (else the error ends with ``bad_image_hint``). Messages name an image by
    ``name_of(path)`` (a pulled set's ``s3://`` key rather than its cache path). ``record``: ``use`` reads only
    the images changed since the folder's last recorded scan (:mod:`plantml.datasets.scan_record`) and records
    this one; ``renew`` reads every image and records the scan; ``off`` reads every image and records nothing.
    ``progress(images, total=N)`` wraps the iteration over the images (a progress bar may draw there).
    """
    def name_of_image(path: Path) -> str:  # on one line, whatever its name holds (a newline, bytes not UTF-8)
        return shown_text(name_of(path))

    root = Path(root).expanduser()
    others: list[Path] = []
    folders = class_folders(root, left_out=others)
    # a .gif or .heic among the photos, a linked sub-folder: the set is smaller than the folder, say so and why
    for why, left in _by_reason(others).items():
        logger.warning("%d file(s) left out of the set: %s (such as %s)", len(left), why, name_of_image(left[0]))
    loose = loose_files(root)
    if loose:  # a photo saved beside the class folders has no class
        logger.warning("%d file(s) left out of the set: not in a class folder (such as %s)", len(loose), name_of_image(loose[0]))

    for class_dir, files in folders:
        if not files:  # said before a single image is read
            raise no_images(class_dir)
    digest = hashlib.sha256()
    samples: list[tuple[Path, int]] = []
    skipped: list[Path] = []
    kept = [0] * len(folders)
    known = ScanRecord(root, record)
    images = [(label, path) for label, (_, files) in enumerate(folders) for path in files]
    for label, path in progress(images, total=len(images)) if progress else images:
        relative = path.relative_to(root).as_posix()
        stat = file_stat(path)  # before the read: a change after it is a new stat next time
        file_digest = known.digest(relative, stat)
        if file_digest is None:
            data, problem, noted = _read_image(path, name_of_image)
            if problem:
                if not skip_bad_images:
                    raise DataError(f"image {name_of_image(path)}: {problem}; {bad_image_hint}")
                skipped.append(path)
                continue
            file_digest = hashlib.sha256(data).digest()
            if not noted:  # a very large image's warning is said at every scan
                known.found(relative, stat, file_digest)
        # fsencode: a name that is not UTF-8 (a Latin-1 folder) hashes as its bytes
        digest.update(os.fsencode(relative) + b"\0")
        digest.update(file_digest)
        samples.append((path, label))
        kept[label] += 1
    for (class_dir, files), count in zip(folders, kept):
        if count == 0:
            raise no_images(class_dir, unreadable=len(files))
    known.save()
    return ImageFolderScan(
        root=root,
        classes=tuple(name_text(class_dir.name) for class_dir, _ in folders),
        samples=tuple(samples),
        content_hash=digest.hexdigest(),
        skipped=tuple(skipped),
        unchanged=known.reused,
    )


def _by_reason(left_out: Sequence[Path]) -> dict[str, list[Path]]:
    """The files of the class folders left out of a set, by why: not an image's extension, a linked folder (not
    followed), or named like an image but not a regular file (a FIFO, a link to a device)."""
    reasons: dict[str, list[Path]] = {}
    for path in left_out:
        if path.is_dir():
            why = "linked folders inside a class folder are not followed"
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            why = "not regular files"
        else:
            why = f"not {'/'.join(IMAGE_EXTENSIONS)}"
        reasons.setdefault(why, []).append(path)
    return reasons


#: Pillow's modes of 16-bit (and 32-bit integer) grayscale, which its ``convert("RGB")`` clips at 255.
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB. 16-bit grayscale (a 16-bit PNG) keeps its high byte, as 16-bit RGB does in
    Pillow and torchvision; Pillow's own conversion would clip it at 255 and turn the image white."""
    if image.mode in _WIDE_GRAY_MODES:
        high_byte = (np.asarray(image).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(high_byte).convert("RGB")  # 2-D uint8: mode L
    return image.convert("RGB")


def _read_image(path: Path, name_of: Callable[[Path], str] = str) -> tuple[bytes, str | None, bool]:
    """The bytes of ``path``, why they are not a whole image (None when they are), and whether a warning was
    said about it; a file that cannot be read (no permission, an I/O error) is a problem like one that cannot
    be decoded. Pillow's warning about a very large image becomes one warning line that names the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return b"", f"cannot be read ({os_reason(exc)})", False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        problem = _decode_problem(data)
    for warning in caught:
        if issubclass(warning.category, Image.DecompressionBombWarning):
            logger.warning("image %s: %s", name_of(path), str(warning.message).split(", could be")[0])
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return data, problem and f"cannot be decoded ({problem})", bool(caught)


def _decode_problem(data: bytes) -> str | None:
    """Why ``data`` is not a whole image, or None. It is decoded, not only verified: ``verify()``
    passes a truncated JPEG, which then fails mid-epoch. JPEGs decode at reduced scale (draft)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (64, 64))
            image.load()
        return None
    except UnidentifiedImageError:  # its own text names the in-memory buffer, not the file
        return "not an image format Pillow reads"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def check_split_fractions(val_fraction: float, test_fraction: float) -> None:
    """A :class:`UsageError` unless both fractions are in (0, 1) and their sum below 1 (``--val-split``, ``--test-split``)."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UsageError(f"split fractions val={val_fraction}, test={test_fraction}: each must be in (0, 1) and their sum below 1")


def stratified_split(labels: Sequence[int], val_fraction: float = 0.15, test_fraction: float = 0.15,
                     seed: int = 0, class_names: Sequence[str] | None = None) -> Split:
    """Split indices per class, with a seeded shuffle, so each subset keeps the class balance.

    Every class gives at least one image to each subset; with 200 images per class and
    the default fractions the subsets hold 140/30/30 per class.
    """
    check_split_fractions(val_fraction, test_fraction)
    labels_array = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    test: list[int] = []
    for label in np.unique(labels_array):
        indices = np.flatnonzero(labels_array == label)
        n = len(indices)
        n_val = max(1, round(n * val_fraction))
        n_test = max(1, round(n * test_fraction))
        if n - n_val - n_test < 1:
            name = class_names[label] if class_names else str(label)
            raise DataError(
                f"class {name!r}: {n} image(s) are too few for a train/val/test split "
                f"(need at least {n_val + n_test + 1})"
            )
        indices = rng.permutation(indices)
        val.extend(indices[:n_val].tolist())
        test.extend(indices[n_val:n_val + n_test].tolist())
        train.extend(indices[n_val + n_test:].tolist())
    return Split(train=tuple(sorted(train)), val=tuple(sorted(val)), test=tuple(sorted(test)))


def preprocessing(classes: tuple[str, ...], image_size: int) -> dict[str, Any]:
    """What a consumer must do to an image before the model sees it, and what its output columns are.

    Saved as the registered model's MLflow ``metadata``, so it travels with the model:
    exactly what :func:`build_transforms` does for evaluation.
    """
    return {
        # one output column each, in this order (the class folders, sorted); bytes that are not UTF-8 as %XX, as in the run's tags
        "classes": [safe_text(name) for name in classes],
        "image_size": [image_size, image_size],  # height, width: resized to it, aspect ratio not kept, no crop
        "resize": "bilinear, antialiased",
        "color": "RGB",
        "scale": "pixel / 255",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "layout": "NCHW float32",
    }


def build_transforms(image_size: int, train: bool) -> transforms.Compose:
    """Resize and ImageNet normalisation; light augmentation (flips, small colour jitter) on train."""
    steps: list = [transforms.Resize((image_size, image_size), antialias=True)]
    if train:
        steps += [
            transforms.RandomHorizontalFlip(),
            transforms.RandomVerticalFlip(),
            transforms.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1),
        ]
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


class ImageSamples(Dataset):
    """A list of ``(path, label)`` read with PIL and passed through ``transform``."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                return self.transform(to_rgb(image)), label
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:  # changed since the scan
            raise DataError(f"image {path}: cannot be decoded ({exc})") from None


def default_num_workers() -> int:
    """DataLoader workers sized to the machine: half the CPUs, at most 8; none on 2 cores or fewer.

    On two cores a worker process only competes with the training threads (measured:
    0 workers is about 15% faster there than 1).
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cpus <= 2 else min(8, cpus // 2)


@dataclass
class DataLoaders:
    """The three loaders of a run and what describes them."""

    train: DataLoader
    val: DataLoader
    test: DataLoader
    split: Split
    classes: tuple[str, ...]
    extra: dict = field(default_factory=dict)


def drops_lone_last_image(share: int, batch_size: int) -> bool:
    """Whether an epoch of ``share`` training images leaves out its last batch: only when it would hold
    one image, which batch norm cannot train on at small sizes (the next epoch's shuffle places it elsewhere)."""
    return share > 1 and share % batch_size == 1


def build_loaders(scan: ImageFolderScan, split: Split, *, image_size: int, batch_size: int,
                  num_workers: int, seed: int, pin_memory: bool = False, ranks: Ranks = Ranks()) -> DataLoaders:
    """Train (shuffled, augmented), validation and test loaders over ``split`` (under torchrun, over this rank's share)."""
    def subset(indices: Sequence[int], train: bool) -> ImageSamples:
        return ImageSamples([scan.samples[i] for i in indices], build_transforms(image_size, train))

    train_set, val_set, test_set = subset(split.train, True), subset(split.val, False), subset(split.test, False)
    train_sampler = ranks.train_sampler(train_set, seed)  # None on a single process: the loader shuffles
    # the seeded generator fixes the shuffle order (single process) and the workers' augmentation seeds, per rank
    generator = torch.Generator().manual_seed(seed + ranks.rank)
    common = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        "persistent_workers": num_workers > 0,
    }
    share = len(train_sampler) if train_sampler is not None else len(train_set)
    return DataLoaders(
        # the seeded generator fixes both the shuffle order and the workers' augmentation seeds
        train=DataLoader(train_set, shuffle=train_sampler is None, sampler=train_sampler, generator=generator,
                         drop_last=drops_lone_last_image(share, batch_size), **common),
        val=DataLoader(val_set, shuffle=False, sampler=ranks.eval_sampler(val_set), **common),
        test=DataLoader(test_set, shuffle=False, sampler=ranks.eval_sampler(test_set), **common),
        split=split,
        classes=scan.classes,
    )
