"""Model fusion: output ensembles (mean, vote, Caruana-weighted, stacking), member training, soups, SWA and
weight-space merges (task arithmetic, TIES, DARE, SLERP, permutation alignment)."""

from .api import ensemble, member_probas
from .combine import Ensemble
from .members import Members, train_members
from .merge import merge
from .select import Selection, caruana, refine
from .soup import refresh_bn, soup, swa
from .stacking import OutOfFold

__all__ = [
    "Ensemble", "Members", "OutOfFold", "Selection", "caruana", "ensemble", "member_probas", "merge", "refine",
    "refresh_bn", "soup", "swa", "train_members",
]
