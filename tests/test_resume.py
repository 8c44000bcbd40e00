"""Long steps resume after a crash: pruning fine-tunes, distillation, QAT, codebook, ensemble members.

Each test interrupts a run right after its N-th epoch checkpoint (what a kill during epoch N+1
leaves behind), reruns the same call, and checks that the rerun (a) trained only the epochs that
were missing and (b) reached bit-identical weights to an uninterrupted run with the same seed.
"""

from __future__ import annotations

import sys

import pytest
import torch
from killing import assert_killed_command_resumes

import slimfuse as sf
from slimfuse.checkpoint import Area, Checkpoint
from slimfuse.errors import ArtifactError


class Crash(Exception):
    """Stands for the process dying."""


def bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and bits(sa[k]) == bits(sb[k]) for k in sa)


@pytest.fixture
def saves(monkeypatch):
    """``saves.crash_after = N`` makes the N-th epoch checkpoint the last one before a crash;
    ``saves.count`` counts the epoch checkpoints written (= epochs trained) since the last reset."""
    real = Checkpoint.save

    class Counter:
        count = 0
        crash_after: int | None = None

        def reset(self):
            self.count, self.crash_after = 0, None

    counter = Counter()

    def save(self, **kwargs):
        real(self, **kwargs)
        counter.count += 1
        if counter.count == counter.crash_after:
            raise Crash

    monkeypatch.setattr(Checkpoint, "save", save)
    return counter


def interrupted_then_resumed(saves, run, crash_after: int, folder) -> tuple[object, int]:
    """Run ``run()`` until it crashes after ``crash_after`` epoch checkpoints, then rerun it; return
    the rerun's result and the number of epochs the rerun trained."""
    saves.reset()
    saves.crash_after = crash_after
    with pytest.raises(Crash):
        run()
    assert folder.exists()
    saves.reset()
    result = run()
    assert not folder.exists(), "the checkpoint must be removed when the job completes"
    return result, saves.count


@pytest.fixture(scope="module")
def dense(digits):
    torch.manual_seed(0)
    return sf.fit(sf.zoo.for_task("mlp", digits.task, hidden=[48, 24]), digits, epochs=4, progress=False)


@pytest.mark.parametrize("kw,crash_after,left", [
    # AGP: 20 optimizer steps an epoch, pruning steps at 0, 10, 20 and 30: the crash after epoch 1
    # leaves masks of the third step and one step to come.
    ({"sparsity": 0.8, "steps": 4}, 1, 3),
    # Structured, 2 epochs per step: step 1 is finished and kept, step 2 crashes after its first epoch.
    ({"channels": 0.5, "steps": 2}, 3, 1),
], ids=["agp", "channels"])
def test_pruning_resumes_with_its_masks_schedule_and_finished_steps(digits, dense, tmp_path, saves, kw, crash_after,
                                                                   left):
    ck = tmp_path / "ck"
    kw = dict(kw, data=digits, epochs=4, progress=False)
    straight = sf.prune(dense, **kw)
    resumed, trained = interrupted_then_resumed(saves, lambda: sf.prune(dense, checkpoint=ck, **kw), crash_after, ck)
    assert trained == left
    assert same_state(straight, resumed)
    assert sf.spec_of(resumed) == sf.spec_of(straight) and sf.lineage_of(resumed) == sf.lineage_of(straight)


def test_distillation_resumes_and_is_tied_to_its_parameters(digits, dense, tmp_path, saves):
    ck = tmp_path / "ck"
    torch.manual_seed(1)
    student = sf.zoo.for_task("mlp", digits.task, hidden=[16])
    kw = dict(epochs=2, hints={"fc1": "fc1"}, progress=False)
    straight = sf.distill(dense, student, digits, **kw)
    resumed, trained = interrupted_then_resumed(
        saves, lambda: sf.distill(dense, student, digits, checkpoint=ck, **kw), 1, ck)
    assert trained == 1
    assert same_state(straight, resumed)

    # A leftover checkpoint of another temperature is replaced, never resumed from.
    saves.reset()
    saves.crash_after = 1
    with pytest.raises(Crash):
        sf.distill(dense, student, digits, checkpoint=ck, **kw)
    saves.reset()
    with pytest.warns(UserWarning, match="other parameters"):
        hotter = sf.distill(dense, student, digits, checkpoint=ck, temperature=8.0, **kw)
    assert saves.count == 2
    assert same_state(hotter, sf.distill(dense, student, digits, temperature=8.0, **kw))


@pytest.mark.parametrize("scheme,options", [("qat", {"epochs": 3}), ("codebook:4", {"epochs": 3})])
def test_quantization_fine_tuning_resumes(digits, dense, tmp_path, saves, scheme, options):
    ck = tmp_path / "ck"
    straight = sf.quantize(dense, scheme, calib=digits, **options)
    resumed, trained = interrupted_then_resumed(
        saves, lambda: sf.quantize(dense, scheme, calib=digits, checkpoint=ck, **options), 1, ck)
    assert trained == 2
    assert same_state(straight, resumed)


