"""The validation gate (slimfuse.validate) and the broken results it was built to stop.

Each model here is a tiny stand-in with the structure of a case that once returned a broken
model with exit 0: a flatten by ``.view`` after a quantized conv, forward code reading layer
attributes, an additive ``finfo.min`` attention mask through ONNX Runtime int8-static, a layer
whose weights are all below the global pruning threshold, an ensemble with ONNX and torch-int8
members, tied embeddings.
"""

import json

import pytest
import torch
from factories import token_ids
from safetensors.torch import load_file
from torch import nn

import slimfuse as sf
from slimfuse.compress.prune import magnitude_masks
from slimfuse.compress.schemes import SCHEMES
from slimfuse.models.spec import derive
from slimfuse.validate import ValidationError, check, validation_of


def agreement(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x).argmax(1) == b(x).argmax(1)).float().mean())


@pytest.fixture(scope="module")
def conv_view(digits):
    torch.manual_seed(0)
    return sf.fit(sf.zoo.user_model("factories:conv_view"), digits, epochs=3, progress=False)


# --------------------------------------------------------------------------- torch int8


def test_int8_static_conv_output_flattens_with_view(conv_view, digits):
    """fbgemm's conv writes channels-last: ``x.view(x.size(0), -1)`` after it must still work."""
    q = sf.quantize(conv_view, "int8-static", calib=digits, backend="torch")
    assert q.precision["conv1"] == q.precision["conv2"] == "int8-static"
    assert agreement(q, conv_view, digits.test.x) >= 0.95
    v = validation_of(q)
    assert v["ran"] and v["reload"] == "bit-exact" and v["agreement"] >= 0.95 and v["samples"] <= 256


def test_int8_layers_keep_the_attributes_forward_code_reads(digits):
    torch.manual_seed(0)
    model = sf.fit(sf.zoo.user_model("factories:attr_reader"), digits, epochs=2, progress=False)
    q = sf.quantize(model, "int8-static", calib=digits, backend="torch")
    conv, lin = q.net.conv, q.net.fc
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (1, 8, (3, 3), (1, 1))
    assert (lin.in_features, lin.out_features) == (model.fc.in_features, model.fc.out_features)
    assert agreement(q, model, digits.test.x) >= 0.95
    d = sf.quantize(model, "int8-dynamic", backend="torch")
    assert agreement(d, model, digits.test.x) >= 0.95


# --------------------------------------------------------------------------- ONNX Runtime int8-static


@pytest.fixture(scope="module")
def attention():
    torch.manual_seed(0)
    m = sf.zoo.user_model("factories:tiny_attention")
    with torch.no_grad():  # sharp attention: averaging over the padding instead changes the predictions
        for layer in (m.q, m.k, m.out):
            layer.weight.mul_(4)
    return m


def test_attention_mask_is_excluded_from_int8_static_calibration(attention):
    ids = token_ids(256)
    test = token_ids(256, seed=1)
    q = sf.quantize(attention, "int8-static", calib=ids)  # ONNX Runtime, the default backend
    assert agreement(q, attention, test) >= 0.95
    step = sf.lineage_of(q)[-1]
    extreme = step["params"]["extreme_nodes"]
    assert any("Softmax" in n for n in extreme) and all("attention mask" in why for why in extreme.values())
    # the card is truthful: the attention products and the masked nodes compute in float
    assert len(step["params"]["float_nodes"]) >= 2
    assert step["validation"]["reload"] == "bit-exact"


def test_int8_static_with_the_mask_in_calibration_fails_at_the_step(attention):
    ids = token_ids(256)
    with pytest.raises(ValidationError, match=r"quantize\(int8-static, backend=onnxruntime\).*op_types="):
        sf.quantize(attention, "int8-static", calib=ids, exclude_extreme=False)
    q = sf.quantize(attention, "int8-static", calib=ids, exclude_extreme=False, validate=False)
    assert agreement(q, attention, token_ids(256, seed=1)) < 0.9  # what the gate stopped
    assert validation_of(q) == {"ran": False, "reason": "validate=False"}


# --------------------------------------------------------------------------- pruning


