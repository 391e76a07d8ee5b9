"""The int8 model: export, its accuracy check and gate, the precision setting, integrity, /models.

Unit tests of the gate decision first, then the real artefacts: the demo model trained in the test
session (its int8 twin quantised by onnxruntime and checked on the test split), a version whose
int8 model genuinely fails the check, and real servers showing what they serve and why.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from adapters.serving.data import read_jsonl
from adapters.serving.registry import ModelRegistry
from adapters.serving.runtime import OnnxClassifier
from adapters.serving.variants import (
    FP32_FILE,
    INT8_FILE,
    Int8Gate,
    ModelIntegrityError,
    choose_variant,
    judge_int8,
)
from adapters.training.quantize import KNOWN_RECIPES, RECIPES, quantize_model
from refit.settings import SettingsError, load_settings
from service.predictor import ModelHolder
from tests.servers import ServiceProcess, copy_registry, wait_for

GOOD = {"examples": 3080, "agreement": 0.995, "accuracy_drop": 0.002}
SIZE_SHARE = {"all-int8": 0.3, "blockwise-int8": 0.3, "blockwise-int8-fp32-embeddings": 0.7}


def manifest_with(check: dict | None) -> dict:
    manifest: dict = {"onnx": {"sha256": "f" * 64}}
    if check is not None:
        manifest["int8"] = {"file": INT8_FILE, "sha256": "i" * 64, "check": check}
    return manifest


# -- the gate decision -----------------------------------------------------------------------------


def test_the_gate_passes_at_its_thresholds_and_fails_just_past_them():
    gate = Int8Gate()  # the defaults a user gets: 99% agreement, half a point of accuracy
    assert (gate.min_agreement, gate.max_accuracy_drop) == (0.99, 0.005)
    assert judge_int8(GOOD, gate).passed
    assert judge_int8({**GOOD, "agreement": 0.99, "accuracy_drop": 0.005}, gate).passed
    assert judge_int8({**GOOD, "accuracy_drop": -0.01}, gate).passed  # int8 better: fine
    low = judge_int8({**GOOD, "agreement": 0.9899}, gate)
    assert not low.passed and "agreement" in low.reason and "98.99% < 99.00%" in low.reason
    worse = judge_int8({**GOOD, "accuracy_drop": 0.0051}, gate)
    assert not worse.passed and "accuracy drop 0.51 points > 0.50" in worse.reason
    both = judge_int8({**GOOD, "agreement": 0.5, "accuracy_drop": 0.2}, gate)
    assert not both.passed and "agreement" in both.reason and "accuracy drop" in both.reason
    assert not judge_int8(None, gate).passed
    assert not judge_int8({**GOOD, "agreement": float("nan")}, gate).passed


def test_precision_setting_picks_the_file_and_says_why():
    passing, failing = manifest_with(GOOD), manifest_with({**GOOD, "agreement": 0.9})
    gate = Int8Gate()
    auto = choose_variant(passing, "auto", gate)
    assert (auto.precision, auto.file, auto.sha256) == ("int8", INT8_FILE, "i" * 64)
    assert "passed" in auto.reason
    fallback = choose_variant(failing, "auto", gate)
    assert (fallback.precision, fallback.file, fallback.sha256) == ("fp32", FP32_FILE, "f" * 64)
    assert "failed the accuracy gate" in fallback.reason and "serving fp32" in fallback.reason
    forced = choose_variant(failing, "int8", gate)
    assert forced.precision == "int8" and "REFIT_MODEL_PRECISION is int8" in forced.reason
    assert "failed" in forced.reason
    assert choose_variant(passing, "fp32", gate).precision == "fp32"
    for precision in ("auto", "int8"):
        old = choose_variant(manifest_with(None), precision, gate)
        assert old.precision == "fp32" and "no int8 model" in old.reason
    # A stricter gate than the one the version was trained under is applied where it is read.
    strict = Int8Gate(min_agreement=1.0, max_accuracy_drop=0.0)
    assert choose_variant(passing, "auto", strict).precision == "fp32"


# -- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["auto", "fp32", "int8"])
def test_precision_setting_values(monkeypatch, value):
    monkeypatch.setenv("REFIT_MODEL_PRECISION", value)
    assert load_settings().model_precision == value


def test_precision_defaults_to_fp32_with_the_documented_gate(monkeypatch):
    monkeypatch.delenv("REFIT_MODEL_PRECISION", raising=False)
    settings = load_settings()
    assert settings.model_precision == "fp32"
    assert Int8Gate.from_settings(settings) == Int8Gate(0.99, 0.005)


@pytest.mark.parametrize(("variable", "value"), [
    ("REFIT_MODEL_PRECISION", "int4"),
    ("REFIT_MODEL_PRECISION", "INT8 "),
    ("REFIT_INT8_MIN_AGREEMENT", "1.5"),
    ("REFIT_INT8_MIN_AGREEMENT", "ninety"),
    ("REFIT_INT8_MAX_ACCURACY_DROP", "-0.1"),
])
def test_a_bad_precision_setting_stops_start_up_naming_the_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings()


def test_server_refuses_to_start_with_a_bad_precision(tmp_path, trained_registry):
    service = ServiceProcess(
        registry=copy_registry(trained_registry.root, tmp_path / "registry"),
        data_dir=tmp_path / "var", env={"REFIT_MODEL_PRECISION": "int4"},
    )
    try:
        with pytest.raises(RuntimeError, match="server exited") as failed:
            service.start(timeout=120)
    finally:
        service.stop()
    assert "REFIT_MODEL_PRECISION: Input should be 'auto', 'fp32' or 'int8'" in str(failed.value)


# -- the artefacts ---------------------------------------------------------------------------------


def test_manifest_records_the_int8_model_and_its_check(trained_registry):
    from adapters.training.export import sha256_file

    version = trained_registry.current()
    m = version.manifest
    record = m["int8"]
    int8_path = version.path / record["file"]
    assert record["file"] == INT8_FILE and int8_path.is_file()
    assert record["sha256"] == sha256_file(int8_path)
    assert record["size_bytes"] == int8_path.stat().st_size
    assert record["fp32_size_bytes"] == (version.path / FP32_FILE).stat().st_size
    # Int8 weights: a quarter of the fp32 file, or two thirds with the fp32 embedding table.
    recipe = KNOWN_RECIPES[record["recipe"]]
    assert record["method"] == recipe.method
    assert record["size_bytes"] < SIZE_SHARE[recipe.name] * record["fp32_size_bytes"]
    assert record["origin"] == "quantised from model.onnx" and record["build_seconds"] > 0
    # The recipe is chosen on validation, never on the test split the check reports.
    trials = record["selection"]["trials"]
    assert trials and all(t["split"] == "validation" for t in trials)
    closest = max(trials, key=lambda t: t["agreement"])["recipe"]
    assert record["recipe"] == next((t["recipe"] for t in trials if t["passed"]), closest)
    assert not list(version.path.glob(".int8-candidate-*"))
    check = record["check"]
    assert check["split"] == "test" and check["examples"] == m["metrics"]["test"]["examples"]
    assert check["fp32_accuracy"] == pytest.approx(m["metrics"]["test"]["accuracy"])
    assert check["accuracy_drop"] == pytest.approx(
        check["fp32_accuracy"] - check["int8_accuracy"], abs=1e-6)
    assert check["gate"] == {"min_agreement": 0.99, "max_accuracy_drop": 0.005}
    assert check["passed"] is True, check["reason"]
    assert check["seconds"] > 0


def test_int8_model_reproduces_its_recorded_check(trained_registry):
    """The int8 file as served scores what the manifest says, and agrees with fp32."""
    version = trained_registry.current()
    check = version.manifest["int8"]["check"]
    test = read_jsonl(version.path / "data" / "test.jsonl")
    variant = choose_variant(version.manifest, "int8", Int8Gate())
    int8 = OnnxClassifier(version.path, variant=variant)
    fp32 = OnnxClassifier(version.path)
    assert int8.variant.precision == "int8" and fp32.variant.precision == "fp32"
    got = int8.predict(test.texts)
    want = fp32.predict(test.texts)
    assert got.probabilities.shape == want.probabilities.shape
    assert got.embeddings.shape == want.embeddings.shape == (len(test), 384)
    agreement = float(np.mean(got.probabilities.argmax(1) == want.probabilities.argmax(1)))
    assert agreement == pytest.approx(check["agreement"], abs=1e-6)
    accuracy = float(np.mean([int8.labels[p] == t for p, t in
                              zip(got.probabilities.argmax(1), test.labels, strict=True)]))
    assert accuracy == pytest.approx(check["int8_accuracy"], abs=1e-6)
    # Quantised, not copied: the embeddings move, a little.
    cosine = np.sum(got.embeddings * want.embeddings, axis=1)
    assert 0.8 < float(cosine.mean()) < 0.99999


def test_the_export_makes_the_blockwise_model_and_knows_the_dynamic_one():
    assert [r.name for r in RECIPES] == ["blockwise-int8", "blockwise-int8-fp32-embeddings"]
    assert KNOWN_RECIPES["blockwise-int8-fp32-embeddings"].method["batch_independent"] is True
    assert KNOWN_RECIPES["blockwise-int8"].method["batch_independent"] is True
    assert KNOWN_RECIPES["all-int8"].method["batch_independent"] is False
    assert "MatMulNBits" in KNOWN_RECIPES["blockwise-int8"].method["tool"]


@pytest.fixture(scope="module")
def blockwise_model(trained_registry, tmp_path_factory):
    """The trained version's fp32 model quantised with the blockwise recipe, in a copy."""
    version = trained_registry.current()
    folder = tmp_path_factory.mktemp("blockwise")
    for name in ("manifest.json", "tokenizer.json", FP32_FILE, "data/test.jsonl"):
        (folder / name).parent.mkdir(exist_ok=True)
        shutil.copy(version.path / name, folder / name)
    quantize_model(folder / FP32_FILE, folder / "blockwise.onnx", RECIPES[0])
    return folder


