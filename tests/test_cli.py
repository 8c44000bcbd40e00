import json

import numpy as np
import pytest
from click.testing import CliRunner

import slimfuse as sf
from slimfuse.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "teacher"
    result = run("train", "--data", "digits", "--hidden", "32", "--epochs", "8", "-o", out)
    assert result.exit_code == 0, result.output
    return out


def test_train_eval_info(trained):
    card = sf.read_card(trained)
    assert card["spec"]["args"]["hidden"] == [32] and card["metrics"]["test"]["accuracy"] > 0.8
    result = run("eval", trained, "--data", "digits")
    assert result.exit_code == 0, result.output
    assert "| teacher | torch |" in result.output
    info = run("info", trained)
    assert info.exit_code == 0
    assert json.loads(info.output)["bytes_on_disk"] > 0


def test_same_command_twice_gives_bit_identical_weight_files(trained, tmp_path):
    again = tmp_path / "again"
    assert run("train", "--data", "digits", "--hidden", "32", "--epochs", "8", "-o", again).exit_code == 0
    assert (again / "weights.safetensors").read_bytes() == (trained / "weights.safetensors").read_bytes()


def test_eval_writes_json(trained, tmp_path):
    result = run("eval", trained, "--data", "digits", "--json", tmp_path / "r.json")
    assert result.exit_code == 0
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["accuracy"] > 0.8


def _bad_csv(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b,label\n" + "1,2,0\n1,nan,1\n" * 10)
    return tmp_path / "bad.csv"


BAD_CLI = [
    ("unknown data", lambda p: ["train", "--data", "nope", "-o", p / "out"], "unknown data set"),
    ("nan in csv", lambda p: ["train", "--data", _bad_csv(p), "-o", p / "out"], "NaN"),
    ("bad hidden", lambda p: ["train", "--data", "digits", "--hidden", "a,b", "-o", p / "out"], "--hidden"),
    ("zero hidden", lambda p: ["train", "--data", "digits", "--hidden", "0", "-o", p / "out"], "--hidden"),
    ("unknown model", lambda p: ["train", "--data", "digits", "--model", "vgg", "-o", p / "out"], "unknown model"),
    ("lenet on 8x8", lambda p: ["train", "--data", "digits", "--model", "lenet5", "-o", p / "out"], "12x12"),
    ("negative epochs", lambda p: ["train", "--data", "digits", "--epochs", "-3", "-o", p / "out"], "epochs"),
    ("absurd batch", lambda p: ["train", "--data", "digits", "--batch-size", "99999999", "-o", p / "out"],
     "--batch-size"),
    ("zero epochs", lambda p: ["train", "--data", "digits", "--epochs", "0", "-o", p / "out"], "--epochs"),
    ("combine without members", lambda p: ["train", "--data", "digits", "--combine", "vote", "-o", p / "out"],
     "members > 1"),
    ("flag typo", lambda p: ["train", "--data", "digits", "--epoch", "3", "-o", p / "out"], "--epochs"),
    ("ensemble of one", lambda p: ["ensemble", p / "none", "--data", "digits", "-o", p / "out"], "at least two"),
    ("export without .onnx", lambda p: ["export", p / "none", "-o", p / "out"], "*.onnx"),
    ("bad optimizer", lambda p: ["train", "--data", "digits", "--optimizer", "lion", "-o", p / "out"], "optimizer"),
    ("eval missing artifact", lambda p: ["eval", p / "none", "--data", "digits"], "no such artifact"),
    ("eval bad split", lambda p: ["eval", p / "none", "--data", "digits", "--split", "dev"], "--split"),
    ("info on a pickle", lambda p: (p / "m.pkl").write_bytes(b"\x80\x04K\x01.") and ["info", p / "m.pkl"], "pickle"),
    ("unknown scenario", lambda p: ["demo", "--scenario", "speech", "-o", p / "out"], "unknown scenario"),
    ("eval zero threads", lambda p: ["eval", p / "none", "--data", "digits", "--threads", "0"], "--threads"),
]


@pytest.mark.parametrize("case,args,message", BAD_CLI, ids=[c[0] for c in BAD_CLI])
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, case, args, message):
    result = run(*args(tmp_path))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_eval_with_mismatched_data_is_a_user_error(trained, tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 5))
    np.savez(tmp_path / "d.npz", X=x, y=np.arange(50) % 2)
    result = run("eval", trained, "--data", tmp_path / "d.npz")
    assert result.exit_code == 2 and "error:" in result.output


def test_help_everywhere():
    for cmd in ([], ["train"], ["eval"], ["info"], ["demo"]):
        result = run(*cmd, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


@pytest.mark.slow
def test_killed_train_command_resumes_to_the_same_weights(tmp_path):
    """SIGKILL `slimfuse train` after its second epoch; the same command again finishes the job."""
    import sys

    from killing import assert_killed_command_resumes

    def command(out):
        return [sys.executable, "-m", "slimfuse", "train", "--data", "digits", "--hidden", "256,256",
                "--epochs", "40", "-o", str(out)]

    assert_killed_command_resumes(command, tmp_path, epoch=2)
