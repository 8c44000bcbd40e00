"""Recommendation: synthetic data, CSV reader, ranking metrics, table compression, ensembles."""

import math

import numpy as np
import pytest
import torch

import slimfuse as sf
from slimfuse import recsys
from slimfuse.measure import counts
from slimfuse.recsys.compress import _pack, _unpack
from slimfuse.recsys.data import HeldOut
from slimfuse.recsys.ensemble import normalize


@pytest.fixture(scope="module")
def data():
    return recsys.synthetic(400, 300, interactions=20, popularity=0.5, seed=0)


@pytest.fixture(scope="module")
def mf(data):
    torch.manual_seed(0)
    return recsys.fit(recsys.mf(data.n_users, data.n_items, 32), data, epochs=20, batch_size=512)


def _arrays(d):
    return [d.train.x, d.train.y, d.val.x, d.val.y, d.val.seen_items, d.test.y, d.test.seen_ptr]


# ---- data ------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_per_seed(data):
    again = recsys.synthetic(400, 300, interactions=20, popularity=0.5, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(_arrays(data), _arrays(again)))
    other = recsys.synthetic(400, 300, interactions=20, popularity=0.5, seed=1)
    assert not torch.equal(data.train.y, other.train.y[: len(data.train.y)])


def test_synthetic_popularity_is_power_law(data):
    counts = np.sort(np.bincount(data.train.y.numpy(), minlength=data.n_items))[::-1]
    assert counts[:30].sum() > 3 * counts[-30:].sum()  # head items far more popular than the tail


def test_leave_one_out_holds_out_one_item_per_user(data):
    for split in (data.val, data.test):
        assert torch.equal(split.x, torch.arange(data.n_users))
    train_of = [set() for _ in range(data.n_users)]
    for u, i in zip(data.train.x.tolist(), data.train.y.tolist()):
        train_of[u].add(i)
    for u in (0, 7, 399):
        assert set(data.val.seen(u).tolist()) == train_of[u]
        assert set(data.test.seen(u).tolist()) == train_of[u] | {int(data.val.y[u])}
        assert int(data.test.y[u]) not in data.test.seen(u).tolist()
    sub = data.test.subset([5, 2])
    assert torch.equal(sub.seen(0), data.test.seen(5)) and torch.equal(sub.seen(1), data.test.seen(2))


def _csv(tmp_path, text, name="ratings.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_read_interactions_orders_by_time_and_renumbers(tmp_path):
    rows = ["user,item,rating,timestamp"]
    for u in (10, 20):
        for t, item in enumerate((101, 102, 103, 104)):
            rows.append(f"{u},{item + u},{5 - t % 2},{100 - t}")  # timestamps decrease: 104 is the oldest
    rows.append("10,111,1,50")  # rated 1: dropped with min_rating=2
    rows.append("20,121,5,1")  # an older repeat of user 20's latest interaction: the latest one counts
    d = recsys.read_interactions(_csv(tmp_path, "\n".join(rows) + "\n"), min_rating=2)
    assert d.n_users == 2 and list(d.user_ids) == [10, 20]
    assert d.item_ids[int(d.test.y[0])] == 111 and d.item_ids[int(d.val.y[0])] == 112
    assert d.item_ids[int(d.test.y[1])] == 121 and len(d.train) == 4


@pytest.mark.parametrize("text, message", [
    ("", "file is empty"),
    ("user,item\n", "header but no interactions"),
    ("user,product\n1,2\n", "missing column(s) item"),
    ("user,item\n1,2\nx,3\n", "line 3, column 'user': 'x' is not an integer id"),
    ("user,item\n1,2.5\n", "line 2, column 'item': '2.5' is not an integer id"),
    ("user,item,rating\n1,2,nan\n", "line 2, column 'rating': 'nan' is NaN"),
    ("user,item\n1,2\n1,3\n1,4\n2,2\n", "1 user(s) have fewer than 3 interactions (first: 2)"),
    ("user,item\n1,2,3\n", "line 2 has 3 fields, header has 2"),
])
def test_read_interactions_bad_input_is_one_clear_error(tmp_path, text, message):
    with pytest.raises(sf.DataError) as e:
        recsys.read_interactions(_csv(tmp_path, text))
    assert message in str(e.value)


def test_read_interactions_can_drop_short_users(tmp_path):
    d = recsys.read_interactions(_csv(tmp_path, "user,item\n1,2\n1,3\n1,4\n2,2\n"), drop_short_users=True)
    assert d.n_users == 1 and list(d.user_ids) == [1]


# ---- metrics ---------------------------------------------------------------------------------
def test_metrics_match_hand_computed_values():
    # user 0: item 1 seen; held-out 3. Scores 4 > 3 > 2 > 1 > 0 on items 0..4 -> without the seen
    # item 1, ranking is 0, 2, 3, 4: item 3 at rank 2. user 1: nothing seen; held-out 0 ranks first.
    split = HeldOut(torch.tensor([0, 1]), torch.tensor([3, 0]), torch.tensor([0, 1, 1]), torch.tensor([1]))

    class Fixed(torch.nn.Module):
        def forward(self, users):
            return torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0], [5.0, 1.0, 0.0, 2.0, 3.0]])[users]

    m = recsys.evaluate(Fixed(), split, k=2)
    assert m["recall@2"] == pytest.approx(0.5)
    assert m["ndcg@2"] == pytest.approx(0.5)  # user 0 outside the top 2 (0), user 1 first (1)
    m3 = recsys.evaluate(Fixed(), split, k=3)
    assert m3["recall@3"] == 1.0
    assert m3["ndcg@3"] == pytest.approx((1 / math.log2(4) + 1) / 2)

    class Other(torch.nn.Module):  # user 0 top 2: 3, 0 (shares item 0); user 1 top 2: 1, 2 (none)
        def forward(self, users):
            return torch.tensor([[4.0, 9.0, 0.0, 5.0, 1.0], [0.0, 5.0, 4.0, 1.0, 2.0]])[users]

    assert recsys.evaluate(Other(), split, k=2, reference=Fixed())["overlap@2"] == pytest.approx(0.25)


