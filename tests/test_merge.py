"""Weight-space merges (slimfuse.merge): alignment, task vectors, verification, artifacts, CLI."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import slimfuse as sf
from slimfuse.cli import app
from slimfuse.fuse.merge import dare_vector, disjoint_mean, slerp_tensor, ties_vector, trim
from slimfuse.fuse.rebasin import align, permutation_groups, permute_state
from slimfuse.models.calling import forward


def _init(model_fn, seed):
    torch.manual_seed(seed)
    return model_fn()


def _same_function(a, b, x):
    return (sf.predict(a, x) - sf.predict(b, x)).abs().max().item()


# ---- alignment is a permutation ----------------------------------------------------------------

@pytest.mark.parametrize("build, shape", [
    (lambda: sf.zoo.mlp(20, [16, 12], 5), (20,)),
    (lambda: sf.zoo.lenet5(classes=5, image_size=16), (1, 16, 16)),
    (lambda: sf.zoo.cnn(classes=5, image_size=8, widths=[6, 8], hidden=10), (1, 8, 8)),
])
@pytest.mark.parametrize("matching", ["weights", "activations"])
def test_aligned_model_computes_the_same_function(build, shape, matching):
    a, b = _init(build, 0), _init(build, 1)
    if any(isinstance(m, nn.BatchNorm2d) for m in b.modules()):  # non-trivial running statistics
        b.train()
        with torch.no_grad():
            b(torch.randn(64, *shape))
        b.eval()
    x = torch.randn(200, *shape)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    aligned = align(b, a, matching=matching, x=x)
    assert _same_function(aligned, b, x) < 1e-4
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())  # input untouched
    moved = [k for k, v in aligned.state_dict().items() if not torch.equal(v, before[k])]
    assert moved, "alignment of two random inits permuted nothing"
    first = next(k for k in before if k.endswith("weight"))  # hidden units are a reordering of the originals
    assert sorted(aligned.state_dict()[first].flatten().tolist()) == sorted(before[first].flatten().tolist())


class InputAdd(nn.Module):
    """``x + fc1(x)``: the raw input is added to fc1's units, so they cannot move; fc2's can."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.fc2((x + self.fc1(x)).relu()).relu())


@pytest.mark.parametrize("pattern", ["residual", "concat", "depthwise", "layernorm-residual", "attention"])
def test_aligned_graph_model_computes_the_same_function(pattern):
    from peer_models import Concat, Depthwise, LayerNormGELU, hf_bert

    build, x = {
        "residual": (lambda: sf.zoo.resnet(classes=5, widths=[8, 16]), torch.randn(64, 1, 8, 8)),
        "concat": (Concat, torch.randn(64, 1, 8, 8)),
        "depthwise": (Depthwise, torch.randn(64, 1, 8, 8)),
        "layernorm-residual": (LayerNormGELU, torch.randn(64, 1, 8, 8)),
        "attention": (hf_bert, torch.randint(0, 17, (16, 64))),
    }[pattern]
    a, b = _init(build, 0), _init(build, 1)
    if pattern == "residual":  # non-trivial running statistics
        b.train()
        with torch.no_grad():
            b(x)
    b.eval()
    groups, skipped = permutation_groups(b, x)
    aligned = align(b, a.eval(), x=x if pattern != "attention" else None, groups=groups)
    ref = forward(b, x)
    assert (forward(aligned, x) - ref).abs().max().item() < 1e-4 * (1 + ref.abs().max().item())
    moved = [k for k, v in aligned.state_dict().items() if not torch.equal(v, b.state_dict()[k])]
    assert moved, "alignment of two random inits permuted nothing"
    if pattern == "attention":  # query/key/value split into heads: left out, said why; the MLP units move
        assert skipped and all("changes the model's outputs" in s for s in skipped)
        assert any(".intermediate.dense" in g.layer for g in groups)


def test_units_a_permutation_would_change_are_left_out_and_named():
    torch.manual_seed(0)
    model = InputAdd().eval()
    groups, skipped = permutation_groups(model, torch.randn(16, 8))
    assert [g.layer for g in groups] == ["fc2"]
    assert len(skipped) == 1 and skipped[0].startswith("fc1: reordering its units changes the model's outputs")


