"""Benchmark: the scan a training makes of its image folder, reading every image vs trusting the scan record.

A set of N images per class (the synthetic leaves at 256 px, as PNG and as JPEG of quality 90: the sizes and
formats of PlantVillage's photos) is scanned alternately: reading, decoding and hashing every image
(``record="off"``, what every training did before), and as a training now does (``record="use"``) with the
record of the previous scan in place. The first scan with a record (none yet: everything read, the record
written) is timed too. Each in this process, the files in the page cache (a warm-up scan first); medians.

Run: ``python benchmarks/data_scan.py [--per-class 5000] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from plantml.datasets import scan_record
from plantml.training import synth
from plantml.training.data import scan_image_folder


def as_jpeg(folder: Path, destination: Path) -> Path:
    for image in sorted(folder.glob("*/*.png")):
        (destination / image.parent.name).mkdir(parents=True, exist_ok=True)
        with Image.open(image) as opened:
            opened.convert("RGB").save(destination / image.parent.name / f"{image.stem}.jpg", quality=90)
    return destination


def timed(folder: Path, record: str) -> tuple[float, int]:
    started = time.perf_counter()
    scan = scan_image_folder(folder, record=record)  # type: ignore[arg-type]
    return time.perf_counter() - started, scan.unchanged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "data_scan.json")
    options = parser.parse_args()
    scan_record.SETTLE_NS = 0  # the set was written a moment ago; a training's set was written long before
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["PLANTML_CACHE_DIR"] = str(Path(scratch) / "cache")
        png = synth.generate(Path(scratch) / "png", synth.SynthSpec(per_class=options.per_class, size=256, seed=0))
        jpeg = as_jpeg(png, Path(scratch) / "jpeg")
        for name, folder in (("jpeg", jpeg), ("png", png)):
            count = 2 * options.per_class
            mb = sum(path.stat().st_size for path in folder.glob("*/*")) / 1e6
            timed(folder, "off")  # warm-up: the files into the page cache
            first, _ = timed(folder, "use")
            every, trusted = [], []
            for _ in range(options.repeats):
                every.append(timed(folder, "off")[0])
                seconds, unchanged = timed(folder, "use")
                assert unchanged == count, f"{unchanged} of {count} images trusted"
                trusted.append(seconds)
            results[name] = {"images": count, "megabytes": round(mb, 1), "first_with_record_s": first,
                             "every_image_s": statistics.median(every), "unchanged_s": statistics.median(trusted),
                             "ratio": statistics.median(trusted) / statistics.median(every)}
            row = results[name]
            print(f"{name}: {count} images, {mb:.0f} MB: every image read {row['every_image_s']:.2f} s "
                  f"({1000 * row['every_image_s'] / count:.2f} ms an image), first scan with a record "
                  f"{first:.2f} s, unchanged since {row['unchanged_s']:.2f} s: ratio {row['ratio']:.3f}", flush=True)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps({"repeats": options.repeats, "results": results}, indent=2))


if __name__ == "__main__":
    main()
