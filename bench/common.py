"""Shared pieces of the benchmarks: datasets, CPU accounting of process trees, wrk runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.servers import process_tree as tree_pids

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def require_shared() -> Path:
    if not SHARED.is_dir():
        sys.exit(f"benchmarks need the real datasets at {SHARED} (the team's machines have them)")
    return SHARED


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def cpu_seconds(root: int) -> float:
    """User + system CPU seconds of a process and all its descendants, so far."""
    total = 0
    for pid in tree_pids(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def write_bodies(texts: list[str], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"texts": [t]}) + "\n" for t in texts))
    return path


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    seconds: float
    throughput: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int
    server_cpu_s: float
    cpu_ms_per_prediction: float

    @property
    def p99_over_p50(self) -> float:
        return self.p99_ms / self.p50_ms if self.p50_ms else float("inf")


def run_wrk(
    url: str, concurrency: int, seconds: int, bodies: Path, server_pid: int,
    script: Path | None = None, env: dict[str, str] | None = None,
) -> LoadResult:
    """Closed-loop load from wrk (a separate, light process) with ``concurrency`` connections;
    ``script`` (default bench/predict.lua) and ``env`` set what it sends."""
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    lua = script or ROOT / "bench" / "predict.lua"
    before = cpu_seconds(server_pid)
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(lua),
            url,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "REFIT_BENCH_BODIES": str(bodies), **(env or {})},
        check=True,
    ).stdout
    used = cpu_seconds(server_pid) - before
    summary = json.loads(re.search(r"WRK_JSON (\{.*\})", out).group(1))
    errors = sum(
        summary[k] for k in ("non_2xx", "connect_errors", "read_errors", "write_errors", "timeouts")
    )
    requests = summary["requests"]
    return LoadResult(
        concurrency=concurrency,
        requests=requests,
        seconds=summary["seconds"],
        throughput=requests / summary["seconds"],
        p50_ms=summary["p50_ms"],
        p95_ms=summary["p95_ms"],
        p99_ms=summary["p99_ms"],
        errors=errors,
        server_cpu_s=used,
        cpu_ms_per_prediction=1000 * used / max(1, requests),
    )


def save(name: str, payload: object) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=lambda o: o.__dict__))
    return path
