"""Ensembles, stacking, soups and SWA (slimfuse.fuse), on scikit-learn's digits."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

import slimfuse as sf
from slimfuse.cli import app
from slimfuse.data import Splits
from slimfuse.fuse import caruana, ensemble, refine, soup, swa, train_members
from slimfuse.fuse.combine import Ensemble, LogLinearPool
from slimfuse.fuse.select import nll
from slimfuse.fuse.stacking import OutOfFold, fit_meta


@pytest.fixture(scope="module")
def data(digits):
    return digits


def small_mlp(hidden=24, classes=10):
    return lambda: sf.zoo.mlp(64, [hidden], classes)


@pytest.fixture(scope="module")
def members(data):
    """Four MLPs trained from different seeds, deliberately short so they disagree."""
    return train_members(small_mlp(), data, 4, "seed", epochs=4, lr=3e-3)


def probas(model, split):
    return sf.predict(model, split, output="proba").double().numpy()


# ---- weighted (Caruana) ---------------------------------------------------------------------------

def test_weighted_is_never_worse_than_the_best_member_on_its_validation_data(data, members):
    best = min(sf.evaluate(m, data.val)["nll"] for m in members)
    for refined in (False, True):
        ens = ensemble(members, "weighted", data, refine=refined)
        got = nll(probas(ens, data.val), data.val.y.numpy())
        assert got <= best + 1e-6
        w = ens.selection.weights
        assert w.shape == (4,) and abs(w.sum() - 1) < 1e-9 and (w >= 0).all()
        # the weights are reported in the lineage, and the module holds exactly the non-zero ones
        step = sf.lineage_of(ens)[-1]["params"]
        assert step["method"] == "weighted" and np.allclose(step["weights"], w, atol=1e-6)
        assert torch.allclose(ens.weights.double(), torch.from_numpy(w[w > 0] / w[w > 0].sum()), atol=1e-6)
        assert len(ens.members) == int((w > 0).sum())


def test_weighted_falls_back_to_a_clearly_best_member_with_a_warning(data, members):
    """Members that are noise next to a trained one: no combination beats it, so the ensemble says
    so and returns it alone (one-hot weights), recorded in the lineage."""
    torch.manual_seed(0)
    good = sf.fit(sf.zoo.mlp(64, [64], 10), data, epochs=30, lr=3e-3)  # trained long: well calibrated
    noisy = []
    for i in range(3):
        torch.manual_seed(100 + i)
        net = sf.zoo.mlp(64, [24], 10)  # untrained and confidently wrong
        with torch.no_grad():
            net.out.weight.mul_(20)
        noisy.append(net)
    with pytest.warns(UserWarning, match="no combination beats the best member"):
        ens = ensemble([noisy[0], good, noisy[1], noisy[2]], "weighted", data)
    assert ens.selection.weights.tolist() == [0.0, 1.0, 0.0, 0.0] and len(ens.members) == 1
    step = sf.lineage_of(ens)[-1]["params"]
    assert step["fallback"] is True and step["check"]["best_member"] == 1
    assert ens.temperature == 1.0 and torch.allclose(sf.predict(ens, data.test, output="proba"),
                                                     sf.predict(good, data.test, output="proba"), atol=1e-6)


def test_weighted_keeps_a_combination_that_beats_its_best_member_out_of_sample(data, members):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the combination pays here
        ens = ensemble(members, "weighted", data)
    step = sf.lineage_of(ens)[-1]["params"]
    assert step["fallback"] is False and step["check"]["nll_diff"]["hi"] < 0
    best = min(sf.evaluate(m, data.test)["nll"] for m in members)
    assert sf.evaluate(ens, data.test)["nll"] < best


def test_weighted_selects_and_checks_on_out_of_fold_rows_when_members_have_them(data):
    """k-fold members carry predictions of their fold models on every training row; weighted selection
    and its fallback check use those rows with the validation rows (180 validation rows alone on digits
    cannot show a gain of the size ensembles give), and the lineage says so. A plain list has none."""
    mem = train_members(small_mlp(), data, 4, "seed", epochs=4, lr=3e-3, folds=3)
    n_train, n_val = len(data.train), len(data.val)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # whether it falls back is not the point here
        ens = ensemble(mem, "weighted", data)
        plain = ensemble(list(mem), "weighted", data)
    step = sf.lineage_of(ens)[-1]["params"]
    assert step["selected_on"] == {"out_of_fold_rows": n_train, "validation_rows": n_val}
    assert step["check"]["nll_diff"]["n"] == n_train + n_val
    assert "selected_on" not in sf.lineage_of(plain)[-1]["params"]
    assert sf.lineage_of(plain)[-1]["params"]["check"]["nll_diff"]["n"] == n_val


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.integers(5, 40), st.integers(2, 5), st.integers(0, 10_000))
def test_caruana_on_cached_arrays_keeps_the_best_point_of_its_trajectory(k, n, c, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(k, n, c)) * rng.uniform(0.1, 4, size=(k, 1, 1))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    y = rng.integers(0, c, size=n)
    sel = caruana(p, y, rounds=15)
    assert sel.loss <= min(nll(p[j], y) for j in range(k)) + 1e-12
    assert sel.loss == pytest.approx(min(sel.trajectory))
    assert nll((sel.weights[:, None, None] * p).sum(0), y) == pytest.approx(sel.loss)
    assert refine(p, y, sel).loss <= sel.loss + 1e-12


# ---- stacking -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_stacking_meta_features_are_out_of_fold(data):
    mem = train_members(small_mlp(16), data, 2, "bagging", epochs=3, lr=3e-3, folds=3)
    oof, n = mem.oof, len(data.train)
    assert oof.scheme == "k-fold" and sorted(oof.sample_ids.tolist()) == list(range(n))  # every row once
    for row, (sid, f) in enumerate(zip(oof.sample_ids, oof.fold)):
        for k in range(2):
            assert sid not in set(oof.trained_on[k][f].tolist()), (row, k)
    # the fold models really trained on the other folds (bootstrap samples of them, for bagging)
    for k in range(2):
        for f in range(3):
            others = set(oof.sample_ids[oof.fold != f].tolist())
            assert set(oof.trained_on[k][f].tolist()) <= others
            assert len(oof.trained_on[k][f]) > 0.5 * len(others)
    assert oof.leaks() == []
    ens = ensemble(mem, "stacking", data, bag=True)
    assert ens.oof is oof and sf.lineage_of(ens)[-1]["params"]["scheme"] == "k-fold"
    best = max(sf.evaluate(m, data.test)["accuracy"] for m in mem)
    assert sf.evaluate(ens, data.test)["accuracy"] >= best - 0.05
    # bag=True: the meta-learner runs on the fold models that made its training features
    assert ens.bag == 3 and len(ens.members) == 3 * 2 and sf.lineage_of(ens)[-1]["params"]["bag"] == 3
    assert sf.lineage_of(ens)[-1]["validation"]["reload"] == "bit-exact"  # the spec records the bag
    x = data.test.x[:20]
    with torch.no_grad():
        p = torch.stack([torch.stack([torch.softmax(m(x), -1) for m in fold]) for fold in mem.fold_models]).mean(0)
        expected = torch.log_softmax(ens.meta(p.permute(1, 0, 2).reshape(20, -1)), -1)
    assert torch.allclose(ens(x), expected, atol=1e-5)
    refit = ensemble(mem, "stacking", data)  # by default on the members refitted on all rows
    assert refit.bag == 1 and len(refit.members) == 2 and "bag" not in sf.lineage_of(refit)[-1]["params"]
    # ... trained on the out-of-fold rows plus the refitted members' own validation rows, leak-free
    rows = refit.oof
    assert len(rows.y) == n + len(data.val) and rows.leaks() == [] and np.array_equal(rows.features[:n], oof.features)
    assert sorted(rows.sample_ids[n:].tolist()) == list(range(n, n + len(data.val)))
    assert sf.lineage_of(refit)[-1]["params"]["meta_rows"] == {"out_of_fold_rows": n, "validation_rows": len(data.val)}
    assert not torch.equal(refit.meta.weight, ens.meta.weight)


def test_stacking_on_pretrained_members_uses_the_held_out_validation_split(data, members):
    ens = ensemble(members, "stacking", data)
    oof = ens.oof
    assert oof.scheme == "blend" and oof.leaks() == []
    assert (oof.sample_ids >= len(data.train)).all()  # validation rows only: the members never saw them
    assert np.array_equal(oof.y, data.val.y.numpy())
    best = max(sf.evaluate(m, data.test)["accuracy"] for m in members)
    assert sf.evaluate(ens, data.test)["accuracy"] >= best - 0.05
    assert isinstance(ens.meta, LogLinearPool)  # the default meta-learner lives in tensors, not a pickle
    assert ens.meta.weight.shape == (len(members),) and ens.meta.bias.shape == (10,)
    assert isinstance(ensemble(members, "stacking", data, meta="linear").meta, torch.nn.Linear)


def test_the_loglinear_pool_trusts_the_informative_member_and_beats_it_out_of_sample():
    rng = np.random.default_rng(0)
    n, c = 1200, 5
    y = rng.integers(0, c, n)
    good = np.full((n, c), 0.3 / (c - 1))
    good[np.arange(n), y] = 0.7
    good = np.where(rng.random((n, 1)) < 0.2, rng.dirichlet(np.ones(c), n), good)  # wrong now and then
    sharp = good ** 2 / (good ** 2).sum(1, keepdims=True)  # the same member, over-confident
    noise = rng.dirichlet(np.ones(c), n)
    features = np.stack([sharp, noise, noise[::-1]], axis=1).astype(np.float32)  # (N, K, C)
    half = n // 2
    oof = OutOfFold(features[:half], y[:half], np.arange(half), np.zeros(half, dtype=np.int64),
                    [[np.array([], dtype=np.int64)]] * 3, "blend")
    net, spec = fit_meta(oof, c)
    assert spec["kind"] == "loglinear" and spec["l2"] in (1e-3, 1e-2, 1e-1)
    w = net.weight.detach().numpy()
    assert w[0] > 2 * np.abs(w[1:]).max()  # the informative member dominates
    with torch.no_grad():
        logp = torch.log_softmax(net(torch.from_numpy(features[half:].reshape(n - half, -1))), -1).numpy()
    pooled = -logp[np.arange(n - half), y[half:]].mean()
    alone = -np.log(sharp[half:][np.arange(n - half), y[half:]]).mean()
    assert pooled < alone - 0.01  # it also tempers the over-confident member
    assert 0.3 < w[0] < 0.8  # by about the square root it was sharpened with


def test_stacking_refuses_meta_features_from_a_member_that_saw_the_label(members, data):
    oof = ensemble(members, "stacking", data).oof
    seen = [[np.concatenate([t[0], oof.sample_ids[:1]])] for t in oof.trained_on]  # member saw sample 0
    leaky = OutOfFold(oof.features, oof.y, oof.sample_ids, oof.fold, seen, "blend")
    assert len(leaky.leaks()) == len(members)
    with pytest.raises(sf.ConfigError, match="leak"):
        fit_meta(leaky, 10)


# ---- vectorized inference -----------------------------------------------------------------------

def test_vmap_equals_the_member_loop(data, members):
    for group, auto in ((members, "fused"), ([sf.zoo.cnn(10, 1, 8, [4], 8) for _ in range(3)], "loop")):
        # untrained CNNs: their mean predicts one class, which the validation gate calls a collapse
        ens = ensemble(group, "mean", data, validate=False)
        with torch.inference_mode():
            ens(data.test.x[:4])
            assert ens.last_path == auto  # auto on CPU: MLPs fused into one network, other members the loop
            ens.vectorize = True
            batched = ens(data.test.x)
            assert ens.last_path == "vmap"
            ens.vectorize = False
            loop = ens(data.test.x)
            assert ens.last_path == "loop"
        # float32 batched matmuls may round differently from one matmul per member
        assert torch.allclose(batched, loop, rtol=1e-5, atol=1e-6)
    mixed = ensemble([members[0], sf.zoo.mlp(64, [8, 8], 10)], "mean", data)
    mixed.vectorize = True
    with torch.inference_mode():
        mixed(data.test.x[:4])
    assert mixed.last_path == "loop"  # heterogeneous members fall back to the loop


def test_vmap_follows_weight_updates(data, members):
    ens = ensemble(members, "mean", data)
    ens.vectorize = True
    with torch.inference_mode():
        before = ens(data.test.x[:8])
    with torch.no_grad():
        ens.members[1].out.bias[0] += 5.0  # class 0 becomes far more likely
        after = ens(data.test.x[:8])
    assert ens.last_path == "vmap" and not torch.allclose(before, after)
    ens.vectorize = False
    with torch.no_grad():
        assert torch.allclose(after, ens(data.test.x[:8]), rtol=1e-5, atol=1e-6)


def test_fused_mlp_members_equal_the_loop_and_export_as_one_wide_graph(tmp_path, data):
    group = [sf.zoo.mlp(64, [24, 12], 10, dropout=0.1) for _ in range(5)]
    ens = ensemble(group, "weighted", weights=[0.1, 0.3, 0.2, 0.25, 0.15])
    with torch.no_grad():
        fused = ens.member_logits(data.test.x)
        assert ens.last_path == "fused"
        loop = ens._loop(data.test.x)
    assert torch.allclose(fused, loop, rtol=1e-5, atol=1e-6)  # float rounding only
    with torch.no_grad():
        ens.members[2].out.bias[3] += 4.0  # an in-place update rebuilds the fused weights
        assert torch.allclose(ens.member_logits(data.test.x), ens._loop(data.test.x), rtol=1e-5, atol=1e-6)
    ens.train()
    assert ens(data.test.x[:2]) is not None and ens.last_path == "loop"  # training never sees the fused copy
    ens.eval()
    import onnx

    result = sf.export(ens, "onnx", tmp_path / "fused.onnx", sample=data.val)
    assert result.parity["max_abs_diff"] < 1e-4
    ops = [n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node]
    assert sum(op in ("MatMul", "Gemm") for op in ops) == 3  # one matmul per layer, not one per member
    session = ort.InferenceSession(str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: data.test.x.numpy()})[0]
    ens.fuse = False
    np.testing.assert_allclose(got, sf.predict(ens, data.test).numpy(), rtol=1e-4, atol=1e-5)


def test_onnx_runtime_members_run_in_turn_without_spinning_threads(data, members):
    from slimfuse.export import to_onnx

    onnx_members = [to_onnx(m, sample=data.val) for m in members[:3]]
    for m in onnx_members:  # as an imported ONNX file arrives: no task on it
        m.slimfuse["task"] = None
    assert ensemble(onnx_members, "mean").classes == 10  # read from the graphs' output shape, no data needed
    ens = Ensemble(onnx_members, "mean", classes=10)
    ens.fuse = False  # the members one by one, as vote, stacking and member_logits run them
    alone = onnx_members[0](data.test.x)  # called by itself: ONNX Runtime's default, threads spin
    got = ens(data.test.x)
    assert ens.last_path == "loop"
    for m in onnx_members:  # in the ensemble: each member's session was made without spinning
        quiet = [s for (_, spinning), s in m._sessions.items() if not spinning]
        assert len(quiet) == 1
        assert quiet[0].get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert [spinning for _, spinning in onnx_members[0]._sessions] == [True, False]
    torch.testing.assert_close(onnx_members[0](data.test.x), alone)  # and alone again with the default
    with sf.runtime.spinning(True):  # the caller's choice stands: the default sessions, spinning
        torch.testing.assert_close(ens(data.test.x), got)
    assert all(len(m._sessions) == 2 for m in onnx_members)
    want = torch.logsumexp(torch.stack([torch.log_softmax(m(data.test.x), -1) for m in members[:3]]), 0) - np.log(3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["mean", "weighted", "mean-logits"])
def test_onnx_runtime_members_run_as_one_graph_and_export_as_one_file(tmp_path, data, members, method):
    from slimfuse.export import to_onnx, torch_to_proto
    from slimfuse.runtime import OnnxPredictor

    x = data.test.x
    probas = nn.Sequential(members[2], nn.Softmax(-1)).eval()  # a file whose output is probabilities
    onnx_members = [to_onnx(members[0], sample=data.val), to_onnx(members[1], sample=data.val),
                    OnnxPredictor.from_bytes(torch_to_proto(probas, x[:2]).SerializeToString())]
    assert onnx_members[2]._io["proba"]
    options = {"weights": [0.6, 0.0, 0.4], "temperature": 0.8} if method == "weighted" else {}
    ens = Ensemble(onnx_members, method, classes=10, **options)  # training mode, gradients on: no matter
    ens.fuse = False
    loop = ens(x)
    assert ens.last_path == "loop"
    ens.fuse = True
    got = ens(x)
    assert ens.last_path == "fused" and isinstance(ens._fused[1], OnnxPredictor)  # one session
    assert ens.member_logits(x).shape == (3, len(x), 10)  # members one by one, as asked
    torch.testing.assert_close(got, loop, rtol=1e-5, atol=1e-5)
    if method == "weighted":  # the graph has the combiner built in: a new temperature rebuilds it
        ens.temperature = 1.3
        with torch.inference_mode():
            hotter = ens(x)
        ens.temperature = 0.8
        torch.testing.assert_close(hotter, torch.log_softmax(torch.log_softmax(loop, -1) * 0.8 / 1.3, -1),
                                   rtol=1e-4, atol=1e-5)
    want = torch.stack([m(x) for m in onnx_members])
    torch.testing.assert_close(want, ens._loop(x))

    result = sf.export(ens, "onnx", tmp_path / "ens.onnx", sample=data.val)  # one file, parity checked
    assert result.parity["max_abs_diff"] < 1e-4
    session = ort.InferenceSession(str(tmp_path / "ens.onnx"), providers=["CPUExecutionProvider"])
    assert len(session.get_inputs()) == 1
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, loop.numpy(), rtol=1e-5, atol=1e-5)

    mixed = Ensemble([onnx_members[0], members[1]], method, classes=10).eval()
    with pytest.raises(sf.ConfigError, match="ONNX Runtime sessions inside"):
        sf.export(mixed, "onnx", tmp_path / "mixed.onnx", sample=data.val)
    assert not (tmp_path / "mixed.onnx").exists()

    ens.members[0] = to_onnx(members[3], sample=data.val)  # replaced: the graph is rebuilt from the members
    with torch.inference_mode():
        again = ens(x)
        assert ens.last_path == "fused"
        ens.fuse = False
        torch.testing.assert_close(again, ens(x), rtol=1e-5, atol=1e-5)
        ens.fuse = True
    assert not torch.allclose(again, got)
    with torch.inference_mode():  # a member made under inference_mode: tensors without a version counter,
        ens.members[0] = to_onnx(members[0], sample=data.val)  # whose in-place changes no check could see
        torch.testing.assert_close(ens(x), got, rtol=1e-5, atol=1e-5)
        assert ens.last_path == "loop"


def _fresh(ens, x):
    """The fused output and the loop's, on the members as they are now."""
    with torch.no_grad():
        fused = ens(x)
        path = ens.last_path
        ens.fuse = False
        loop = ens(x)
        ens.fuse = True
    return fused, path, loop


