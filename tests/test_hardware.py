"""slimfuse.hardware(): the machine's features, recorded on every report and card; half precision computed natively."""

import copy
import json
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import slimfuse as sf
from slimfuse.cli import app
from slimfuse.compress.quant_torch import HalfModel
from slimfuse.hardware import FEATURES, computes, cpu_flags, summary
from slimfuse.measure import flag_slower

PROC = Path("/proc/cpuinfo")


def test_hardware_has_the_documented_fields():
    info = sf.hardware()
    assert {"cpu", "machine", "cores", "flags", "features", "compute", "torch", "onnxruntime",
            "torch_threads"} <= info.keys()
    assert isinstance(info["cores"], int) and info["cores"] >= 1
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["torch"]["version"] == torch.__version__
    assert info["torch"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(info["torch"]["quantized_engines"]) <= set(torch.backends.quantized.supported_engines)
    assert set(info["compute"]) == {"bf16", "fp16", "int8"}
    assert [FEATURES[f] for f in info["flags"]] == info["features"]
    ort = pytest.importorskip("onnxruntime")
    assert info["onnxruntime"] == {"version": ort.__version__, "providers": ort.get_available_providers()}
    json.dumps(info)  # goes into cards and reports


@pytest.mark.skipif(not PROC.exists(), reason="no /proc/cpuinfo on this system")
def test_features_agree_with_proc_cpuinfo():
    text = PROC.read_text()
    flags = next(set(line.split(":", 1)[1].split()) for line in text.splitlines()
                 if line.split(":")[0].strip() in ("flags", "Features"))
    info = sf.hardware()
    assert set(info["flags"]) == flags & set(FEATURES)  # every reported feature is there, none is missed
    assert info["compute"]["bf16"] == bool({"amx_bf16", "avx512_bf16"} & flags)
    assert info["compute"]["fp16"] == bool({"amx_fp16", "avx512_fp16"} & flags)
    assert info["cores"] == len(os.sched_getaffinity(0))


def test_cpu_flags_parses_x86_and_arm_layouts():
    assert cpu_flags("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nflags : other\n") == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags("processor : 0\nFeatures : fp asimd sve\n") == {"fp", "asimd", "sve"}
    assert cpu_flags("") == set()


def test_cards_and_reports_record_the_hardware(digits_mlp, digits, tmp_path):
    path = sf.save(digits_mlp, tmp_path / "a")
    card = json.loads((path / "card.json").read_text())
    assert card["hardware"] == summary() and card["hardware"]["cores"] == sf.hardware()["cores"]
    report = sf.measure({"mlp": digits_mlp}, digits.test, seconds=0.1)
    assert json.loads(report.to_json())["hardware"] == summary()
    assert report.to_markdown().startswith(f"Measured on: {summary()['cpu']}, {summary()['cores']} cores")
    out = CliRunner().invoke(app, ["info", str(path)])
    assert out.exit_code == 0 and json.loads(out.output)["hardware"] == summary()


def test_cli_info_hardware_prints_the_machine():
    out = CliRunner().invoke(app, ["info", "--hardware"])
    assert out.exit_code == 0, out.output
    shown = json.loads(out.output)
    assert shown["flags"] == sf.hardware()["flags"] and shown["cores"] == sf.hardware()["cores"]
    bad = CliRunner().invoke(app, ["info"])
    assert bad.exit_code == 2 and "artifact folder" in bad.output


def test_rows_slower_than_their_input_are_flagged():
    rows = [
        {"name": "base", "lineage": "train", "throughput_b256": 1000.0},
        {"name": "int8", "lineage": "train -> quantize(scheme=int8)", "throughput_b256": 800.0},
        {"name": "pruned", "lineage": "train -> prune", "throughput_b256": 1500.0},
        {"name": "pq", "lineage": "train -> prune -> quantize", "throughput_b256": 1200.0},
        {"name": "other", "lineage": "fit", "throughput_b256": 10.0},
    ]
    report = sf.Report(copy.deepcopy(rows))
    assert report.row("int8")["slower"] == "base" and report.row("int8")["speedup"] == pytest.approx(0.8)
    assert report.row("pq")["slower"] == "pruned"  # its input is the pruned model, not the first one
    assert "slower" not in report.row("pruned") and report.row("pruned")["speedup"] == pytest.approx(1.5)
    assert "slower" not in report.row("other") and "speedup" not in report.row("other")
    assert "int8 (slower than base)" in report.to_markdown()
    assert flag_slower([dict(r) for r in rows[:1]])[0].get("slower") is None


@pytest.mark.parametrize("scheme", ["bf16", "fp16"])
def test_half_scheme_computes_in_half_where_the_cpu_does(digits_mlp, digits, tmp_path, scheme):
    q = sf.quantize(digits_mlp, scheme)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[scheme]
    step = sf.lineage_of(q)[-1]["params"]
    if computes(scheme):
        assert isinstance(q, HalfModel) and {p.dtype for p in q.parameters()} == {dtype}
        assert step["compute"] == scheme
        seen = []
        hook = q.net.fc1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        out = q(digits.test.x[:32])
        hook.remove()
        assert seen == [dtype] and out.dtype == torch.float32  # computed in half, returned as float32
    else:
        assert not isinstance(q, HalfModel) and step["compute"].startswith("fp32 (this CPU has no native")
    with torch.inference_mode():
        ref, got = digits_mlp(digits.test.x), q(digits.test.x)
    tol = 0.05 if scheme == "bf16" else 0.01  # bf16 keeps 8 bits of mantissa, fp16 11
    assert (got - ref).abs().max() <= tol * ref.abs().max()
    assert sf.evaluate(q, digits.test)["accuracy"] >= sf.evaluate(digits_mlp, digits.test)["accuracy"] - 0.01
    loaded = sf.load(sf.save(q, tmp_path / "q"))
    assert type(loaded) is type(q) and torch.equal(sf.predict(loaded, digits.test), sf.predict(q, digits.test))


@pytest.mark.parametrize("scheme", ["bf16", "fp16"])
def test_half_compute_with_data_is_chosen_by_measurement(digits_mlp, digits, scheme):
    q = sf.quantize(digits_mlp, scheme, digits)
    how = sf.lineage_of(q)[-1]["params"]["compute"]
    if not computes(scheme):
        assert not isinstance(q, HalfModel) and how.startswith("fp32 (this CPU has no native")
        return
    times = {k: float(v) for k, v in re.findall(r"(fp16|bf16|fp32) ([0-9.]+) ms", how)}
    assert set(times) == {scheme, "fp32"} and "[batch 256:" in how  # the timings it decided on, recorded
    assert isinstance(q, HalfModel) == (times[scheme] <= times["fp32"])


def test_half_compute_can_be_forced_either_way(digits_mlp):
    stored = sf.quantize(digits_mlp, "bf16", compute="fp32")
    assert not isinstance(stored, HalfModel) and {p.dtype for p in stored.parameters()} == {torch.float32}
    forced = sf.quantize(digits_mlp, "bf16", compute="half")
    assert isinstance(forced, HalfModel)
    with pytest.raises(sf.ConfigError, match="field 'compute': unknown value 'fast'"):
        sf.quantize(digits_mlp, "bf16", compute="fast")
    with pytest.raises(sf.ConfigError, match="already quantized"):
        sf.quantize(forced, "int8-dynamic", backend="torch")


def test_choose_times_every_candidate_and_picks_the_fastest_within_the_bound(digits_mlp, digits):
    from slimfuse.compress.choose import choose

    broken = copy.deepcopy(digits_mlp)
    with torch.no_grad():
        broken.out.bias.fill_(0)
        broken.out.bias[0] = 1e6  # always class 0: far out of the accuracy bound
    c = choose(digits_mlp, digits.val, batch=64, val=digits.val, rounds=2, runs=2, reference="input",
               candidates={"input": lambda: digits_mlp, "fp32 copy": lambda: copy.deepcopy(digits_mlp),
                           "broken": lambda: broken, "fails": lambda: sf.quantize(digits_mlp, "no-such")})
    assert c.name == "fp32 copy" and c.model is not None  # the input is timed, never picked; broken is out
    assert c.row("broken")["within"] is False and c.row("broken")["drop"] > 0.5
    assert "unknown quantization scheme" in c.row("fails")["error"]
    assert choose(digits_mlp, digits.val, batch=8, val=digits.val, rounds=1, runs=1,
                  candidates={"broken": lambda: broken}).name is None  # strict: nothing out of bounds is picked
    cores = sf.hardware()["cores"]
    for name in ("input", "fp32 copy", "broken"):
        r = c.row(name)
        assert set(r["per_threads"]) == set(range(1, cores + 1)) and r["throughput"] == max(r["per_threads"].values())
        assert r["throughput"] == pytest.approx(64 / (r["ms"] / 1e3))
    assert c.row("fp32 copy")["slower"] == (c.row("fp32 copy")["throughput"] < c.row("input")["throughput"])
    assert json.dumps(c.summary())


def test_auto_backend_returns_a_measured_candidate_and_records_the_timings(digits_mlp, digits):
    q = sf.quantize(digits_mlp, "int8-static", calib=digits)
    step = sf.lineage_of(q)[-1]["params"]
    chosen = step["chosen_by"]
    assert set(chosen["candidates"]) == {"input", "torch", "onnxruntime qdq", "onnxruntime qoperator"}
    assert step["backend"] == chosen["picked"] != "input"
    ok = {n: r for n, r in chosen["candidates"].items() if n != "input" and r["drop"] is not None
          and r["drop"] <= 0.01 + 1e-12}
    if ok:
        assert chosen["within_bound"] and chosen["picked"] == max(ok, key=lambda n: ok[n]["throughput"])
    else:  # none within the bound: the most accurate is returned, and said so
        assert not chosen["within_bound"]
        assert chosen["candidates"][chosen["picked"]]["drop"] == min(
            r["drop"] for n, r in chosen["candidates"].items() if n != "input")
    assert (q.slimfuse_runtime if hasattr(q, "slimfuse_runtime") else "torch") == (
        "onnxruntime" if chosen["picked"].startswith("onnxruntime") else "torch")
    assert sf.evaluate(q, digits.test)["accuracy"] >= sf.evaluate(digits_mlp, digits.test)["accuracy"] - 0.03
    rule = sf.quantize(digits_mlp, "int8-dynamic", calib=None)  # no data to measure on: the fixed default
    assert "chosen_by" not in sf.lineage_of(rule)[-1]["params"]


@pytest.fixture(scope="module")
def sparse_mlp():
    torch.manual_seed(0)
    m = sf.zoo.mlp(256, [256], 10)
    with torch.no_grad():
        for layer in (m.fc1, m.out):
            w = layer.weight
            w[w.abs() < w.abs().flatten().kthvalue(int(0.9 * w.numel())).values] = 0  # 90% unstructured
    return m


def test_sparse_kernel_layers_match_dense_and_reload_bit_exactly(sparse_mlp, tmp_path):
    from slimfuse.compress.sparse_kernel import SparseLinear

    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    forced = sf.sparse_kernels(sparse_mlp, x, batch=64, min_speedup=1e-9, rounds=1, runs=1)  # every layer CSR
    assert {type(m) for m in (forced.fc1, forced.out)} == {SparseLinear}
    assert set(forced.slimfuse_kernels) == {"fc1", "out"} and forced.slimfuse_kernels["fc1"]["sparsity"] >= 0.89
    with torch.inference_mode():
        ref, got = sparse_mlp(x), forced(x)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)  # the same product, summed in another order
    loaded = sf.load(sf.save(forced, tmp_path / "s"))
    assert type(loaded.fc1) is SparseLinear and sf.spec_of(loaded)["arch"] == "sparse-kernels"
    with torch.inference_mode():
        assert torch.equal(loaded(x), got)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), sparse_mlp.state_dict().values()))
    never = sf.sparse_kernels(sparse_mlp, x, batch=64, min_speedup=1e9, rounds=1, runs=1)
    assert not any(isinstance(m, SparseLinear) for m in never.modules())
    assert sf.spec_of(never) == sf.spec_of(sparse_mlp) and sf.lineage_of(never)[-1]["params"]["layers"] == []
    with pytest.raises(sf.ConfigError, match="no Linear"):
        sf.sparse_kernels(nn.Sequential(nn.ReLU()), x)
