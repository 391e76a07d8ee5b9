"""Soak: minutes of mixed load on one server, with a promote every minute and one retrain.

- predictions: wrk, one text per request (banking77 test texts, or the demo texts without the
  shared data), ``--connections`` connections, run in one-minute segments so each minute has its
  own p50/p99 and error count;
- feedback: one client posting a labelled item every 0.2 s (by prediction id and by text);
- a promote every minute, alternating between the two newest versions (a hot swap in every
  worker);
- one retrain, started after the first minute (it makes the second version).

Reported per minute: requests, errors (non-2xx, connect/read/timeouts) for predictions, feedback
errors, p50 and p99, and the resident memory (RSS) of every worker, sampled every 10 s. Target
(issue 10): 0 errors, RSS flat after warm-up and at most 400 MB per worker.

    .venv/bin/python bench/soak.py [--minutes 10] [--connections 8] [--registry DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, SHARED, read_texts, rss_mb, run_wrk, save, write_bodies  # noqa: E402
from tests.servers import ServiceProcess  # noqa: E402


def worker_pids(server_pid: int) -> list[int]:
    """The serving workers: processes under the server whose command line runs the service."""
    from bench.common import tree_pids

    pids = []
    for pid in tree_pids(server_pid)[1:]:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if "_bentoml_impl" in cmd or "worker" in cmd:
            pids.append(pid)
    return sorted(pids)


class Sampler(threading.Thread):
    def __init__(self, server_pid: int, every_s: float = 10) -> None:
        super().__init__(daemon=True)
        self.server_pid = server_pid
        self.every_s = every_s
        self.started = time.monotonic()
        self.samples: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            row = {"t": round(time.monotonic() - self.started, 1)}
            for pid in worker_pids(self.server_pid):
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    row[str(pid)] = round(rss_mb(pid), 1)
            self.samples.append(row)
            self.stop.wait(self.every_s)


class FeedbackClient(threading.Thread):
    def __init__(self, url: str, texts: list[str], label: str) -> None:
        super().__init__(daemon=True)
        self.url, self.texts, self.label = url, texts, label
        self.ok = 0
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            n = 0
            while not self.stop.wait(0.2):
                n += 1
                text = self.texts[n % len(self.texts)]
                try:
                    if n % 2:
                        answer = client.post("/predict", json={"texts": [text]})
                        pid = answer.json()["predictions"][0]["prediction_id"]
                        item = {"prediction_id": pid, "label": self.label}
                    else:
                        item = {"text": text, "label": self.label}
                    answer = client.post("/feedback", json={"items": [item]})
                    if answer.status_code == 200:
                        self.ok += 1
                    else:
                        self.errors.append(f"feedback {answer.status_code}")
                except (httpx.HTTPError, KeyError, ValueError) as exc:
                    self.errors.append(type(exc).__name__)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--registry", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="refit-soak-"))
    registry = work / "registry"
    if args.registry:
        shutil.copytree(args.registry, registry, symlinks=True)
    else:
        subprocess.run([sys.executable, "-m", "refit.cli", "train", "--data",
                        str(ROOT / "data" / "demo" / "intents.jsonl"), "--registry", str(registry),
                        "--search", "none"], check=True, cwd=ROOT)
    bank = SHARED / "banking77" / "test.jsonl"
    texts = (
        read_texts(bank) if bank.exists() else read_texts(ROOT / "data" / "demo" / "intents.jsonl")
    )
    bodies = write_bodies(texts, work / "bodies.jsonl")
    feedback = json.loads((ROOT / "data" / "demo" / "feedback.json").read_text())["items"]

    service = ServiceProcess(registry=registry, data_dir=work / "var").start()
    assert service.proc is not None
    sampler = Sampler(service.proc.pid)
    sampler.start()
    fb = FeedbackClient(service.url, [i["text"] for i in feedback if "text" in i], "gift_card")
    fb.start()
    minutes: list[dict] = []
    retrain_job = None
    try:
        with service.client() as client:
            for minute in range(args.minutes):
                if minute == 1:
                    retrain_job = client.post("/retrain", json={"force": True}).json()
                if minute >= 2:
                    names = [v["version"] for v in client.get("/models").json()["versions"]]
                    if len(names) >= 2:
                        current = client.get("/models").json()["current"]
                        target = names[-2] if current == names[-1] else names[-1]
                        client.post("/models/promote", json={"version": target})
                fb_errors_before = len(fb.errors)
                result = run_wrk(service.url + "/predict", args.connections, 60, bodies,
                                 service.proc.pid)
                rss = [s for s in sampler.samples if minute * 60 <= s["t"] < (minute + 1) * 60 + 5]
                last = rss[-1] if rss else {}
                minutes.append({
                    "minute": minute + 1, "requests": result.requests, "errors": result.errors,
                    "feedback_errors": len(fb.errors) - fb_errors_before,
                    "req_per_s": round(result.throughput, 1), "p50_ms": round(result.p50_ms, 1),
                    "p99_ms": round(result.p99_ms, 1),
                    "rss_mb": {k: v for k, v in last.items() if k != "t"},
                })
                print(json.dumps(minutes[-1]), flush=True)
            job = (client.get(f"/retrain/{retrain_job['job_id']}").json()
                   if retrain_job and "job_id" in retrain_job else retrain_job)
    finally:
        fb.stop.set()
        sampler.stop.set()
        service.stop()
    peak = max((v for s in sampler.samples for k, v in s.items() if k != "t"), default=0)
    summary = {
        "minutes": minutes, "rss_samples": sampler.samples, "feedback_ok": fb.ok,
        "feedback_errors": fb.errors[:20], "retrain": {k: job.get(k) for k in ("phase", "error")}
        if isinstance(job, dict) else None,
        "total_errors": sum(m["errors"] for m in minutes) + len(fb.errors),
        "peak_rss_mb": peak,
        "median_p99_ms": statistics.median(m["p99_ms"] for m in minutes),
    }
    path = save("soak", summary)
    print(f"\nsoak: {args.minutes} min, errors {summary['total_errors']}, peak worker RSS "
          f"{peak:.0f} MB, median per-minute p99 {summary['median_p99_ms']} ms; {path}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
