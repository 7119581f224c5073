"""Where a command's CPU goes, by kind of process: run it, sample every process on the machine, print the totals.

    python benchmarks/suite_cpu.py -- pytest tests/integration -n 3 --dist loadfile

CI's two cores are busy most of a suite, so its wall time follows the CPU its processes use; this tells which
kind of process uses it (MLflow servers, ``plantml train`` subprocesses, PostgreSQL, the pytest workers, ...) and
how busy the machine was. Every process's CPU time is read from ``/proc`` four times a second; a process that
lives less than a sample is missed, a longer one counted whole. It measures the whole machine: run it alone.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
#: (kind, test on the command line's words), the first that matches names the process.
KINDS = (
    ("postgres", lambda words, text: Path(words[0]).name in ("postgres", "initdb", "pg_ctl") or text.startswith("postgres:")),
    ("seaweedfs", lambda words, text: Path(words[0]).name == "weed"),
    ("mlflow server", lambda words, text: "mlflow" in words[1:3] and "server" in words or "uvicorn" in words[1:3]),
    ("plantml <command>", lambda words, text: "plantml" in words[:3]),
    ("torchrun", lambda words, text: "torch.distributed.run" in words or Path(words[0]).name == "torchrun"),
    ("chromium", lambda words, text: "chromium" in Path(words[0]).name),
    ("docker", lambda words, text: Path(words[0]).name in ("dockerd", "containerd", "containerd-shim-runc-v2", "docker-proxy")),
    ("pytest", lambda words, text: "pytest" in Path(words[0]).name or "xdist" in text or "execnet" in text
     or "import sys;exec(eval(sys.stdin.readline()))" in text),
    ("python -c (tests' scripts)", lambda words, text: "python" in Path(words[0]).name and "-c" in words[1:3]),
    ("other python", lambda words, text: "python" in Path(words[0]).name),
)


def kind_of(pid: int) -> str:
    try:
        words = [w.decode(errors="replace") for w in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if w]
    except OSError:
        return "gone"
    if not words:
        return "kernel"
    text = " ".join(words)
    if words[0].endswith("plantml") or words[1:3] == ["-m", "plantml"]:
        sub = next((w for w in words[1:] if not w.startswith("-") and w != "plantml"), "?")
        return f"plantml {sub}"
    return next((kind for kind, test in KINDS if test(words, text)), Path(words[0]).name[:30])


def cpu_of(pid: int) -> tuple[int, int] | None:
    """(start time, CPU ticks used) of a process, None once gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19]), int(fields[11]) + int(fields[12])


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command to run after --")
    seen: dict[tuple[int, int], tuple[str, int]] = {}  # (pid, start) -> (kind, ticks at the first sample)
    used: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    stop = threading.Event()

    def sample(first: bool = False) -> None:
        """Add what each process used since the last sample (a new one: since its start; at the first: nothing)."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            got = cpu_of(pid)
            if got is None:
                continue
            key = (pid, got[0])
            if key not in seen:
                seen[key] = (kind_of(pid), got[1] if first else 0)
                count[seen[key][0]] += 0 if first else 1
            kind, before = seen[key]
            used[kind] += got[1] - before
            seen[key] = (kind, got[1])

    def sampling() -> None:
        while not stop.wait(0.25):
            sample()

    sample(first=True)  # what ran before the command is not the command's
    busy0, total0 = machine_ticks()
    started = time.monotonic()
    sampler = threading.Thread(target=sampling, daemon=True)
    sampler.start()
    code = subprocess.call(command)
    stop.set()
    sampler.join()
    sample()
    wall = time.monotonic() - started
    busy1, total1 = machine_ticks()
    print(f"\n{' '.join(command)}: exit {code}, {wall:.0f} s wall, machine busy {100 * (busy1 - busy0) / (total1 - total0):.0f} %"
          f" of {os.cpu_count()} CPUs", file=sys.stderr)
    print(f"{'CPU s':>8}  {'share':>5}  {'processes':>9}  kind", file=sys.stderr)
    total = sum(used.values()) or 1
    for kind, ticks in [(kind, ticks) for kind, ticks in used.most_common(15) if ticks]:
        print(f"{ticks / TICKS:8.0f}  {100 * ticks / total:4.0f}%  {count[kind]:9d}  {kind}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
