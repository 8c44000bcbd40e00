"""slimfuse.quantize, torch backend: smaller artifacts, bounded accuracy loss, bit-exact reloads."""

import functools

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from torch import nn

import slimfuse as sf
from slimfuse.cli import app
from slimfuse.compress.qmodules import QConv2d, QLinear
from slimfuse.measure import artifact_bytes

INT8 = ["int8-dynamic", "int8-static", "qat", "mixed"]
# these tests are about the torch backend; backend="auto" picks onnxruntime for int8 (see BENCHMARKS.md)
quantize = functools.partial(sf.quantize, backend="torch")


@pytest.fixture(scope="module")
def mlp(digits):
    torch.manual_seed(0)
    return sf.fit(sf.zoo.for_task("mlp", digits.task, hidden=[256, 128]), digits, epochs=10, progress=False)


@pytest.fixture(scope="module")
def cnn(digits):  # conv -> batchnorm -> relu -> pool blocks: folding and fusion
    torch.manual_seed(0)
    return sf.fit(sf.zoo.for_task("cnn", digits.task, widths=[8, 16], hidden=32), digits, epochs=6, progress=False)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("scheme, options, max_drop, max_ratio", [
    ("int8-dynamic", {}, 0.02, 0.3),
    ("int8-static", {"calibrator": "minmax"}, 0.02, 0.3),
    ("int8-static", {"calibrator": "percentile"}, 0.02, 0.3),
    ("int8-static", {"calibrator": "entropy"}, 0.02, 0.3),
    ("qat", {"epochs": 1}, 0.02, 0.3),
    ("mixed", {"max_drop": 2.0}, 0.03, 0.6),
    ("fp16", {}, 0.005, 0.55),
    ("bf16", {}, 0.01, 0.55),
])
def test_scheme_is_smaller_accurate_and_reloads_bit_exactly(mlp, digits, tmp_path, scheme, options, max_drop,
                                                            max_ratio):
    before = _state(mlp)
    q = quantize(mlp, scheme, calib=digits, **options)
    base = sf.evaluate(mlp, digits.test)["accuracy"]
    acc = sf.evaluate(q, digits.test)["accuracy"]
    assert acc >= base - max_drop, f"{scheme}: accuracy {acc:.4f} vs fp32 {base:.4f}"
    assert artifact_bytes(q) <= max_ratio * artifact_bytes(mlp)
    loaded = sf.load(sf.save(q, tmp_path / "q"))
    assert torch.equal(sf.predict(q, digits.test), sf.predict(loaded, digits.test))
    assert sf.lineage_of(loaded)[-1]["op"] == "quantize"
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items()), "the input model was mutated"