@pytest.mark.parametrize("change", ["in-place", "new parameter", ".data", "new layer", "new member", "load_state_dict",
                                    "hook", "ensemble weights"])
def test_the_fused_copy_follows_every_change_to_the_members(data, change):
    torch.manual_seed(0)
    group = [sf.zoo.mlp(64, [16], 10) for _ in range(3)]
    ens = ensemble(group, "mean")
    x = data.test.x[:16]
    before, path, _ = _fresh(ens, x)
    assert path == "fused"
    m = ens.members[1]
    with torch.no_grad():
        if change == "in-place":
            m.out.weight.mul_(3.0)
        elif change == "new parameter":
            m.out.weight = torch.nn.Parameter(m.out.weight * 3.0)
        elif change == ".data":
            m.out.weight.data = m.out.weight.data * 3.0
        elif change == "new layer":
            m.out = torch.nn.Linear(m.out.in_features, 10)
        elif change == "new member":
            ens.members[1] = sf.zoo.mlp(64, [16], 10)
        elif change == "load_state_dict":
            m.load_state_dict(sf.zoo.mlp(64, [16], 10).state_dict())
        elif change == "ensemble weights":  # the log weights cached beside the fused copy follow
            ens.weights.copy_(torch.tensor([0.7, 0.2, 0.1]))
        else:
            m.out.register_forward_hook(lambda mod, inp, out: out * 3.0)
    after, path, loop = _fresh(ens, x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, loop, rtol=1e-5, atol=1e-6)
    assert path == ("loop" if change == "hook" else "fused")  # a member with hooks runs as itself


