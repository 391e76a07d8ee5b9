"""Which int8 quantisation to ship: raw speed against agreement, on banking77 and hwu64.

For each data set the fp32 model of the version ``bench/int8_compare.py`` trained (in
``~/.cache/refit-bench/int8-compare``; run that first) is quantised with every variant below, and
each variant is measured:

- **agreement and accuracy drop** against the fp32 ONNX model on the test *and* validation files
  (the gate: agreement >= 99%, drop <= 0.5 point; the export chooses on validation, the check is
  on test);
- **raw speed**: onnxruntime in-process, 1 intra-op thread, the serving session options,
  consecutive batches of 16 and of 32 banking77 test texts, tokenisation included. fp32 and every
  variant run in turn within a round (the machine is shared) and the ratio to that round's fp32 is
  taken; the median over rounds is quoted;
- **batch dependence**: 200 banking77 test texts alone against the same texts in batches of 32
  (labels changed, largest change of the top probability).

Variants: dynamic (``quantize_dynamic``: weights int8 per channel, activations scaled per batch at
run time) and static QDQ (``quantize_static``: activation ranges calibrated once on training
texts, so a text's answer cannot depend on its batch-mates).

    PYTHONPATH=. .venv/bin/python bench/int8_variants.py [--rounds 3] [--only NAME,NAME]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import read_texts, require_shared, save  # noqa: E402
from bench.datasets import CACHE  # noqa: E402

DATASETS = ("banking77", "hwu64")
STORE = CACHE / "int8-variants"
ATTENTION = [r"attention/self/MatMul$", r"attention/self/MatMul_1$"]
FFN_OUTPUT = r"layer\.\d+/output/dense/MatMul$"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "recipe" (as the export makes it) | "dynamic" | "nbits" | "static"
    options: dict[str, Any] = field(default_factory=dict)
    preprocess: bool = False


VARIANTS = [
    Variant("blockwise-int8", "recipe", {"recipe": "blockwise-int8"}),
    Variant("dyn-all", "dynamic", {"ops": ["MatMul", "Gather"]}),
    Variant("dyn-ffn-output-fp32", "dynamic", {"ops": ["MatMul", "Gather"],
                                               "exclude": [FFN_OUTPUT]}),
    Variant("dyn-matmul-only", "dynamic", {"ops": ["MatMul"]}),
    Variant("dyn-reduce-range", "dynamic", {"ops": ["MatMul", "Gather"], "reduce_range": True}),
    Variant("nbits8-b32-level4", "nbits", {"bits": 8, "block": 32, "level": 4}),
    Variant("nbits8-b128-level4", "nbits", {"bits": 8, "block": 128, "level": 4}),
    Variant("nbits8-b32-level4-asym", "nbits", {"bits": 8, "block": 32, "level": 4, "sym": False}),
    Variant("nbits8-b64-level4", "nbits", {"bits": 8, "block": 64, "level": 4}),
    Variant("nbits8-b256-level4", "nbits", {"bits": 8, "block": 256, "level": 4}),
    Variant("static-minmax-fp32-out", "static", {"method": "MinMax", "fp32_out": True}),
    Variant("static-percentile", "static", {"method": "Percentile", "fp32_out": True}),
    Variant("static-entropy", "static", {"method": "Entropy", "fp32_out": True}),
    Variant("static-minmax-ffn-output-fp32", "static",
            {"method": "MinMax", "fp32_out": True, "exclude": [FFN_OUTPUT]}),
]


def matching_nodes(model_path: Path, patterns: Sequence[str]) -> list[str]:
    import re

    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    compiled = [re.compile(p) for p in patterns]
    return [n.name for n in graph.node if any(c.search(n.name) for c in compiled)]


class TextReader:
    """onnxruntime's CalibrationDataReader over tokenised texts, batches of 32."""

    def __init__(self, tokenizer: Any, texts: Sequence[str]) -> None:
        from adapters.serving.tokenization import pad

        ids = tokenizer.token_ids(texts)
        # One length for every batch: histogram calibrators stack the batches' activations.
        longest = max(len(i) for i in ids)
        ids = [i + [0] * (longest - len(i)) for i in ids]
        batches = []
        for start in range(0, len(ids), 32):
            input_ids, _ = pad(ids[start : start + 32])
            mask = (input_ids != 0).astype(np.int64)
            batches.append({"input_ids": input_ids, "attention_mask": mask})
        self.batches = batches
        self.iterator: Iterator[dict[str, np.ndarray]] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.iterator, None)

    def rewind(self) -> None:
        self.iterator = iter(self.batches)


