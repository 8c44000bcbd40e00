"""Data-parallel training under torchrun: 2 CPU processes, gloo on loopback."""

import hashlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import slimfuse as sf

SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys, torch, slimfuse as sf
    data = sf.datasets.load("digits")
    torch.manual_seed(0)
    model = sf.fit(sf.zoo.for_task("mlp", data.task, hidden=[64]), data, epochs=6, batch_size=64)
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()
    sf.save(model, sys.argv[1], metrics={"test": sf.evaluate(model, data.test)})
    with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"rank": int(os.environ["RANK"]), "digest": digest,
                   "accuracy": sf.evaluate(model, data.test)["accuracy"]}, f)
""")


@pytest.mark.slow
def test_two_process_training_matches_one_process(tmp_path, digits):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    out = tmp_path / "runs" / "model"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(out),
         str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"], "the ranks ended with different parameters"
    # One artifact, written once, by rank 0; nothing else in the output folder.
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["model"]
    saved = sf.load(out)
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in saved.state_dict().values())).hexdigest()
    assert digest == ranks[0]["digest"]
    # Same global batch in one process: the same optimisation up to float summation order.
    torch.manual_seed(0)
    single = sf.fit(sf.zoo.for_task("mlp", digits.task, hidden=[64]), digits, epochs=6, batch_size=64)
    assert abs(sf.evaluate(single, digits.test)["accuracy"] - ranks[0]["accuracy"]) <= 0.02
    diff = max((a - b).abs().max().item() for a, b in zip(single.state_dict().values(), saved.state_dict().values()))
    assert diff < 1e-2


@pytest.mark.slow
def test_a_failed_rank_fails_the_run_instead_of_hanging(tmp_path):
    import os
    import time

    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import os, torch, slimfuse as sf
        data = sf.datasets.load("digits")
        if os.environ["RANK"] == "1":
            raise SystemExit("rank 1 lost its data")
        sf.fit(sf.zoo.for_task("mlp", data.task, hidden=[8]), data, epochs=50)
    """))
    start = time.time()
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "SLIMFUSE_DIST_TIMEOUT": "30"},
    )
    assert run.returncode != 0
    assert "rank 1 lost its data" in run.stderr
    assert time.time() - start < 240


MEMBERS = textwrap.dedent("""
    import hashlib, json, os, sys, torch, slimfuse as sf
    data = sf.datasets.load("digits")
    members = sf.train_members(lambda: sf.zoo.for_task("mlp", data.task, hidden=[32]), data, 4, "bagging", epochs=3)
    digests = [hashlib.sha256(b"".join(t.numpy().tobytes() for t in m.state_dict().values())).hexdigest()
               for m in members]
    with open(os.path.join(sys.argv[1], f"{sys.argv[2]}{os.environ.get('RANK', 0)}.json"), "w") as f:
        json.dump({"digests": digests, "lineage": [sf.lineage_of(m) for m in members]}, f)
""")


@pytest.mark.slow
def test_train_members_spreads_members_over_ranks(tmp_path):
    import os

    script = tmp_path / "members.py"
    script.write_text(MEMBERS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path), "two"], capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(script), str(tmp_path), "one"], capture_output=True, text=True,
                         timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"two{r}.json").read_text()) for r in (0, 1)]
    alone = json.loads((tmp_path / "one0.json").read_text())
    assert len(ranks) == 2 and len(alone["digests"]) == 4
    # Each member is trained once, on its own rank, exactly as a single process trains it.
    assert ranks[0]["digests"] == ranks[1]["digests"] == alone["digests"]
    assert ranks[0]["lineage"] == ranks[1]["lineage"] == alone["lineage"]
