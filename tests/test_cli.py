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
    ("hidden 1e9", lambda p: ["train", "--data", "digits", "--hidden", "1000000000", "-o", p / "out"], "--hidden"),
    ("hidden 1e6 x 1e3", lambda p: ["train", "--data", "digits", "--hidden", "1000000,1000", "-o", p / "out"],
     "parameters is over the limit"),
    ("recipe billion laughs", lambda p: ["run", _laughs(p), "-o", p / "out"], "once YAML aliases are expanded"),
]


def _laughs(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join(['*a' + str(i - 1)] * 9)}]" for i in range(1, 10)]
    (tmp_path / "laughs.yaml").write_text("\n".join(lines) + "\ndata: digits\nsteps: *a9\n")
    return tmp_path / "laughs.yaml"


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


def _os_case(tmp_path, kind, trained):
    """(args, path the error line must name) for one kind of OS failure."""
    import os

    train = ["train", "--data", "digits", "--hidden", "8", "--epochs", "1"]
    if kind == "read-only folder":
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o500)
        return train + ["-o", tmp_path / "ro" / "out"], "Permission denied"
    if kind == "parent is a file":
        (tmp_path / "file").write_text("x")
        return train + ["-o", tmp_path / "file" / "out"], "Not a directory"
    if kind == "name too long":
        return train + ["-o", tmp_path / ("n" * 250)], "File name too long"
    if kind == "export onto a folder":
        (tmp_path / "folder.onnx").mkdir()
        return ["export", trained, "--format", "onnx", "-o", tmp_path / "folder.onnx"], "is a folder"
    if kind == "eval --json a folder":
        (tmp_path / "jsondir").mkdir()
        return ["eval", trained, "--data", "digits", "--json", tmp_path / "jsondir"], "is a folder"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["read-only folder", "parent is a file", "name too long", "export onto a folder",
                                  "eval --json a folder"])
def test_os_failures_exit_2_with_one_line_naming_the_path(tmp_path, trained, kind):
    import os

    if kind == "read-only folder" and os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    args, message = _os_case(tmp_path, kind, trained)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = run(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert str(tmp_path) in lines[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, no temp files


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, trained):
    """`export` and `train` with writes capped (RLIMIT_FSIZE: EFBIG, like a full disk)."""
    import subprocess
    import sys

    script = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4_000, 4_000)); "
        "from slimfuse.cli import app; sys.argv = ['slimfuse'] + sys.argv[1:]; app()"
    )
    out = tmp_path / "out"
    out.mkdir()
    for args in (["export", str(trained), "--format", "onnx", "-o", str(out / "big.onnx")],
                 ["train", "--data", "digits", "--hidden", "512", "--epochs", "1", "-o", str(out / "t")]):
        proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "File too large" in lines[0], proc.stderr[-2000:]
        assert str(out) in lines[0]
        assert [p.name for p in out.iterdir() if not p.name.endswith(".checkpoint")] == []
