"""Crash and outage figures: repeated SIGKILLs under load, and PostgreSQL outages under load.

For each backend (SQLite, and a private PostgreSQL cluster), ``--kills`` times: start the server
on the same database, load it for a few seconds (predictions and feedback from 4 clients), SIGKILL
the whole process tree, and count what was acknowledged but is not in the store. Then, on
PostgreSQL, ``--outages`` times: stop the database for ``--outage-s`` seconds under prediction load
and count failed requests and predictions never written.

    .venv/bin/python bench/faults.py [--kills 8] [--outages 3] [--outage-s 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, save  # noqa: E402
from refit.store import Store  # noqa: E402
from tests.servers import PrivatePostgres, ServiceProcess  # noqa: E402
from tests.test_faults import FLUSH_WINDOW_S, Load  # noqa: E402


def kills(registry: Path, url: str, work: Path, count: int) -> dict:
    store = Store.from_url(url)
    lost_feedback = acked_feedback = answered = lost_predictions = lost_outside_window = 0
    for i in range(count):
        before = {row.id for row in store.all_feedback()}
        service = ServiceProcess(registry=registry, data_dir=work / "var",
                                 env={"REFIT_DATABASE_URL": url}).start()
        with Load(service.url) as load:
            time.sleep(3 + i % 3)
            killed_at = time.time()
            service.kill()
        stored_fb = {row.id for row in store.all_feedback()} - before
        acked = set(load.feedback_ids)
        acked_feedback += len(acked)
        lost_feedback += len(acked - stored_fb)
        ids = [pid for _, pid in load.predictions]
        stored = store.get_predictions(ids)
        answered += len(ids)
        lost = [(t, pid) for t, pid in load.predictions if pid not in stored]
        lost_predictions += len(lost)
        lost_outside_window += sum(1 for t, _ in lost if t < killed_at - FLUSH_WINDOW_S - 0.3)
        print(f"  kill {i + 1}: feedback acked {len(acked)}, lost {len(acked - stored_fb)}; "
              f"predictions answered {len(ids)}, lost {len(lost)}", file=sys.stderr)
    store.close()
    return {"kills": count, "feedback_acknowledged": acked_feedback, "feedback_lost": lost_feedback,
            "predictions_answered": answered, "predictions_lost": lost_predictions,
            "predictions_lost_before_flush_window": lost_outside_window}


def outages(registry: Path, pg: PrivatePostgres, work: Path, count: int, seconds: float) -> dict:
    service = ServiceProcess(registry=registry, data_dir=work / "var-outage",
                             env={"REFIT_DATABASE_URL": pg.url}).start()
    rows = []
    try:
        for _ in range(count):
            load = Load(service.url, threads=2)
            load._threads = load._threads[:1]  # predictions only
            with load:
                time.sleep(2)
                pg.stop()
                time.sleep(seconds)
                pg.start()
                time.sleep(2)
            store = Store.from_url(pg.url)
            ids = [pid for _, pid in load.predictions]
            deadline = time.monotonic() + 60
            while len(store.get_predictions(ids)) < len(ids) and time.monotonic() < deadline:
                time.sleep(0.5)
            rows.append({"answered": len(ids), "failed_requests": len(load.failures),
                         "never_written": len(ids) - len(store.get_predictions(ids))})
            store.close()
            print(f"  outage: {rows[-1]}", file=sys.stderr)
    finally:
        service.stop()
    return {"outages": count, "seconds_each": seconds, "runs": rows,
            "server_restarts": 0 if service.proc and service.proc.returncode in (0, None) else 1}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--outages", type=int, default=3)
    parser.add_argument("--outage-s", type=float, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="refit-faults-"))
    import subprocess

    subprocess.run([sys.executable, "-m", "refit.cli", "train", "--data",
                    str(ROOT / "data" / "demo" / "intents.jsonl"), "--registry",
                    str(work / "registry"), "--search", "none"], check=True, cwd=ROOT)
    pg = PrivatePostgres().init()
    assert pg is not None, "PostgreSQL 15 binaries are needed"
    try:
        result = {
            "sqlite": kills(work / "registry", f"sqlite:///{work / 'refit.db'}", work, args.kills),
            "postgresql": kills(work / "registry", pg.url, work, args.kills),
            "postgresql_outage": outages(work / "registry", pg, work, args.outages, args.outage_s),
        }
    finally:
        pg.remove()
    print(json.dumps(result, indent=1))
    save("faults", result)


if __name__ == "__main__":
    main()
