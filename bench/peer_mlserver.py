"""A peer, not only a naive server: refit against MLServer on the same model, same load, one run.

MLServer (PyPI ``mlserver``) serves the same registry version through a small custom runtime
(``bench/mlserver_runtime.py``: refit's own onnxruntime session, tokenizer and length-aware runs),
with MLServer's adaptive batching on (``max_batch_size``, ``max_batch_time``) and its parallel
inference workers (2, as refit's 2 BentoML workers). Both servers run side by side; ``wrk``
(one text per request, banking77 test texts, closed loop) loads one at a time, in interleaved
rounds, so a change in a shared machine's load hits both alike:

- ``refit``: ``POST /predict`` with ``{"texts": [text]}`` (refit's own API; the answer carries
  every label's score and a prediction id, written to the prediction log).
- ``refit-v2``: ``POST /v2/models/refit/infer`` on refit with a JSON ``BYTES`` tensor.
- ``mlserver``: the very same v2 body to MLServer's ``/v2/models/refit/infer``.
- ``refit-nowait`` (opt-in, ``--modes``): ``POST /predict`` on a second refit server started with
  ``REFIT_BATCH_MAX_WAIT_MS=0``, the batcher as it was before it could wait for a fuller batch
  (a before/after in the same run).

Figures are medians over rounds: req/s, p50, p99 and CPU seconds of each server's process tree
per prediction (bench/common.py), and their ratios.

MLServer's dependencies clash with refit's, so it lives in a virtualenv of its own, created on
first use (or by hand: ``python3.11 -m venv /work/venv-mlserver && /work/venv-mlserver/bin/pip
install mlserver==1.7.1 "uvloop<0.22" onnxruntime tokenizers numpy``)::

    .venv/bin/python bench/peer_mlserver.py --version-dir REGISTRY/versions/v1 [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    ROOT,
    LoadResult,
    read_texts,
    require_shared,
    run_wrk,
    save,
    write_bodies,
)
from bench.serve_load import serve_refit, stop, wait_ready, wait_settled  # noqa: E402

REFIT_PORT, MLSERVER_PORT, NOWAIT_PORT = 3320, 3330, 3321
INFER = "/v2/models/refit/infer"
# uvloop 0.22+ raises in MLServer 1.7.1's workers (asyncio.get_event_loop() with no loop).
MLSERVER_PACKAGES = ["mlserver==1.7.1", "uvloop<0.22", "onnxruntime", "tokenizers", "numpy"]


def ensure_venv(venv: Path) -> Path:
    """MLServer's own virtualenv (created once); returns its ``mlserver`` executable."""
    executable = venv / "bin" / "mlserver"
    if not executable.exists():
        print(f"creating {venv} for MLServer", file=sys.stderr)
        subprocess.run(["python3.11", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *MLSERVER_PACKAGES],
                       check=True)
    return executable


