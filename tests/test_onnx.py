"""ONNX export, the ONNX Runtime predictor, and int8 quantization with ONNX Runtime."""

import copy

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import slimfuse as sf
from slimfuse.cli import app
from slimfuse.compress.onnx_int8 import float_nodes
from slimfuse.runtime import OnnxPredictor, load_onnx


@pytest.fixture(scope="module")
def onnx_file(digits_mlp, digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "mlp.onnx"
    result = sf.export(digits_mlp, "onnx", path, sample=digits.val)
    return path, result


def test_export_parity_dynamic_batch_and_recorded_lineage(onnx_file, digits_mlp, digits):
    path, result = onnx_file
    assert result.parity["argmax_agreement"] == 1.0 and result.parity["max_abs_diff"] < 1e-4
    proto = onnx.load(str(path))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    pred = load_onnx(path)
    for n in (1, 7, len(digits.test)):  # dynamic batch axis
        torch.testing.assert_close(pred(digits.test.x[:n]), sf.predict(digits_mlp, digits.test.x[:n]),
                                   atol=1e-4, rtol=1e-4)
    steps = [s["op"] for s in sf.lineage_of(pred)]
    assert steps == ["train", "export"] and sf.lineage_of(pred)[-1]["params"]["parity"] == result.parity
    assert pred.slimfuse_runtime == "onnxruntime"


def test_predictor_is_measured_saved_bit_exactly_and_usable_as_a_module(onnx_file, digits_mlp, digits, tmp_path):
    pred = load_onnx(onnx_file[0])
    report = sf.measure({"torch": digits_mlp, "ort": pred}, digits.test, seconds=0.05)
    torch_row, ort_row = report.row("torch"), report.row("ort")
    assert ort_row["runtime"] == "onnxruntime" and ort_row["macs"] == torch_row["macs"]
    assert ort_row["params"] == torch_row["params"] and abs(ort_row["accuracy"] - torch_row["accuracy"]) < 1e-6
    sf.save(pred, tmp_path / "a")
    back = sf.load(tmp_path / "a")
    assert torch.equal(sf.predict(back, digits.test), sf.predict(pred, digits.test))
    assert sf.lineage_of(back) == sf.lineage_of(pred)
    # a teacher / ensemble member: gradients flow around it, deep copies work
    x = digits.test.x[:5].clone().requires_grad_(True)
    twin = copy.deepcopy(back)
    assert torch.equal(twin(x), pred(x))


def test_tampered_stored_model_is_refused(onnx_file, tmp_path):
    pred = load_onnx(onnx_file[0])
    sf.save(pred, tmp_path / "a")
    card = (tmp_path / "a" / "card.json").read_text()
    (tmp_path / "a" / "card.json").write_text(card.replace(pred.sha256, "0" * 64))
    with pytest.raises(sf.ArtifactError):
        sf.load(tmp_path / "a")


def test_invalid_and_foreign_onnx_files_are_refused(tmp_path, onnx_file):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x80\x04 not a model at all")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(onnx_file[0].read_bytes()[:500])
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 4])
    bad_graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["missing"], ["y"])], "g", [x], [y])
    invalid = tmp_path / "invalid.onnx"
    invalid.write_bytes(onnx.helper.make_model(bad_graph).SerializeToString())
    for path in (garbage, truncated, invalid, tmp_path / "absent.onnx"):
        with pytest.raises(sf.ArtifactError):
            load_onnx(path)


def _int8_initializers(proto):
    return [t for t in proto.graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)]


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8-static"])
def test_ort_int8_is_smaller_low_precision_and_accurate(scheme, onnx_file, digits_mlp, digits):
    fp32 = load_onnx(onnx_file[0])
    q = sf.quantize(digits_mlp, scheme, calib=digits.val, backend="onnxruntime")
    assert isinstance(q, OnnxPredictor)
    assert q.slimfuse_artifact_bytes() < 0.5 * fp32.slimfuse_artifact_bytes()
    assert float_nodes(q.proto) == [] and len(_int8_initializers(q.proto)) >= 2  # weights really are int8
    base = sf.evaluate(fp32, digits.test)["accuracy"]
    assert sf.evaluate(q, digits.test)["accuracy"] >= base - 0.03
    assert sf.lineage_of(q)[-1]["params"]["scheme"] == scheme