def test_weight_matching_recovers_a_known_permutation_of_a_residual_network():
    a = _init(lambda: sf.zoo.resnet(classes=5, widths=[8, 16]), 0)
    x = torch.randn(64, 1, 8, 8)
    a.train()
    with torch.no_grad():
        a(x)
    a.eval()
    groups, _ = permutation_groups(a, x)
    assert len(groups) == 4  # two residual streams, two block interiors
    gen = torch.Generator().manual_seed(3)
    b = copy.deepcopy(a)
    b.load_state_dict(permute_state(a.state_dict(), groups, [torch.randperm(g.size, generator=gen) for g in groups]))
    assert not torch.equal(b.state_dict()["conv1.weight"], a.state_dict()["conv1.weight"])
    back = align(b, a, x=x)
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in back.state_dict().items())


def test_weight_matching_recovers_a_known_permutation():
    a = _init(lambda: sf.zoo.mlp(10, [8, 6], 3), 0)
    perm1, perm2 = torch.randperm(8), torch.randperm(6)
    b = sf.zoo.mlp(10, [8, 6], 3)
    s = a.state_dict()
    b.load_state_dict({"fc1.weight": s["fc1.weight"][perm1], "fc1.bias": s["fc1.bias"][perm1],
                       "fc2.weight": s["fc2.weight"][perm2][:, perm1], "fc2.bias": s["fc2.bias"][perm2],
                       "out.weight": s["out.weight"][:, perm2], "out.bias": s["out.bias"]})
    aligned = align(b, a)
    for k, v in aligned.state_dict().items():
        assert torch.allclose(v, s[k]), k


# ---- task vectors by hand ----------------------------------------------------------------------

def test_ties_equals_a_hand_computation():
    t1 = torch.tensor([1.0, -2.0, 3.0, 0.5])
    t2 = torch.tensor([-4.0, 1.0, 2.0, 0.1])
    assert torch.equal(trim(t1, 0.5), torch.tensor([0.0, -2.0, 3.0, 0.0]))
    # trimmed: [0,-2,3,0], [-4,0,2,0]; signs of the sum: [-,-,+,0]; mean of the agreeing entries
    assert torch.equal(ties_vector([t1, t2], 0.5), torch.tensor([-4.0, -2.0, 2.5, 0.0]))
    # untrimmed: sum [-3,-1,5,0.6] -> signs [-,-,+,+]; entry 0 keeps -4, entry 1 keeps -2, entry 3 (0.5+0.1)/2
    assert torch.allclose(disjoint_mean([t1, t2]), torch.tensor([-4.0, -2.0, 2.5, 0.3]))


def _linear(weight, bias):
    m = sf.zoo.mlp(2, [], 2)
    m.load_state_dict({"out.weight": torch.tensor(weight), "out.bias": torch.tensor(bias)})
    return m


def test_ties_and_task_arithmetic_merges_equal_hand_computations():
    base = _linear([[1.0, 1.0], [1.0, 1.0]], [0.0, 0.0])
    m1 = _linear([[2.0, -1.0], [4.0, 1.5]], [1.0, 0.0])  # task vector [[1,-2],[3,0.5]], [1,0]
    m2 = _linear([[-3.0, 2.0], [3.0, 1.1]], [-0.2, 0.5])  # task vector [[-4,1],[2,0.1]], [-0.2,0.5]
    ties = sf.merge([m1, m2], "ties", base=base, scale=1.0, density=0.5)
    assert torch.allclose(ties.state_dict()["out.weight"], torch.tensor([[-3.0, -1.0], [3.5, 1.0]]))
    # bias vectors [1,0], [-0.2,0.5]: density 0.5 keeps one entry each: [1,0], [0,0.5]
    assert torch.allclose(ties.state_dict()["out.bias"], torch.tensor([1.0, 0.5]))
    ta = sf.merge([m1, m2], "task-arithmetic", base=base, scale=0.5)
    assert torch.allclose(ta.state_dict()["out.weight"], torch.tensor([[-0.5, 0.5], [3.5, 1.3]]))
    assert torch.allclose(ta.state_dict()["out.bias"], torch.tensor([0.4, 0.25]))
    step = sf.lineage_of(ties)[-1]
    assert step["op"] == "merge" and step["params"]["method"] == "ties" and step["params"]["density"] == 0.5
    # DARE without dropping is task arithmetic; DARE-TIES without dropping is TIES' untrimmed disjoint mean
    dare0 = sf.merge([m1, m2], "dare", base=base, scale=0.5, drop=0.0)
    assert torch.allclose(dare0.state_dict()["out.weight"], ta.state_dict()["out.weight"])
    dt0 = sf.merge([m1, m2], "dare-ties", base=base, scale=1.0, drop=0.0)
    assert torch.allclose(dt0.state_dict()["out.weight"], torch.tensor([[-3.0, -1.0], [3.5, 1.3]]))


