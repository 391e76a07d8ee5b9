"""Serving benchmark: the limit, refit under load, and what a user would run instead.

1. The limit: onnxruntime in-process on the same model and texts (banking77 test texts), batch
   sizes 1-64, tokenisation included, CPU seconds per item. "naive" runs each batch as it comes
   (padded to its longest text); "planned" uses refit's length-aware grouping.
2. refit: `bentoml serve` (2 workers), closed-loop load from wrk (one text per request) at each
   concurrency: throughput, p50/p95/p99, errors, CPU seconds of the server's process tree per
   prediction, resident memory per worker.
   With ``--compare-env``, a second refit server with those settings runs beside the first and
   each concurrency loads one then the other (order alternating): a before/after in one run
   (e.g. ``--compare-env REFIT_BATCH_MAX_WAIT_MS=0``, the batcher that never waits).
3. The same model in PyTorch eager behind Starlette/uvicorn (bench/torch_server.py), same load.

    .venv/bin/python bench/serve_load.py --version-dir REGISTRY/versions/v1 [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    ROOT,
    LoadResult,
    read_texts,
    require_shared,
    rss_mb,
    run_wrk,
    save,
    tree_pids,
    write_bodies,
)

CONCURRENCY = (1, 8, 32, 64)


def raw_onnx(version_dir: Path, texts: list[str], threads: int) -> list[dict]:
    from adapters.serving.runtime import OnnxClassifier
    from adapters.serving.tokenization import pad

    classifier = OnnxClassifier(version_dir, intra_op_threads=threads)
    classifier.warm_up()
    rows = []
    for batch in (1, 8, 16, 32, 64):
        for mode in ("naive", "planned"):
            if batch == 1 and mode == "planned":
                continue
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            for i in range(0, len(texts), batch):
                chunk = texts[i : i + batch]
                if mode == "naive":
                    classifier.run_tokens(*pad(classifier.tokenizer.token_ids(chunk)))
                else:
                    classifier.predict(chunk)
            wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
            rows.append(
                {
                    "threads": threads,
                    "batch": batch,
                    "mode": mode,
                    "items_per_s": len(texts) / wall,
                    "cpu_ms_per_item": 1000 * cpu / len(texts),
                }
            )
            print(
                f"  raw onnxruntime threads={threads} batch={batch:>2} {mode:<7} "
                f"{rows[-1]['items_per_s']:7.1f}/s  {rows[-1]['cpu_ms_per_item']:.2f} ms CPU/item",
                file=sys.stderr,
            )
    return rows


def wait_ready(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def wait_settled(root: int, timeout: float = 180) -> None:
    """Wait until the server's drift job (a process of its own, started with the workers) has
    finished starting up and its first run: otherwise its start-up CPU lands in the first
    measurements. It then runs once per ``REFIT_DRIFT_INTERVAL_S`` (an hour here)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        jobs = [p for p in tree_pids(root) if b"monitoring.drift_job" in _cmdline(p)]
        if not jobs and time.monotonic() - started > 30:
            return  # no drift job in this server's tree
        before = sum(_cpu(p) for p in jobs)
        time.sleep(1.0)
        if jobs and sum(_cpu(p) for p in jobs) - before < 0.05:
            return
    print("  (the drift job did not settle; measuring anyway)", file=sys.stderr)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_series(url: str, pid: int, bodies: Path, seconds: int, label: str) -> list[LoadResult]:
    return load_series_interleaved([(label, url, pid)], bodies, seconds)[label]


def load_series_interleaved(
    servers: list[tuple[str, str, int]], bodies: Path, seconds: int
) -> dict[str, list[LoadResult]]:
    """Each concurrency on every server in turn (order reversed at every other concurrency)."""
    for _label, url, pid in servers:  # warm-up runs, not recorded
        run_wrk(url, 8, 3, bodies, pid)
    results: dict[str, list[LoadResult]] = {label: [] for label, _u, _p in servers}
    for step, concurrency in enumerate(CONCURRENCY):
        for label, url, pid in servers if step % 2 == 0 else servers[::-1]:
            result = run_wrk(url, concurrency, seconds, bodies, pid)
            results[label].append(result)
            print(
                f"  {label} c={concurrency:>2}: {result.throughput:6.1f} req/s  "
                f"p50 {result.p50_ms:6.1f}  p95 {result.p95_ms:6.1f}  p99 {result.p99_ms:6.1f} "
                f"ms  p99/p50 {result.p99_over_p50:.2f}  errors {result.errors}  "
                f"{result.cpu_ms_per_prediction:.2f} ms CPU/prediction",
                file=sys.stderr,
            )
    return results


