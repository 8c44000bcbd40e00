"""The zoo's residual CNN (``resnet``): it saves, exports, prunes, quantizes and takes any image size."""

import pytest
import torch
from safetensors import safe_open

import slimfuse as sf
from slimfuse import configs, jobs
from slimfuse.compress.qmodules import QConv2d, QLinear
from slimfuse.data import Task
from slimfuse.errors import ConfigError
from slimfuse.models import zoo
from slimfuse.runtime import OnnxPredictor, load_onnx


@pytest.fixture(scope="module")
def resnet(digits):
    """Two stages: one block, then two (a projection block and an identity block after it)."""
    torch.manual_seed(0)
    net = sf.zoo.for_task("resnet", digits.task, widths=[8, 16], blocks=[1, 2])
    return sf.fit(net, digits, epochs=6, lr=3e-3, progress=False)


@pytest.fixture(scope="module")
def base_acc(resnet, digits):
    return sf.evaluate(resnet, digits.test)["accuracy"]


def test_it_learns_and_reloads_bit_exactly_from_its_spec(resnet, base_acc, digits, tmp_path):
    assert base_acc >= 0.85  # digits: 10 classes, chance is 0.1
    path = sf.save(resnet, tmp_path / "r")
    assert sorted(p.name for p in path.iterdir()) == ["card.json", "weights.safetensors"]  # no pickle
    card = sf.read_card(path)
    assert card["spec"] == {"arch": "resnet", "args": {"classes": 10, "in_channels": 1, "widths": [8, 16],
                                                       "blocks": [1, 2], "inner": [8, 16, 16]}}
    loaded = sf.load(path)
    assert torch.equal(sf.predict(resnet, digits.test), sf.predict(loaded, digits.test))
    with safe_open(str(path / "weights.safetensors"), "pt") as f:  # BatchNorm statistics travel too
        names = set(f.keys())
    assert {"bn1.running_mean", "stage2_1.shortcut.bn.running_var", "stage2_2.body.bn2.num_batches_tracked"} <= names
    assert isinstance(loaded.stage2_2.shortcut, torch.nn.Identity)  # same width, same resolution: no projection


def test_onnx_export_matches_torch_at_every_batch_size(resnet, digits, tmp_path):
    result = sf.export(resnet, "onnx", tmp_path / "r.onnx", sample=digits.val)
    assert result.parity["argmax_agreement"] == 1.0 and result.parity["max_abs_diff"] < 1e-4
    pred = load_onnx(tmp_path / "r.onnx")
    for n in (1, 3, len(digits.test)):
        torch.testing.assert_close(pred(digits.test.x[:n]), sf.predict(resnet, digits.test.x[:n]),
                                   atol=1e-4, rtol=1e-4)


def test_channel_pruning_shrinks_the_residual_streams_and_reloads(resnet, base_acc, digits, tmp_path):
    pruned = sf.prune(resnet, channels=0.25, data=digits, epochs=2, seed=0, progress=False)
    spec = sf.spec_of(pruned)
    assert spec["arch"] == "resnet"  # the zoo's own spec with the new widths, not the `pruned` fallback
    assert spec["args"]["widths"] == [6, 12] and spec["args"]["inner"] == [6, 12, 12]
    assert pruned.conv1.out_channels == 6 and pruned.stage2_1.shortcut.conv.out_channels == 12  # physically smaller
    params = sum(p.numel() for p in pruned.parameters())
    assert params < 0.65 * sum(p.numel() for p in resnet.parameters())
    assert sf.evaluate(pruned, digits.test)["accuracy"] >= base_acc - 0.05  # fine-tuned 2 epochs
    loaded = sf.load(sf.save(pruned, tmp_path / "p"))
    assert sum(p.numel() for p in loaded.parameters()) == params
    assert torch.equal(sf.predict(pruned, digits.test), sf.predict(loaded, digits.test))


