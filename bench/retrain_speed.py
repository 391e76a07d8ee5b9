"""Retraining benchmark: job wall time by feedback volume, and prediction latency around it.

1. Head-only retrain wall time (the job process, start to finish, as the service runs it) for
   1k, 10k and 50k feedback items, with embeddings cached from prediction time against feedback
   given as text (embedded by the job).
2. Prediction p99 under steady load (wrk, 8 connections) against the same load during a retrain
   and during repeated hot swaps between two versions.

The champion is a banking77 version (from bench/train_compare.py); feedback texts are
banking77's training texts with their true labels, cycled to reach the volume.

    .venv/bin/python bench/retrain_speed.py --version-dir REGISTRY/versions/v1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, read_texts, require_shared, run_wrk, save, write_bodies  # noqa: E402
from bench.serve_load import serve_refit, stop, wait_ready  # noqa: E402


def registry_with(version_dir: Path, root: Path) -> Path:
    (root / "versions").mkdir(parents=True)
    os.symlink(version_dir.resolve(), root / "versions" / version_dir.name)
    (root / "current.json").write_text(json.dumps({"version": version_dir.name, "previous": None}))
    return root


def fill_feedback(db_url: str, texts, labels, vectors, encoder_id: str | None, n: int) -> None:
    from refit.store import FeedbackRecord, Store, vector_bytes

    store = Store.from_url(db_url)
    records = []
    for i in range(n):
        j = i % len(texts)
        records.append(
            FeedbackRecord(
                prediction_id=None,
                text=texts[j] if i < len(texts) else f"{texts[j]} ({i // len(texts)})",
                label=labels[j],
                embedding=vector_bytes(vectors[j]) if encoder_id else None,
                encoder_id=encoder_id,
            )
        )
    for start in range(0, n, 5000):
        store.insert_feedback(records[start : start + 5000])
    store.close()


def run_job(db_url: str, registry: Path, workdir: Path) -> dict:
    from refit.jobs import RetrainOptions
    from refit.store import Store

    store = Store.from_url(db_url)
    job_id = f"bench-{time.time_ns()}"
    store.create_job(job_id, RetrainOptions(min_feedback=1, force=True))
    env = {**os.environ, "REFIT_DATABASE_URL": db_url, "REFIT_REGISTRY_PATH": str(registry),
           "REFIT_DATA_DIR": str(workdir)}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "adapters.training.retrain", job_id],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds (user + system) of the job process: on a shared machine wall time includes
    # waiting for a core, CPU time does not.
    cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    job = store.get_job(job_id)
    store.close()
    return {"wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "in_job_seconds": job.result["train_seconds"],
            "version": job.result["version"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--version-dir", type=Path, required=True)
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--embeddings", choices=("both", "cached"), default="both",
                        help="cached: only feedback with embeddings logged at prediction time")
    parser.add_argument("--repeats", type=int, default=1, help="jobs per size (medians quoted)")
    parser.add_argument("--skip-latency", action="store_true",
                        help="only the job timings, no live server")
    args = parser.parse_args()
    shared = require_shared()

    from adapters.serving.registry import ModelVersion
    from adapters.training.pipeline import version_data

    version = ModelVersion(args.version_dir.name, args.version_dir)
    splits, embeddings = version_data(version)
    texts = list(splits.train.texts + splits.validation.texts)
    labels = list(splits.train.labels + splits.validation.labels)
    vectors = np.concatenate([embeddings["train"], embeddings["validation"]])
    encoder_id = version.manifest["encoder"]["id"]
    workdir = Path(tempfile.mkdtemp(prefix="bench-retrain-"))

    timings = []
    for size in (int(s) for s in args.sizes.split(",") if s):
        for cached in (True,) if args.embeddings == "cached" else (True, False):
            db = f"sqlite:///{workdir}/feedback-{size}-{cached}.db"
            fill_feedback(db, texts, labels, vectors, encoder_id if cached else None, size)
            runs = []
            for repeat in range(args.repeats):
                registry = registry_with(
                    args.version_dir, workdir / f"registry-{size}-{cached}-{repeat}"
                )
                runs.append(run_job(db, registry, workdir))
                print(f"    run {repeat + 1}: {runs[-1]}", file=sys.stderr)
            result = {
                key: float(np.median([r[key] for r in runs]))
                for key in ("wall_seconds", "cpu_seconds", "in_job_seconds")
            } | {"runs": runs}
            timings.append(
                {"feedback": size, "embeddings": "cached" if cached else "re-encoded", **result}
            )
            print(
                f"  {size:>6} feedback, {'cached' if cached else 're-encoded'}: {result}",
                file=sys.stderr,
            )

    if args.skip_latency:
        path = save("retrain_speed_jobs", {"timings": timings})
        print(json.dumps(timings, indent=1))
        print(f"results: {path}")
        return
    # Latency around a retrain and around swaps, on a live server.
    test_texts = read_texts(shared / "banking77" / "test.jsonl")
    bodies = write_bodies(test_texts, workdir / "bodies.jsonl")
    db = f"sqlite:///{workdir}/live.db"
    fill_feedback(db, texts, labels, vectors, encoder_id, 10000)
    server = serve_refit(args.version_dir, workdir / "live", 3310, env={"REFIT_DATABASE_URL": db})
    url = "http://127.0.0.1:3310"
    latency = {}
    try:
        wait_ready(url)
        run_wrk(url, 8, 3, bodies, server.pid)
        latency["steady"] = run_wrk(url, 8, args.seconds, bodies, server.pid)
        job = httpx.post(
            url + "/retrain", json={"min_feedback": 1, "force": True}, timeout=30
        ).json()
        latency["during_retrain"] = run_wrk(url, 8, args.seconds, bodies, server.pid)
        while (final := httpx.get(f"{url}/retrain/{job['job_id']}").json())["phase"] not in (
            "done",
            "failed",
        ):
            time.sleep(1)
        latency["retrain_job"] = {"phase": final["phase"], "result": final.get("result"),
                                  "seconds_under_load": final["updated_at"] - final["created_at"]}
        time.sleep(5)  # the promotion's swap settles before the swap measurement starts
        versions = sorted(p.name for p in (workdir / "live" / "registry" / "versions").iterdir())
        stop_swaps = threading.Event()
        swaps = []

        def swapper() -> None:
            k = 0
            while not stop_swaps.is_set():
                target = versions[k % len(versions)]
                httpx.post(url + "/models/promote", json={"version": target}, timeout=30)
                swaps.append(target)
                k += 1
                stop_swaps.wait(2.0)

        thread = threading.Thread(target=swapper)
        thread.start()
        latency["during_swaps"] = run_wrk(url, 8, args.seconds, bodies, server.pid)
        stop_swaps.set()
        thread.join()
        latency["swaps"] = len(swaps)
    finally:
        stop(server)

    steady = latency["steady"].p99_ms
    summary = {
        "p99_ms": {k: v.p99_ms for k, v in latency.items() if hasattr(v, "p99_ms")},
        "p99_ratio_during_retrain": latency["during_retrain"].p99_ms / steady,
        "p99_ratio_during_swaps": latency["during_swaps"].p99_ms / steady,
        "errors_during_swaps": latency["during_swaps"].errors,
        "swaps": latency["swaps"],
    }
    path = save("retrain_speed", {"timings": timings, "latency": latency, "summary": summary})
    print(
        "\n| feedback items | embeddings | job wall time (s) | in-job time (s) |\n|---|---|---|---|"
    )
    for row in timings:
        print(
            f"| {row['feedback']} | {row['embeddings']} | {row['wall_seconds']} "
            f"| {row['in_job_seconds']} |"
        )
    print("\n" + json.dumps(summary, indent=1, default=str))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