def serve_refit(
    version_dir: Path, workdir: Path, port: int, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """``bentoml serve`` on a registry holding ``version_dir`` as its current version."""
    registry = workdir / "registry"
    (registry / "versions").mkdir(parents=True)
    os.symlink(version_dir.resolve(), registry / "versions" / version_dir.name)
    (registry / "current.json").write_text(f'{{"version": "{version_dir.name}", "previous": null}}')
    env = {
        **os.environ,
        "REFIT_REGISTRY_PATH": str(registry),
        "REFIT_DATA_DIR": str(workdir / "var"),
        "BENTOML_HOME": str(workdir / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "REFIT_DRIFT_INTERVAL_S": "3600",
        **(env or {}),
    }
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "bentoml"),
            "serve",
            ".",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=(workdir / "serve.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def serve_torch(version_dir: Path, workdir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "REFIT_BENCH_VERSION_DIR": str(version_dir.resolve())}
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "uvicorn"), "bench.torch_server:app", "--workers", "2",
         "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
        cwd=ROOT, env=env, stdout=(workdir / "torch.log").open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, 15)
    process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--version-dir", type=Path, required=True)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-raw", action="store_true")
    parser.add_argument("--env", action="append", default=[], metavar="REFIT_X=VALUE",
                        help="a setting for the refit server (repeatable)")
    parser.add_argument("--compare-env", action="append", default=[], metavar="REFIT_X=VALUE",
                        help="settings of a second refit server measured beside the first")
    parser.add_argument("--save-as", default="serve_load")
    args = parser.parse_args()
    server_env = dict(item.split("=", 1) for item in args.env)
    compare_env = dict(item.split("=", 1) for item in args.compare_env)
    shared = require_shared()
    texts = read_texts(shared / "banking77" / "test.jsonl")
    random.Random(0).shuffle(texts)
    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    bodies = write_bodies(texts, workdir / "bodies.jsonl")

    raw: list[dict] = []
    if not args.skip_raw:
        print("the limit: raw onnxruntime in-process", file=sys.stderr)
        raw = raw_onnx(args.version_dir, texts[:1024], 1) + raw_onnx(
            args.version_dir, texts[:1024], 2
        )

    print("refit: bentoml serve, 2 workers", file=sys.stderr)
    server = serve_refit(args.version_dir, workdir / "refit", 3300, env=server_env)
    other = (
        serve_refit(args.version_dir, workdir / "compare", 3302, env=server_env | compare_env)
        if compare_env else None
    )
    compared: list[LoadResult] = []
    try:
        servers = [("refit", "http://127.0.0.1:3300", server.pid)]
        if other is not None:
            servers.append(("refit-compare", "http://127.0.0.1:3302", other.pid))
        for _label, url, pid in servers:
            wait_ready(url)
            wait_settled(pid)
        series = load_series_interleaved(servers, bodies, args.seconds)
        refit, compared = series["refit"], series.get("refit-compare", [])
        workers = [
            p
            for p in tree_pids(server.pid)
            if "_bentoml_impl.worker" in Path(f"/proc/{p}/cmdline").read_text()
        ]
        memory = {str(p): round(rss_mb(p), 1) for p in workers}
    finally:
        stop(server)
        if other is not None:
            stop(other)

    torch_results: list[LoadResult] = []
    if not args.skip_torch:
        print("baseline: PyTorch eager, Starlette + uvicorn, 2 workers", file=sys.stderr)
        baseline = serve_torch(args.version_dir, workdir, 3301)
        try:
            wait_ready("http://127.0.0.1:3301")
            torch_results = load_series(
                "http://127.0.0.1:3301", baseline.pid, bodies, args.seconds, "torch"
            )
        finally:
            stop(baseline)

    at32 = next(r for r in refit if r.concurrency == 32)
    summary: dict = {"server_env": server_env}
    if compared:
        other32 = next(r for r in compared if r.concurrency == 32)
        summary |= {"compare_env": compare_env, "compare_c32": other32.__dict__}
    if raw:
        naive32 = next(
            r for r in raw if r["threads"] == 1 and r["batch"] == 32 and r["mode"] == "naive"
        )
        planned32 = next(
            r for r in raw if r["threads"] == 1 and r["batch"] == 32 and r["mode"] == "planned"
        )
        best_naive = min(
            (r for r in raw if r["mode"] == "naive"), key=lambda r: r["cpu_ms_per_item"]
        )
        summary |= {
            "cpu_ratio_vs_raw_batch32_naive": at32.cpu_ms_per_prediction
            / naive32["cpu_ms_per_item"],
            "cpu_ratio_vs_raw_best_naive": at32.cpu_ms_per_prediction
            / best_naive["cpu_ms_per_item"],
            "cpu_ratio_vs_raw_batch32_planned": at32.cpu_ms_per_prediction
            / planned32["cpu_ms_per_item"],
        }
        if compared:
            summary["compare_cpu_ratio_vs_raw_batch32_planned"] = (
                other32.cpu_ms_per_prediction / planned32["cpu_ms_per_item"]
            )
    summary |= {
        "throughput_ratio_vs_torch_c32": (
            at32.throughput / next(r for r in torch_results if r.concurrency == 32).throughput
        )
        if torch_results
        else None,
        "max_p99_over_p50": max(r.p99_over_p50 for r in refit),
        "errors": sum(r.errors for r in refit),
        "worker_rss_mb": memory,
    }
    path = save(
        args.save_as,
        {"raw_onnx": raw, "refit": refit, "refit_compare": compared, "torch": torch_results,
         "summary": summary},
    )
    print("\n" + "\n".join(f"{k}: {v}" for k, v in summary.items()))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