def test_ties_count_half(data):
    tied = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # held-out item 0 tied with two others: expected rank 1
    rank = recsys.metrics.ranks(tied, torch.tensor([0]))
    assert rank.tolist() == [1.0] and recsys.ndcg_at(rank, 2) == pytest.approx(1 / math.log2(3))

    class Constant(torch.nn.Module):
        def forward(self, users):
            return torch.zeros(len(users), data.n_items)

    assert recsys.evaluate(Constant(), data.test)["ndcg@10"] == 0.0


def test_score_plugs_into_measure(data, mf):
    report = sf.measure({"mf": mf}, data.test, score=recsys.score(10), metric="ndcg@10", seconds=0.05)
    row = report.row("mf")
    assert row["ndcg@10"] == pytest.approx(recsys.evaluate(mf, data.test)["ndcg@10"])
    assert "NDCG@10" in report.to_markdown() and report.metric == "ndcg@10"
    with pytest.raises(sf.ConfigError, match="held-out split"):
        recsys.evaluate(mf, data.train)


def test_trained_mf_beats_popularity(data, mf):
    pop = torch.bincount(data.train.y, minlength=data.n_items).float()

    class Popular(torch.nn.Module):
        def forward(self, users):
            return pop.expand(len(users), -1)

    assert recsys.evaluate(mf, data.test)["ndcg@10"] > 1.2 * recsys.evaluate(Popular(), data.test)["ndcg@10"]


# ---- models ----------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [lambda: recsys.mf(50, 20, 8), lambda: recsys.two_tower(50, 20, 8, [8], 4),
                                   lambda: recsys.quantize_tables(recsys.mf(50, 20, 8), 4)])
def test_ids_outside_the_table_are_a_clear_error(build):
    model = build()
    assert model(torch.tensor([0, 49])).shape == (2, 20)
    for ids, message in ((torch.tensor([3, 50]), "user id 50 is outside the table (50 users, ids 0..49)"),
                         (torch.tensor([-1]), "user id -1 is outside"),
                         (torch.tensor([1.0]), "user ids must be integers")):
        with pytest.raises(sf.DataError) as e:
            model(ids)
        assert message in str(e.value)


def test_bpr_training_learns(data):
    torch.manual_seed(0)
    untrained = recsys.mf(data.n_users, data.n_items, 16)
    trained = recsys.fit(untrained, data, loss="bpr", epochs=4, batch_size=1024)
    assert recsys.evaluate(trained, data.val)["ndcg@10"] > 2 * recsys.evaluate(untrained, data.val)["ndcg@10"]