def build(variant: Variant, fp32: Path, out: Path, calibration: Callable[[], Any]) -> float:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    started = time.perf_counter()
    source = fp32
    options = variant.options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            if variant.preprocess:
                source = out.with_suffix(".pre.onnx")
                try:
                    quant_pre_process(str(fp32), str(source), auto_merge=True)
                except Exception:  # noqa: BLE001 - symbolic inference gives up on this graph
                    quant_pre_process(str(fp32), str(source), skip_symbolic_shape=True)
            exclude = matching_nodes(source, options.get("exclude", []))
            if variant.kind == "recipe":  # what the export does (adapters/training/quantize.py)
                from adapters.training.quantize import KNOWN_RECIPES, quantize_model

                quantize_model(source, out, KNOWN_RECIPES[options["recipe"]])
            elif variant.kind == "nbits":
                from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

                quantizer = MatMulNBitsQuantizer(
                    str(source), bits=options.get("bits", 8),
                    block_size=options.get("block", 32), is_symmetric=options.get("sym", True),
                    accuracy_level=options.get("level", 4), nodes_to_exclude=exclude,
                    op_types_to_quantize=tuple(options.get("ops", ["MatMul"])),
                )
                quantizer.process()
                quantizer.model.save_model_to_file(str(out))
            elif variant.kind == "dynamic":
                quantize_dynamic(
                    source, out, weight_type=QuantType.QInt8, per_channel=True,
                    reduce_range=options.get("reduce_range", False),
                    op_types_to_quantize=options["ops"], nodes_to_exclude=exclude,
                    extra_options={"MatMulConstBOnly": True},
                )
            else:
                exclude += matching_nodes(source, ATTENTION)
                extra: dict[str, Any] = {}
                if options.get("fp32_out"):
                    extra["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
                if options["method"] == "Percentile":
                    extra["CalibPercentile"] = 99.99
                quantize_static(
                    source, out, calibration(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"], per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=exclude,
                    calibrate_method=getattr(CalibrationMethod, options["method"]),
                    extra_options=extra,
                )
        finally:
            logging.disable(logging.NOTSET)
    if source != fp32:
        source.unlink()
    return time.perf_counter() - started


def classifier(version_dir: Path, file: Path, threads: int):  # noqa: ANN201
    from adapters.serving.runtime import OnnxClassifier
    from adapters.serving.variants import VariantChoice

    # An absolute ``file`` wins over the version folder in ``version_dir / file``.
    return OnnxClassifier(version_dir, intra_op_threads=threads,
                          variant=VariantChoice("int8", str(file), None, "variant"))


def predictions(version_dir: Path, file: Path, texts: Sequence[str]) -> np.ndarray:
    return classifier(version_dir, file, 2).predict(list(texts)).probabilities.argmax(axis=1)


def scores(predicted: np.ndarray, fp32: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    drop = float(np.mean(fp32 == truth) - np.mean(predicted == truth))
    return {"agreement": round(float(np.mean(predicted == fp32)), 5),
            "accuracy_drop_points": round(100 * drop, 3)}


def batch_dependence(version_dir: Path, file: Path, texts: list[str]) -> dict[str, float]:
    model = classifier(version_dir, file, 2)
    batched = np.concatenate([model.predict(texts[i : i + 32]).probabilities
                              for i in range(0, len(texts), 32)])
    alone = np.concatenate([model.predict([t]).probabilities for t in texts])
    label = batched.argmax(axis=1)
    moved = np.abs(batched.max(axis=1) - alone[np.arange(len(texts)), label])
    return {"labels_changed": int(np.sum(label != alone.argmax(axis=1))),
            "max_confidence_change": float(moved.max())}


def speed(version_dir: Path, files: dict[str, Path], texts: list[str], rounds: int
          ) -> dict[str, dict[str, float]]:
    models = {name: classifier(version_dir, path, 1) for name, path in files.items()}
    for model in models.values():
        model.warm_up()
    per_round: dict[str, dict[int, list[float]]] = {n: {16: [], 32: []} for n in models}
    for round_ in range(rounds):
        for batch in (16, 32):
            for name, model in models.items():
                started = time.perf_counter()
                for i in range(0, len(texts), batch):
                    model.predict(texts[i : i + batch])
                per_round[name][batch].append(len(texts) / (time.perf_counter() - started))
        log(f"  speed round {round_ + 1}: " + ", ".join(
            f"{n} {per_round[n][32][-1]:.0f}/s" for n in models))
    result = {}
    for name in models:
        row: dict[str, float] = {}
        for batch in (16, 32):
            ratios = [v / f for v, f in zip(per_round[name][batch], per_round["fp32"][batch],
                                             strict=True)]
            row[f"items_per_s_b{batch}"] = round(statistics.median(per_round[name][batch]), 1)
            row[f"ratio_b{batch}"] = round(statistics.median(ratios), 3)
        result[name] = row
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument("--calibration-texts", type=int, default=512)
    parser.add_argument("--speed-texts", type=int, default=768)
    parser.add_argument("--save-as", default="int8_variants")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the scores of variants already built by an earlier run")
    args = parser.parse_args()
    shared = require_shared()
    chosen = [v for v in VARIANTS if not args.only or v.name in args.only.split(",")]

    from adapters.serving.tokenization import shared_tokenizer

    results: dict[str, Any] = {"variants": {v.name: v.__dict__ for v in chosen}, "sets": {}}
    files_by_set: dict[str, dict[str, Path]] = {}
    for name in DATASETS:
        version_dir = CACHE / "int8-compare" / f"{name}-none" / "versions" / "v1"
        manifest = json.loads((version_dir / "manifest.json").read_text())
        labels = manifest["labels"]
        tokenizer = shared_tokenizer(version_dir / "tokenizer.json", 128)
        train = read_texts(version_dir / "data" / "train.jsonl")
        random.Random(0).shuffle(train)
        calibration_texts = train[: args.calibration_texts]
        split_rows = {}
        for split in ("test", "validation"):
            rows = [json.loads(line) for line in
                    (version_dir / "data" / f"{split}.jsonl").read_text().splitlines() if line]
            texts = [r["text"] for r in rows]
            truth = np.array([labels.index(r["label"]) for r in rows])
            split_rows[split] = (texts, truth, predictions(version_dir, version_dir / "model.onnx",
                                                           texts))
        test_truth, test_fp32 = split_rows["test"][1], split_rows["test"][2]
        log(f"{name}: fp32 test accuracy {np.mean(test_truth == test_fp32):.4f}")
        folder = STORE / name
        folder.mkdir(parents=True, exist_ok=True)
        files = {"fp32": version_dir / "model.onnx"}
        rows_out: dict[str, Any] = {}
        cache_file = folder / "scores.json"
        cached = json.loads(cache_file.read_text()) if cache_file.is_file() and args.reuse else {}
        for variant in chosen:
            out = folder / f"{variant.name}.onnx"
            files[variant.name] = out
            if variant.name in cached and out.is_file():
                rows_out[variant.name] = cached[variant.name]
                continue
            reader = TextReader(tokenizer, calibration_texts) if variant.kind == "static" else None
            seconds = build(variant, version_dir / "model.onnx", out, lambda r=reader: r)
            files[variant.name] = out
            row: dict[str, Any] = {"build_seconds": round(seconds, 1),
                                   "size_mb": round(out.stat().st_size / 2**20, 1)}
            for split, (texts, truth, fp32) in split_rows.items():
                row[split] = scores(predictions(version_dir, out, texts), fp32, truth)
            rows_out[variant.name] = row
            cache_file.write_text(json.dumps({**cached, **rows_out}, indent=1))
            log(f"  {name} {variant.name}: {row}")
        results["sets"][name] = rows_out
        files_by_set[name] = files

    texts = read_texts(shared / "banking77" / "test.jsonl")
    random.Random(1).shuffle(texts)
    version_dir = CACHE / "int8-compare" / "banking77-none" / "versions" / "v1"
    log("batch dependence (banking77, 200 texts)")
    results["batch_dependence"] = {
        n: batch_dependence(version_dir, p, texts[:200])
        for n, p in files_by_set["banking77"].items()
    }
    log(json.dumps(results["batch_dependence"]))
    log("raw speed (banking77, 1 thread)")
    results["speed"] = speed(version_dir, files_by_set["banking77"], texts[: args.speed_texts],
                             args.rounds)
    path = save(args.save_as, results)
    for variant in chosen:
        s = results["speed"][variant.name]
        cells = [f"{variant.name:32s} x{s['ratio_b16']:.2f} x{s['ratio_b32']:.2f}"]
        for name in DATASETS:
            row = results["sets"][name][variant.name]
            cells.append(f"{name} test {row['test']['agreement']:.4f} "
                         f"{row['test']['accuracy_drop_points']:+.2f} val "
                         f"{row['validation']['agreement']:.4f}")
        cells.append(str(results["batch_dependence"][variant.name]["labels_changed"]))
        print(" | ".join(cells))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