def test_int8_weights_are_really_int8_on_disk(mlp, digits, tmp_path):
    q = quantize(mlp, "int8-static", calib=digits)
    path = sf.save(q, tmp_path / "q")
    with safe_open(str(path / "weights.safetensors"), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert {dtypes[f"net.{n}.weight"] for n in ("fc1", "fc2", "out")} == {torch.int8}
    assert dtypes["net.fc1.weight_scale"] == torch.float32 and dtypes["net.fc1.weight_zero_point"] == torch.int32
    assert dtypes["net.fc1.output_zero_point"] == torch.int32
    assert not any(d == torch.float32 and k.endswith(".weight") for k, d in dtypes.items())
    layer = q.net.fc1
    assert isinstance(layer, QLinear) and layer.weight.dtype == torch.int8
    err = (layer.dequantized_weight() - mlp.fc1.weight).abs()  # rounding error is at most half a step
    assert (err <= layer.weight_scale[:, None] / 2 + 1e-7).all()
    assert q.precision == {"fc1": "int8-static", "fc2": "int8-static", "out": "int8-static"}


def test_measure_reports_real_bytes_params_and_macs(mlp, digits):
    q = quantize(mlp, "int8-dynamic")
    rows = sf.measure({"fp32": mlp, "int8": q}, digits.test, seconds=0.1).rows
    assert rows[1]["bytes"] * 3.3 < rows[0]["bytes"]
    assert rows[1]["params"] == rows[0]["params"] and rows[1]["macs"] == rows[0]["macs"]


def test_conv_batchnorm_relu_is_folded_fused_and_int8(cnn, digits, tmp_path):
    q = quantize(cnn, "int8-static", calib=digits.train)
    assert isinstance(q.net.conv1, QConv2d) and q.net.conv1.relu and isinstance(q.net.bn1, nn.Identity)
    assert set(q.precision.values()) == {"int8-static"}
    base = sf.evaluate(cnn, digits.test)["accuracy"]
    assert sf.evaluate(q, digits.test)["accuracy"] >= base - 0.03
    loaded = sf.load(sf.save(q, tmp_path / "q"))
    assert torch.equal(sf.predict(q, digits.test), sf.predict(loaded, digits.test))


@sf.zoo.rebuildable
class ForwardCodeBlocks(nn.Module):
    """Conv -> BatchNorm -> ReLU written in forward code (no nn.Sequential), then a residual block whose
    BatchNorm output is added to in place and passed through a ReLU module: that ReLU is not the conv's."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.head = nn.Linear(8 * 16, 10)

    def forward(self, x):
        h = self.act1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(h))
        y += h
        y = nn.functional.max_pool2d(self.act2(y), 2)
        return self.head(y.flatten(1))


def test_batchnorm_in_forward_code_is_folded_where_it_keeps_the_function(digits, tmp_path):
    torch.manual_seed(0)
    model = sf.fit(ForwardCodeBlocks(), digits, epochs=3, progress=False)
    q = quantize(model, "int8-static", calib=digits.train)
    assert q.layers["conv1"]["bn"] == "bn1" and q.layers["conv1"]["relu"] == "act1"
    assert q.layers["conv2"]["bn"] == "bn2" and q.layers["conv2"]["relu"] is None  # act2 runs after the addition
    assert isinstance(q.net.bn2, nn.Identity) and isinstance(q.net.act2, nn.ReLU)
    assert set(q.precision.values()) == {"int8-static"}  # no BatchNorm left in fp32
    base = sf.evaluate(model, digits.test)["accuracy"]
    assert sf.evaluate(q, digits.test)["accuracy"] >= base - 0.03
    loaded = sf.load(sf.save(q, tmp_path / "q"), trust_factory=True)  # the class lives in this test module
    assert torch.equal(sf.predict(q, digits.test), sf.predict(loaded, digits.test))


@sf.zoo.rebuildable
class PadsByStride(nn.Module):
    """TensorFlow-style padding computed in forward code from the convolution's own ``stride`` and
    ``kernel_size`` (transformers' MobileNetV2 does this), on a conv -> BatchNorm -> ReLU chain."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(1, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.head = nn.Linear(8 * 16, 10)

    def forward(self, x):
        total = max(self.conv.kernel_size[0] - self.conv.stride[0], 0)
        x = nn.functional.pad(x, (total // 2, total - total // 2) * 2)
        return self.head(self.act(self.bn(self.conv(x))).flatten(1))


def test_a_fold_is_tried_on_forward_code_that_reads_the_layers_attributes(digits):
    torch.manual_seed(0)
    model = sf.fit(PadsByStride(), digits, epochs=3, progress=False)
    q = quantize(model, "int8-static", calib=digits.train)  # was: AttributeError 'Sequential' has no 'stride'
    assert q.layers["conv"]["bn"] == "bn" and q.layers["conv"]["relu"] == "act"
    assert sf.evaluate(q, digits.test)["accuracy"] >= sf.evaluate(model, digits.test)["accuracy"] - 0.03


def test_int8_dynamic_that_would_not_shrink_a_cnn_is_refused_with_the_alternatives():
    model = sf.zoo.resnet(classes=10, widths=[16, 32])  # its one Linear holds 1% of the weights
    with pytest.raises(sf.ConfigError, match=r"would not be smaller .*use int8-static"):
        quantize(model, "int8-dynamic")


def test_layers_without_a_kernel_stay_float_and_are_listed(cnn, digits, tmp_path):
    q = quantize(cnn, "int8-dynamic")  # torch has no dynamic int8 conv
    assert q.precision["conv1"] == "fp32" and q.precision["bn1"] == "fp32" and q.precision["fc"] == "int8-dynamic"
    assert isinstance(q.net.conv1, nn.Conv2d) and isinstance(q.net.fc, QLinear)
    card = sf.read_card(sf.save(q, tmp_path / "q"))
    assert "Conv2d" in card["lineage"][-1]["params"]["float_layers"]["conv1"]
    assert card["spec"]["args"]["layers"]["conv2"]["precision"] == "fp32"

    torch.manual_seed(0)  # a layer type no scheme quantizes, in the middle of a quantized region
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 10))
    net = sf.fit(net, digits, epochs=3, progress=False)
    s = quantize(net, "int8-static", calib=digits)
    assert s.precision == {"1": "int8-static", "2": "fp32", "4": "int8-static"}
    assert "LayerNorm" in s.layers["2"]["reason"]
    agree = (sf.predict(s, digits.test, output="label") == sf.predict(net, digits.test, output="label")).float().mean()
    assert agree > 0.95


def test_mixed_keeps_sensitive_layers_until_max_drop_is_met(mlp, digits, tmp_path):
    strict = quantize(mlp, "mixed", calib=digits, max_drop=0.0)
    assert sf.evaluate(strict, digits.val)["accuracy"] >= sf.evaluate(mlp, digits.val)["accuracy"]
    card = sf.read_card(sf.save(strict, tmp_path / "q"))
    step = card["lineage"][-1]["params"]
    assert set(step["precision"]) == {"fc1", "fc2", "out"} and set(step["sensitivity"]) == {"fc1", "fc2", "out"}
    loose = quantize(mlp, "mixed", calib=digits, max_drop=50, high="fp16")
    assert set(loose.precision.values()) == {"int8-static"}


def test_clear_errors(mlp, digits):
    with pytest.raises(sf.ConfigError, match="calibration data"):
        quantize(mlp, "int8-static")
    with pytest.raises(sf.ConfigError, match="unknown quantization scheme 'int4'"):
        quantize(mlp, "int4")
    with pytest.raises(sf.ConfigError, match="field 'calibrator': unknown value"):
        quantize(mlp, "int8-static", calib=digits, calibrator="magic")
    with pytest.raises(sf.ConfigError, match="its options"):
        quantize(mlp, "int8-dynamic", calibrator="entropy")
    with pytest.raises(sf.ConfigError, match="Splits"):
        quantize(mlp, "qat", calib=digits.train)
    with pytest.raises(sf.ConfigError, match="no layer it can quantize"):
        quantize(nn.Sequential(nn.Conv2d(1, 2, 3)), "int8-dynamic")
    with pytest.raises(sf.ConfigError, match="already quantized"):
        quantize(quantize(mlp, "int8-dynamic"), "int8-dynamic")


def test_a_torch_without_int8_kernels_gets_one_clear_error_and_auto_takes_onnxruntime(mlp, digits, tmp_path,
                                                                                     monkeypatch):
    """torch deprecates the quantized ops the torch backend runs on. Where a build lacks them, quantizing
    with backend='torch' and loading a torch-int8 artifact each say so and name ONNX Runtime; 'auto'
    records the torch candidate as failed and returns an ONNX Runtime model; float schemes still work."""
    from slimfuse.compress import qmodules

    saved = sf.save(quantize(mlp, "int8-static", calib=digits), tmp_path / "int8")
    monkeypatch.setattr(qmodules, "KERNELS", (*qmodules.KERNELS, "a_kernel_this_torch_lacks"))
    for scheme in INT8:
        with pytest.raises(sf.ConfigError, match="no int8 kernels .*backend='onnxruntime'"):
            quantize(mlp, scheme, calib=digits, epochs=1) if scheme == "qat" else quantize(mlp, scheme, calib=digits)
    with pytest.raises(sf.ArtifactError, match="cannot load this torch-int8 artifact.*backend='onnxruntime'"):
        sf.load(saved)
    auto = sf.quantize(mlp, "int8-static", calib=digits)
    assert auto.slimfuse_runtime == "onnxruntime"
    assert "no int8 kernels" in sf.lineage_of(auto)[-1]["params"]["chosen_by"]["candidates"]["torch"]["error"]
    assert sf.evaluate(quantize(mlp, "bf16"), digits.test)["accuracy"] > 0.9


def test_cli_quantize(mlp, tmp_path):
    runner = CliRunner()
    sf.save(mlp, tmp_path / "fp32")
    res = runner.invoke(app, ["quantize", str(tmp_path / "fp32"), "--scheme", "int8-static", "--data", "digits",
                              "--backend", "torch", "-o", str(tmp_path / "q8")])
    assert res.exit_code == 0, res.output
    assert sf.read_card(tmp_path / "q8")["spec"]["arch"] == "quantized"
    res = runner.invoke(app, ["quantize", str(tmp_path / "fp32"), "--scheme", "int8-static", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "calibration data" in res.output and not (tmp_path / "x").exists()
