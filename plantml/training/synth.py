"""A deterministic, offline two-class leaf data set: healthy leaves and leaves with disease spots.

It exists so that ``plantml train`` works with no download: the images are drawn with
PIL and numpy from a seed, in the torchvision ``ImageFolder`` layout
(``DIR/healthy/*.png``, ``DIR/diseased/*.png``). The same parameters always give
byte-identical files, hence the same content hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from plantml.errors import PlantmlError, UsageError
from plantml.settings import cache_dir
from plantml.staging import CACHE_FOLDER, folder_lock, local_writes, set_aside, staging_folder, sweep

logger = logging.getLogger(__name__)

CLASSES = ("diseased", "healthy")
DEFAULT_PER_CLASS = 200
DEFAULT_SIZE = 96
DEFAULT_SEED = 0
GENERATOR_VERSION = 1  # bump when the drawing changes, so caches are not reused
_MARKER = ".plantml-synthetic"


@dataclass(frozen=True)
class SynthSpec:
    """The parameters that fully determine a synthetic data set."""

    per_class: int = DEFAULT_PER_CLASS
    size: int = DEFAULT_SIZE
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.per_class < 3:
            raise UsageError(f"--per-class {self.per_class}: need at least 3 images per class")
        if not 16 <= self.size <= 1024:
            raise UsageError(f"--size {self.size}: choose between 16 and 1024 pixels")

    @property
    def name(self) -> str:
        """A stable name for the set, also used for its cache folder."""
        digest = hashlib.sha256(repr((GENERATOR_VERSION, self.per_class, self.size, self.seed)).encode()).hexdigest()
        return f"synthetic-leaves-{self.per_class}x{len(CLASSES)}-{self.size}px-s{self.seed}-{digest[:8]}"


def _rng_for(seed: int, label: int, index: int) -> np.random.Generator:
    # one independent stream per image, so an image does not depend on how many came before
    return np.random.default_rng([seed, label, index])


def _leaf_polygon(rng: np.random.Generator, size: int) -> tuple[list[tuple[float, float]], float, float, float, float]:
    """A pointed leaf outline, rotated and placed on the canvas; returns points and geometry."""
    cx = size * rng.uniform(0.42, 0.58)
    cy = size * rng.uniform(0.42, 0.58)
    length = size * rng.uniform(0.30, 0.42)  # half-length
    width = length * rng.uniform(0.38, 0.6)  # half-width
    angle = rng.uniform(0, math.pi)
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    points = []
    for t in np.linspace(0, 2 * math.pi, 48, endpoint=False):
        # sin^1.3 profile gives pointed tips at both ends
        x = length * math.cos(t)
        y = width * math.copysign(abs(math.sin(t)) ** 1.3, math.sin(t))
        points.append((cx + x * cos_a - y * sin_a, cy + x * sin_a + y * cos_a))
    return points, cx, cy, length, angle


def draw_leaf(rng: np.random.Generator, size: int, diseased: bool) -> Image.Image:
    """Draw one leaf image (RGB, ``size`` x ``size``)."""
    background = tuple(int(v) for v in rng.integers((150, 120, 80), (230, 210, 170)))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)

    points, cx, cy, length, angle = _leaf_polygon(rng, size)
    green = (int(rng.integers(30, 90)), int(rng.integers(110, 190)), int(rng.integers(20, 80)))
    draw.polygon(points, fill=green)

    # midrib and a few side veins, slightly lighter than the blade
    vein = tuple(min(255, c + 45) for c in green)
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    tip = (cx + length * cos_a, cy + length * sin_a)
    base = (cx - length * cos_a, cy - length * sin_a)
    line_width = max(1, size // 64)
    draw.line([base, tip], fill=vein, width=line_width)
    for frac in np.linspace(-0.6, 0.6, 5):
        ox, oy = cx + frac * length * cos_a, cy + frac * length * sin_a
        for side in (-1, 1):
            vx = ox + 0.45 * length * (0.5 * cos_a - side * 0.8 * sin_a)
            vy = oy + 0.45 * length * (0.5 * sin_a + side * 0.8 * cos_a)
            draw.line([(ox, oy), (vx, vy)], fill=vein, width=line_width)

    if diseased:
        _draw_spots(rng, draw, cx, cy, length, angle, size)

    image = image.filter(ImageFilter.GaussianBlur(radius=size / 200))
    noise = rng.normal(0, 6, (size, size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _draw_spots(rng: np.random.Generator, draw: ImageDraw.ImageDraw, cx: float, cy: float,
                length: float, angle: float, size: int) -> None:
    """Brown and yellow lesions, each a dark core in a yellow halo, inside the leaf blade."""
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    for _ in range(int(rng.integers(3, 9))):
        along = rng.uniform(-0.65, 0.65) * length
        across = rng.uniform(-0.22, 0.22) * length
        x = cx + along * cos_a - across * sin_a
        y = cy + along * sin_a + across * cos_a
        r = size * rng.uniform(0.025, 0.06)
        halo = (int(rng.integers(190, 240)), int(rng.integers(170, 215)), int(rng.integers(30, 80)))
        core = (int(rng.integers(90, 140)), int(rng.integers(50, 85)), int(rng.integers(15, 40)))
        draw.ellipse([x - 1.5 * r, y - 1.5 * r, x + 1.5 * r, y + 1.5 * r], fill=halo)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=core)


def generate(directory: str | os.PathLike[str], spec: SynthSpec = SynthSpec()) -> Path:
    """Write the data set described by ``spec`` into ``directory`` and return it.

    Existing files of the same names are overwritten; other files are left alone.
    """
    root = Path(directory)
    for label, class_name in enumerate(CLASSES):
        class_dir = root / class_name
        class_dir.mkdir(parents=True, exist_ok=True)
        for index in range(spec.per_class):
            image = draw_leaf(_rng_for(spec.seed, label, index), spec.size, diseased=class_name == "diseased")
            # optimize=False and no metadata keep the bytes deterministic
            image.save(class_dir / f"{class_name}_{index:04d}.png", format="PNG", optimize=False)
    # the content digest, which the next use of a cached set holds its files to
    (root / _MARKER).write_text(f"{spec.name}\n{_content_digest(root)}\n")
    return root


def _content_digest(root: Path) -> str:
    from plantml.datasets.manifest import build_manifest

    return build_manifest(root).digest


def _damage(folder: Path) -> str | None:
    """What changed in a cached set since it was drawn (an image removed, cut short or rewritten), or None.

    A set drawn before the marker recorded its digest is taken as it is."""
    try:
        recorded = (folder / _MARKER).read_text(encoding="utf-8", errors="replace").split("\n")
        if len(recorded) < 2 or not recorded[1]:
            return None
        return None if _content_digest(folder) == recorded[1] else "its images changed on disk since it was drawn"
    except (OSError, PlantmlError) as exc:
        return f"it cannot be read ({exc})"


def as_jpeg(source: str | os.PathLike[str], target: str | os.PathLike[str], quality: int = 95,
            subsampling: str = "4:2:0") -> Path:
    """Copy the image folder ``source`` to ``target`` as JPEG files (``.jpg``), as photos come
    (``subsampling`` of the chroma: ``4:2:0`` as cameras save, or ``4:4:4``).

    The marker is not copied: the copy is a folder of photos like any other.
    """
    root = Path(target)
    for path in sorted(Path(source).glob("*/*.png")):
        out = root / path.parent.name / f"{path.stem}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image.convert("RGB").save(out, format="JPEG", quality=quality, subsampling=subsampling)
    return root


def ensure_cached(spec: SynthSpec = SynthSpec()) -> Path:
    """The cached copy of the synthetic set, generated on first use (atomically).

    It is generated into a staging folder beside it, then renamed: an interrupted run leaves
    no half set, and a staging folder whose process died is swept by the next call.
    """
    root = cache_dir()
    target = root / spec.name
    if (target / _MARKER).is_file():
        sweep(root)  # what a killed generation of another spec left
        damage = _damage(target)
        if damage is None:
            return target
        return _draw_again(target, spec, damage)
    with local_writes(CACHE_FOLDER, root):
        root.mkdir(parents=True, exist_ok=True)
        with staging_folder(root, spec.name) as staging:
            generate(staging, spec)
            try:
                staging.rename(target)
            except OSError:
                if not (target / _MARKER).is_file():  # not a concurrent twin that won the race
                    raise
    return target


def _draw_again(target: Path, spec: SynthSpec, damage: str) -> Path:
    """Replace a damaged cached set by a new drawing (the same bytes as it had), one process at a time."""
    with local_writes(CACHE_FOLDER, target.parent), folder_lock(target):
        if _damage(target) is None:  # another process drew it again while this one waited
            return target
        logger.warning("the cached synthetic data set %s: %s; drawing it again", target, damage)
        with staging_folder(target.parent, spec.name) as staging:
            generate(staging, spec)
            aside = set_aside(target)
            staging.rename(target)
        shutil.rmtree(aside, ignore_errors=True)
    return target


def write_set(directory: str | os.PathLike[str], spec: SynthSpec = SynthSpec()) -> Path:
    """``plantml data synth DIR``: write the set into ``directory``, all of it or nothing.

    ``directory`` must be missing, empty, or a synthetic set already (a re-synth); a folder
    holding anything else is refused untouched. The images are drawn into a staging folder
    inside it, then moved into place, so a full disk leaves the folder as it was. A second
    synth into the same folder waits for the first, then writes over its complete set.
    """
    root = Path(directory).expanduser()  # as every other folder plantml reads: `~/leaves` in quotes is not `./~/leaves`
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root}: not a folder")
    created = False
    try:
        with local_writes("folder", root):
            with contextlib.suppress(FileExistsError):
                root.mkdir(parents=True)
                created = True  # by this process: a concurrent synth into it must not remove it on failure
            with folder_lock(root):  # the folder itself: no file added to it
                _check_target(root)  # under the lock: another synth's staging folder is gone by then
                with staging_folder(root, "plantml-synth") as staging:
                    generate(staging, spec)
                    _move_into(staging, root)
    except BaseException:
        if created:
            shutil.rmtree(root, ignore_errors=True)
        raise
    return root


def _check_target(root: Path) -> None:
    """Refuse a folder of other files than a synthetic set's, and a synthetic set someone added files to:
    the images a new set lacks are removed, so a photo added to one of its folders would go with them."""
    if not is_synthetic(root):
        sweep(root)  # the staging folder of an earlier synth that was killed does not count
        if any(root.iterdir()):
            raise UsageError(f"folder {root}: not empty and not a synthetic set; give an empty or new folder")
        return
    for path in sorted(root.glob("[!.]*/*")):  # what _move_into may remove
        if path.is_file() and not _is_drawn_image(path):
            raise UsageError(f"folder {root}: a synthetic set with other files added ({path}), which writing over it "
                             "would remove; give an empty or new folder")


def _is_drawn_image(path: Path) -> bool:
    """True for a file name :func:`generate` writes: ``CLASS/CLASS_NNNN.png`` of one of its classes."""
    class_name = path.parent.name
    return class_name in CLASSES and re.fullmatch(rf"{class_name}_\d{{4,}}\.png", path.name) is not None


def _move_into(staging: Path, root: Path) -> None:
    """Move every file of ``staging`` to the same place under ``root`` (same file system: renames,
    which need no space), the marker last, so the folder is a synthetic set only once complete.

    The images of the set it replaces that the new one lacks (a smaller ``--per-class``) are removed first."""
    for path in sorted(root.glob("[!.]*/*")):  # the class folders; the staging folders are hidden
        if path.is_file() and not (staging / path.relative_to(root)).is_file():
            path.unlink()
    for path in sorted(staging.rglob("*")):
        if path.is_file() and path.name != _MARKER:
            destination = root / path.relative_to(staging)
            destination.parent.mkdir(exist_ok=True)
            os.replace(path, destination)
    os.replace(staging / _MARKER, root / _MARKER)


def is_synthetic(directory: str | os.PathLike[str]) -> bool:
    """True when ``directory`` was written by :func:`generate`."""
    return (Path(directory) / _MARKER).is_file()
