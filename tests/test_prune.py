"""slimfuse.prune: exact sparsity, masks that hold, sparse storage, channels that really go."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import slimfuse as sf
from slimfuse.cli import app
from slimfuse.compress import sparse
from slimfuse.measure import macs
from slimfuse.models import folder_bytes


@pytest.fixture(scope="module")
def dense(digits):
    torch.manual_seed(0)
    return sf.fit(sf.zoo.for_task("mlp", digits.task, hidden=[64, 32]), digits, epochs=6, progress=False)


def bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and bits(sa[k]) == bits(sb[k]) for k in sa)


def zeros(model, names=("fc1", "fc2")) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight == 0 for n in names}


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.9])
def test_exact_sparsity_over_layers_in_scope(dense, scope, sparsity):
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    pruned = sf.prune(dense, sparsity=sparsity, scope=scope, schedule="oneshot")
    z = zeros(pruned)
    if scope == "global":
        n = sum(m.numel() for m in z.values())
        assert sum(int(m.sum()) for m in z.values()) == round(sparsity * n)
    else:
        for m in z.values():
            assert int(m.sum()) == round(sparsity * m.numel())
    assert torch.equal(pruned.out.weight, dense.out.weight)  # the output layer is excluded by default ...
    step = sf.lineage_of(pruned)[-1]
    assert step["op"] == "prune" and step["params"]["excluded"] == ["out"]  # ... and the card says so
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())  # input untouched


def test_ties_are_broken_deterministically():
    model = sf.zoo.mlp(10, [10], 3)
    with torch.no_grad():
        model.fc1.weight.fill_(0.5)
    a = sf.prune(model, sparsity=0.45, scope="layer", schedule="oneshot", exclude=[])
    b = sf.prune(model, sparsity=0.45, scope="layer", schedule="oneshot", exclude=[])
    assert int((a.fc1.weight == 0).sum()) == 45
    assert torch.equal(a.fc1.weight, b.fc1.weight)


def test_agp_masks_hold_during_finetuning_and_accuracy_stays(dense, digits):
    base = sf.evaluate(dense, digits.test)["accuracy"]
    seen = []
    pruned = sf.prune(dense, sparsity=0.8, data=digits, epochs=3, steps=4, on_step=seen.append)
    z = zeros(pruned)
    n = sum(m.numel() for m in z.values())
    assert sum(int(m.sum()) for m in z.values()) == round(0.8 * n)
    assert [s["step"] for s in seen] == [1, 2, 3, 4] and seen[-1]["sparsity"] == pytest.approx(0.8)
    assert all(a["sparsity"] < b["sparsity"] for a, b in zip(seen, seen[1:]))  # cubic schedule rises
    assert sf.evaluate(pruned, digits.test)["accuracy"] >= base - 0.03
    # One-shot: the mask chosen before fine-tuning is exactly the zero set after it.
    unfinetuned = sf.prune(dense, sparsity=0.8, schedule="oneshot")
    tuned = sf.prune(dense, sparsity=0.8, schedule="oneshot", data=digits, epochs=2)
    for name, mask in zeros(unfinetuned).items():
        assert torch.equal(zeros(tuned)[name], mask)
    assert not torch.equal(tuned.fc1.weight, unfinetuned.fc1.weight)  # the survivors did train


def test_sparse_artifact_reloads_bit_exactly_and_is_smaller(dense, digits, tmp_path):
    pruned = sf.prune(dense, sparsity=0.9, schedule="oneshot")
    sf.save(pruned, tmp_path / "sparse")
    sf.save(pruned, tmp_path / "dense", codec="dense")
    back = sf.load(tmp_path / "sparse")
    assert same_state(pruned, back)
    assert torch.equal(sf.predict(pruned, digits.test), sf.predict(back, digits.test))
    assert folder_bytes(tmp_path / "sparse") < folder_bytes(tmp_path / "dense") / 3
    storage = sf.read_card(tmp_path / "sparse")["storage"]
    assert storage["codec"] == "sparse-zstd"
    assert storage["meta"]["tensors"]["fc1.weight"]["layout"] == "bitmask+values"
    assert storage["meta"]["tensors"]["fc1.bias"]["layout"] == "dense"  # no zeros: stays dense
    assert sf.measure({"p": back}, digits.test, seconds=0.05).row("p")["bytes"] == folder_bytes(tmp_path / "sparse")
    # A reloaded model keeps its codec, so saving it again stays small.
    sf.save(back, tmp_path / "again")
    assert folder_bytes(tmp_path / "again") == folder_bytes(tmp_path / "sparse")


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8]),
    shape=st.lists(st.integers(0, 17), min_size=0, max_size=3),
    density=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_sparse_codec_roundtrip_is_bit_exact(dtype, shape, density, seed):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g) * 100).to(dtype)
    t[torch.rand(shape, generator=g) > density] = 0
    if dtype.is_floating_point and t.numel():
        t.view(-1)[0] = -0.0  # negative zero and NaN keep their bits
        t.view(-1)[-1] = float("nan")
    state = {"w": t, "b": torch.zeros(3)}
    tensors, meta = sparse.encode(state)
    assert all(v.dtype == torch.uint8 for k, v in tensors.items() if k.startswith(sparse.PREFIX))
    out = sparse.decode(tensors, json.loads(json.dumps(meta)))
    for k in state:
        assert out[k].dtype == state[k].dtype and out[k].shape == state[k].shape
        assert bits(out[k]) == bits(state[k])


def test_damaged_sparse_payload_raises_artifact_error(dense, tmp_path):
    sf.save(sf.prune(dense, sparsity=0.9, schedule="oneshot"), tmp_path / "a")
    card = json.loads((tmp_path / "a" / "card.json").read_text())
    card["storage"]["meta"]["tensors"]["fc1.weight"]["nonzeros"] += 1
    (tmp_path / "a" / "card.json").write_text(json.dumps(card))
    with pytest.raises(sf.ArtifactError, match="fc1.weight"):
        sf.load(tmp_path / "a")


@pytest.fixture(scope="module")
def residual(digits):
    torch.manual_seed(0)
    model = sf.zoo.user_model("prune_models:residual_concat", width=8)
    return sf.fit(model, digits, epochs=1, progress=False)


@pytest.mark.parametrize("importance", ["l1", "taylor"])
def test_structured_residual_concat_model_shrinks_and_runs(residual, digits, importance):
    pruned = sf.prune(residual, channels=0.5, importance=importance, data=digits, epochs=1, steps=2)
    x = digits.test.x[:5]
    assert pruned(x).shape == residual(x).shape
    assert pruned.stem.out_channels == pruned.mix.out_channels == 4  # residual: widths move together
    assert pruned.mix.in_channels == pruned.branch1.out_channels + pruned.branch2.out_channels == 8  # concat
    assert pruned.fc.in_features == pruned.mix.out_channels * 16  # flatten -> linear
    assert pruned.out.out_features == 10  # the output layer keeps its classes
    assert macs(pruned, x) < 0.5 * macs(residual, x)
    assert sum(p.numel() for p in pruned.parameters()) < 0.5 * sum(p.numel() for p in residual.parameters())


def test_structured_user_model_reloads_without_pickle(residual, digits, tmp_path):
    pruned = sf.prune(residual, channels=0.5, data=digits, epochs=1)
    sf.save(pruned, tmp_path / "p")
    card = sf.read_card(tmp_path / "p")
    assert (card["spec"]["arch"] == "pruned"
            and card["spec"]["args"]["base"]["factory"] == "prune_models:residual_concat")
    with pytest.raises(sf.ArtifactError, match="trust_factory"):
        sf.load(tmp_path / "p")  # the base is a user factory: importing it needs trust
    back = sf.load(tmp_path / "p", trust_factory=True)
    assert same_state(pruned, back)
    assert torch.equal(sf.predict(pruned, digits.test), sf.predict(back, digits.test))
    # Pruning again builds on the recorded shapes.
    again = sf.prune(back, channels=0.5, epochs=0, data=digits)
    sf.save(again, tmp_path / "q")
    assert same_state(again, sf.load(tmp_path / "q", trust_factory=True))


def test_structured_zoo_models_get_new_widths_in_their_spec(dense, digits, tmp_path):
    base = sf.evaluate(dense, digits.test)["accuracy"]
    pruned = sf.prune(dense, channels=0.5, data=digits, epochs=2)
    assert sf.spec_of(pruned) == {"arch": "mlp", "args": {**sf.spec_of(dense)["args"], "hidden": [32, 16]}}
    assert sf.evaluate(pruned, digits.test)["accuracy"] >= base - 0.05
    torch.manual_seed(0)
    cnn = sf.zoo.for_task("cnn", digits.task, widths=[16, 32], hidden=24)
    small = sf.prune(cnn, channels=0.6, round_to=4, epochs=0, data=digits)
    args = sf.spec_of(small)["args"]
    new, old = args["widths"] + [args["hidden"]], [16, 32, 24]
    assert all(w % 4 == 0 and 0 < w <= 0.4 * o for w, o in zip(new, old)), new  # rounded to multiples of 4
    sf.save(small, tmp_path / "cnn")
    assert same_state(small, sf.load(tmp_path / "cnn"))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, True, "0.5"])
def test_sparsity_outside_unit_interval_is_a_config_error(dense, bad):
    with pytest.raises(sf.ConfigError, match="field 'sparsity': Input should be"):
        sf.prune(dense, sparsity=bad, schedule="oneshot")


def test_clear_errors(dense):
    with pytest.raises(sf.ConfigError, match="nothing to prune"):
        sf.prune(sf.zoo.mlp(64, [], 10), channels=0.5, epochs=0, data=sf.datasets.load("digits"))
    with pytest.raises(sf.ConfigError, match="needs data"):
        sf.prune(dense, sparsity=0.5, epochs=2)
    with pytest.raises(sf.ConfigError, match="needs data"):
        sf.prune(dense, channels=0.5, epochs=1)
    with pytest.raises(sf.ConfigError, match="agp"):
        sf.prune(dense, sparsity=0.5)  # gradual pruning without data to fine-tune on
    with pytest.raises(sf.ConfigError, match="exactly one"):
        sf.prune(dense, sparsity=0.5, channels=0.5)
    with pytest.raises(sf.ConfigError, match="does not have: nope"):
        sf.prune(dense, sparsity=0.5, schedule="oneshot", exclude=["nope"])
    with pytest.raises(sf.ConfigError, match="already"):
        sf.prune(sf.prune(dense, sparsity=0.5, schedule="oneshot"), sparsity=0.2, schedule="oneshot")


def test_cli_prune(dense, tmp_path):
    sf.save(dense, tmp_path / "teacher")
    runner = CliRunner()
    res = runner.invoke(app, ["prune", str(tmp_path / "teacher"), "--sparsity", "0.8", "--data", "digits",
                              "--epochs", "1", "--steps", "3", "-o", str(tmp_path / "sparse")])
    assert res.exit_code == 0, res.output
    assert "prune step 3/3" in res.output
    pruned = sf.load(tmp_path / "sparse")
    assert int((pruned.fc1.weight == 0).sum() + (pruned.fc2.weight == 0).sum()) == round(0.8 * (64 * 64 + 64 * 32))
    assert sf.read_card(tmp_path / "sparse")["metrics"]["test"]["accuracy"] > 0.5
    res = runner.invoke(app, ["prune", str(tmp_path / "teacher"), "--channels", "0.5", "--data", "digits",
                              "--epochs", "0", "-o", str(tmp_path / "small")])
    assert res.exit_code == 0, res.output
    assert sf.spec_of(sf.load(tmp_path / "small"))["args"]["hidden"] == [32, 16]
    res = runner.invoke(app, ["prune", str(tmp_path / "teacher"), "--sparsity", "1.5", "-o", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "--sparsity" in res.output
    assert not (tmp_path / "bad").exists()