def test_blockwise_int8_is_quantised_and_close_to_fp32(blockwise_model):
    import onnx

    graph = onnx.load(str(blockwise_model / "blockwise.onnx")).graph
    # Every weight matrix of the encoder (6 layers x 6) is int8, and nothing else: the head
    # stays fp32.
    blockwise = [n.name for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(blockwise) == 36 and all(name.startswith("/encoder/layer.") for name in blockwise)
    largest = max(graph.initializer, key=lambda i: int(np.prod(i.dims)))
    assert list(largest.dims) == [30522, 384]  # the token embedding table, in 8 bits
    assert largest.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    assert {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name in ("bits", "accuracy_level")} == {8, 4}
    test = read_jsonl(blockwise_model / "data" / "test.jsonl")
    int8 = OnnxClassifier(blockwise_model, variant=choose_variant(
        {"int8": {"file": "blockwise.onnx"}}, "int8", Int8Gate()))
    fp32 = OnnxClassifier(blockwise_model)
    got, want = int8.predict(test.texts), fp32.predict(test.texts)
    cosine = np.sum(got.embeddings * want.embeddings, axis=1)
    assert float(cosine.min()) > 0.99 and float(cosine.mean()) < 0.999999
    agreement = np.mean(got.probabilities.argmax(1) == want.probabilities.argmax(1))
    assert agreement >= 0.99


def test_blockwise_int8_answers_do_not_depend_on_batch_mates(blockwise_model):
    """Each text's activations are quantised on their own, so a text gets the same answer alone
    and in any batch (what /predict promises, tests/test_service.py); dynamic int8 does not."""
    texts = read_jsonl(blockwise_model / "data" / "test.jsonl").texts[:48]
    int8 = OnnxClassifier(blockwise_model, variant=choose_variant(
        {"int8": {"file": "blockwise.onnx"}}, "int8", Int8Gate()))
    batched = np.concatenate([int8.predict(texts[i : i + 16]).probabilities
                              for i in range(0, len(texts), 16)])
    alone = np.concatenate([int8.predict([t]).probabilities for t in texts])
    np.testing.assert_allclose(alone, batched, atol=1e-5)


@pytest.fixture()
def registry_copy(trained_registry, tmp_path):
    return ModelRegistry(copy_registry(trained_registry.root, tmp_path / "registry"))


def tamper_with(path) -> None:
    """Change one byte in the middle of a model file: it may well still load, and differ."""
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x01
    path.write_bytes(bytes(content))


@pytest.mark.parametrize(("precision", "file"), [("auto", INT8_FILE), ("fp32", FP32_FILE)])
def test_a_tampered_model_file_is_refused(registry_copy, precision, file):
    version = registry_copy.current()
    holder = ModelHolder(registry_copy, precision=precision)
    assert holder.sync() and holder.require().variant.file == file
    # A new version whose served file differs from its manifest's sha256.
    with registry_copy.stage() as staged:
        for item in version.path.iterdir():
            if item.is_file() and item.name != "manifest.json":
                shutil.copy(item, staged.path / item.name)
        tamper_with(staged.path / file)
        tampered = registry_copy.commit(staged, {**version.manifest, "parent": version.name})
    with pytest.raises(ModelIntegrityError, match="sha256"):
        OnnxClassifier(tampered.path, variant=holder.choose(tampered.manifest))
    registry_copy.promote(tampered.name)
    assert holder.sync() is False
    assert holder.require().version == version.name  # the old model keeps serving
    assert "does not match the sha256 in its manifest" in holder.status.last_error
    assert tampered.name in holder.status.last_error


def test_forced_precisions_load_the_file_they_name(registry_copy):
    for precision, expected in (("fp32", "fp32"), ("int8", "int8"), ("auto", "int8")):
        holder = ModelHolder(registry_copy, precision=precision)
        assert holder.sync()
        model = holder.require()
        assert model.variant.precision == expected == model.classifier.variant.precision
        out = holder.run_batch(["my parcel never arrived", "cancel my order please"])
        assert out.probabilities.shape == (2, len(model.labels))


# -- a version whose int8 model fails, and what servers say ---------------------------------------


@pytest.fixture(scope="module")
def failing_registry(trained_registry, tmp_path_factory, demo_data_path):
    """The trained registry plus v2: the same data, with an int8 model that genuinely fails
    its check. Its int8 file gets a head that is not the version's (so int8 and fp32 disagree):
    the check measures that as it would any bad quantisation."""
    import adapters.training.pipeline as training
    from adapters.training.head import ClassifierHead
    from adapters.training.search import SearchOptions

    registry = ModelRegistry(
        copy_registry(trained_registry.root, tmp_path_factory.mktemp("int8-fail") / "registry"))
    real_write_int8 = training.write_int8

    def bad_int8(folder, fp32_file, head, parent_int8, *args):
        import torch

        torch.manual_seed(1)
        wrong = ClassifierHead(384, head.num_classes, hidden_size=0, dropout=0.0).eval()
        return real_write_int8(
            folder, fp32_file, wrong, trained_registry.current().int8_path, *args)

    patch = pytest.MonkeyPatch()
    patch.setattr(training, "write_int8", bad_int8)
    try:
        result = training.train_version(
            registry, read_jsonl(demo_data_path),
            options=training.TrainingOptions(search=SearchOptions(strategy="none")),
        )
    finally:
        patch.undo()
    assert result.version.name == "v2" and registry.pointer().version == "v2"
    return registry


def test_a_failing_int8_check_is_recorded(failing_registry):
    check = failing_registry.get("v2").manifest["int8"]["check"]
    assert check["passed"] is False
    assert check["agreement"] < 0.99 and "failed the accuracy gate" in check["reason"]


def test_models_shows_the_gate_and_auto_falls_back_to_fp32(failing_registry, tmp_path):
    """A real server with ``auto`` and the default gate: v2 (int8 failed) is served in fp32,
    saying why; promoting v1 (int8 passed) swaps every worker to its int8 model."""
    service = ServiceProcess(
        registry=copy_registry(failing_registry.root, tmp_path / "registry"),
        data_dir=tmp_path / "var", env={"REFIT_MODEL_PRECISION": "auto"},
    ).start()
    try:
        with service.client() as client:
            body = client.get("/models").json()
            assert body["current"] == "v2"
            serving = body["serving"]
            assert serving["version"] == "v2" and serving["precision"] == "fp32"
            assert "int8 failed the accuracy gate" in serving["precision_reason"]
            assert "serving fp32" in serving["precision_reason"]
            versions = {v["version"]: v for v in body["versions"]}
            v1, v2 = versions["v1"], versions["v2"]
            assert v2["int8"]["passed"] is False and v2["precision"] == "fp32"
            assert v1["int8"]["passed"] is True and v1["precision"] == "int8"
            manifest = failing_registry.get("v1").manifest["int8"]
            assert v1["int8"]["agreement"] == manifest["check"]["agreement"]
            assert v1["int8"]["size_mb"] < 0.7 * v1["int8"]["fp32_size_mb"]
            assert client.post("/predict", json={"texts": ["hello"]}).status_code == 200

            assert client.post("/models/promote", json={"version": "v1"}).status_code == 200

            def all_int8() -> bool:
                seen = {}
                for _ in range(8):
                    s = client.get("/models").json()["serving"]
                    seen[s["worker_pid"]] = (s["version"], s["precision"])
                return len(seen) == 2 and set(seen.values()) == {("v1", "int8")}

            wait_for(all_int8, 20, what="both workers on v1's int8 model")
            served = client.get("/models").json()["serving"]
            assert "int8 passed the accuracy gate" in served["precision_reason"]
            answer = client.post("/predict", json={"texts": ["my parcel never arrived"]}).json()
            assert answer["model_version"] == "v1"
    finally:
        service.stop()


def test_the_default_serves_fp32_and_shows_the_int8_check(
    trained_registry, tmp_path, monkeypatch
):
    monkeypatch.delenv("REFIT_MODEL_PRECISION", raising=False)
    service = ServiceProcess(
        registry=copy_registry(trained_registry.root, tmp_path / "registry"),
        data_dir=tmp_path / "var",
    ).start()
    try:
        with service.client() as client:
            body = client.get("/models").json()
            assert body["serving"]["precision"] == "fp32"
            assert body["serving"]["precision_reason"] == "REFIT_MODEL_PRECISION is fp32"
            assert body["versions"][0]["int8"]["passed"] is True  # shown, not served
            assert body["versions"][0]["precision"] == "fp32"
    finally:
        service.stop()


def test_a_head_only_childs_check_from_its_parents_int8_run_is_the_full_check(
    trained_registry, tmp_path
):
    """A retrain runs its parent's int8 model over the test texts while the new head trains, and
    applies the head to those embeddings afterwards: the check it records is the one running the
    composed int8 file gives. A composed file whose encoder is not the parent's int8 one is
    refused."""
    import torch

    from adapters.serving.tokenization import TextTokenizer
    from adapters.training.export import compose_with_encoder
    from adapters.training.head import head_probabilities
    from adapters.training.pipeline import version_head
    from adapters.training.quantize import BackgroundEncoding, Probe, check_int8
    from refit.errors import ExportParityError

    parent = trained_registry.current()
    assert parent.int8_path is not None
    test = read_jsonl(parent.path / "data" / "test.jsonl")
    head = version_head(parent)
    with torch.no_grad():  # a new head, as a retrain makes
        last = head.net[-1]
        noise = torch.randn(last.weight.shape, generator=torch.Generator().manual_seed(0))
        last.weight.add_(0.3 * noise)
    child = tmp_path / "child"
    child.mkdir()
    shutil.copy(parent.path / "tokenizer.json", child / "tokenizer.json")
    compose_with_encoder(parent.int8_path, head, child / INT8_FILE)
    max_length = parent.manifest["encoder"]["max_seq_length"]
    manifest = {"version": "child", "labels": parent.labels,
                "encoder": {"max_seq_length": max_length}}
    index = {label: i for i, label in enumerate(parent.labels)}
    fp32_embeddings = OnnxClassifier(parent.path).predict(test.texts).embeddings
    probe = Probe(test.texts, np.array([index[label] for label in test.labels]),
                  head_probabilities(head, fp32_embeddings).argmax(axis=1))
    tokenizer = TextTokenizer(parent.path / "tokenizer.json", max_length)

    encoding = BackgroundEncoding(parent.path, parent.manifest, test.texts)
    full = check_int8(child, manifest, probe, Int8Gate())
    fast = check_int8(child, manifest, probe, Int8Gate(), encoding(), head, tokenizer)
    for key in ("examples", "agreement", "fp32_accuracy", "int8_accuracy", "accuracy_drop",
                "disagreements", "passed", "reason"):
        assert fast[key] == full[key], key
    assert fast["encoder_run"]["from"] == f"{parent.name}/{INT8_FILE}"
    assert fast["encoder_run"]["composed_file_parity"]["max_abs_diff_embedding"] <= 1e-6

    compose_with_encoder(parent.onnx_path, head, child / INT8_FILE)  # the fp32 encoder instead
    with pytest.raises(ExportParityError, match="encoder does not match"):
        check_int8(child, manifest, probe, Int8Gate(), encoding(), head, tokenizer)