def test_global_pruning_never_empties_a_layer_of_small_weights():
    torch.manual_seed(0)
    model = sf.zoo.mlp(64, [32, 32], 10)
    with torch.no_grad():
        model.fc2.weight.mul_(1e-3)  # every weight below any global threshold
    pruned = sf.prune(model, sparsity=0.9, schedule="oneshot", exclude=[])
    layers = ["fc1", "fc2", "out"]
    zeros = {n: int((pruned.get_submodule(n).weight == 0).sum()) for n in layers}
    sizes = {n: pruned.get_submodule(n).weight.numel() for n in layers}
    assert zeros["fc2"] == int(0.98 * sizes["fc2"])  # capped at max_layer_sparsity (default 0.98)
    assert sum(zeros.values()) == round(0.9 * sum(sizes.values()))  # the others take the rest: still exact
    assert sf.lineage_of(pruned)[-1]["params"]["max_layer_sparsity"] == 0.98
    # the cap holds for any cap and any layer: at least one weight always survives
    masks = magnitude_masks({"a": torch.full((10,), 1e-6), "b": torch.ones(90)}, 0.5, "global", 0.999)
    assert int(masks["a"].sum()) == 1 and int((~masks["b"]).sum()) == 41
    with pytest.raises(sf.ConfigError, match="max_layer_sparsity"):
        sf.prune(model, sparsity=0.99, schedule="oneshot")
    with pytest.raises(sf.ConfigError, match="max_layer_sparsity"):
        sf.prune(model, sparsity=0.5, schedule="oneshot", max_layer_sparsity=1.0)


# --------------------------------------------------------------------------- fusion and artifacts


def test_ensemble_of_onnx_torch_int8_and_zoo_members_reloads_bit_exactly(digits, digits_mlp, tmp_path):
    onnx_member = sf.quantize(digits_mlp, "int8-static", calib=digits, backend="onnxruntime")
    torch_member = sf.quantize(digits_mlp, "int8-static", calib=digits, backend="torch")
    ens = sf.ensemble([onnx_member, torch_member, digits_mlp], "weighted", digits)
    assert validation_of(ens)["reload"] == "bit-exact"
    # the weighted selection may drop members: the mean keeps all three
    for e in (ens, sf.ensemble([onnx_member, torch_member, digits_mlp], "mean", digits)):
        sf.save(e, tmp_path / "ens")
        again = sf.load(tmp_path / "ens")
        assert torch.equal(sf.predict(e, digits.test), sf.predict(again, digits.test))
    assert [type(m).__name__ for m in again.members] == ["OnnxPredictor", "QuantizedModel", "Sequential"]


@pytest.mark.parametrize("tie", [True, False])
def test_tied_parameters_are_stored_once_and_retied_on_load(tmp_path, tie):
    torch.manual_seed(0)
    model = sf.zoo.user_model("factories:tied_lm", tie=tie)
    if not tie:  # tied after construction: the loader must tie it again
        model.head.weight = model.emb.weight
    sf.save(model, tmp_path / "lm")
    stored = load_file(str(tmp_path / "lm" / "weights.safetensors"))
    assert sorted(stored) == ["emb.weight", "mix.bias", "mix.weight"]
    card = json.loads((tmp_path / "lm" / "card.json").read_text())
    assert card["storage"]["tied"] == {"head.weight": "emb.weight"}
    again = sf.load(tmp_path / "lm", trust_factory=True)
    assert again.head.weight is again.emb.weight
    ids = token_ids(8)
    assert torch.equal(again(ids), model(ids))


def test_soup_and_distill_record_their_validation(digits, digits_mlp):
    student = sf.distill(digits_mlp, sf.zoo.for_task("mlp", digits.task, hidden=[32]), digits, epochs=3,
                         progress=False)
    v = validation_of(student)
    assert v["ran"] and v["reload"] == "bit-exact" and v["samples"] == min(256, len(digits.val))
    soup = sf.soup([digits_mlp, digits_mlp], "uniform", digits)
    assert validation_of(soup)["agreement"] == 1.0