def test_onnx_in_int8_onnx_out(onnx_file, digits, tmp_path):
    # a foreign file (no slimfuse metadata), as a TensorFlow/Keras exporter would write it
    proto = onnx.load(str(onnx_file[0]))
    del proto.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(proto.SerializeToString())
    for method in ("percentile", "entropy"):
        q = sf.quantize(str(foreign), "int8-static", calib=digits.val, backend="onnxruntime", calibrator=method)
        assert [s["op"] for s in sf.lineage_of(q)] == ["import_onnx", "quantize"]
    result = sf.export(q, "onnx", tmp_path / "int8.onnx")
    again = load_onnx(result.path)
    assert torch.equal(again(digits.test.x), q(digits.test.x))
    assert [s["op"] for s in sf.lineage_of(again)] == ["import_onnx", "quantize"]


def test_clear_errors(digits_mlp, digits, tmp_path):
    with pytest.raises(sf.ConfigError, match="calibration data"):
        sf.quantize(digits_mlp, "int8-static", backend="onnxruntime")
    with pytest.raises(sf.ConfigError, match="unknown quantization scheme"):
        sf.quantize(digits_mlp, "int4-magic")
    with pytest.raises(sf.ConfigError, match="calibrator"):
        sf.quantize(digits_mlp, "int8-static", digits.val, backend="onnxruntime", calibrator="median")
    with pytest.raises(sf.ConfigError, match="unknown field"):
        sf.quantize(digits_mlp, "int8-dynamic", backend="onnxruntime", symmetric=True)
    with pytest.raises(sf.ConfigError, match="format"):
        sf.export(digits_mlp, "tflite", tmp_path / "m.tflite")
    assert not list(tmp_path.iterdir())


def test_cli_export_and_quantize_an_onnx_file(digits_mlp, tmp_path):
    sf.save(digits_mlp, tmp_path / "teacher")
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(tmp_path / "teacher"), "-o", str(tmp_path / "m.onnx"), "--data", "digits"])
    assert res.exit_code == 0, res.output
    assert "argmax agreement 1.0000" in res.output
    res = runner.invoke(app, ["quantize", str(tmp_path / "m.onnx"), "--scheme", "int8-static", "--data", "digits",
                              "--backend", "onnxruntime", "-o", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    q = sf.load(tmp_path / "q")
    assert isinstance(q, OnnxPredictor) and sf.read_card(tmp_path / "q")["metrics"]["test"]["accuracy"] > 0.5
    (tmp_path / "bad.onnx").write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    res = runner.invoke(app, ["quantize", str(tmp_path / "bad.onnx"), "--scheme", "int8-dynamic", "-o",
                              str(tmp_path / "out.onnx")])
    assert res.exit_code == 2 and "not an ONNX model" in res.output
    assert not (tmp_path / "out.onnx").exists()


def test_keras_style_model_nhwc_input_and_softmax_output():
    """A foreign model taking NHWC images and ending in softmax (as Keras exporters write them)."""
    h = onnx.helper
    w = np.random.default_rng(0).normal(size=(32, 10)).astype(np.float32)
    nodes = [h.make_node("Flatten", ["images"], ["flat"]), h.make_node("MatMul", ["flat", "w"], ["z"]),
             h.make_node("Softmax", ["z"], ["probs"], axis=-1)]
    images = h.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["n", 4, 4, 2])
    probs = h.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, ["n", 10])
    graph = h.make_graph(nodes, "keras_like", [images], [probs], [onnx.numpy_helper.from_array(w, "w")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    pred = sf.runtime.from_proto(model, input_layout="nhwc")
    x = torch.rand(20, 2, 4, 4, generator=torch.Generator().manual_seed(0))  # NCHW, as slimfuse data is
    expected = torch.log_softmax(x.permute(0, 2, 3, 1).reshape(20, 32) @ torch.from_numpy(w), dim=-1)
    torch.testing.assert_close(pred(x), expected, atol=1e-4, rtol=1e-4)
    assert pred.slimfuse_macs() == 320


# -- hostile ONNX files: nothing reaches outside the file, run-time failures are one ArtifactError ----

def _graph_model(nodes, inits=(), opset=17, functions=()):
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, None])
    graph = h.make_graph(nodes, "g", [x], [y], initializer=list(inits))
    imports = [h.make_opsetid("", opset)] + [h.make_opsetid(f.domain, 1) for f in functions]
    return h.make_model(graph, opset_imports=imports, functions=list(functions))


