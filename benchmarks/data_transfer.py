"""Benchmark: ``plantml data push`` / the pull of ``--data-dir s3://…`` against plain boto3 transfers.

On one local stack, alternately, N rounds each, for one synthetic image set:
- push: what ``plantml data push`` does: every image decoded once (a set that cannot train is
  refused before any upload), then :func:`plantml.datasets.push` (hashes every file, skips what
  is stored, uploads in parallel, writes the manifest) to a fresh prefix, against an ``aws s3 sync``-style upload
  of the same files with boto3's transfer manager (``upload_file``, the same number of
  threads, no hashing, no manifest) to another fresh prefix;
- pull: :func:`plantml.datasets.pull` (downloads in parallel, checks every SHA-256, renames
  into the cache) into an empty cache, against boto3's ``download_file`` of every object
  with the same number of threads.

Prints MB/s medians and the ratios plantml / boto3 (goal: at least 0.8 each), and writes JSON.
Run: ``python benchmarks/data_transfer.py [--repeats 5] [--per-class 500] [--size 128]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from plantml.datasets import build_manifest, pull, push
from plantml.datasets.remote import DEFAULT_WORKERS, S3Location, object_store_client
from plantml.stack import make_stack
from plantml.training import synth
from plantml.training.data import scan_image_folder

RESULTS = Path(__file__).parent / "results" / "data_transfer.json"
BUCKET = "data"


def checked_push(client, root: Path, uri: str) -> None:
    """``plantml data push``: the decode check of every image, then the push."""
    scan_image_folder(root)
    push(client, root, uri)


def boto3_upload(client, root: Path, where: S3Location, files: list[str]) -> None:
    """What ``aws s3 sync DIR s3://…`` does: every file through the transfer manager, in parallel."""
    with ThreadPoolExecutor(max_workers=DEFAULT_WORKERS) as pool:
        list(pool.map(lambda rel: client.upload_file(str(root / rel), where.bucket, where.key(rel)), files))


def boto3_download(client, where: S3Location, files: list[str], target: Path) -> None:
    """What ``aws s3 sync s3://… DIR`` does: every object through the transfer manager, in parallel."""

    def get(rel: str) -> None:
        local = target / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(where.bucket, where.key(rel), str(local))

    with ThreadPoolExecutor(max_workers=DEFAULT_WORKERS) as pool:
        list(pool.map(get, files))


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="plantml-bench-data-"))
    stack = make_stack("local").start()
    try:
        root = synth.generate(scratch / "leaves", synth.SynthSpec(per_class=args.per_class, size=args.size, seed=5))
        files = [entry.path for entry in build_manifest(root).files]
        megabytes = sum((root / rel).stat().st_size for rel in files) / 1e6
        client = object_store_client(stack.tracking_settings(), workers=DEFAULT_WORKERS)
        if BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
            client.create_bucket(Bucket=BUCKET)
        times: dict[str, list[float]] = {"plantml_push": [], "boto3_upload": [], "plantml_pull": [], "boto3_download": []}
        for round_index in range(args.repeats):
            ours, theirs = f"s3://{BUCKET}/p-{uuid.uuid4().hex[:8]}", S3Location(BUCKET, f"b-{uuid.uuid4().hex[:8]}")
            pairs = [("plantml_push", partial(checked_push, client, root, ours)),
                     ("boto3_upload", partial(boto3_upload, client, root, theirs, files))]
            for name, action in pairs if round_index % 2 == 0 else reversed(pairs):
                times[name].append(timed(action))
            cache, plain = scratch / f"cache-{round_index}", scratch / f"plain-{round_index}"
            pairs = [("plantml_pull", partial(pull, client, ours, cache)),
                     ("boto3_download", partial(boto3_download, client, theirs, files, plain))]
            for name, action in pairs if round_index % 2 == 0 else reversed(pairs):
                times[name].append(timed(action))
            shutil.rmtree(cache)
            shutil.rmtree(plain)
        rates = {name: megabytes / statistics.median(values) for name, values in times.items()}
        result = {
            "files": len(files), "megabytes": round(megabytes, 1), "repeats": args.repeats, "workers": DEFAULT_WORKERS,
            "median_seconds": {k: round(statistics.median(v), 3) for k, v in times.items()},
            "mb_per_s": {k: round(v, 1) for k, v in rates.items()},
            "push_ratio": round(rates["plantml_push"] / rates["boto3_upload"], 3),
            "pull_ratio": round(rates["plantml_pull"] / rates["boto3_download"], 3),
        }
    finally:
        stack.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{result['files']} files, {result['megabytes']} MB, {args.repeats} rounds (medians):")
    for name, rate in result["mb_per_s"].items():
        print(f"  {name:15s} {rate:7.1f} MB/s  ({result['median_seconds'][name]:.2f} s)")
    print(f"push: plantml / boto3 = {result['push_ratio']}   pull: plantml / boto3 = {result['pull_ratio']}   (goal >= 0.8)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