# --------------------------------------------------------------------------- the gate itself


class _Constant(nn.Module):
    """A 'technique result' predicting class 0 for everything."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.bias = nn.Parameter(torch.arange(classes, 0, -1).float())

    def forward(self, x):
        return self.bias.expand(len(x), -1)


def test_one_class_is_a_collapse_only_where_every_input_model_tells_the_samples_apart(digits, digits_mlp):
    sure = sf.zoo.for_task("mlp", digits.task, hidden=[8])  # answers class 0 for everything
    with torch.no_grad():
        sure[-1].weight.zero_()
        sure[-1].bias.zero_()
        sure[-1].bias[0] = 50.0
    ens = sf.ensemble([sure, digits_mlp], "mean")  # no data: checked on a synthetic sample
    v = validation_of(ens)
    assert v["ran"] and v["classes"] == 1 and v["agreement"] == 1.0  # it answers as its first member does
    other = sf.zoo.for_task("mlp", digits.task, hidden=[16])
    with pytest.raises(ValidationError, match="collapsed: it predicts class 0 for all"):
        check(_Constant(), "merge-x", reference=[digits_mlp, other], data=digits)


class _Crashes(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Unflatten(1, (3, 4)))  # the wrong reshape

    def forward(self, x):
        return self.inner(x)


def test_a_broken_technique_result_raises_at_the_gate(digits, digits_mlp):
    real = SCHEMES[("fp16", "torch")]  # stand in a broken implementation behind the real verb
    SCHEMES[("fp16", "torch")] = lambda model, *, arg=None, calib=None: derive(model, _Constant(), "quantize")
    try:
        with pytest.raises(ValidationError, match="collapsed: it predicts class 0 for all"):
            sf.quantize(digits_mlp, "fp16", calib=digits)
        kept = sf.quantize(digits_mlp, "fp16", calib=digits, validate=False)
        assert validation_of(kept)["ran"] is False
    finally:
        SCHEMES[("fp16", "torch")] = real
    with pytest.raises(ValidationError, match=r"step-x: the result crashes on its first call in layer 'inner.2' "
                                              r"\(Unflatten\).*try fix-y"):
        check(_Crashes(), "step-x", reference=digits_mlp, data=digits, fix="fix-y")
    nan = sf.zoo.for_task("mlp", digits.task, hidden=[8])
    with torch.no_grad():
        nan[1].weight[0, 0] = float("nan")
    with pytest.raises(ValidationError, match=r"NaN or infinite values, first in layer 'fc1' \(Linear\)"):
        check(nan, "step-n", data=digits)
    with pytest.raises(ValidationError, match="gives output"):
        check(nn.Flatten(0), "step-s", data=digits)


def test_a_result_that_does_not_reload_bit_exactly_raises(digits, digits_mlp):
    class Drifts(nn.Module):  # state that is not in the state dict: lost on save
        def __init__(self, inner):
            super().__init__()
            self.inner, self.offset = inner, torch.ones(10)

        def forward(self, x):
            return self.inner(x) + self.offset

    broken = derive(digits_mlp, Drifts(digits_mlp), "test")
    with pytest.raises(ValidationError, match="cannot be saved and reloaded"):
        check(broken, "step-r", reference=digits_mlp, data=digits)  # its spec rebuilds a plain MLP
    assert check(broken, "step-r", reference=digits_mlp, data=digits, reload=False) is broken


def test_agreement_floor_and_synthetic_samples(digits, digits_mlp):
    torch.manual_seed(1)
    other = sf.zoo.for_task("mlp", digits.task, hidden=[8])  # untrained: agrees at chance level
    with pytest.raises(ValidationError, match=r"agrees with the input model on only .* \(floor 0.2\)"):
        check(other, "step-a", reference=digits_mlp, data=digits)
    # no data: a synthetic sample of the task's shape; random inputs test crashes and collapse, not agreement
    cand = derive(digits_mlp, other, "test")
    v = validation_of(check(cand, "step-b", reference=digits_mlp, reload=False))
    assert v["synthetic"] and v["samples"] == 64 and v["floor"] is None and "reload" not in v