def test_dare_drops_and_rescales():
    tau = torch.linspace(-1, 1, 20000)
    out = dare_vector(tau, 0.7, torch.Generator().manual_seed(0))
    kept = out != 0
    assert torch.allclose(out[kept], tau[kept] / 0.3)
    assert abs((~kept).float().mean().item() - 0.7) < 0.02
    assert abs(out.sum().item() - tau.sum().item()) < 0.02 * tau.abs().sum().item()  # unbiased in expectation


def test_slerp_follows_the_sphere():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp_tensor(a, b, 0.5), torch.tensor([2 ** -0.5, 2 ** -0.5]))
    assert torch.allclose(slerp_tensor(a, b, 0.0), a)
    assert torch.allclose(slerp_tensor(a, 2 * a, 0.5), 1.5 * a)  # parallel: linear


# ---- errors ------------------------------------------------------------------------------------

def test_architecture_mismatch_and_bad_options_are_clear_errors():
    with pytest.raises(sf.ConfigError, match=r"merge: tensor 'fc1.weight' is \(5, 8\)"):
        sf.merge([sf.zoo.mlp(8, [4], 3), sf.zoo.mlp(8, [5], 3)])
    with pytest.raises(sf.ConfigError, match="merge: model 1 has different tensors"):
        sf.merge([sf.zoo.mlp(784, [4], 10), sf.zoo.lenet5()])
    with pytest.raises(sf.ConfigError, match="merge: tensor"):
        sf.merge([sf.zoo.mlp(8, [4], 3)] * 2, "ties", base=sf.zoo.mlp(8, [6], 3))
    with pytest.raises(sf.ConfigError, match="pass base="):
        sf.merge([sf.zoo.mlp(8, [4], 3)] * 2, "ties")
    with pytest.raises(sf.ConfigError, match="exactly two"):
        sf.merge([sf.zoo.mlp(8, [4], 3)] * 3, "slerp")
    with pytest.raises(sf.ConfigError, match="field 'method': unknown value 'average-ish'"):
        sf.merge([sf.zoo.mlp(8, [4], 3)] * 2, "average-ish")
    with pytest.raises(sf.ConfigError, match="density"):
        sf.merge([sf.zoo.mlp(8, [4], 3)] * 2, "ties", base=sf.zoo.mlp(8, [4], 3), density=0)
    with pytest.raises(sf.ConfigError, match="REPAIR measures hidden activations"):
        sf.merge([sf.zoo.mlp(8, [4], 3)] * 2, repair=True)
    from factories import TwoBranch
    with pytest.raises(sf.ConfigError, match="pass data="):  # a user's module: traced on the data
        sf.merge([TwoBranch(), TwoBranch()])
    from peer_models import GRURows
    with pytest.raises(sf.ConfigError, match="rebasin found no hidden units it can permute"):
        sf.merge([GRURows(), GRURows()], data=sf.Splits(*[sf.Split(torch.randn(8, 1, 8, 8), torch.arange(8) % 2)] * 3,
                                                         sf.Task("t", "classification", 10, (1, 8, 8))))


# ---- end to end on digits ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_mlps(digits):
    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        out.append(sf.fit(sf.zoo.for_task("mlp", digits.task, hidden=[64, 64]), digits, epochs=12, seed=seed,
                          batch_size=128, progress=False))
    return out