def _external(name):
    t = onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, [4], [0.0] * 4)
    t.ClearField("float_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value="secret.bin")
    return t


def _hostile_onnx(kind):
    h = onnx.helper
    if kind == "external initializer":
        return _graph_model([h.make_node("Add", ["x", "w"], ["y"])], [_external("w")])
    if kind == "external Constant":
        return _graph_model([h.make_node("Constant", [], ["w"], value=_external("c")),
                             h.make_node("Add", ["x", "w"], ["y"])])
    if kind == "external in If subgraph":
        out = h.make_tensor_value_info("w", onnx.TensorProto.FLOAT, None)
        branch = h.make_graph([h.make_node("Constant", [], ["w"], value=_external("c"))], "b", [], [out])
        cond = h.make_tensor("cond", onnx.TensorProto.BOOL, [], [True])
        return _graph_model([h.make_node("If", ["cond"], ["w"], then_branch=branch, else_branch=branch),
                             h.make_node("Add", ["x", "w"], ["y"])], [cond])
    if kind == "custom op":
        node = h.make_node("Evil", ["x"], ["y"], domain="com.example")
        model = _graph_model([node])
        model.opset_import.append(h.make_opsetid("com.example", 1))
        return model
    if kind == "ConstantOfShape bomb":
        shape = h.make_tensor("shape", onnx.TensorProto.INT64, [2], [10**5, 10**5])
        return _graph_model([h.make_node("ConstantOfShape", ["shape"], ["big"], name="bomb"),
                             h.make_node("Add", ["x", "big"], ["y"])], [shape])
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,message", [
    ("external initializer", "stores tensor 'w' in an external file"),
    ("external Constant", "attribute 'value' of a Constant node in the graph stores tensor 'c' in an external"),
    ("external in If subgraph", "'then_branch' subgraph of an If node stores tensor 'c' in an external"),
    ("custom op", "custom op of domain 'com.example'"),
    ("ConstantOfShape bomb", "ConstantOfShape node 'bomb' needs"),
])
def test_hostile_onnx_files_are_refused_before_onnx_runtime_sees_them(tmp_path, kind, message):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    path = tmp_path / "m.onnx"
    path.write_bytes(_hostile_onnx(kind).SerializeToString())
    with pytest.raises(sf.ArtifactError, match=message):
        load_onnx(path)
    result = CliRunner().invoke(app, ["quantize", str(path), "--scheme", "int8-dynamic",
                                      "-o", str(tmp_path / "q.onnx")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "q.onnx").exists()


def test_custom_ops_load_only_when_allowed(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(_hostile_onnx("custom op").SerializeToString())
    pred = load_onnx(path, allow_custom_ops=True)  # parsed and checked; ORT itself cannot run it
    with pytest.raises(sf.ArtifactError, match="ONNX Runtime failed to create a session"):
        pred(torch.zeros(2, 4))


def test_a_graph_that_fails_at_run_time_is_one_artifact_error_naming_the_node(tmp_path):
    h = onnx.helper
    shape = h.make_tensor("shape", onnx.TensorProto.INT64, [2], [3, 5])
    model = _graph_model([h.make_node("Reshape", ["x", "shape"], ["y"], name="bad_reshape")], [shape])
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    pred = load_onnx(path)  # passes the checker: the batch size is only known at run time
    with pytest.raises(sf.ArtifactError, match="ONNX Runtime failed running this model at node 'bad_reshape'"):
        pred(torch.zeros(2, 4))