def test_torch_int8_folds_every_batchnorm_and_runs_at_batch_one(resnet, base_acc, digits, tmp_path):
    q = sf.quantize(resnet, "int8-static", calib=digits, backend="torch")
    assert set(q.precision.values()) == {"int8-static"}  # every conv (BatchNorm folded) and the output layer
    body = q.net.stage2_1.body
    assert isinstance(body.conv1, QConv2d) and body.conv1.relu and isinstance(body.bn1, torch.nn.Identity)
    assert isinstance(q.net.stage2_1.shortcut.conv, QConv2d) and isinstance(q.net.out, QLinear)  # after flatten
    assert sf.evaluate(q, digits.test)["accuracy"] >= base_acc - 0.03
    one = q(digits.test.x[:1])
    assert one.shape == (1, 10) and torch.isfinite(one).all()
    path = sf.save(q, tmp_path / "q")
    loaded = sf.load(path)
    assert torch.equal(sf.predict(q, digits.test), sf.predict(loaded, digits.test))
    with safe_open(str(path / "weights.safetensors"), "pt") as f:  # real int8 on disk
        weights = {k: f.get_tensor(k).dtype for k in f.keys() if k.endswith(".weight")}  # noqa: SIM118
    assert len(weights) == 9 and set(weights.values()) == {torch.int8}  # 8 convs and the output layer


def test_onnx_runtime_int8_runs_at_batch_one_and_reloads(resnet, base_acc, digits, tmp_path):
    q = sf.quantize(resnet, "int8-static", calib=digits, backend="onnxruntime")
    assert isinstance(q, OnnxPredictor)
    assert sf.evaluate(q, digits.test)["accuracy"] >= base_acc - 0.03
    one = q(digits.test.x[:1])
    assert one.shape == (1, 10) and torch.isfinite(one).all()
    torch.testing.assert_close(one, q(digits.test.x[:4])[:1], atol=1e-5, rtol=1e-5)
    loaded = sf.load(sf.save(q, tmp_path / "q"))
    assert torch.equal(sf.predict(q, digits.test), sf.predict(loaded, digits.test))


@pytest.mark.parametrize("shape", [(1, 3, 12, 20), (5, 3, 9, 9), (2, 3, 31, 7)])
def test_any_image_size_and_batch_size(shape):
    torch.manual_seed(0)
    net = zoo.for_task("resnet", Task("toy", "classification", 4, (3, 12, 20)), widths=[4, 8, 8], blocks=[1, 1, 2])
    x = torch.randn(*shape)
    out = net.eval()(x)
    assert out.shape == (shape[0], 4)
    with torch.no_grad():  # in eval mode each image's output is its own, whatever the batch
        torch.testing.assert_close(out[:1], net(x[:1]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="square"):
        zoo.for_task("cnn", Task("toy", "classification", 4, (3, 12, 20)))


def test_students_and_the_train_job_know_resnet(resnet, digits, tmp_path):
    s = zoo.student(resnet, width=0.5)
    assert sf.spec_of(s)["args"] == {"classes": 10, "in_channels": 1, "widths": [4, 8], "blocks": [1, 2],
                                     "inner": [4, 8, 8]}
    shallow = zoo.student(resnet, width=1.0, depth=1)
    assert sf.spec_of(shallow)["args"]["widths"] == [8] and shallow(digits.test.x[:2]).shape == (2, 10)
    assert sf.spec_of(jobs.build_student(configs.check_student("resnet:4,8"), None, digits.task))["args"][
        "widths"] == [4, 8]
    done = jobs.train(configs.Train(model="resnet", widths=[8], epochs=3, lr=3e-3), digits, tmp_path / "t")
    assert sf.read_card(tmp_path / "t")["spec"]["arch"] == "resnet"
    assert done.metrics["test"]["accuracy"] == sf.evaluate(sf.load(tmp_path / "t"), digits.test)["accuracy"] > 0.3


def test_bad_arguments_are_one_config_error():
    with pytest.raises(ConfigError, match="blocks gives 1 stages but widths 2"):
        zoo.resnet(widths=[4, 8], blocks=[1])
    with pytest.raises(ConfigError, match="inner gives 1 widths for 2 blocks"):
        zoo.resnet(widths=[4, 8], inner=[4])
    with pytest.raises(ConfigError, match="positive integers"):
        zoo.resnet(widths=[4, 0])
    with pytest.raises(ConfigError, match="depth"):
        zoo.student(zoo.resnet(widths=[4, 8]), depth=3)
