"""Statistics behind every "A vs B" claim: paired intervals, McNemar, Report.compare verdicts."""

import copy
from math import comb

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

import slimfuse as sf
from slimfuse import stats


def test_mcnemar_equals_the_exact_binomial_test():
    a = np.array([1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 1, 1], dtype=bool)
    b = np.array([0, 0, 0, 0, 0, 1, 0, 1, 1, 0, 1, 0], dtype=bool)
    out = stats.mcnemar(a, b)
    assert (out["a_only"], out["b_only"]) == (6, 1)
    hand = 2 * (comb(7, 0) + comb(7, 1)) / 2 ** 7  # P(X <= 1), X ~ Bin(7, 1/2), doubled
    assert out["p_value"] == pytest.approx(hand) == pytest.approx(binomtest(1, 7, 0.5).pvalue)
    assert stats.mcnemar(a, a)["p_value"] == 1.0  # no discordant pairs: no evidence


def test_paired_bootstrap_interval_matches_a_hand_resampling():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.3, 1, 200), rng.normal(0.0, 1, 200)
    got = stats.paired_bootstrap(a, b, n_boot=1000, seed=5)
    idx = np.random.default_rng(5).integers(0, 200, size=(1000, 200))  # the same draws, by hand
    means = (a - b)[idx].mean(1)
    assert got.diff == pytest.approx((a - b).mean())
    assert (got.lo, got.hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert got.lo < got.diff < got.hi and got.n == 200


def test_verdicts_and_claims_follow_the_interval():
    rng = np.random.default_rng(0)
    base = rng.normal(size=300)
    clear = stats.paired_bootstrap(base + 1.0, base + rng.normal(0, 0.1, 300))
    noise = stats.paired_bootstrap(base + rng.normal(0, 1, 300), base + rng.normal(0, 1, 300))
    assert stats.verdict(clear) == "better" and stats.claim(clear) == "met"
    assert stats.verdict(clear, higher_is_better=False) == "worse"
    assert stats.claim(clear, higher_is_better=False) == "missed"
    assert noise.lo < 0 < noise.hi and stats.verdict(noise) == "tie" == stats.claim(noise)


def test_bad_input_is_a_config_error():
    with pytest.raises(sf.ConfigError, match="same samples"):
        stats.paired_bootstrap([1, 0], [1, 0, 1])
    with pytest.raises(sf.ConfigError, match="correctness"):
        stats.mcnemar([0.5, 1], [1, 0])
    with pytest.raises(sf.ConfigError):
        stats.spread([])
    s = stats.spread([1.0, 2.0, 3.0])
    assert (s["mean"], s["std"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 1.0, 3.0, 3)


def test_report_compare_says_better_worse_and_tie(digits_mlp, digits):
    broken = copy.deepcopy(digits_mlp)
    with torch.no_grad():
        broken.fc1.weight.mul_(0.0).add_(torch.randn_like(broken.fc1.weight))  # a much worse model
    same = copy.deepcopy(digits_mlp)
    report = sf.measure({"good": digits_mlp, "broken": broken, "same": same}, digits.test, seconds=0.05)
    c = report.compare("good", "broken")
    assert c.verdict == "better" and c.interval.lo > 0 and c.p_value < 1e-6
    assert c.interval.diff == pytest.approx(report.row("good")["accuracy"] - report.row("broken")["accuracy"])
    assert report.compare("broken", "good", "nll").verdict == "worse"  # lower NLL is better
    tie = report.compare("good", "same", "nll")
    assert tie.verdict == "tie" and tie.interval.diff == 0
    assert "tie" in str(tie) and tie.to_dict()["verdict"] == "tie"
    assert "samples" not in report.to_json()  # per-sample arrays stay out of the JSON
    with pytest.raises(sf.ConfigError, match="accuracy or nll"):
        report.compare("good", "same", "bytes")
    with pytest.raises(KeyError):
        report.compare("good", "nobody")
