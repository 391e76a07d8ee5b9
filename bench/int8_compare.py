"""fp32 against int8 in one run: serving speed, memory, and accuracy on banking77 and hwu64.

1. Models: one version per data set, trained by refit's own pipeline (``fit_head`` then
   ``register_version``, so each gets its int8 model and the int8 check on the test file) from the
   cached frozen-encoder embeddings of bench/datasets.py, with the head's default configuration
   (``--search none``: the 12-trial grid of ``refit train`` is too slow on the shared machine; the
   encoder, its export and the int8 quantisation are the same either way). Versions are kept in
   ``~/.cache/refit-bench/int8-compare`` and reused by later runs.
2. Accuracy: the version's int8 check (int8 against fp32 on the whole test file): accuracy of
   both, their agreement, and whether the default gate passes.
3. Raw onnxruntime in-process, batch 32, tokenisation included: items/s and CPU per item.
4. Serving: ``bentoml serve`` (2 workers) on the banking77 version with
   ``REFIT_MODEL_PRECISION=fp32`` and ``=int8`` in turn (ABAB...: the machine is shared, so load
   from other users hits both alike), wrk at 32 connections with one banking77 test text per
   request: req/s, p50/p99, server CPU per prediction, workers' RSS. The ratio is taken per round
   and the median quoted.

    .venv/bin/python bench/int8_compare.py [--rounds 3] [--seconds 15] [--rebuild]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    read_texts,
    require_shared,
    rss_mb,
    run_wrk,
    save,
    tree_pids,
    write_bodies,
)
from bench.datasets import CACHE  # noqa: E402

DATASETS = ("banking77", "hwu64")
CONCURRENCY = 32
STORE = CACHE / "int8-compare"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Reporter:
    def __init__(self, name: str) -> None:
        self.name = name

    def phase(self, name: str, detail: str = "") -> None:
        log(f"  [{self.name}] {name} {detail}")

    def event(self, kind: str, **fields: object) -> None:
        pass


def build_version(  # noqa: ANN201
    name: str, search: str, rebuild: bool, recipe_name: str | None = None, store: Path = STORE
):
    """The data set's version, trained by refit's pipeline from cached embeddings.

    ``recipe_name`` restricts the int8 export to that one quantisation recipe (to measure a recipe
    the selection would not pick); by default the export chooses as ``refit train`` does.
    """
    import shutil

    import adapters.training.quantize as quantize
    from adapters.serving.registry import ModelRegistry
    from adapters.serving.tokenization import TextTokenizer
    from adapters.training.encoder import load_encoder, packaged_encoder_dir
    from adapters.training.pipeline import (
        EmbeddedSplits,
        EncoderSource,
        HeadRecipe,
        Provenance,
        Splits,
        fit_head,
        register_version,
    )
    from adapters.training.search import SearchOptions
    from bench.datasets import load

    root = store / (f"{name}-{search}" + (f"-{recipe_name}" if recipe_name else ""))
    if rebuild:
        shutil.rmtree(root, ignore_errors=True)
    registry = ModelRegistry(root)
    current = registry.current()
    if current is not None and current.int8_path is not None:
        return current
    started = time.perf_counter()
    bench = load(name)
    splits = Splits(bench.train, bench.validation, bench.test)
    data = EmbeddedSplits(
        bench.train.label_set(), splits,
        {"train": bench.x_train, "validation": bench.x_validation, "test": bench.x_test},
    )
    source = EncoderSource(
        tokenizer=TextTokenizer(packaged_encoder_dir() / "tokenizer.json", 128),
        encoder=load_encoder(),
    )
    recipe = HeadRecipe(search=SearchOptions(strategy=search))
    reporter = _Reporter(name)
    fitted = fit_head(data, recipe, source, reporter)
    recipes = quantize.RECIPES
    if recipe_name is not None:
        quantize.RECIPES = (quantize.KNOWN_RECIPES[recipe_name],)
    try:
        version = register_version(
            registry, fitted, Provenance(data_source=f"bench/datasets.py {name}"), recipe.seed,
            reporter, started,
        )
    finally:
        quantize.RECIPES = recipes
    registry.promote(version.name)
    return version


def raw_batch32(version_dir: Path, texts: list[str]) -> dict[str, dict[str, float]]:
    """onnxruntime in-process, 1 thread, batches of 32 (planned), tokenisation included."""
    from adapters.serving.runtime import OnnxClassifier
    from adapters.serving.variants import Int8Gate, choose_variant

    manifest = __import__("json").loads((version_dir / "manifest.json").read_text())
    rows: dict[str, dict[str, float]] = {}
    for precision in ("fp32", "int8", "fp32", "int8"):
        variant = choose_variant(manifest, precision, Int8Gate())
        classifier = OnnxClassifier(version_dir, intra_op_threads=1, variant=variant)
        classifier.warm_up()
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(texts), 32):
            classifier.predict(texts[i : i + 32])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        row = rows.setdefault(precision, {"items_per_s": 0.0, "cpu_ms_per_item": 1e9})
        # Best of two runs each: the least disturbed by other users of the machine.
        row["items_per_s"] = max(row["items_per_s"], len(texts) / wall)
        row["cpu_ms_per_item"] = min(row["cpu_ms_per_item"], 1000 * cpu / len(texts))
        log(f"  raw {precision}: {len(texts) / wall:7.1f} items/s  "
            f"{1000 * cpu / len(texts):.2f} ms CPU/item")
    return rows


def batch_dependence(version_dir: Path, texts: list[str]) -> dict[str, dict[str, float]]:
    """Whether a text's answer depends on the texts batched with it: each text alone against the
    same text in consecutive batches of 32. Dynamic int8 quantises activations per batch."""
    import numpy as np

    from adapters.serving.registry import ModelRegistry
    from adapters.serving.runtime import OnnxClassifier
    from adapters.serving.variants import Int8Gate, choose_variant

    manifest = ModelRegistry(version_dir.parent.parent).get(version_dir.name).manifest
    rows = {}
    for precision in ("fp32", "int8"):
        classifier = OnnxClassifier(
            version_dir, 2, choose_variant(manifest, precision, Int8Gate()))
        batched = np.concatenate([classifier.predict(texts[i : i + 32]).probabilities
                                  for i in range(0, len(texts), 32)])
        alone = np.concatenate([classifier.predict([t]).probabilities for t in texts])
        label = batched.argmax(axis=1)
        moved = np.abs(batched.max(axis=1) - alone[np.arange(len(texts)), label])
        rows[precision] = {
            "texts": len(texts),
            "labels_changed": int(np.sum(label != alone.argmax(axis=1))),
            "confidence_change_median": float(np.median(moved)),
            "confidence_change_max": float(moved.max()),
        }
        log(f"  {precision}: {rows[precision]}")
    return rows


def serve_once(version_dir: Path, precision: str, bodies: Path, seconds: int) -> dict:
    from tests.servers import ServiceProcess, copy_registry

    work = Path(tempfile.mkdtemp(prefix=f"bench-int8-{precision}-"))
    registry = copy_registry(version_dir.parent.parent, work / "registry")
    service = ServiceProcess(
        registry=registry, data_dir=work / "var",
        env={"REFIT_MODEL_PRECISION": precision, "REFIT_DRIFT_INTERVAL_S": "3600"},
    )
    service.start(timeout=240)
    try:
        assert service.proc is not None
        served = {service.client().get("/models").json()["serving"]["precision"]
                  for _ in range(6)}
        if served != {precision}:
            raise RuntimeError(f"asked for {precision}, the workers serve {served}")
        run_wrk(service.url + "/predict", 8, 3, bodies, service.proc.pid)  # warm-up
        result = run_wrk(service.url + "/predict", CONCURRENCY, seconds, bodies, service.proc.pid)
        workers = [p for p in tree_pids(service.proc.pid)
                   if "_bentoml_impl.worker" in Path(f"/proc/{p}/cmdline").read_text()]
        rss = [round(rss_mb(p), 1) for p in workers]
    finally:
        service.stop()
    log(f"  serve {precision}: {result.throughput:6.1f} req/s  p50 {result.p50_ms:6.1f}  "
        f"p99 {result.p99_ms:6.1f} ms  {result.cpu_ms_per_prediction:.2f} ms CPU/prediction  "
        f"errors {result.errors}  worker RSS {rss} MB")
    return {"precision": precision, "load": result.__dict__, "worker_rss_mb": rss}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3, help="ABAB rounds of fp32 then int8")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--search", choices=["none", "grid"], default="none")
    parser.add_argument("--rebuild", action="store_true", help="train the versions again")
    from adapters.training.quantize import KNOWN_RECIPES

    parser.add_argument("--recipe", choices=list(KNOWN_RECIPES), default=None,
                        help="build the int8 models with this quantisation recipe only "
                        "(default: chosen on validation, as refit train does)")
    parser.add_argument("--save-as", default="int8_compare")
    parser.add_argument("--store", type=Path, default=STORE,
                        help="where the trained versions are kept (default %(default)s)")
    parser.add_argument("--batch-dependence-only", action="store_true",
                        help="only measure how answers depend on batch-mates, then stop")
    args = parser.parse_args()
    shared = require_shared()

    accuracy = {}
    versions = {}
    for name in DATASETS:
        log(f"model: {name}")
        version = build_version(name, args.search, args.rebuild, args.recipe, args.store)
        versions[name] = version
        record = version.manifest["int8"]
        check = record["check"]
        accuracy[name] = {
            "version_dir": str(version.path),
            "test_examples": check["examples"],
            "fp32_accuracy": check["fp32_accuracy"],
            "int8_accuracy": check["int8_accuracy"],
            "accuracy_drop_points": round(100 * check["accuracy_drop"], 3),
            "agreement": check["agreement"],
            "gate_passed": check["passed"],
            "fp32_mb": round(record["fp32_size_bytes"] / 2**20, 1),
            "int8_mb": round(record["size_bytes"] / 2**20, 1),
            "recipe": record.get("recipe"),
            "quantize_seconds": record["build_seconds"],
            "check_seconds": check["seconds"],
        }
        log(f"  {check['reason']}")

    texts = read_texts(shared / "banking77" / "test.jsonl")
    random.Random(0).shuffle(texts)
    version_dir = versions["banking77"].path
    log("batch dependence: 400 banking77 test texts, alone and in batches of 32")
    dependence = batch_dependence(version_dir, texts[:400])
    if args.batch_dependence_only:
        print(dependence)
        return
    log("raw onnxruntime, batch 32, 1 thread (banking77 test texts)")
    raw = raw_batch32(version_dir, texts[:1024])

    bodies = write_bodies(texts, Path(tempfile.mkdtemp(prefix="bench-int8-")) / "bodies.jsonl")
    runs = []
    for round_ in range(args.rounds):
        log(f"serving round {round_ + 1}/{args.rounds}")
        runs.append([serve_once(version_dir, p, bodies, args.seconds) for p in ("fp32", "int8")])

    def ratios(key: str) -> list[float]:
        return [b["load"][key] / a["load"][key] for a, b in runs]

    def median(precision: str, key: str) -> float:
        index = 0 if precision == "fp32" else 1
        return statistics.median(r[index]["load"][key] for r in runs)

    summary = {
        "rounds": args.rounds,
        "seconds_per_run": args.seconds,
        "throughput_ratio_c32_per_round": [round(r, 3) for r in ratios("throughput")],
        "throughput_ratio_c32_median": round(statistics.median(ratios("throughput")), 3),
        "cpu_per_prediction_ratio_median": round(
            statistics.median(ratios("cpu_ms_per_prediction")), 3),
        "p99_ratio_median": round(statistics.median(ratios("p99_ms")), 3),
        **{f"{p}_{k}_median": round(median(p, k), 2) for p in ("fp32", "int8")
           for k in ("throughput", "p50_ms", "p99_ms", "cpu_ms_per_prediction")},
        "worker_rss_mb_median": {
            p: statistics.median(sum(r[i]["worker_rss_mb"]) / len(r[i]["worker_rss_mb"])
                                 for r in runs)
            for i, p in enumerate(("fp32", "int8"))
        },
        "batch_dependence": dependence,
        "raw_batch32": raw,
        "raw_batch32_speedup": round(raw["int8"]["items_per_s"] / raw["fp32"]["items_per_s"], 3),
        "accuracy": accuracy,
        "errors": sum(r["load"]["errors"] for pair in runs for r in pair),
    }
    path = save(args.save_as, {"summary": summary, "runs": runs})
    print("\n".join(f"{k}: {v}" for k, v in summary.items()))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
