"""Labelling the review queue's picks against labelling random predictions (issue 13, item 3).

The stream of ``bench/stream.py`` (its traffic, its new labels, its first version and its retrain
recipe, imported from there) is replayed in rounds. A random 30% of the traffic is held out for
evaluation and is never offered for labelling; the rest is the prediction log. After each round
of traffic arrives, ``--per-round`` predictions that nobody labelled yet are labelled (with their
true label) by one of four strategies, and the model is retrained on all labels so far and
promoted; its accuracy on the held-out traffic is then measured. Strategies:

- ``random``: predictions drawn uniformly from the unlabelled log (what users do today);
- ``uncertainty``, ``margin``, ``diverse``: the review queue's picks, ranked by the very functions
  the service's ``GET /review`` uses (``adapters/serving/review.py``) on the serving version's
  probabilities and embeddings; ``diverse`` clusters the ``--pool-factor`` x per-round least
  confident candidates (the service's ``REFIT_REVIEW_DIVERSE_POOL_FACTOR``, 2).

Real code: every head is trained by ``adapters.training.head.train_head`` through
``bench/stream.py``'s replay of the retrain job's recipe (replay of up to 5,000 rows of the
champion's training data plus all labels less a held-out fifth, warm start, new labels grow the
head). The first version's head uses the default configuration (``--search none``: linear head,
L-BFGS, C = 10) so that the 4 x 20 x seeds retrains stay short on a shared machine.

    .venv/bin/python bench/active_learning.py [--datasets hwu64 banking77] [--seeds 3]

Writes bench/figures/active-learning-<dataset>.png, bench/results/active-learning-<dataset>.json
and prints the markdown tables that BENCHMARKS.md carries.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.serving.review import diverse_picks, rank, top_two_margin  # noqa: E402
from bench.common import ROOT, save  # noqa: E402
from bench.datasets import load  # noqa: E402
from bench.stream import StreamOptions, Version, build_stream, first_version, retrain  # noqa: E402

FIGURES = ROOT / "bench" / "figures"
STRATEGIES = ("random", "uncertainty", "margin", "diverse")
TARGET_SHARE = 0.6
EVAL_FRACTION = 0.3


def probabilities(version: Version, x: np.ndarray) -> np.ndarray:
    from adapters.training.head import head_probabilities

    return head_probabilities(version.head, x)


def pick(
    strategy: str, version: Version, x: np.ndarray, candidates: np.ndarray, count: int,
    pool_factor: int, rng: np.random.Generator, seed: int,
) -> np.ndarray:
    """``count`` rows of ``candidates`` (unlabelled, arrived) chosen by ``strategy``."""
    if strategy == "random":
        return rng.choice(candidates, min(count, len(candidates)), replace=False)
    p = probabilities(version, x[candidates])
    confidence = p.max(axis=1)
    if strategy == "uncertainty":
        return candidates[rank(confidence)[:count]]
    if strategy == "margin":
        return candidates[rank(top_two_margin(p))[:count]]
    # diverse: the service's pool of the least confident, clustered.
    uncertain = rank(confidence)[: pool_factor * count]
    chosen = diverse_picks(x[candidates[uncertain]], confidence[uncertain], count, seed)
    return candidates[uncertain[chosen]]


def run_arm(
    strategy: str, seed: int, v1: Version, stream: Any, log_rows: np.ndarray,
    eval_rows: np.ndarray, rounds: int, per_round: int, pool_factor: int,
) -> dict[str, Any]:
    x, truth = stream.x, np.array(stream.labels, dtype=object)
    chunks = int(stream.chunk.max()) + 1
    rng = np.random.default_rng(1000 + seed)
    version = v1
    labelled: list[int] = []
    curve = [{"labels": 0, "accuracy": float((v1.predict(x[eval_rows]) == truth[eval_rows]).mean()),
              "new_label_share": 0.0}]
    retrain_seconds = 0.0
    for r in range(rounds):
        arrived_until = (r + 1) * chunks // rounds  # chunks [0, arrived_until) have arrived
        taken = set(labelled)
        candidates = np.array(
            [row for row in log_rows if stream.chunk[row] < arrived_until and row not in taken]
        )
        picks = pick(strategy, version, x, candidates, per_round, pool_factor, rng, seed + r)
        labelled += [int(row) for row in picks]
        ids = list(range(1, len(labelled) + 1))
        started = time.perf_counter()
        version, _ = retrain(
            version, ids, x[labelled], [stream.texts[i] for i in labelled],
            [stream.labels[i] for i in labelled], f"v{r + 2}", seed,
        )
        retrain_seconds += time.perf_counter() - started
        accuracy = float((version.predict(x[eval_rows]) == truth[eval_rows]).mean())
        new_share = float(np.isin(truth[labelled], stream.new_labels).mean())
        curve.append({"labels": len(labelled), "accuracy": accuracy,
                      "new_label_share": round(new_share, 3)})
    return {"strategy": strategy, "seed": seed, "curve": curve,
            "retrain_seconds": round(retrain_seconds, 1)}


def labels_to_reach(curve: list[dict[str, Any]], target: float) -> int | None:
    """Labels at the first point of ``curve`` whose accuracy reaches ``target`` (no
    interpolation: the round that gets there)."""
    return next((p["labels"] for p in curve if p["accuracy"] >= target - 1e-12), None)


def mean_curve(arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    points = zip(*(arm["curve"] for arm in arms), strict=True)
    return [
        {"labels": group[0]["labels"],
         "accuracy": float(np.mean([p["accuracy"] for p in group])),
         "accuracy_sd": float(np.std([p["accuracy"] for p in group])),
         "new_label_share": float(np.mean([p["new_label_share"] for p in group]))}
        for group in points
    ]


def run(
    name: str, seeds: int, rounds: int, per_round: int | None, pool_factor: int
) -> dict[str, Any]:
    bench = load(name)
    options = StreamOptions(search="none")
    stream = build_stream(bench, options)
    started = time.perf_counter()
    v1 = first_version(bench, stream.old_labels, options)
    n = len(stream.labels)
    order = np.random.default_rng(7).permutation(n)
    eval_rows = np.sort(order[: round(n * EVAL_FRACTION)])
    log_rows = np.sort(order[round(n * EVAL_FRACTION):])
    if per_round is None:  # a fifth of the log over all rounds, as bench/stream.py's feedback
        per_round = max(1, round(0.2 * len(log_rows) / rounds))
    print(f"{name}: {n} predictions ({len(eval_rows)} held out), new labels {stream.new_labels}, "
          f"{rounds} rounds of {per_round} labels", flush=True)
    arms: list[dict[str, Any]] = []
    for seed in range(seeds):
        for strategy in STRATEGIES:
            arm = run_arm(
                strategy, seed, v1, stream, log_rows, eval_rows, rounds, per_round, pool_factor
            )
            arms.append(arm)
            end = arm["curve"][-1]
            print(f"  {strategy:11s} seed {seed}: {end['labels']} labels, accuracy "
                  f"{end['accuracy']:.4f} (retrains {arm['retrain_seconds']}s)", flush=True)
    curves = {s: mean_curve([a for a in arms if a["strategy"] == s]) for s in STRATEGIES}
    budget = curves["random"][-1]["labels"]
    target = curves["random"][-1]["accuracy"]
    reach = {}
    for strategy in STRATEGIES:
        needed = labels_to_reach(curves[strategy], target)
        reach[strategy] = {"labels": needed,
                           "share": None if needed is None else round(needed / budget, 3)}
    result = {
        "dataset": name, "predictions": n, "held_out": len(eval_rows),
        "log": len(log_rows), "new_labels": stream.new_labels, "rounds": rounds,
        "per_round": per_round, "diverse_pool_factor": pool_factor, "seeds": seeds,
        "head_config": "default HeadConfig (linear, L-BFGS, C=10), --search none",
        "random_final": {"labels": budget, "accuracy": target},
        "reach_random_final": reach, "curves": curves, "arms": arms,
        "seconds": round(time.perf_counter() - started, 1),
    }
    save(f"active-learning-{name}", result)
    plot(result, FIGURES / f"active-learning-{name}.png")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"random": "#777777", "uncertainty": "#1f77b4", "margin": "#ff7f0e",
               "diverse": "#2ca02c"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy in STRATEGIES:
        curve = result["curves"][strategy]
        xs = [p["labels"] for p in curve]
        ys = np.array([p["accuracy"] for p in curve])
        sd = np.array([p["accuracy_sd"] for p in curve])
        ax.plot(xs, ys, "o-", markersize=3, color=colours[strategy], label=strategy)
        ax.fill_between(xs, ys - sd, ys + sd, color=colours[strategy], alpha=0.12)
    final = result["random_final"]
    ax.axhline(final["accuracy"], color="k", linestyle=":", linewidth=1)
    ax.axvline(TARGET_SHARE * final["labels"], color="k", linestyle="--", linewidth=1,
               label=f"{TARGET_SHARE:.0%} of random's labels")
    ax.set_xlabel("labels given")
    ax.set_ylabel("accuracy on held-out traffic")
    ax.set_title(f"{result['dataset']}: labelling the review queue vs random "
                 f"(mean of {result['seeds']} seeds, ±1 sd)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    curves = result["curves"]
    final = result["random_final"]
    lines = [
        (f"**{result['dataset']}**: {result['predictions']} predictions ({result['held_out']} held "
         f"out for evaluation), new labels {', '.join(f'`{x}`' for x in result['new_labels'])}; "
         f"{result['rounds']} rounds of {result['per_round']} labels; mean of {result['seeds']} "
         f"seeds. Random's final accuracy: {final['accuracy']:.4f} at {final['labels']} labels."),
        "",
        "| labels | " + " | ".join(STRATEGIES) + " |",
        "|---" * (len(STRATEGIES) + 1) + "|",
    ]
    for i, point in enumerate(curves["random"]):
        lines.append(f"| {point['labels']} | " + " | ".join(
            f"{curves[s][i]['accuracy']:.4f}" for s in STRATEGIES) + " |")
    lines += ["", "| | " + " | ".join(STRATEGIES) + " |", "|---" * (len(STRATEGIES) + 1) + "|"]
    reach = result["reach_random_final"]
    lines.append("| labels to reach random's final accuracy | " + " | ".join(
        "never" if reach[s]["labels"] is None
        else f"{reach[s]['labels']} ({reach[s]['share']:.0%})" for s in STRATEGIES) + " |")
    lines.append("| share of new-label items among the labels | " + " | ".join(
        f"{curves[s][-1]['new_label_share']:.2f}" for s in STRATEGIES) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["hwu64", "banking77"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=None,
                        help="labels per round (default: a fifth of the log over all rounds)")
    parser.add_argument("--pool-factor", type=int, default=2,
                        help="diverse: clusters this many times --per-round least confident")
    parser.add_argument("--tables-from", nargs="+", type=Path, default=None,
                        help="print the tables of saved results")
    args = parser.parse_args()
    if args.tables_from:
        import json

        for path in args.tables_from:
            print(markdown(json.loads(path.read_text())) + "\n")
        return
    import torch

    torch.set_num_threads(1)  # the machine is shared; head training is small
    for name in args.datasets:
        result = run(name, args.seeds, args.rounds, args.per_round, args.pool_factor)
        print(markdown(result), flush=True)
        print(f"({result['seconds']} s)\n", flush=True)


if __name__ == "__main__":
    main()
