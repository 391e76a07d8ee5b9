"""What the Open Inference Protocol costs: server CPU per prediction of ``/v2/.../infer`` against
``/predict``, on one server, in one run.

One refit server (``bentoml serve``, the default 2 workers) answers closed-loop load from ``wrk``
(one text per request, banking77 test texts) in three modes:

- ``predict``: ``POST /predict`` with ``{"texts": [text]}``; JSON answer (label, confidence,
  scores of every label, prediction id).
- ``v2-json``: ``POST /v2/models/refit/infer`` with a JSON ``BYTES`` tensor, all four outputs as
  JSON tensors.
- ``v2-binary``: the body ``tritonclient`` sends by default (built by its own
  ``generate_request_body``): binary input, all four outputs as binary tensors.

Rounds interleave the modes, so a change in the shared machine's load hits them alike. The
figure is the median over rounds of the server process tree's CPU seconds per prediction
(bench/common.py), and its ratio to ``predict``'s.

Under load the encoder dominates and a shared machine's noise is several percent, so the script
also measures, in-process, the part that differs: each endpoint's parse, data-plane call and
render, one text per request, sequentially, on the real data plane (batcher, prediction log to
SQLite, metrics) over the tests' tiny toy ONNX model (tests/fixtures.py), so that everything but
the encoder and HTTP is what is timed (CPU of the whole process, µs per request).

    .venv/bin/python bench/v2_overhead.py [--version-dir DIR] [--rounds 3] [--seconds 10]

Without ``--version-dir`` it trains the demo model (data/demo, 10 labels, no search) first.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, read_texts, require_shared, run_wrk, save  # noqa: E402
from bench.serve_load import serve_refit, stop, wait_ready  # noqa: E402

PORT = 3310
INFER = "/v2/models/refit/infer"
MODES = {"predict": "/predict", "v2-json": INFER, "v2-binary": INFER}


def bodies_for(mode: str, texts: list[str]) -> list[tuple[int, bytes]]:
    """(Inference-Header-Content-Length or 0, body) per text."""
    if mode == "predict":
        return [(0, orjson.dumps({"texts": [t]})) for t in texts]
    if mode == "v2-json":
        return [(0, orjson.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                              "data": [t]}]})) for t in texts]
    import tritonclient.http as triton

    bodies = []
    for text in texts:
        tensor = triton.InferInput("text", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([text], dtype=object))  # binary by default
        body, header_length = triton.InferenceServerClient.generate_request_body([tensor])
        bodies.append((header_length or 0, body))
    return bodies


def write_bodies(bodies: list[tuple[int, bytes]], path: Path) -> Path:
    path.write_text("".join(f"{length} {body.hex()}\n" for length, body in bodies))
    return path


def check(url: str, mode: str, body: tuple[int, bytes]) -> None:
    """One request of the mode, answered as expected, before any load."""
    length, content = body
    headers = {"content-type": "application/json"}
    if length:
        headers = {"content-type": "application/octet-stream",
                   "inference-header-content-length": str(length)}
    response = httpx.post(url + MODES[mode], content=content, headers=headers, timeout=30)
    response.raise_for_status()
    if mode == "v2-binary":
        assert "inference-header-content-length" in response.headers, response.headers
    elif mode == "v2-json":
        assert len(response.json()["outputs"]) == 4


def in_process(texts: list[str], workdir: Path, rounds: int, requests: int) -> dict[str, float]:
    """Median µs of process CPU per request of each mode, over interleaved rounds."""
    import asyncio
    import time

    from adapters.serving.registry import ModelRegistry
    from refit.settings import load_settings
    from service.composition import build_data_plane
    from service.inference_protocol import InferenceProtocol
    from service.schemas import PredictRequest, PredictResponse
    from tests.fixtures import write_toy_version

    registry = ModelRegistry(workdir / "toy-registry")
    write_toy_version(registry)
    settings = load_settings(registry_path=registry.root, data_dir=workdir / "toy-var")
    plane = build_data_plane(settings, run_drift_job=False)
    plane.start_blocking()
    protocol = InferenceProtocol(plane, settings)
    bodies = {mode: bodies_for(mode, texts[:requests]) for mode in MODES}

    async def predict(body: bytes) -> bytes:
        request = PredictRequest.model_validate_json(body)
        batch = await plane.predict(request.texts)
        return PredictResponse.from_batch(batch).model_dump_json().encode()

    async def infer(body: bytes, length: int) -> bytes:
        reply = await protocol.infer("refit", None, body, str(length) if length else None)
        return reply.body

    async def run(mode: str) -> float:
        started = time.process_time()
        for length, body in bodies[mode]:
            await (predict(body) if mode == "predict" else infer(body, length))
        return 1e6 * (time.process_time() - started) / len(bodies[mode])

    async def measure() -> dict[str, list[float]]:
        for mode in MODES:  # warm-up
            await run(mode)
        found: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(rounds):
            for mode in MODES:
                found[mode].append(await run(mode))
        return found

    try:
        found = asyncio.run(measure())
    finally:
        plane.stop_blocking()
    return {mode: statistics.median(values) for mode, values in found.items()}


def demo_version(workdir: Path) -> Path:
    registry = workdir / "demo-registry"
    subprocess.run(
        [str(Path(sys.executable).parent / "refit"), "train", "--data",
         str(ROOT / "data" / "demo" / "intents.jsonl"), "--search", "none", "--registry",
         str(registry)],
        check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
    )
    return registry / "versions" / "v1"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--version-dir", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--concurrency", type=int, action="append")
    parser.add_argument("--in-process-requests", type=int, default=1000)
    parser.add_argument("--save-as", default="v2_overhead")
    args = parser.parse_args()
    concurrencies = args.concurrency or [32]
    texts = read_texts(require_shared() / "banking77" / "test.jsonl")
    random.Random(0).shuffle(texts)
    texts = texts[:2000]
    workdir = Path(tempfile.mkdtemp(prefix="bench-v2-"))
    version_dir = args.version_dir or demo_version(workdir)
    files = {mode: write_bodies(bodies_for(mode, texts), workdir / f"{mode}.bodies")
             for mode in MODES}
    script = ROOT / "bench" / "bodies.lua"
    url = f"http://127.0.0.1:{PORT}"

    print("in-process: parse + data plane + render, toy model", file=sys.stderr)
    micro = in_process(texts, workdir, max(args.rounds, 5), args.in_process_requests)
    for mode, value in micro.items():
        print(f"  {mode:<9} {value:7.1f} µs CPU/request  ({value / micro['predict']:.3f} of "
              "predict)", file=sys.stderr)

    server = serve_refit(version_dir, workdir, PORT)
    runs: list[dict] = []
    try:
        wait_ready(url)
        for mode in MODES:
            check(url, mode, bodies_for(mode, texts[:1])[0])
            run_wrk(url, 8, 3, files[mode], server.pid, script,
                    {"REFIT_BENCH_PATH": MODES[mode]})  # warm-up, not recorded
        for round_ in range(args.rounds):
            for concurrency in concurrencies:
                for mode in MODES:
                    result = run_wrk(url, concurrency, args.seconds, files[mode], server.pid,
                                     script, {"REFIT_BENCH_PATH": MODES[mode]})
                    runs.append({"round": round_, "mode": mode, **result.__dict__})
                    print(f"  round {round_} c={concurrency:>2} {mode:<9} "
                          f"{result.throughput:6.1f} req/s  p50 {result.p50_ms:6.1f}  "
                          f"p99 {result.p99_ms:6.1f} ms  errors {result.errors}  "
                          f"{result.cpu_ms_per_prediction:.3f} ms CPU/prediction",
                          file=sys.stderr)
    finally:
        stop(server)

    summary = []
    for concurrency in concurrencies:
        def median(mode: str, key: str, c: int = concurrency) -> float:
            return statistics.median(
                r[key] for r in runs if r["mode"] == mode and r["concurrency"] == c
            )

        base_cpu, base_rate = median("predict", "cpu_ms_per_prediction"), median(
            "predict", "throughput")
        for mode in MODES:
            row = {
                "concurrency": concurrency, "mode": mode,
                "cpu_ms_per_prediction": median(mode, "cpu_ms_per_prediction"),
                "throughput": median(mode, "throughput"),
                "p99_ms": median(mode, "p99_ms"),
                "errors": sum(r["errors"] for r in runs
                              if r["mode"] == mode and r["concurrency"] == concurrency),
            }
            row["cpu_vs_predict"] = row["cpu_ms_per_prediction"] / base_cpu
            row["throughput_vs_predict"] = row["throughput"] / base_rate
            summary.append(row)
    print(f"\nmedians over {args.rounds} interleaved rounds of {args.seconds}s:")
    print("| concurrency | mode | CPU ms/prediction | vs /predict | req/s | vs /predict | p99 ms "
          "| errors |")
    print("|---|---|---|---|---|---|---|---|")
    for row in summary:
        print(f"| {row['concurrency']} | {row['mode']} | {row['cpu_ms_per_prediction']:.3f} | "
              f"{row['cpu_vs_predict']:.3f} | {row['throughput']:.1f} | "
              f"{row['throughput_vs_predict']:.3f} | {row['p99_ms']:.1f} | {row['errors']} |")
    print("\nin-process, median µs of CPU per request (parse + data plane + render, toy model):")
    print("| mode | µs CPU/request | vs /predict |")
    print("|---|---|---|")
    for mode, value in micro.items():
        print(f"| {mode} | {value:.1f} | {value / micro['predict']:.3f} |")
    save(args.save_as, {"runs": runs, "summary": summary, "in_process_us": micro,
                        "version_dir": str(version_dir)})


if __name__ == "__main__":
    main()