@pytest.mark.parametrize("where", ["member forward hook", "member pre-hook", "global forward hook"])
def test_hooks_set_before_the_first_call_fire_on_every_call(data, where):
    torch.manual_seed(0)
    group = [sf.zoo.mlp(64, [16], 10).eval() for _ in range(3)]
    seen = []
    if where == "member forward hook":  # on a member other than the first, which the fusing test reads
        handle = group[2].fc1.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    elif where == "member pre-hook":
        handle = group[1].register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].shape))
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda mod, inp, out: seen.append(out.shape) if isinstance(mod, torch.nn.Linear) else None)
    ens = Ensemble(group, "mean", classes=10).eval()  # the members themselves, not copies
    x = data.test.x[:4]
    try:
        with torch.no_grad():
            want = ens._loop(x)
            for _ in range(3):
                seen.clear()
                got = ens(x)
                assert ens.last_path == "loop" and seen, where  # the hooks saw this call
                torch.testing.assert_close(torch.stack([ens.members[i](x) for i in range(3)]), want)
    finally:
        handle.remove()
    with torch.no_grad():
        seen.clear()
        again = ens(x)
    assert ens.last_path == "fused" and not seen  # hooks gone: fused again, the same outputs
    torch.testing.assert_close(again, got, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("b", [7, 33])  # fewer than 16 rows: classes last; more: class-major
@pytest.mark.parametrize("method", ["mean", "weighted", "mean-logits"])
def test_combining_equals_the_float64_formula_with_and_without_gradients(method, b):
    torch.manual_seed(0)
    k, c = 4, 10
    logits = torch.randn(k, b, c) * 40  # log-probabilities down to about -300: nothing may underflow to -inf
    weights = torch.tensor([0.5, 0.0, 0.3, 0.2])
    ens = Ensemble([torch.nn.Identity()] * k, method, classes=c, weights=weights, temperature=0.7)
    z = logits.double()
    if method == "mean-logits":
        want = torch.log_softmax(z.mean(0), -1)
    else:
        lse = torch.logsumexp(torch.log_softmax(z, -1) + weights.double().log()[:, None, None], 0)
        want = torch.log_softmax(lse / 0.7, -1)
    with torch.no_grad():
        got = ens.combine(logits)
    assert got.shape == (b, c) and got.is_contiguous() and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    leaf = logits.clone().requires_grad_()
    with_grad = ens.combine(leaf)
    torch.testing.assert_close(with_grad.detach(), got)  # the in-place (no-gradient) form computes the same
    with_grad[:, 0].sum().backward()
    z64 = z.clone().requires_grad_()
    ref = (torch.log_softmax(z64.mean(0), -1) if method == "mean-logits" else torch.log_softmax(
        torch.logsumexp(torch.log_softmax(z64, -1) + weights.double().log()[:, None, None], 0) / 0.7, -1))
    ref[:, 0].sum().backward()
    torch.testing.assert_close(leaf.grad.double(), z64.grad, rtol=1e-4, atol=1e-5)


# ---- artifacts and export -----------------------------------------------------------------------

def test_ensemble_save_load_is_bit_exact(tmp_path, data, members):
    hetero = [members[0], sf.zoo.cnn(10, 1, 8, [4], 8)]
    cases = {
        "weighted": ensemble(members, "weighted", data),
        "stacking-mlp": ensemble(members, "stacking", data, meta="mlp", meta_hidden=[16]),
        "stacking-loglinear": ensemble(members, "stacking", data),
        "stacking-linear": ensemble(members, "stacking", data, meta="linear"),
        "vote": ensemble(members, "vote", data),
        "mean-logits-hetero": ensemble(hetero, "mean-logits", data),
    }
    for name, ens in cases.items():
        sf.save(ens, tmp_path / name)
        again = sf.load(tmp_path / name)
        assert torch.equal(sf.predict(ens, data.test), sf.predict(again, data.test)), name
        card = json.loads((tmp_path / name / "card.json").read_text())
        assert card["spec"]["arch"] == "ensemble" and card["lineage"][-1]["op"] == "ensemble"
        keys = load_file(str(tmp_path / name / "weights.safetensors")).keys()
        assert any(k.startswith("members.0.") for k in keys)
    assert sorted(p.name for p in (tmp_path / "vote").iterdir()) == ["card.json", "weights.safetensors"]


@pytest.mark.parametrize("method", ["weighted", "stacking", "vote"])
def test_onnx_export_of_the_whole_ensemble_matches_torch(tmp_path, data, members, method):
    ens = ensemble(members, method, data)
    path = tmp_path / "ens.onnx"
    result = sf.export(ens, "onnx", path, sample=data.val)  # one graph; slimfuse checks parity itself
    assert result.parity["argmax_agreement"] == 1.0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: data.test.x.numpy()})[0]
    want = sf.predict(ens, data.test).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ---- errors -------------------------------------------------------------------------------------

