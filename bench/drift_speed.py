"""Drift benchmark: job time by window size, its cost to prediction latency, and its verdicts.

1. One drift run (read the window from SQLite, four signals, Evidently report written) for windows
   of 500, 2,000 and 10,000 logged predictions against a banking77 version's reference; median of
   3 runs.
2. Prediction p99 under load (wrk, 8 connections) with the drift job running back to back (every
   second, window 2,000) against the same load with it idle.
3. Verdicts: 10 windows of 500 in-distribution texts (banking77 test) and 10 windows of 500
   NLU++ hotel texts (a different domain): how often each raises the flag.

    .venv/bin/python bench/drift_speed.py --version-dir REGISTRY/versions/v1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import read_texts, require_shared, run_wrk, save, write_bodies  # noqa: E402
from bench.serve_load import serve_refit, stop, wait_ready  # noqa: E402


def predictions_for(version_dir: Path, texts: list[str]):
    from adapters.serving.runtime import OnnxClassifier

    classifier = OnnxClassifier(version_dir, intra_op_threads=2)
    out = [classifier.predict(texts[i : i + 256]) for i in range(0, len(texts), 256)]
    probabilities = np.concatenate([o.probabilities for o in out])
    embeddings = np.concatenate([o.embeddings for o in out])
    return classifier.labels, probabilities, embeddings


def fill_predictions(
    db_url: str, version: str, texts, labels, probabilities, embeddings, n: int
) -> None:
    from refit.store import PredictionRecord, Store

    store = Store.from_url(db_url)
    now = time.time()
    rows = []
    for i in range(n):
        j = i % len(texts)
        best = int(probabilities[j].argmax())
        rows.append(PredictionRecord(f"{i:028x}", now - n + i, version, texts[j], labels[best],
                                     float(probabilities[j, best]), embeddings[j].tobytes()))
    for start in range(0, n, 5000):
        store.insert_predictions(rows[start : start + 5000])
    store.close()


def window_verdicts(
    reference, labels, probabilities, embeddings, texts, windows: int, size: int
) -> list[dict]:
    from monitoring.drift import Thresholds, Window, detect

    rng = np.random.default_rng(0)
    verdicts = []
    for _ in range(windows):
        rows = rng.choice(len(texts), size, replace=False)
        window = Window(
            labels=[labels[i] for i in probabilities[rows].argmax(axis=1)],
            confidence=probabilities[rows].max(axis=1).astype(np.float64),
            text_length=np.array([len(texts[i]) for i in rows], dtype=np.float64),
            embeddings=embeddings[rows], start=0, end=1,
        )
        result, _ = detect(reference, window, Thresholds())
        verdicts.append({"drift": result.drift_detected,
                         **{name: round(s.score, 4) for name, s in result.signals.items()},
                         "flagged": [name for name, s in result.signals.items() if s.drifted]})
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--version-dir", type=Path, required=True)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--only-latency", action="store_true")
    args = parser.parse_args()
    shared = require_shared()

    from adapters.serving.registry import ModelVersion
    from monitoring.drift import Reference
    from monitoring.drift_job import DriftJob
    from refit.settings import RefitSettings
    from refit.store import Store

    version = ModelVersion(args.version_dir.name, args.version_dir)
    train_texts = read_texts(shared / "banking77" / "train.jsonl")
    test_texts = read_texts(shared / "banking77" / "test.jsonl")
    hotel_texts = read_texts(shared / "nlupp" / "hotels.jsonl")
    labels, probabilities, embeddings = predictions_for(args.version_dir, train_texts)
    workdir = Path(tempfile.mkdtemp(prefix="bench-drift-"))

    timings = []
    for size in () if args.only_latency else (500, 2000, 10000):
        db = f"sqlite:///{workdir}/drift-{size}.db"
        fill_predictions(db, version.name, train_texts, labels, probabilities, embeddings, size)
        registry = workdir / f"registry-{size}"
        (registry / "versions").mkdir(parents=True)
        os.symlink(args.version_dir.resolve(), registry / "versions" / version.name)
        (registry / "current.json").write_text(
            json.dumps({"version": version.name, "previous": None})
        )
        job = DriftJob(RefitSettings(registry_path=registry, data_dir=workdir / f"var-{size}",
                                     database_url=db, drift_window=size), Store.from_url(db))
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            result = job.run_once()
            runs.append(time.perf_counter() - started)
        timings.append({"window": size, "median_seconds": round(statistics.median(runs), 3),
                        "runs": [round(r, 3) for r in runs], "status": result.status})
        print(f"  drift run, window {size}: {timings[-1]}", file=sys.stderr)

    reference = Reference.load(version.name, version.path, version.labels)
    verdicts: dict[str, list[dict]] = {}
    if not args.only_latency:
        _, test_p, test_e = predictions_for(args.version_dir, test_texts)
        _, hotel_p, hotel_e = predictions_for(args.version_dir, hotel_texts)
        verdicts = {
            "banking77 test (in distribution)": window_verdicts(
                reference, labels, test_p, test_e, test_texts, 10, 500
            ),
            "NLU++ hotels (other domain)": window_verdicts(
                reference, labels, hotel_p, hotel_e, hotel_texts, 10, 500
            ),
        }
    for name, rows in verdicts.items():
        print(f"  {name}: {sum(r['drift'] for r in rows)}/10 windows flagged", file=sys.stderr)

    # p99 with the drift job running back to back, against it idle.
    bodies = write_bodies(test_texts, workdir / "bodies.jsonl")
    latency = {}
    for label, interval in (("drift idle", "3600"), ("drift running every 1s", "1")):
        db = f"sqlite:///{workdir}/live-{interval}.db"
        fill_predictions(db, version.name, train_texts, labels, probabilities, embeddings, 2000)
        server = serve_refit(
            args.version_dir,
            workdir / f"live-{interval}",
            3320,
            env={
                "REFIT_DATABASE_URL": db,
                "REFIT_DRIFT_INTERVAL_S": interval,
                "REFIT_DRIFT_WINDOW": "2000",
            },
        )
        try:
            wait_ready("http://127.0.0.1:3320")
            runs_log = workdir / f"live-{interval}" / "var" / "drift" / "drift_job.log"
            if interval == "1":
                # Measure while the job runs back to back, not while it imports and calibrates.
                while httpx.get("http://127.0.0.1:3320/drift").json().get("status") != "ok":
                    time.sleep(0.5)
            before = runs_log.read_text().count("drift ok") if runs_log.exists() else 0
            run_wrk("http://127.0.0.1:3320", args.concurrency, 3, bodies, server.pid)
            latency[label] = run_wrk(
                "http://127.0.0.1:3320", args.concurrency, args.seconds, bodies, server.pid
            )
            after = runs_log.read_text().count("drift ok") if runs_log.exists() else 0
            latency[label + " (drift runs logged)"] = after - before
        finally:
            stop(server)
    idle, busy = latency["drift idle"], latency["drift running every 1s"]
    summary = {
        "concurrency": args.concurrency,
        "drift_runs_during_load": latency["drift running every 1s (drift runs logged)"],
        "window_2000_seconds": next(
            (t["median_seconds"] for t in timings if t["window"] == 2000), None
        ),
        "p99_idle_ms": idle.p99_ms,
        "p99_drift_running_ms": busy.p99_ms,
        "p99_increase": busy.p99_ms / idle.p99_ms - 1,
        "false_alarms_in_distribution": sum(
            r["drift"] for r in verdicts.get("banking77 test (in distribution)", [])
        ),
        "detections_other_domain": sum(
            r["drift"] for r in verdicts.get("NLU++ hotels (other domain)", [])
        ),
    }
    path = save(
        "drift_speed" if not args.only_latency else f"drift_latency_c{args.concurrency}",
        {"timings": timings, "verdicts": verdicts, "latency": latency, "summary": summary},
    )
    print("\n" + json.dumps(summary, indent=1))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
