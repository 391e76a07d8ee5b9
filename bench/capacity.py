"""Capacity on paper: what one PostgreSQL carries, and what one replica does per core.

On a private PostgreSQL 15 with ``fsync`` on (as in production; the tests turn it off):

1. **Prediction-log writes.** ``--writers`` serving workers' batched writers
   (:class:`service.prediction_log.PredictionLog`, default 200 ms flush, each its own connection
   pool), each offered ``--rate`` rows per second for ``--seconds``: whether the database keeps
   up (the time to write everything against ``--seconds``), its CPU per 1,000 rows, and bytes on
   disk per row (table and indexes).
2. **Feedback lookups.** ``--threads`` clients looking up logged predictions by id
   (``Store.get_predictions``, what ``POST /feedback`` by ``prediction_id`` does) and, separately,
   inserting feedback by prediction id (``Store.insert_feedback``: a transaction with the
   change-feed lock); per second, and database CPU per operation.
3. **One replica.** ``bentoml serve`` (2 workers) on that database, loaded by ``wrk`` with
   ``--concurrency`` connections, one text per request: requests per second, the server's CPU
   per prediction (so predictions per second per core), and the database's CPU per prediction
   (its share of serving: the batched log writes).

    .venv/bin/python bench/capacity.py [--seconds 10] [--writers 1,4,8,16] [--rate 500]
        [--threads 4] [--concurrency 16] [--registry DIR]

The figures divide CPU time by work done, which holds better than rates on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.common import ROOT, cpu_seconds, run_wrk, save, write_bodies  # noqa: E402
from refit.store import FeedbackRecord, PredictionRecord, Store  # noqa: E402
from service.dataplane import new_prediction_id  # noqa: E402
from service.prediction_log import PredictionLog  # noqa: E402
from tests.servers import PrivatePostgres, ServiceProcess  # noqa: E402

EMBEDDING = np.random.default_rng(0).standard_normal(384).astype(np.float32).tobytes()
TEXTS = [json.loads(line)["text"] for line in
         (ROOT / "data" / "demo" / "intents.jsonl").read_text().splitlines() if line.strip()]


class DurablePostgres(PrivatePostgres):
    """The private cluster of the tests, but with fsync on: commits wait for the disk."""

    def start(self) -> None:
        self._run(
            "/usr/lib/postgresql/15/bin/pg_ctl", "-D", str(self.folder / "data"), "-w", "-l",
            str(self.folder / "postgres.log"), "-o",
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=on "
            "-c synchronous_commit=on -c shared_buffers=256MB",
            "start",
        )

    def cpu(self) -> float:
        """CPU seconds of the postmaster and all its backends so far."""
        postmaster = int((self.folder / "data" / "postmaster.pid").read_text().split()[0])
        return cpu_seconds(postmaster)


def record(now: float, index: int) -> PredictionRecord:
    text = TEXTS[index % len(TEXTS)]
    return PredictionRecord(new_prediction_id(now), now, "v1", text, "order_status", 0.91,
                            EMBEDDING)


def count_rows(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT count(*) FROM predictions").scalar_one())


def log_writes(pg: DurablePostgres, writers: int, rate: float, seconds: float) -> dict:
    """``writers`` batched writers, each offered ``rate`` rows per second (as a serving worker
    logs its predictions), for ``seconds``: how many rows the database took, and at what cost."""
    stores = [Store.from_url(pg.url) for _ in range(writers)]
    logs = [PredictionLog(store, retention_rows=10**9) for store in stores]
    stop = threading.Event()
    offered = [0] * writers

    def feed(index: int) -> None:
        started, i = time.monotonic(), 0
        while not stop.is_set():
            due = int((time.monotonic() - started) * rate)
            if due > i:
                now = time.time()
                logs[index].add([record(now, i + k) for k in range(due - i)])
                offered[index] += due - i
                i = due
            time.sleep(0.01)

    before_rows, before_cpu = count_rows(stores[0]), pg.cpu()
    for log in logs:
        log.start()
    feeders = [threading.Thread(target=feed, args=(i,), daemon=True) for i in range(writers)]
    started = time.monotonic()
    for thread in feeders:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in feeders:
        thread.join()
    for log in logs:
        log.close()  # writes what is left: every offered row is counted
    elapsed = time.monotonic() - started
    rows = count_rows(stores[0]) - before_rows
    cpu = pg.cpu() - before_cpu
    for store in stores:
        store.close()
    return {"writers": writers, "offered_rows_per_s": round(sum(offered) / seconds),
            "rows": rows, "seconds_to_write_all": round(elapsed, 2),
            "rows_per_s": round(rows / elapsed),
            "pg_cpu_ms_per_1000_rows": round(1e6 * cpu / max(1, rows), 1)}


def bytes_per_row(pg: DurablePostgres) -> dict:
    store = Store.from_url(pg.url)
    with store.engine.connect() as conn:
        size = conn.exec_driver_sql(
            "SELECT pg_total_relation_size('predictions')").scalar_one()
        rows = conn.exec_driver_sql("SELECT count(*) FROM predictions").scalar_one()
    store.close()
    return {"rows": int(rows), "total_bytes": int(size),
            "bytes_per_row": round(size / max(1, rows))}


def lookups(pg: DurablePostgres, threads: int, seconds: float) -> dict:
    store = Store.from_url(pg.url)
    with store.engine.connect() as conn:
        ids = [row[0] for row in conn.exec_driver_sql(
            "SELECT id FROM predictions TABLESAMPLE SYSTEM (5) LIMIT 20000")]
    results: dict[str, dict] = {}
    for kind in ("lookup", "feedback_insert"):
        stores = [Store.from_url(pg.url) for _ in range(threads)]
        done = [0] * threads
        stop = threading.Event()

        def run(index: int, kind: str = kind, stores: list[Store] = stores,
                done: list[int] = done, stop: threading.Event = stop) -> None:
            rng = random.Random(index)
            own = stores[index]
            while not stop.is_set():
                prediction_id = rng.choice(ids)
                if kind == "lookup":
                    found = own.get_predictions([prediction_id])
                    assert prediction_id in found
                else:
                    own.insert_feedback([FeedbackRecord(
                        prediction_id=prediction_id, text="t", label="card_lost",
                        predicted_label="order_status", model_version="v1",
                        embedding=EMBEDDING, encoder_id="e")])
                done[index] += 1

        before = pg.cpu()
        workers = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
        started = time.monotonic()
        for worker in workers:
            worker.start()
        time.sleep(seconds)
        stop.set()
        for worker in workers:
            worker.join()
        elapsed = time.monotonic() - started
        cpu = pg.cpu() - before
        count = sum(done)
        results[kind] = {"threads": threads, "operations": count,
                         "per_s": round(count / elapsed),
                         "pg_cpu_ms_per_operation": round(1000 * cpu / max(1, count), 3)}
        for own in stores:
            own.close()
    store.close()
    return results


def watch_connections(pg: DurablePostgres, seen: list[int], stop: threading.Event) -> None:
    """Sample the database's client connections (the replica's pools) every half second."""
    store = Store.from_url(pg.url)
    while not stop.wait(0.5):
        with store.engine.connect() as conn:
            seen.append(int(conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            ).scalar_one()) - 1)  # less this sampler's own
    store.close()


def replica(pg: DurablePostgres, registry: Path, concurrency: int, seconds: int,
            work: Path) -> dict:
    service = ServiceProcess(registry=registry, data_dir=work / "var",
                             env={"REFIT_DATABASE_URL": pg.url}).start()
    try:
        bodies = write_bodies(TEXTS, work / "bodies.jsonl")
        run_wrk(service.url, concurrency, 3, bodies, service.proc.pid)  # warm up
        before = pg.cpu()
        connections: list[int] = []
        stop = threading.Event()
        watcher = threading.Thread(target=watch_connections, args=(pg, connections, stop))
        watcher.start()
        result = run_wrk(service.url, concurrency, seconds, bodies, service.proc.pid)
        pg_cpu = pg.cpu() - before
        stop.set()
        watcher.join()
        time.sleep(1)
    finally:
        service.stop()
    return {
        "concurrency": concurrency, "requests": result.requests,
        "req_per_s": round(result.throughput, 1), "p50_ms": round(result.p50_ms, 1),
        "p99_ms": round(result.p99_ms, 1), "errors": result.errors,
        "server_cpu_ms_per_prediction": round(result.cpu_ms_per_prediction, 2),
        "predictions_per_s_per_core": round(1000 / result.cpu_ms_per_prediction, 1),
        "pg_cpu_ms_per_prediction": round(1000 * pg_cpu / max(1, result.requests), 3),
        "pg_connections_max": max(connections, default=0),
    }


def demo_registry(work: Path) -> Path:
    registry = work / "registry"
    subprocess.run(
        [sys.executable, "-m", "refit.cli", "train", "--data",
         str(ROOT / "data" / "demo" / "intents.jsonl"), "--registry", str(registry),
         "--search", "none"],
        check=True, cwd=ROOT, capture_output=True,
    )
    return registry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--writers", default="1,4,8,16")
    parser.add_argument("--rate", type=float, default=500,
                        help="rows per second offered by each writer")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--registry", type=Path, help="default: train the demo model")
    parser.add_argument("--parts", default="log,feedback,replica")
    args = parser.parse_args()
    pg = DurablePostgres().init()
    if pg is None:
        sys.exit("PostgreSQL 15 binaries not found in /usr/lib/postgresql/15/bin")
    work = Path(tempfile.mkdtemp(prefix="refit-capacity-"))
    try:
        load = os.getloadavg()[0]
        parts = set(args.parts.split(","))
        payload: dict = {"load_average_at_start": round(load, 1), "cores": os.cpu_count()}
        if "log" in parts:
            payload["log_writes"] = [log_writes(pg, int(w), args.rate, args.seconds)
                                     for w in args.writers.split(",")]
            for row in payload["log_writes"]:
                print("log writes", row, flush=True)
            payload["table_size"] = bytes_per_row(pg)
            print("size", payload["table_size"], flush=True)
        if "feedback" in parts:
            if "log" not in parts:
                log_writes(pg, 4, 2000, 10)  # something to look up
            payload["feedback"] = lookups(pg, args.threads, args.seconds)
            print("feedback", payload["feedback"], flush=True)
        if "replica" in parts:
            registry = args.registry or demo_registry(work)
            payload["replica"] = replica(pg, registry, args.concurrency, int(args.seconds * 2),
                                         work)
            print("replica", payload["replica"], flush=True)
        path = save("capacity", payload)
        print(f"saved {path}")
    finally:
        pg.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
