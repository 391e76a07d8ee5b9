"""The feedback memory inside the data plane, in-process over toy ONNX models and real SQLite:
rebuilt for every model the worker serves (after a promotion it keeps only what the new model
still gets wrong), and off when ``memory_enabled`` is false."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from adapters.serving.data import read_jsonl
from adapters.serving.registry import ModelRegistry
from adapters.serving.runtime import OnnxClassifier
from refit.settings import load_settings
from refit.store import FeedbackSubmission
from service.composition import build_data_plane
from service.memory import RECALIBRATE_AFTER_CHANGES
from tests.fixtures import TOY_LABELS, write_toy_version
from tests.servers import wait_for

CANDIDATES = [f"question number {i} about my account" for i in range(60)]


@pytest.fixture()
def registry(tmp_path) -> ModelRegistry:
    registry = ModelRegistry(tmp_path / "registry")
    write_toy_version(registry)
    return registry


def plane_over(registry: ModelRegistry, tmp_path, **overrides):
    settings = load_settings(registry_path=registry.root, data_dir=tmp_path / "var", **overrides)
    plane = build_data_plane(settings, run_drift_job=False)
    plane.start_blocking()
    return plane


def give(plane, items: list[tuple[str, str]]) -> list[int]:
    submissions = [FeedbackSubmission(None, text, label) for text, label in items]
    receipt = asyncio.run(plane.feedback(submissions))
    return receipt.feedback_ids


def test_after_a_promotion_the_memory_keeps_only_what_the_new_model_gets_wrong(registry, tmp_path):
    v2 = write_toy_version(registry, labels=(*TOY_LABELS, "gift_card"), promote=False, seed=1)
    v1_says = OnnxClassifier(registry.get("v1").path).predict(CANDIDATES).probabilities.argmax(1)
    v2_says = OnnxClassifier(v2.path).predict(CANDIDATES).probabilities.argmax(1)
    # A text v1 gets wrong and v2 gets right, if its true label is v2's answer.
    fixed = next(i for i in range(len(CANDIDATES))
                 if v2.labels[v2_says[i]] != TOY_LABELS[v1_says[i]])
    fixed_text, fixed_label = CANDIDATES[fixed], v2.labels[v2_says[fixed]]
    plane = plane_over(registry, tmp_path)
    try:
        wait_for(lambda: plane.memory_state().built_for == "v1", timeout=10, what="first build")
        unknown_id, fixed_id = give(
            plane, [("a text about something nobody has a label for", "brand_new"),
                    (fixed_text, fixed_label)],
        )
        # The follower brings both in (v1 gets both wrong).
        wait_for(lambda: plane.memory_state().entries == 2, timeout=5, what="the follower")
        batch = asyncio.run(plane.predict([fixed_text]))
        assert batch.predictions[0].source == "feedback"
        assert batch.predictions[0].label == fixed_label
        assert batch.predictions[0].feedback_id == fixed_id

        registry.promote("v2")
        wait_for(lambda: plane.memory_state().built_for == "v2", timeout=15,
                 what="the rebuild after the swap")
        state = plane.memory_state()
        assert state.feedback_items == 2 and state.entries == 1
        assert plane.memory is not None and plane.memory.memory.ids.tolist() == [unknown_id]
        # The new model answers the fixed text itself, with the label the feedback gave.
        batch = asyncio.run(plane.predict([fixed_text]))
        assert batch.model_version == "v2"
        assert batch.predictions[0].source == "model"
        assert batch.predictions[0].label == fixed_label
    finally:
        plane.stop_blocking()


def test_the_memory_reads_the_models_prototypes_and_recalibrates_as_feedback_arrives(
    registry, tmp_path
):
    # The toy version has training texts; give it their embeddings, as `refit train` writes them.
    v1 = registry.get("v1")
    train = read_jsonl(v1.path / "data" / "train.jsonl")
    vectors = OnnxClassifier(v1.path).predict(list(train.texts)).embeddings
    np.savez(v1.path / "data" / "embeddings.npz", train=vectors.astype(np.float16))
    plane = plane_over(registry, tmp_path)
    try:
        wait_for(lambda: plane.memory_state().built_for == "v1", timeout=10, what="first build")
        first = plane.memory_state()
        assert first.prototype_rule and first.feedback_items == 0
        assert plane.memory is not None and plane.memory.memory.reference is not None
        assert plane.memory.memory.reference.shape == (len(TOY_LABELS), 384)
        items = [(CANDIDATES[i], TOY_LABELS[i % len(TOY_LABELS)])
                 for i in range(RECALIBRATE_AFTER_CHANGES)]
        give(plane, items[:-1])
        wait_for(lambda: plane.memory_state().cursor >= RECALIBRATE_AFTER_CHANGES - 1,
                 timeout=5, what="the follower")
        time.sleep(1.5)  # a few rounds of the rebuild thread: not due yet
        assert plane.memory_state().built_at == first.built_at
        give(plane, items[-1:])
        wait_for(lambda: plane.memory_state().feedback_items == RECALIBRATE_AFTER_CHANGES,
                 timeout=15, what="the recalibration")
        state = plane.memory_state()
        assert state.built_for == "v1" and state.built_at != first.built_at
        assert state.calibration is not None
        assert state.calibration.items == RECALIBRATE_AFTER_CHANGES
        assert state.new_label_margin is not None  # the default until there is evidence
    finally:
        plane.stop_blocking()


def test_relabel_and_delete_reach_the_memory(registry, tmp_path):
    plane = plane_over(registry, tmp_path)
    try:
        wait_for(lambda: plane.memory_state().built_for == "v1", timeout=10, what="first build")
        [fid] = give(plane, [("where can I buy a voucher", "voucher")])
        wait_for(lambda: plane.memory_state().entries == 1, timeout=5, what="the insert")
        asyncio.run(plane.relabel_feedback(fid, "gift_card"))
        wait_for(lambda: plane.memory is not None and plane.memory.memory.labels == ["gift_card"],
                 timeout=5, what="the relabel")
        assert asyncio.run(plane.predict(["where can I buy a voucher"])).predictions[0].label \
            == "gift_card"
        asyncio.run(plane.delete_feedback(fid))
        wait_for(lambda: plane.memory_state().entries == 0, timeout=5, what="the deletion")
        assert asyncio.run(plane.predict(["where can I buy a voucher"])).predictions[0].source \
            == "model"
    finally:
        plane.stop_blocking()


def test_memory_disabled_serves_the_model_only(registry, tmp_path):
    plane = plane_over(registry, tmp_path, memory_enabled=False)
    try:
        give(plane, [("where can I buy a voucher", "voucher")])
        state = plane.memory_state()
        assert not state.enabled and state.entries == 0
        assert asyncio.run(plane.predict(["where can I buy a voucher"])).predictions[0].source \
            == "model"
        # Without the memory, text feedback is not embedded at once (the retrain does it).
        assert plane.store.all_feedback()[0].embedding is None
    finally:
        plane.stop_blocking()


def test_a_label_a_retrain_added_stays_the_memorys_until_the_head_is_as_good(registry, tmp_path):
    import json

    v2 = write_toy_version(registry, labels=(*TOY_LABELS, "gift_card"), promote=False, seed=1)
    # v2 as the retrain job records it: v1's child, which added gift_card from feedback.
    manifest = json.loads((v2.path / "manifest.json").read_text())
    manifest["parent"] = "v1"
    manifest["training"] = {"retrain": {"new_labels": ["gift_card"]}}
    (v2.path / "manifest.json").write_text(json.dumps(manifest))
    v2_says = OnnxClassifier(v2.path).predict(CANDIDATES).probabilities.argmax(1)
    # Feedback teaching gift_card: one text v2 gets right, the others it gets wrong.
    right = next(i for i in range(len(CANDIDATES)) if v2.labels[v2_says[i]] == "gift_card")
    wrong = [i for i in range(len(CANDIDATES)) if v2.labels[v2_says[i]] != "gift_card"][:4]
    plane = plane_over(registry, tmp_path)
    try:
        wait_for(lambda: plane.memory_state().built_for == "v1", timeout=10, what="first build")
        give(plane, [(CANDIDATES[i], "gift_card") for i in [right, *wrong]])
        wait_for(lambda: plane.memory_state().entries == 5, timeout=5, what="the follower")
        registry.promote("v2")
        wait_for(lambda: plane.memory_state().built_for == "v2", timeout=15,
                 what="the rebuild after the swap")
        state = plane.memory_state()
        # Too little feedback to show the head is as good: the memory keeps serving the label,
        # all of its entries, the one v2 gets right too, as a label the model does not know.
        assert state.calibration is not None
        assert state.calibration.memory_served == ("gift_card",)
        assert state.entries == 5
        assert plane.memory is not None and "gift_card" not in plane.memory.memory.known_labels
        batch = asyncio.run(plane.predict([CANDIDATES[right]]))
        assert batch.model_version == "v2"
        assert batch.predictions[0].source == "feedback"
        assert batch.predictions[0].label == "gift_card"
    finally:
        plane.stop_blocking()
