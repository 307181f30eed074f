"""Mean ± std over seeds: the numbers (report.py's table and figures) and the drawing of a learning
curve as a mean line with a ± std band (train.py's learning_curves.png, report.py's curves_<task>.png)."""
from __future__ import annotations

import math
from collections.abc import Iterable


def mean_std(xs: list[float]) -> tuple[float, float | None] | None:
    """(mean, sample std) of xs; std None with one value, None with none."""
    if not xs:
        return None
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def mean_curve(points: Iterable[tuple[int, float]]) -> list[tuple[int, float, float, int]]:
    """(step, mean, std, n) of the values at each step (several: one per seed), in step order; std 0.0
    where a step has one value."""
    by_step: dict[int, list[float]] = {}
    for step, v in points:
        by_step.setdefault(step, []).append(v)
    out = []
    for step in sorted(by_step):
        m, s = mean_std(by_step[step])
        out.append((step, m, s or 0.0, len(by_step[step])))
    return out


def draw_mean_curve(ax, curve: list[tuple[int, float, float, int]], band: dict | None = None, **line):
    """A mean_curve on `ax`: a line through the means (styled by **line) and, unless band is None, the
    ± std band (styled by band). Nothing for an empty curve."""
    if not curve:
        return
    steps, means, stds = [p[0] for p in curve], [p[1] for p in curve], [p[2] for p in curve]
    ax.plot(steps, means, **line)
    if band is not None:
        ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], **band)