def test_aligned_repair_beats_naive_averaging_and_is_verified(digits, two_mlps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        naive = sf.merge(two_mlps, "uniform", digits)
        merged = sf.merge(two_mlps, "rebasin", digits)
    naive_acc = sf.evaluate(naive, digits.test)["accuracy"]
    got = sf.evaluate(merged, digits.test)["accuracy"]
    best = max(sf.evaluate(m, digits.test)["accuracy"] for m in two_mlps)
    assert got > naive_acc + 0.02, (got, naive_acc)
    assert got > best - 0.05, (got, best)
    step = sf.lineage_of(merged)[-1]["params"]
    val = step["chosen_by"]["val_accuracy"]  # matching and REPAIR by default as validation accuracy decides
    assert set(val) == {"weights", "weights + REPAIR", "activations", "activations + REPAIR"}
    chosen = step["matching"] + (" + REPAIR" if step["repair"] else "")
    assert val[chosen] == max(val.values()) == pytest.approx(sf.evaluate(merged, digits.val)["accuracy"])
    ver = step["verification"]
    assert ver == merged.verification
    assert ver["merged"]["accuracy"] == pytest.approx(got, abs=1e-6)
    assert ver["verdict"] in ("worse", "tie", "better")
    low, high = ver["vs_best"]["accuracy"]["lo"], ver["vs_best"]["accuracy"]["hi"]
    assert low <= ver["vs_best"]["accuracy"]["diff"] <= high
    lat = ver["latency"]  # one network against two: the merge is the cheaper one to serve
    assert lat["merged_ms"] > 0 and lat["ensemble_ms"] > 0 and lat["hardware"]["cores"] >= 1
    assert ver["ensemble"]["accuracy"] >= best - 0.03
    assert ver["params"]["ensemble"] == 2 * ver["params"]["merged"]


def test_residual_networks_merge_aligned_far_above_the_naive_average(digits):
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(sf.fit(sf.zoo.for_task("resnet", digits.task, widths=[16, 32]), digits, epochs=8, seed=seed,
                              progress=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        naive = sf.merge(members, "uniform", digits)
        merged = sf.merge(members, "rebasin", digits, matching="activations")
    naive_acc, got = (sf.evaluate(m, digits.test)["accuracy"] for m in (naive, merged))
    assert got > naive_acc + 0.2, (got, naive_acc)
    step = sf.lineage_of(merged)[-1]["params"]
    assert step["groups"] == 4 and step["units"] == 16 + 16 + 32 + 32 and step["not_aligned"] == []
    assert merged.verification["params"]["ensemble"] == 2 * merged.verification["params"]["merged"]


def test_a_worse_merge_warns_and_falls_back_to_distillation(digits, two_mlps):
    with pytest.warns(UserWarning, match="beyond noise"):
        naive = sf.merge(two_mlps, "uniform", digits, fallback="distill", distill_epochs=3)
    ver = naive.verification
    assert ver["verdict"] == "worse"
    ops = [s["op"] for s in sf.lineage_of(naive)]
    assert ops[-2:] == ["merge", "distill"]
    assert ver["fallback"]["merged"]["accuracy"] == pytest.approx(sf.evaluate(naive, digits.test)["accuracy"], abs=1e-6)
    assert ver["fallback"]["merged"]["accuracy"] > ver["merged"]["accuracy"] + 0.05
    assert sf.spec_of(naive) == sf.spec_of(two_mlps[0])


@pytest.mark.filterwarnings("ignore:merge \\(rebasin\\)")
def test_merged_model_saves_and_reloads_bit_exactly(tmp_path, digits, two_mlps):
    merged = sf.merge(two_mlps, "rebasin", digits)
    sf.save(merged, tmp_path / "m")
    back = sf.load(tmp_path / "m")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in merged.state_dict().items())
    assert torch.equal(sf.predict(back, digits.test), sf.predict(merged, digits.test))
    card = sf.read_card(tmp_path / "m")
    assert card["lineage"][-1]["params"]["verification"]["verdict"] == merged.verification["verdict"]


@pytest.mark.filterwarnings("ignore:merge \\(rebasin\\)")
def test_cli_merge_writes_a_verified_artifact(tmp_path, two_mlps):
    for i, m in enumerate(two_mlps):
        sf.save(m, tmp_path / f"m{i}")
    runner = CliRunner()
    res = runner.invoke(app, ["merge", str(tmp_path / "m0"), str(tmp_path / "m1"), "--data", "digits",
                              "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "best member" in res.output and "ensemble" in res.output
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert card["metrics"]["merge"]["verdict"] in ("worse", "tie", "better")
    assert card["lineage"][-1]["op"] == "merge"
    res = runner.invoke(app, ["merge", str(tmp_path / "m0"), str(tmp_path / "m1"), "--method", "ties",
                              "-o", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "pass base=" in res.output
    assert not (tmp_path / "bad").exists()
