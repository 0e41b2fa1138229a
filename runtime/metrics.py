"""Test-set metrics of smoothed classifiers (DESIGN §3), from per-point (label, prediction, radius).

- certified accuracy at r: fraction of points whose prediction is correct (not abstained) and R ≥ r;
- ACR: mean of R over all points, counting 0 where the prediction is wrong or abstained;
- clean smoothed accuracy: certified accuracy at r = 0;
- abstain rate: fraction of points with prediction ABSTAIN (-1).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from arqc.base import ArqcError
from arqc.runtime.smoothing import ABSTAIN

DEFAULT_RADII: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


@dataclass(frozen=True)
class Summary:
    """Metrics of one certified test set; ``certified_accuracy`` maps radius → fraction of points."""

    certified_accuracy: dict[float, float]
    acr: float
    clean_accuracy: float
    abstain_rate: float
    num_points: int


def summarize(points: Iterable[tuple[int, int, float]], radii: Sequence[float] = DEFAULT_RADII) -> Summary:
    """Metrics of points given as (label, prediction, radius); prediction -1 means abstain."""
    rows = list(points)
    if not rows:
        raise ArqcError("no certified points to summarize; certify at least one image")
    labels = np.array([r[0] for r in rows], np.int64)
    predictions = np.array([r[1] for r in rows], np.int64)
    radius = np.array([r[2] for r in rows], np.float64)
    correct = (predictions == labels) & (predictions != ABSTAIN)
    return Summary(
        certified_accuracy={float(r): float(np.mean(correct & (radius >= r))) for r in radii},
        acr=float(np.mean(np.where(correct, radius, 0.0))),
        clean_accuracy=float(np.mean(correct)),
        abstain_rate=float(np.mean(predictions == ABSTAIN)),
        num_points=len(rows),
    )
