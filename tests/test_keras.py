"""Keras 3 models through slimfuse: translated to torch layers that compute what Keras computes, through every
verb with no glue, saved as JSON + safetensors that reload without Keras; what cannot be translated is one
clear error naming the layer. (The model x verb matrix rows ``keras-*`` are in test_peer_models.py.)"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import slimfuse as sf
from slimfuse.errors import ArtifactError, ConfigError
from slimfuse.models.keras import torch_of

keras = pytest.importorskip("keras")
layers = keras.layers


def _keras_out(model, *xs: np.ndarray) -> np.ndarray:
    out = model(list(xs) if len(xs) > 1 else xs[0], training=False)
    return np.asarray(out.detach().cpu() if hasattr(out, "detach") else out)


def _torch_out(net, *xs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(*(torch.from_numpy(x) for x in xs)).numpy()


def _randomise_stats(model) -> None:
    """Give every BatchNormalization non-trivial moving statistics, so the translation of them is tested."""
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(size=n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=n).astype("float32"))


@pytest.fixture()
def seeded():
    keras.utils.set_random_seed(0)


def test_a_sequential_cnn_computes_what_keras_computes(seeded):
    """Strided 'same' padding (TensorFlow puts the extra pixel after), a depthwise multiplier, BatchNorm
    statistics, 'same' max pooling, and a Dense after a Flatten of channels-last features."""
    model = keras.Sequential([
        keras.Input((9, 9, 2)), layers.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
        layers.BatchNormalization(), layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2),
        layers.MaxPooling2D(padding="same"), layers.Conv2D(5, 2, padding="same", activation="swish"),
        layers.Flatten(), layers.Dropout(0.2), layers.Dense(10, activation="softmax")])
    _randomise_stats(model)
    x = np.random.default_rng(1).random((3, 9, 9, 2), dtype=np.float32)
    net = sf.from_keras(model)
    np.testing.assert_allclose(_torch_out(net, x), _keras_out(model, x), atol=1e-6)
    kinds = {type(m).__name__ for m in net.modules()}
    assert {"Conv2d", "BatchNorm2d", "Linear", "MaxPool2d"} <= kinds  # torch layers that pruning and int8 find


def test_a_functional_model_with_two_inputs_merges_and_global_pooling(seeded):
    image, side = keras.Input((12, 12, 3)), keras.Input((4,))
    h = layers.Rescaling(1 / 255.0)(image)
    a = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(6, 3, padding="same", use_bias=False)(h)))
    b = layers.Add()([a, layers.Conv2D(6, 3, padding="same")(a)])
    c = layers.GlobalAveragePooling2D()(layers.Concatenate()([b, a]))
    out = layers.Dense(5)(layers.Concatenate()([c, layers.Dense(3, activation="gelu")(side)]))
    model = keras.Model([image, side], out)
    _randomise_stats(model)
    rng = np.random.default_rng(2)
    x1, x2 = rng.random((2, 12, 12, 3), dtype=np.float32) * 255, rng.random((2, 4), dtype=np.float32)
    net = sf.from_keras(model)
    np.testing.assert_allclose(_torch_out(net, x1, x2), _keras_out(model, x1, x2), atol=1e-5)


def test_embeddings_layer_norm_and_a_4d_output(seeded):
    tokens = keras.Input((6,), dtype="int32")
    e = layers.LayerNormalization()(layers.Embedding(20, 8)(tokens))
    seq = keras.Model(tokens, layers.Dense(3)(layers.Flatten()(e)))
    ids = np.random.default_rng(3).integers(0, 20, (4, 6)).astype("int32")
    np.testing.assert_allclose(_torch_out(sf.from_keras(seq), ids), _keras_out(seq, ids), atol=1e-5)
    conv = keras.Sequential([keras.Input((5, 5, 2)), layers.Conv2D(3, 3, padding="same")])  # a feature map out
    x = np.random.default_rng(4).random((2, 5, 5, 2), dtype=np.float32)
    got = _torch_out(sf.from_keras(conv), x)
    assert got.shape == (2, 5, 5, 3)  # channels-last, as Keras returns it
    np.testing.assert_allclose(got, _keras_out(conv, x), atol=1e-6)


@pytest.fixture(scope="module")
def nhwc(digits):
    def image(s: sf.Split) -> sf.Split:
        return sf.Split(s.x.permute(0, 2, 3, 1).contiguous(), s.y)

    task = sf.Task("digits-nhwc", "classification", 10, (8, 8, 1), digits.task.class_names)
    return sf.Splits(image(digits.train), image(digits.val), image(digits.test), task)


def _cnn():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(8, 3, padding="same", activation="relu"),
                             layers.MaxPooling2D(), layers.Flatten(), layers.Dense(32, activation="relu"),
                             layers.Dense(10)])


def test_every_verb_takes_a_keras_model_with_no_glue(nhwc, tmp_path):
    """evaluate, fit, prune (sparsity and channels), quantize, export, ensemble, measure, save: each given the
    Keras model itself; the results are torch modules within bounds of the Keras model's own accuracy."""
    model = _cnn()  # trained by Keras itself, as a Keras user has it
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss)
    model.fit(nhwc.train.x.numpy(), nhwc.train.y.numpy(), epochs=8, batch_size=64, verbose=0)
    keras_accuracy = float((_keras_out(model, nhwc.test.x.numpy()).argmax(-1) == nhwc.test.y.numpy()).mean())
    base = sf.evaluate(model, nhwc.test)["accuracy"]
    assert base > 0.85 and abs(base - keras_accuracy) < 1e-6  # the same predictions (float32 mean)
    trained = sf.from_keras(model)
    fitted = sf.fit(model, nhwc, epochs=1, lr=1e-3, progress=False)
    assert isinstance(fitted, torch.nn.Module) and sf.evaluate(fitted, nhwc.test)["accuracy"] > base - 0.05
    sparse = sf.prune(model, sparsity=0.5, data=nhwc, epochs=1, progress=False)
    narrow = sf.prune(model, channels=0.25, data=nhwc, epochs=1, progress=False)
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in trained.parameters())
    quantized = sf.quantize(model, "int8-static", nhwc, backend="onnxruntime")
    for result in (sparse, narrow, quantized):
        assert base - sf.evaluate(result, nhwc.test)["accuracy"] < 0.05
    exported = sf.export(model, "onnx", tmp_path / "m.onnx", sample=nhwc.test)
    assert exported.parity["argmax_agreement"] == 1.0
    ens = sf.ensemble([model, narrow], "mean", nhwc)
    assert sf.evaluate(ens, nhwc.test)["accuracy"] >= base - 0.02
    report = sf.measure({"keras": model}, nhwc.test, threads=1, seconds=0.05, batch=32)
    assert report.rows[0]["params"] == sum(p.numel() for p in trained.parameters())
    for result in (model, narrow, ens):  # every artifact reloads bit-exactly
        path = sf.save(result, tmp_path / f"a{id(result)}")
        back = sf.load(path)
        inputs = nhwc.test.x[:32]
        expected = torch_of(result)
        with torch.no_grad():
            assert torch.equal(back.eval()(inputs), expected.eval()(inputs))


