"""How long the review queue takes on a large prediction log (issue 13, item 3).

Fills a fresh store (SQLite by default, or ``--database-url``) with ``--rows`` predictions of the
serving version (real-sized 384-float embeddings, confidences and margins drawn uniformly, a share
from another version and a share past retention), labels ``--labelled`` of them, among them the
least confident, and times what ``GET /review`` does behind HTTP, i.e. the data plane's
``_review_blocking`` on that store, per strategy, and the drift job's count for the gauge.
Prints the query plans too, to show the indexes at work.

    .venv/bin/python bench/review_speed.py --rows 10000 200000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from refit.settings import RefitSettings  # noqa: E402
from refit.store import FeedbackRecord, PredictionRecord, Store  # noqa: E402
from service.dataplane import DataPlane  # noqa: E402

DAY = 86400.0


def fill(store: Store, rows: int, labelled: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    now = time.time()
    batch: list[PredictionRecord] = []
    for i in range(rows):
        version = "v2" if i % 10 else "v1"  # a tenth from an older version
        age = 40 * DAY if i % 50 == 0 else rng.uniform(0, 29 * DAY)  # 2% past retention
        vector = rng.normal(size=384).astype(np.float32)
        vector /= np.linalg.norm(vector)
        batch.append(PredictionRecord(
            f"{i:028x}", now - age, version, f"text number {i}", f"label_{i % 20}",
            float(rng.random()), vector.tobytes(), float(rng.random()),
        ))
        if len(batch) == 5000:
            store.insert_predictions(batch)
            batch = []
    store.insert_predictions(batch)
    # Label the least confident of v2 (what a user working through the queue labels first) and
    # a random spread.
    lowest = store.review_candidates("v2", "confidence", 0, labelled // 2)
    random_ids = rng.choice(rows, labelled - len(lowest), replace=False)
    ids = [c.id for c in lowest] + [f"{i:028x}" for i in random_ids]
    store.insert_feedback([
        FeedbackRecord(prediction_id=pid, text=f"text number {int(pid, 16)}", label="x")
        for pid in dict.fromkeys(ids)
    ])


def timed(call: Any, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds) * 1000


def plans(store: Store) -> list[str]:
    if store.dialect != "sqlite":
        return []
    out = []
    with store.engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert raw is not None
        for score in ("confidence", "margin"):
            query = (
                f"EXPLAIN QUERY PLAN SELECT id FROM predictions WHERE model_version = 'v2' AND "
                f"{score} IS NOT NULL AND created_at >= 0 AND NOT EXISTS (SELECT id FROM "
                f"feedback WHERE feedback.prediction_id = predictions.id) ORDER BY {score}, id "
                "LIMIT 40"
            )
            out += [f"{score}: {row[-1]}" for row in raw.execute(query).fetchall()]
    return out


def run(rows: int, labelled: int, url: str | None, repeats: int) -> dict[str, Any]:
    folder = tempfile.mkdtemp(prefix="refit-review-speed-")
    store = Store.from_url(url or f"sqlite:///{folder}/refit.db")
    started = time.perf_counter()
    fill(store, rows, labelled)
    fill_s = time.perf_counter() - started
    settings = RefitSettings()
    plane = SimpleNamespace(store=store, settings=settings)
    result: dict[str, Any] = {"rows": rows, "labelled": labelled, "dialect": store.dialect,
                              "fill_s": round(fill_s, 1)}
    for strategy in ("uncertainty", "margin", "diverse"):
        for limit in (10, 100):
            queue = DataPlane._review_blocking(plane, "v2", strategy, limit)  # type: ignore[arg-type]
            assert len(queue.items) == limit
            result[f"{strategy}_{limit}_ms"] = round(timed(
                lambda s=strategy, n=limit: DataPlane._review_blocking(  # type: ignore[misc]
                    plane, "v2", s, n), repeats), 2)
    result["count_ms"] = round(timed(
        lambda: store.count_review_queue("v2", 0.5, time.time() - 30 * DAY), max(3, repeats // 5)
    ), 1)
    result["plans"] = plans(store)
    store.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 200_000])
    parser.add_argument("--labelled", type=int, default=2000)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    results = [run(n, args.labelled, args.database_url, args.repeats) for n in args.rows]
    for r in results:
        print(r, flush=True)
    keys = [k for k in results[0] if k.endswith("_ms")]
    print("\n| rows | " + " | ".join(k.removesuffix("_ms") for k in keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for r in results:
        print(f"| {r['rows']:,} | " + " | ".join(f"{r[k]:g}" for k in keys) + " |")


if __name__ == "__main__":
    main()