def test_members_with_different_class_counts_get_a_clear_error(data):
    a, b = sf.zoo.mlp(64, [8], 10), sf.zoo.mlp(64, [8], 5)
    with pytest.raises(sf.ConfigError, match=r"different numbers of classes \(member 0: 10, member 1: 5\)"):
        ensemble([a, b], "mean")
    with pytest.raises(sf.ConfigError, match="different numbers of classes"):
        ensemble([a, b], "weighted", data)
    with pytest.raises(sf.ConfigError, match="field 'method': unknown value 'median'"):
        ensemble([a], "median", data)
    with pytest.raises(sf.ConfigError, match="pass data="):
        ensemble([a, a], "stacking")


# ---- soups and SWA ------------------------------------------------------------------------------

def test_soups_refuse_mismatched_shapes():
    with pytest.raises(sf.ConfigError, match=r"tensor 'fc1.weight' is \(16, 64\) in model 1 but \(8, 64\)"):
        soup([sf.zoo.mlp(64, [8], 10), sf.zoo.mlp(64, [16], 10)], "uniform")
    with pytest.raises(sf.ConfigError, match="different tensors"):
        soup([sf.zoo.mlp(64, [8], 10), sf.zoo.mlp(64, [8, 8], 10)], "uniform")


def test_greedy_soup_of_fine_tuned_models_is_no_worse_than_its_best_ingredient(data):
    base = sf.fit(sf.zoo.mlp(64, [32], 10), data, epochs=4, lr=3e-3, progress=False)
    tuned = [sf.fit(base, data, epochs=2, lr=1e-3, seed=s, progress=False) for s in range(3)]
    best = max(sf.evaluate(m, data.val)["accuracy"] for m in tuned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one shared basin: no warning
        greedy = soup(tuned, "greedy", data)
        uniform = soup(tuned, "uniform", data)
    assert sf.evaluate(greedy, data.val)["accuracy"] >= best
    assert sf.evaluate(uniform, data.val)["accuracy"] >= best - 0.05
    assert sf.lineage_of(greedy)[-1]["op"] == "soup"


def test_soup_without_a_shared_basin_warns(data, members):
    # the same function with its hidden units permuted: equally accurate, but a different basin
    a = members[0]
    b = sf.zoo.mlp(64, [24], 10)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    state = a.state_dict()
    b.load_state_dict({"fc1.weight": state["fc1.weight"][perm], "fc1.bias": state["fc1.bias"][perm],
                       "out.weight": state["out.weight"][:, perm], "out.bias": state["out.bias"]})
    assert torch.allclose(sf.predict(a, data.val), sf.predict(b, data.val), atol=1e-5)
    with pytest.warns(UserWarning, match="do not share a loss basin"):
        soup([a, b], "uniform", data)


@pytest.mark.slow
def test_swa_refreshes_batchnorm_and_matches_plain_training(data):
    net = sf.zoo.cnn(10, 1, 8, [8], 16)
    plain = sf.fit(net, data, epochs=8, lr=3e-3, progress=False)
    averaged = swa(net, data, epochs=8, lr=3e-3)
    assert sf.evaluate(averaged, data.test)["accuracy"] >= sf.evaluate(plain, data.test)["accuracy"] - 0.03
    again = sf.fuse.refresh_bn(sf.fuse.soup([averaged], "uniform"), data.train)
    assert torch.allclose(averaged.bn1.running_mean, again.bn1.running_mean, atol=1e-5)
    assert sf.lineage_of(averaged)[-1]["op"] == "swa"


class _Pixels(Dataset):
    """Dict samples, as a Hugging Face pipeline yields them: {"pixels": image, "labels": class}."""

    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return {"pixels": self.split.x[i], "labels": self.split.y[i]}


class _NamedInput(nn.Module):
    """A BatchNorm CNN whose forward takes its input by name, as dict batches call it."""

    def __init__(self):
        super().__init__()
        self.net = sf.zoo.cnn(10, 1, 8, [8], 16)

    def forward(self, pixels):
        return self.net(pixels)


def test_soup_and_swa_take_the_users_dataloaders(data):
    torch.manual_seed(0)
    val = DataLoader(_Pixels(data.val), batch_size=256)  # one batch, as the in-memory pass reads it
    base = sf.fit(_NamedInput(), data, epochs=3, lr=3e-3, progress=False)
    tuned = [sf.fit(base, data, epochs=1, lr=1e-3, seed=s, progress=False) for s in range(3)]
    from_loader = soup(tuned, "greedy", val)  # ranked on the loader; BatchNorm refreshed on its inputs
    in_memory = soup(tuned, "greedy", Splits(train=data.val, val=data.val, test=data.test, task=data.task))
    assert sf.lineage_of(from_loader)[-1]["params"]["kept"] == sf.lineage_of(in_memory)[-1]["params"]["kept"]
    for (name, a), b in zip(from_loader.state_dict().items(), in_memory.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert sf.evaluate(from_loader, val)["accuracy"] >= max(sf.evaluate(m, val)["accuracy"] for m in tuned)

    train = DataLoader(_Pixels(data.train), batch_size=64, shuffle=True)
    averaged = swa(base, train, epochs=2, lr=1e-3)
    with torch.no_grad():  # BatchNorm holds the statistics of the training inputs
        features = averaged.net.conv1(data.train.x)
    torch.testing.assert_close(averaged.net.bn1.running_mean, features.mean((0, 2, 3)), rtol=0, atol=0.02)
    torch.testing.assert_close(averaged.net.bn1.running_var, features.var((0, 2, 3)), rtol=0.1, atol=0.02)
    assert sf.evaluate(averaged, val)["accuracy"] >= sf.evaluate(base, val)["accuracy"] - 0.05
    assert sf.lineage_of(averaged)[-1]["op"] == "swa"
    with pytest.raises(sf.DataError, match="no inputs to recompute BatchNorm"):
        sf.fuse.refresh_bn(copy.deepcopy(averaged), DataLoader(_Pixels(data.val.subset(torch.arange(0))),
                                                              batch_size=8))


# ---- member training ----------------------------------------------------------------------------

def test_train_members_diversity_kinds(data):
    bag = train_members(small_mlp(8), data, 2, "bagging", epochs=1)
    assert all(len(t) < 0.7 * len(data.train) for t in bag.trained_on)  # bootstrap: ~63% unique rows
    snap = train_members(small_mlp(8), data, 3, "snapshot", epochs=3, lr=3e-3)
    assert len(snap) == 3 and [s["op"] for s in sf.lineage_of(snap[2])][-1] == "snapshot"
    assert not torch.equal(snap[0].out.weight, snap[2].out.weight)
    archs = train_members([small_mlp(8), lambda: sf.zoo.cnn(10, 1, 8, [4], 8)], data, diversity="architectures",
                          epochs=1)
    assert [sf.spec_of(m)["arch"] for m in archs] == ["mlp", "cnn"]
    with pytest.raises(sf.ConfigError, match="multiple of k"):
        train_members(small_mlp(8), data, 3, "snapshot", epochs=4)


# ---- CLI ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_trains_members_and_combines_artifacts(tmp_path):
    run = CliRunner().invoke
    for seed in (0, 1):
        r = run(app, ["train", "-d", "digits", "--hidden", "16", "--epochs", "2", "--seed", str(seed),
                      "-o", str(tmp_path / f"m{seed}")])
        assert r.exit_code == 0, r.output
    r = run(app, ["ensemble", str(tmp_path / "m0"), str(tmp_path / "m1"), "--method", "weighted", "-d", "digits",
                  "-o", str(tmp_path / "ens")])
    assert r.exit_code == 0, r.output
    assert "weights: m0=" in r.output and sf.read_card(tmp_path / "ens")["spec"]["arch"] == "ensemble"
    r = run(app, ["train", "-d", "digits", "--hidden", "16", "--epochs", "2", "--members", "3", "--diversity",
                  "bagging", "-o", str(tmp_path / "bag")])
    assert r.exit_code == 0, r.output
    assert len(sf.load(tmp_path / "bag").members) == 3
    r = run(app, ["ensemble", str(tmp_path / "m0"), "-d", "digits", "--method", "median", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--method" in r.output and not (tmp_path / "x").exists()


def test_refresh_bn_restores_each_layers_momentum_and_the_training_mode(data):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8, momentum=0.3), nn.Linear(8, 10)).eval()
    sf.fuse.refresh_bn(net, data.train)
    assert net[2].momentum == 0.3 and not net.training
    features = net[1](data.train.x.flatten(1)).detach()
    assert torch.allclose(net[2].running_mean, features.mean(0), atol=0.05)  # recomputed from the data