def serve_mlserver(
    executable: Path, version_dir: Path, workdir: Path, port: int, max_batch_size: int,
    max_batch_time: float, parallel_workers: int,
) -> subprocess.Popen:
    folder = workdir / "mlserver"
    (folder / "refit").mkdir(parents=True)
    (folder / "settings.json").write_text(json.dumps({
        "debug": False,  # its default (True) logs at DEBUG level: not what one deploys
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": port + 1,
        "metrics_port": port + 2,
        "parallel_workers": parallel_workers,
    }))
    (folder / "refit" / "model-settings.json").write_text(json.dumps({
        "name": "refit",
        "implementation": "bench.mlserver_runtime.RefitOnnxRuntime",
        "max_batch_size": max_batch_size,
        "max_batch_time": max_batch_time,
        "parameters": {"uri": str(version_dir.resolve())},
    }))
    return subprocess.Popen(
        [str(executable), "start", str(folder)],
        cwd=ROOT,
        env={"PATH": f"{executable.parent}:/usr/bin:/bin", "PYTHONPATH": str(ROOT),
             "HOME": str(Path.home())},
        stdout=(workdir / "mlserver.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_mlserver(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/v2/models/refit/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def v2_bodies(texts: list[str], path: Path) -> Path:
    """bench/bodies.lua's format: header length (0: plain JSON), a space, the body in hex."""
    lines = []
    for text in texts:
        body = orjson.dumps(
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}
        )
        lines.append(f"0 {body.hex()}\n")
    path.write_text("".join(lines))
    return path


def check(url: str, path: str, body: bytes) -> dict:
    response = httpx.post(url + path, content=body,
                          headers={"content-type": "application/json"}, timeout=60)
    response.raise_for_status()
    return response.json()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--version-dir", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--concurrency", type=int, action="append",
                        help="repeatable; default 32")
    parser.add_argument("--venv", type=Path, default=Path("/work/venv-mlserver"))
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-batch-time", type=float, default=0.01, help="seconds")
    parser.add_argument("--parallel-workers", type=int, default=2)
    parser.add_argument("--modes", default="refit,refit-v2,mlserver")
    parser.add_argument("--save-as", default="peer_mlserver")
    args = parser.parse_args()
    concurrencies = args.concurrency or [32]
    modes = args.modes.split(",")
    executable = ensure_venv(args.venv)
    shared = require_shared()
    texts = read_texts(shared / "banking77" / "test.jsonl")
    import random

    random.Random(0).shuffle(texts)
    workdir = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    predict_bodies = write_bodies(texts, workdir / "bodies.jsonl")
    infer_bodies = v2_bodies(texts, workdir / "v2.txt")
    refit_url, mlserver_url = (f"http://127.0.0.1:{p}" for p in (REFIT_PORT, MLSERVER_PORT))

    refit = serve_refit(args.version_dir, workdir / "refit", REFIT_PORT)
    nowait = (
        serve_refit(args.version_dir, workdir / "nowait", NOWAIT_PORT,
                    env={"REFIT_BATCH_MAX_WAIT_MS": "0"})
        if "refit-nowait" in modes else None
    )
    nowait_url = f"http://127.0.0.1:{NOWAIT_PORT}"
    peer = serve_mlserver(executable, args.version_dir, workdir, MLSERVER_PORT,
                          args.max_batch_size, args.max_batch_time, args.parallel_workers)
    try:
        wait_ready(refit_url)
        wait_settled(refit.pid)
        if nowait is not None:
            wait_ready(nowait_url)
            wait_settled(nowait.pid)
        wait_mlserver(mlserver_url)
        one = orjson.dumps(
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [texts[0]]}]}
        )
        answers = {"refit-v2": check(refit_url, INFER, one), "mlserver": check(mlserver_url,
                                                                             INFER, one)}
        labels = {m: next(o["data"][0] for o in a["outputs"] if o["name"] == "label")
                  for m, a in answers.items()}
        print(f"one text: {labels}", file=sys.stderr)
        assert labels["refit-v2"] == labels["mlserver"], labels

        def run(mode: str, concurrency: int, seconds: int) -> LoadResult:
            if mode == "refit":
                return run_wrk(refit_url, concurrency, seconds, predict_bodies, refit.pid)
            if mode == "refit-nowait":
                assert nowait is not None
                return run_wrk(nowait_url, concurrency, seconds, predict_bodies, nowait.pid)
            url, pid = (refit_url, refit.pid) if mode == "refit-v2" else (mlserver_url, peer.pid)
            return run_wrk(url, concurrency, seconds, infer_bodies, pid,
                           script=ROOT / "bench" / "bodies.lua",
                           env={"REFIT_BENCH_PATH": INFER})

        for mode in modes:  # warm-up, not recorded
            run(mode, 8, 3)
        results: dict[str, dict[int, list[LoadResult]]] = {
            m: {c: [] for c in concurrencies} for m in modes
        }
        for round_ in range(args.rounds):
            order = modes if round_ % 2 == 0 else modes[::-1]
            for concurrency in concurrencies:
                for mode in order:
                    result = run(mode, concurrency, args.seconds)
                    results[mode][concurrency].append(result)
                    print(
                        f"  round {round_ + 1} {mode:<9} c={concurrency:>2}: "
                        f"{result.throughput:6.1f} req/s  p50 {result.p50_ms:6.1f}  "
                        f"p99 {result.p99_ms:6.1f} ms  errors {result.errors}  "
                        f"{result.cpu_ms_per_prediction:.2f} ms CPU/prediction",
                        file=sys.stderr,
                    )
    finally:
        stop(refit)
        if nowait is not None:
            stop(nowait)
        stop(peer)

    def med(mode: str, c: int, field: str) -> float:
        return statistics.median(getattr(r, field) for r in results[mode][c])

    summary: dict = {"mlserver": {"max_batch_size": args.max_batch_size,
                                  "max_batch_time_s": args.max_batch_time,
                                  "parallel_workers": args.parallel_workers}}
    for c in concurrencies:
        medians = {
            m: {f: med(m, c, f) for f in ("throughput", "p50_ms", "p99_ms",
                                           "cpu_ms_per_prediction")}
            | {"errors": sum(r.errors for r in results[m][c])}
            for m in modes
        }
        summary[f"c{c}"] = medians
        if "mlserver" in medians:
            peer_m = medians["mlserver"]
            for m in (x for x in modes if x != "mlserver"):
                summary[f"c{c}"][f"{m}_over_mlserver"] = {
                    "throughput": medians[m]["throughput"] / peer_m["throughput"],
                    "p99_mlserver_over_refit": peer_m["p99_ms"] / medians[m]["p99_ms"],
                    "cpu_mlserver_over_refit": peer_m["cpu_ms_per_prediction"]
                    / medians[m]["cpu_ms_per_prediction"],
                }
    with open("/proc/loadavg") as f:
        summary["loadavg_after"] = f.read().split()[:3]
    path = save(args.save_as, {"rounds": results, "summary": summary})
    print(json.dumps(summary, indent=1))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
