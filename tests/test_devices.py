"""``device=`` on every verb that trains or runs: names resolved, missing GPUs refused before any work,
the CPU default unchanged, results always back on the CPU. The CUDA cases run where torch sees a GPU."""

import pytest
import torch
from click.testing import CliRunner

import slimfuse as sf
from slimfuse import configs, devices
from slimfuse.cli import app
from slimfuse.export import to_onnx

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the accelerator machine)")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _gpus(monkeypatch, count: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_device_names_resolve(monkeypatch):
    assert devices.resolve("cpu") == devices.resolve(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve("auto") == devices.resolve(None) == torch.device("cpu")
    _gpus(monkeypatch, 2)
    assert devices.resolve("auto") == devices.resolve("cuda") == torch.device("cuda", 0)
    assert devices.resolve("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "3")  # torchrun: each rank its own GPU
    assert devices.resolve("auto") == torch.device("cuda", 1)
    with pytest.raises(sf.ConfigError, match="has 2 GPU"):
        devices.resolve("cuda:2")


@pytest.mark.parametrize("name", ["gpu", "cuda:", "CPU", "cuda:0 ", "mps", "cuda:1234"])
def test_unknown_device_names_are_refused_alike_by_config_and_library(name):
    with pytest.raises(sf.ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
        configs.Train.build(device=name)
    with pytest.raises(sf.ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
        devices.resolve(name)


def test_a_missing_gpu_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(sf.ConfigError, match="CPU build"):
        devices.resolve("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    with pytest.raises(sf.ConfigError, match="no GPU is visible"):
        devices.resolve("cuda:0")


def test_cpu_and_auto_without_a_gpu_train_exactly_as_the_default(digits, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.manual_seed(0)
    model = sf.zoo.for_task("mlp", digits.task, hidden=[16])
    default = sf.fit(model, digits, epochs=2)
    assert _same(default, sf.fit(model, digits, epochs=2, device="cpu"))
    assert _same(default, sf.fit(model, digits, epochs=2, device="auto"))
    assert _same(default, sf.fit(model, digits, epochs=2, device=torch.device("cpu")))


@no_cuda
@pytest.mark.parametrize("verb", ["fit", "prune", "distill", "qat", "codebook", "ensemble", "merge", "measure",
                                  "optimize", "predict"])
def test_every_verb_refuses_a_gpu_that_is_not_there_before_any_work(verb, digits, digits_mlp, tmp_path):
    m = digits_mlp
    calls = {
        "fit": lambda: sf.fit(m, digits, epochs=1, device="cuda"),
        "prune": lambda: sf.prune(m, 0.5, data=digits, device="cuda"),
        "distill": lambda: sf.distill(m, m, digits, epochs=1, device="cuda"),
        "qat": lambda: sf.quantize(m, "qat", digits, device="cuda"),
        "codebook": lambda: sf.quantize(m, "codebook:4", data=digits, device="cuda:0"),
        "ensemble": lambda: sf.ensemble([m, m], "weighted", digits, device="cuda"),
        "merge": lambda: sf.merge([m, m], "uniform", digits, device="cuda"),
        "measure": lambda: sf.measure(m, digits.test, device="cuda"),
        "optimize": lambda: sf.optimize(m, digits, budget_s=1, device="cuda"),
        "predict": lambda: sf.predict(m, digits.test.x, device="cuda"),
    }
    with pytest.raises(sf.ConfigError, match="device='cuda(:0)?': this torch build has no CUDA|no GPU is visible"):
        calls[verb]()


@no_cuda
def test_the_cli_refuses_a_missing_gpu_with_exit_2_and_no_output(tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    for device in ("cuda", "gpu"):
        result = runner.invoke(app, ["train", "--data", "digits", "--epochs", "1", "--device", device, "-o", str(out)])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "device" in lines[0] and "Traceback" not in result.output
        assert not out.exists()


def test_cpu_only_models_stay_on_the_cpu(digits, digits_mlp):
    q = sf.quantize(digits_mlp, "int8-dynamic", backend="torch")
    assert devices.movable(digits_mlp) and not devices.movable(q)
    assert not devices.movable(to_onnx(digits_mlp))
    with devices.placed(q, torch.device("cuda", 0)) as where:  # never moved, so no GPU is needed
        assert where == torch.device("cpu")
    assert torch.equal(sf.predict(q, digits.test.x, device="auto"), sf.predict(q, digits.test.x))
    row = sf.measure(q, digits.test, seconds=0.1, device="auto").rows[0]
    assert row["device"] == "cpu"


def test_onnx_runtime_takes_its_cuda_provider_only_where_installed(monkeypatch, digits, digits_mlp):
    import onnxruntime as ort

    from slimfuse import runtime

    here = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert runtime.providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert runtime.providers() == ["CPUExecutionProvider"]
    monkeypatch.undo()
    onnx = to_onnx(digits_mlp)
    expected = "cuda" if "CUDAExecutionProvider" in here else "cpu"
    assert sf.measure(onnx, digits.test, seconds=0.1).rows[0]["device"] == expected


def test_a_training_hook_sees_batches_on_the_training_device(digits):
    seen = []

    def loss(logits, batch):
        seen.append((logits.device, batch.x.device, batch.y.device, batch.index.device))
        return torch.nn.functional.cross_entropy(logits, batch.y)

    torch.manual_seed(0)
    sf.fit(sf.zoo.for_task("mlp", digits.task, hidden=[8]), digits, epochs=1, loss=loss, device="auto")
    want = devices.resolve("auto")
    assert seen and all(s[:3] == (want, want, want) and s[3].type == "cpu" for s in seen)


# ------------------------------------------------------------------------- on a GPU (accelerator machine)


@cuda
def test_training_on_the_gpu_returns_a_cpu_model_as_accurate_as_cpu_training(digits):
    torch.manual_seed(0)
    model = sf.zoo.for_task("mlp", digits.task, hidden=[64])
    on_cpu = sf.fit(model, digits, epochs=8)
    on_gpu = sf.fit(model, digits, epochs=8, device="cuda")
    assert {p.device.type for p in on_gpu.parameters()} == {"cpu"}
    assert devices.of(model).type == "cpu"  # the input was not moved
    a, b = sf.evaluate(on_cpu, digits.test)["accuracy"], sf.evaluate(on_gpu, digits.test)["accuracy"]
    assert abs(a - b) <= 0.03


@cuda
def test_every_training_verb_runs_on_the_gpu(digits, digits_mlp, tmp_path):
    m = digits_mlp
    base = sf.evaluate(m, digits.test)["accuracy"]
    results = {
        "prune": sf.prune(m, 0.5, data=digits, epochs=2, device="cuda"),
        "channels": sf.prune(m, channels=0.25, data=digits, epochs=2, device="cuda"),
        "distill": sf.distill(m, sf.zoo.for_task("mlp", digits.task, hidden=[32]), digits, epochs=4, device="cuda"),
        "qat": sf.quantize(m, "qat", digits, epochs=1, device="cuda"),
        "codebook": sf.quantize(m, "codebook:4", data=digits, epochs=1, device="cuda"),
        "ensemble": sf.ensemble([m, m], "weighted", digits, device="cuda"),
    }
    for name, r in results.items():
        assert sf.evaluate(r, digits.test)["accuracy"] >= base - 0.1, name
        sf.save(r, tmp_path / name)  # artifacts hold CPU tensors
        assert _same(r, sf.load(tmp_path / name)) if name != "ensemble" else True
    row = sf.measure(m, digits.test, seconds=0.2, device="cuda").rows[0]
    assert row["device"].startswith("cuda") and row["latency_b1_p50_ms"] > 0
