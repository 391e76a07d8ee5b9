"""How long the feedback memory's lookup takes on the serving hot path, by memory size.

A batch of queries (L2-normalised 384-d float32, like the encoder's embeddings) is looked up in
a :class:`adapters.serving.memory.FeedbackMemory` of 100 to 100,000 entries; the median and the
99th percentile of the wall time per call are reported, for batch sizes 1 and 64, and the median
CPU time of the process per call (on a busy machine wall time mostly measures waiting for a core;
CPU time is the work itself). BLAS threads are fixed per run (``--threads``, default 1: a serving
worker shares the cores with the others). The memory is set up as a worker's: 50 labels the model
knows (with their class prototypes as the reference) and 10 it does not, so the prototype rule
runs on every row the entries leave unanswered (random queries: all of them). The same lookups
without the rule (no reference: the nearest entry alone) are timed in the same run, for the
rule's cost.

    .venv/bin/python bench/memory_speed.py [--threads 1] [--sizes 100 1000 ...]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+",
                        default=[100, 1000, 5000, 20000, 100000])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    # BLAS reads its thread count when numpy loads: set it before the import.
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(args.threads)
    import time

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from adapters.serving.memory import DEFAULT_NEW_LABEL_MARGIN, FeedbackMemory
    from bench.common import save

    rng = np.random.default_rng(0)

    def unit(shape: tuple[int, int]) -> np.ndarray:
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    rows = []
    print(f"BLAS threads {args.threads}")
    print("| entries | batch | median ms | p99 ms | CPU ms (median) | CPU ms, nearest entry only |")
    print("|---|---|---|---|---|---|")

    def timed(memory: FeedbackMemory, queries: np.ndarray, repeats: int) -> tuple[list, list]:
        for _ in range(3):
            memory.lookup(queries)
        times, cpu = [], []
        for _ in range(repeats):
            started, started_cpu = time.perf_counter(), time.process_time()
            memory.lookup(queries)
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        return times, cpu

    for size in args.sizes:
        vectors = unit((size, 384))
        labels = [f"l{i % 60}" for i in range(size)]
        known = [f"l{i}" for i in range(50)]
        memory = FeedbackMemory(known_labels=known, reference=unit((50, 384)),
                                new_label_margin=DEFAULT_NEW_LABEL_MARGIN)
        plain = FeedbackMemory(known_labels=known)
        for m in (memory, plain):
            m.add(list(range(size)), vectors, labels)
        for batch in (1, 64):
            queries = unit((batch, 384))
            repeats = max(10, args.repeats if size <= 20000 else args.repeats // 10)
            times, cpu = timed(memory, queries, repeats)
            _, plain_cpu = timed(plain, queries, repeats)
            median, p99 = np.median(times) * 1000, np.percentile(times, 99) * 1000
            cpu_ms, plain_ms = np.median(cpu) * 1000, np.median(plain_cpu) * 1000
            rows.append({"entries": size, "batch": batch, "median_ms": median, "p99_ms": p99,
                         "cpu_median_ms": cpu_ms, "cpu_median_ms_nearest_only": plain_ms})
            print(f"| {size:,} | {batch} | {median:.3f} | {p99:.3f} | {cpu_ms:.3f} | "
                  f"{plain_ms:.3f} |", flush=True)
    save(f"memory-speed-threads{args.threads}", rows)


if __name__ == "__main__":
    main()
