"""The model matrix: every peer model x every verb works as docs/models.md says, or fails as it says.

Each (model, verb) cell is recomputed here (``peer_matrix.run_cell``): a "works" cell asserts its
bounds (accuracy against the baseline trained in this run, bit-exact reload, ONNX parity), a
"not supported" cell must be one SlimfuseError with the reason the file quotes, and no cell may end in
a raw exception. Regenerate the file with ``python benchmarks/models_matrix.py``.
"""

from __future__ import annotations

import peer_matrix as pm
import pytest
import torch

DOCUMENTED = pm.parse(pm.DOC.read_text()) if pm.DOC.exists() else {}
CELLS = [pytest.param(p, v, id=f"{p.name}-{v}", marks=[pytest.mark.slow] if v in pm.SLOW_VERBS else [])
         for p in pm.models() for v in pm.VERBS]


@pytest.fixture(scope="module")
def ctx(digits):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and steady on a shared machine
    yield pm.Context(digits)
    torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("peer", "verb"), CELLS)
def test_cell(ctx, peer, verb):
    outcome = pm.run_cell(ctx, peer, verb)
    assert outcome.status != "crash", f"{peer.name} x {verb} ends in a raw error or a failed check: {outcome.why}"
    documented = DOCUMENTED.get((peer.name, verb))
    assert documented is not None, f"docs/models.md has no cell {peer.name} x {verb}: run python {pm.SCRIPT}"
    assert documented == outcome.cell, (f"docs/models.md says {peer.name} x {verb} is {documented!r}, the code now "
                                        f"gives {outcome.cell!r}: run python {pm.SCRIPT}")


def test_the_matrix_covers_every_model_and_verb():
    assert len(pm.models()) >= 15 and len(pm.VERBS) >= 8
    assert set(DOCUMENTED) == {(p.name, v) for p in pm.models() for v in pm.VERBS}, f"run python {pm.SCRIPT}"


def test_the_file_round_trips_through_render_and_parse():
    outcomes = {(p.name, v): pm.Outcome("works", "x") if i % 3 else pm.Outcome("refused", f"ConfigError: r{i % 2}")
                for i, (p, v) in enumerate((p, v) for p in pm.models() for v in pm.VERBS)}
    cells = pm.parse(pm.render(outcomes, "a machine", 1.0))
    assert cells == {k: o.cell for k, o in outcomes.items()}