@pytest.mark.parametrize("diversity,k,epochs,folds,crash_after,left", [
    ("seed", 3, 2, None, 3, 3),  # member 0 done, member 1 after epoch 1: 1 + 2 epochs left
    ("bagging", 2, 1, 2, 3, 3),  # members and the first fold's models done: 3 fold models left
    ("snapshot", 2, 4, None, 3, 1),  # cycle 1's snapshot taken, epoch 3 done: 1 epoch left
])
def test_member_training_keeps_finished_members(digits, tmp_path, saves, diversity, k, epochs, folds, crash_after,
                                                left):
    ck = tmp_path / "ck"
    torch.manual_seed(0)
    builder = sf.zoo.for_task("mlp", digits.task, hidden=[16])
    kw = dict(k=k, diversity=diversity, epochs=epochs, folds=folds, seed=3)
    straight = sf.train_members(builder, digits, **kw)
    resumed, trained = interrupted_then_resumed(
        saves, lambda: sf.train_members(builder, digits, checkpoint=ck, **kw), crash_after, ck)
    assert trained == left
    assert len(resumed) == len(straight) == k
    assert all(same_state(a, b) for a, b in zip(straight, resumed))
    assert [sf.lineage_of(m) for m in resumed] == [sf.lineage_of(m) for m in straight]
    if folds:
        assert (resumed.oof.features == straight.oof.features).all()


def test_checkpoint_areas_never_touch_a_users_folder_and_replace_other_runs(digits, tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not a slimfuse checkpoint"):
        Area(mine, "key")
    assert (mine / "todo.txt").read_text() == "keep me"

    # A multi-stage job's area where a single training checkpoints (e.g. `train --members` then
    # `train` to the same output): replaced with a warning, and the training runs normally.
    Area(tmp_path / "ck", "another job")
    torch.manual_seed(0)
    model = sf.zoo.for_task("mlp", digits.task, hidden=[16])
    with pytest.warns(UserWarning, match="another run"):
        again = sf.fit(model, digits, epochs=1, checkpoint=tmp_path / "ck")
    assert same_state(again, sf.fit(model, digits, epochs=1))
    with pytest.warns(UserWarning, match="other parameters"):
        Area(tmp_path / "ck2", "one job")
        Area(tmp_path / "ck2", "another job")


@pytest.mark.slow
def test_killed_prune_command_resumes_to_the_same_weights(tmp_path, digits):
    """SIGKILL `slimfuse prune` (AGP fine-tuning) after its first epoch; the same command finishes the job."""
    torch.manual_seed(0)
    sf.save(sf.zoo.for_task("mlp", digits.task, hidden=[128, 128]), tmp_path / "dense")

    def command(out):
        return [sys.executable, "-m", "slimfuse", "prune", str(tmp_path / "dense"), "--sparsity", "0.9",
                "--data", "digits", "--epochs", "20", "--no-validate", "-o", str(out)]  # untrained input

    assert_killed_command_resumes(command, tmp_path, epoch=1)


@pytest.mark.parametrize("command,epochs", [
    (["train", "--data", "digits", "--hidden", "16", "--members", "2", "--epochs", "2"], 4),
    (["distill", "--teacher", "{dense}", "--student", "mlp:16", "--data", "digits", "--epochs", "3"], 3),
    (["quantize", "{dense}", "--scheme", "qat", "--data", "digits", "--epochs", "3"], 3),
])
def test_commands_resume_where_they_crashed(tmp_path, dense, saves, command, epochs):
    from click.testing import CliRunner

    from slimfuse.cli import app

    sf.save(dense, tmp_path / "dense")
    args = [a.format(dense=tmp_path / "dense") for a in command]

    def run(out):
        return CliRunner().invoke(app, [*args, "-o", str(out)])

    assert run(tmp_path / "straight").exit_code == 0
    saves.reset()
    saves.crash_after = 1
    assert isinstance(run(tmp_path / "resumed").exception, Crash)
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.checkpoint").exists()
    saves.reset()
    result = run(tmp_path / "resumed")
    assert result.exit_code == 0, result.output
    assert saves.count == epochs - 1
    assert (tmp_path / "resumed" / "weights.safetensors").read_bytes() == \
        (tmp_path / "straight" / "weights.safetensors").read_bytes()
    assert not (tmp_path / ".resumed.checkpoint").exists()


def test_a_finished_job_removes_what_a_killed_checkpoint_save_left(tmp_path, digits):
    """A SIGKILL during a checkpoint write leaves `.NAME.tmp-*` beside it; the finished job removes it."""
    (tmp_path / "..ck.tmp-killed").mkdir()
    (tmp_path / "..ck.tmp-killed" / "state.json").write_text("{partial")
    sf.fit(sf.zoo.for_task("mlp", digits.task, hidden=[8]), digits, epochs=1, checkpoint=tmp_path / ".ck")
    assert list(tmp_path.iterdir()) == []