# ---- quantized tables -------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [7, 8])
def test_int4_packing_round_trips(dim):
    codes = torch.randint(0, 16, (5, dim), dtype=torch.uint8)
    packed = _pack(codes, 4)
    assert packed.shape == (5, -(-dim // 2)) and torch.equal(_unpack(packed, 4, dim), codes)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_rows_are_within_half_a_step(bits):
    w = torch.randn(64, 24) * torch.rand(64, 1) * 3
    q = recsys.QEmbedding.from_float(w, bits)
    step = q.scale.float()[:, None]
    # the fitted grid may clip extreme values (int4), but never by more than the chosen range allows
    err = (q.dequantize() - w).abs()
    assert (err.mean(1) <= step[:, 0] / 2).all()
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (64, 24 * bits // 8)


@pytest.mark.parametrize("bits, keep", [(8, 0.98), (4, 0.93)])
def test_quantized_tables_reload_bit_exactly_and_keep_ndcg(tmp_path, data, mf, bits, keep):
    q = recsys.quantize_tables(mf, bits)
    assert isinstance(q.net.users, recsys.QEmbedding) and isinstance(mf.users, torch.nn.Embedding)  # input intact
    sf.save(mf, tmp_path / "fp32")
    sf.save(q, tmp_path / "q")
    back = sf.load(tmp_path / "q")
    users = data.test.x
    assert torch.equal(back(users), q(users))
    step = sf.lineage_of(back)[-1]
    assert {k: step[k] for k in ("op", "params")} == {"op": "quantize_tables", "params": {"bits": bits}}
    assert step["validation"]["reload"] == "bit-exact"  # the card records the validation the step ran
    rows = data.n_users + data.n_items  # packed codes + float16 scale and offset per row, nothing else
    table_bytes = sum(t.numel() * t.element_size() for k, t in q.state_dict().items() if "bias" not in k)
    assert table_bytes == rows * (32 * bits // 8 + 4)
    fp32_bytes, q_bytes = sf.models.folder_bytes(tmp_path / "fp32"), sf.models.folder_bytes(tmp_path / "q")
    assert fp32_bytes - q_bytes >= rows * 32 * 4 - table_bytes - 1024  # the artifact shrinks by the tables' savings
    base, ndcg = recsys.evaluate(mf, data.test)["ndcg@10"], recsys.evaluate(back, data.test)["ndcg@10"]
    assert ndcg >= keep * base
    assert counts(back)["params"] == sum(p.numel() for p in mf.parameters())


# ---- pruning and distillation -----------------------------------------------------------------
def test_mf_dimension_pruning_keeps_the_best_low_rank_scores():
    torch.manual_seed(0)
    m = recsys.mf(40, 30, 8)
    with torch.no_grad():  # factors of rank 3: pruning to 3 dimensions must keep every score
        m.users.weight.copy_(torch.randn(40, 3) @ torch.randn(3, 8))
        m.items.weight.copy_(torch.randn(30, 3) @ torch.randn(3, 8))
    users = torch.arange(40)
    small = recsys.prune_dims(m, 3)
    assert small.users.weight.shape == (40, 3) and small.items.weight.shape == (30, 3)
    assert torch.allclose(small(users), m(users), atol=1e-4)
    assert sf.spec_of(small)["args"]["dim"] == 3
    two = recsys.prune_dims(m, 2)  # below the rank: the best rank-2 approximation of the score matrix
    s = m(users) - m.bias
    u, sv, vt = torch.linalg.svd(s.double())
    best = (u[:, :2] * sv[:2]) @ vt[:2]
    assert torch.allclose((two(users) - two.bias).double(), best, atol=1e-4)


def test_two_tower_dimension_pruning_shrinks_tables(tmp_path, data):
    torch.manual_seed(0)
    tower = recsys.two_tower(data.n_users, data.n_items, 16, [16], 8)
    small = recsys.prune_dims(tower, 0.5)
    assert small.users.weight.shape == (data.n_users, 8) and small.user_tower[0].weight.shape == (16, 8)
    sf.save(small, tmp_path / "s")
    assert torch.equal(sf.load(tmp_path / "s")(data.val.x[:9]), small(data.val.x[:9]))
    with pytest.raises(sf.ConfigError, match="keep must be"):
        recsys.prune_dims(tower, 1.5)


def test_distilled_student_follows_the_teacher_more_than_one_trained_alone(data, mf):
    torch.manual_seed(1)
    student = recsys.mf(data.n_users, data.n_items, 8)
    alone = recsys.fit(student, data, epochs=10, batch_size=1024)
    distilled = recsys.distill(mf, student, data, epochs=10, batch_size=1024)
    overlap = {n: recsys.evaluate(m, data.test, reference=mf)["overlap@10"] for n, m in
               (("alone", alone), ("distilled", distilled))}
    assert overlap["distilled"] > overlap["alone"] + 0.05
    assert sf.lineage_of(distilled)[-1]["op"] == "distill"


# ---- ensembles --------------------------------------------------------------------------------
def test_rank_normalization():
    r = normalize(torch.tensor([[0.3, -1.0, 2.0]]), "rank")
    assert torch.equal(r, torch.tensor([[0.5, 0.0, 1.0]]))


@pytest.mark.parametrize("method", ["score", "rank"])
def test_ensemble_learns_weights_on_validation_and_reloads(tmp_path, data, mf, method):
    torch.manual_seed(2)
    other = recsys.fit(recsys.mf(data.n_users, data.n_items, 16), data, loss="bpr", epochs=3, batch_size=1024)
    ens = recsys.ensemble([mf, other], data, method=method)
    val = {n: recsys.evaluate(m, data.val)["ndcg@10"] for n, m in (("mf", mf), ("other", other), ("ens", ens))}
    assert val["ens"] >= max(val["mf"], val["other"]) - 1e-9  # selection starts from the best member
    assert sf.lineage_of(ens)[0]["params"]["val_ndcg@10"] == pytest.approx(val["ens"], abs=1e-4)
    sf.save(ens, tmp_path / "e")
    back = sf.load(tmp_path / "e")
    assert torch.equal(back(data.test.x), ens(data.test.x)) and torch.equal(back.weights, ens.weights)


def test_optimize_space_candidates_are_transforms(data, mf):
    space = dict(recsys.optimize_space(mf, data, epochs=1))
    assert {"int8", "int4", "dims/2", "distilled mf dim/4"} <= set(space)
    small = space["dims/2+int4"](mf)
    assert small.net.users.dim == 16 and small.net.users.bits == 4
    assert [s["op"] for s in sf.lineage_of(small)][-2:] == ["prune_dims", "quantize_tables"]


def test_recsys_scenario_is_registered():
    from slimfuse.pipeline.scenarios import SCENARIOS

    assert SCENARIOS["recsys"][0] == "slimfuse.recsys.demo:run"


def test_optimize_searches_recommenders_on_ndcg(data, mf):
    result = sf.optimize(mf, data, max_drop=2.0, objective="bytes", budget_s=120, seconds=0.02)
    assert result.metric == "ndcg@10" and not [c.error for c in result.candidates if c.error]
    names = {c.name for c in result.candidates}
    assert {"int8", "int4", "dims/2", "dims/4", "distilled mf dim/4"} <= names
    assert any(" > int" in n for n in names)  # finishing moves applied to structural candidates
    best = result.best
    assert best is not None and best.row["bytes"] < result.baseline.row["bytes"] / 4
    assert best.drop <= 2.0


def test_demo_states_what_it_measures_for_int4_tables():
    """The demo's note reports table bytes and whole-artifact bytes apart, beside the documented target."""
    from slimfuse.measure import Report
    from slimfuse.recsys import table_bytes
    from slimfuse.recsys.demo import int4_note

    mf = recsys.mf(50, 40, 64)
    q4 = recsys.quantize_tables(mf, 4)
    assert table_bytes(mf) == 90 * 64 * 4 and table_bytes(q4) == 90 * (32 + 2 + 2)  # codes + fp16 scale/offset
    report = Report([{"name": "fp32", "ndcg@10": 0.20, "bytes": 30_000},
                     {"name": "int4", "ndcg@10": 0.19, "bytes": 5_000}], metric="ndcg@10")
    note = int4_note(report, mf, q4, ("fp32", "int4"))
    assert "tables 7.11x smaller (23,040 -> 3,240 bytes), whole artifact 6.00x" in note
    assert "at 95.0% of the fp32 NDCG@10" in note and "not met on this small data set" in note