def test_names_are_stable_across_copies_and_reloads_need_no_keras(nhwc, tmp_path):
    """``copy.deepcopy`` of a Keras model renames its variables (an artifact keyed by name could not reload a
    copy); the translation's names stay, and loading it needs neither Keras nor pickle."""
    net = sf.from_keras(_cnn())
    assert list(copy.deepcopy(net).state_dict()) == list(net.state_dict())
    path = sf.save(sf.prune(net, sparsity=0.5, schedule="oneshot", validate=False), tmp_path / "p")
    assert json.loads((path / "card.json").read_text())["spec"]["arch"] == "keras"
    x = nhwc.test.x[:8]
    expected = sf.load(path)(x)
    code = ("import sys, torch; sys.modules['keras'] = None\n"  # any import of keras now fails
            "import slimfuse as sf\n"
            f"m = sf.load({str(path)!r}); x = torch.load({str(tmp_path / 'x.pt')!r})\n"
            f"torch.save(m(x).detach(), {str(tmp_path / 'y.pt')!r})")
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected.detach())


def test_what_cannot_be_translated_is_refused_naming_the_layer():
    keras.utils.set_random_seed(0)
    lstm = keras.Sequential([keras.Input((5, 3)), layers.LSTM(4, name="recurrent"), layers.Dense(2)])
    with pytest.raises(ConfigError, match="'recurrent'.*LSTM"):
        sf.prune(lstm, sparsity=0.5, schedule="oneshot")
    shared = layers.Dense(3, name="twice")
    x = keras.Input((3,))
    with pytest.raises(ConfigError, match="'twice'.*called 2 times"):
        sf.from_keras(keras.Model(x, shared(shared(x))))
    first = keras.Sequential([keras.Input((2, 6, 6)), layers.Conv2D(2, 3, data_format="channels_first",
                                                                   name="cf")])
    with pytest.raises(ConfigError, match="'cf'.*channels_last"):
        sf.from_keras(first)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    sub = Subclassed()
    sub(np.zeros((1, 3), "float32"))
    with pytest.raises(ConfigError, match="subclassed Keras model"):
        sf.quantize(sub, "int8-dynamic")


@pytest.mark.parametrize(("change", "message"), [
    (lambda g: g["nodes"][0].update({"in": ["nowhere"]}), "not computed before"),
    (lambda g: g["nodes"][0]["args"].update({"out": 10**12}), "out of range"),
    (lambda g: g["nodes"][0]["args"].update({"in": 60_000, "out": 60_000}), "parameters"),
    (lambda g: g["nodes"][0].update({"op": "eval"}), "unknown Keras graph op"),
    (lambda g: g.update({"outputs": ["missing"]}), "outputs name"),
])
def test_a_hostile_keras_card_is_refused_before_anything_is_built(tmp_path, change, message):
    net = sf.from_keras(_cnn())
    path = sf.save(net, tmp_path / "m")
    card = json.loads((path / "card.json").read_text())
    change(card["spec"]["args"]["graph"])
    (path / "card.json").write_text(json.dumps(card))
    with pytest.raises((ArtifactError, ConfigError), match=message):
        sf.load(path)
