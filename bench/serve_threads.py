"""Where a prediction's CPU goes in a running refit server: CPU per prediction by thread.

Starts ``bentoml serve`` (2 workers) on a registry holding ``--version-dir``, loads it with wrk
(one banking77 test text per request, closed loop) and reads every thread's CPU time from
``/proc/<pid>/task/<tid>/stat`` before and after each run: no profiler is attached, so nothing is
slowed down. Threads are named with ``py-spy dump`` when py-spy is installed (``pip install
py-spy``; Python threads have no OS-level names in 3.11), else shown by their OS name. Also prints
the mean batch size (``refit_inference_batch_size`` from ``/metrics``).

    .venv/bin/python bench/serve_threads.py --version-dir REGISTRY/versions/v1 \
        [--env REFIT_BATCH_MAX_WAIT_MS=0] [--rounds 2] [--seconds 15]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import read_texts, require_shared, run_wrk, tree_pids, write_bodies  # noqa: E402
from bench.serve_load import serve_refit, stop, wait_ready, wait_settled  # noqa: E402

PORT = 3360


def thread_names(pids: list[int]) -> dict[int, str]:
    """OS thread id -> Python thread name (``inference_0`` -> ``inference``), via py-spy."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {}
    names: dict[int, str] = {}
    for pid in pids:
        out = subprocess.run([spy, "dump", "--json", "-p", str(pid)], capture_output=True,
                             text=True).stdout
        try:
            threads = json.loads(out or "[]")
        except json.JSONDecodeError:
            continue
        for thread in threads:
            if thread.get("os_thread_id"):
                names[thread["os_thread_id"]] = re.sub(r"_\d+$", "", thread.get("thread_name")
                                                       or "?")
    return names


def process_kind(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "gone"
    if b"_bentoml_impl.worker" in cmdline:
        return "worker"
    if b"monitoring.drift_job" in cmdline:
        return "drift job"
    return "bentoml"


def thread_ticks(root: int, names: dict[int, str]) -> collections.Counter[str]:
    ticks: collections.Counter[str] = collections.Counter()
    for pid in tree_pids(root):
        kind = process_kind(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                name = names.get(int(tid)) or Path(f"/proc/{pid}/task/{tid}/comm").read_text()
                fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks[f"{kind}: {name.strip()}"] += int(fields[11]) + int(fields[12])
    return ticks


def batch_totals(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics", timeout=10).text

    def total(prefix: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(prefix))

    return total("refit_inference_batch_size_sum"), total("refit_inference_batch_size_count")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--version-dir", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--env", action="append", default=[], metavar="REFIT_X=VALUE")
    args = parser.parse_args()
    texts = read_texts(require_shared() / "banking77" / "test.jsonl")
    random.Random(0).shuffle(texts)
    workdir = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    bodies = write_bodies(texts, workdir / "bodies.jsonl")
    env = dict(item.split("=", 1) for item in args.env)
    server = serve_refit(args.version_dir, workdir, PORT, env=env)
    url = f"http://127.0.0.1:{PORT}"
    tick = os.sysconf("SC_CLK_TCK")
    try:
        wait_ready(url)
        wait_settled(server.pid)
        run_wrk(url, 8, 3, bodies, server.pid)  # warm-up, not recorded
        names = thread_names(tree_pids(server.pid))
        for round_ in range(args.rounds):
            batches_before, ticks_before = batch_totals(url), thread_ticks(server.pid, names)
            result = run_wrk(url, args.concurrency, args.seconds, bodies, server.pid)
            batches_after, ticks_after = batch_totals(url), thread_ticks(server.pid, names)
            texts_run = batches_after[0] - batches_before[0]
            batches = max(1.0, batches_after[1] - batches_before[1])
            print(f"round {round_ + 1} c={args.concurrency}: {result.throughput:.1f} req/s, "
                  f"p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, "
                  f"{result.cpu_ms_per_prediction:.2f} ms CPU/prediction, "
                  f"mean batch {texts_run / batches:.1f}, errors {result.errors}")
            used = {k: ticks_after[k] - ticks_before.get(k, 0) for k in ticks_after}
            for name, value in sorted(used.items(), key=lambda kv: -kv[1]):
                ms = 1000 * value / tick / max(1, result.requests)
                if ms >= 0.005:
                    print(f"  {name:<32} {ms:.3f} ms/prediction")
    finally:
        stop(server)


if __name__ == "__main__":
    main()
