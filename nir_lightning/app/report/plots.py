"""Inline SVG plots for the cohort report, written in Python: no plotting library in the page.

Each plot is a string ``<svg ...>...</svg>``; marks carry ``data-id`` (a click scrolls to the
pair's row, see the page script) and a ``<title>`` (the browser's tooltip).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

import numpy as np

FLAG_COLOUR = "#d62728"
OK_COLOUR = "#1f77b4"
_W, _H = 440, 300
_PAD = (46, 16, 16, 40)  # left, right, top, bottom


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[lo, hi]``.

    >>> _ticks(0.0, 1.0)
    [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    """
    span = hi - lo if hi > lo else 1.0
    raw = span / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if raw <= m * step)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


class _Axes:
    """Linear data -> pixel maps of one panel with its frame and tick labels."""

    def __init__(self, xlim: tuple[float, float], ylim: tuple[float, float], w: int = _W, h: int = _H) -> None:
        self.xlim, self.ylim, self.w, self.h = xlim, ylim, w, h
        left, right, top, bottom = _PAD
        self.x0, self.x1, self.y0, self.y1 = left, w - right, h - bottom, top

    def x(self, v: float) -> float:
        lo, hi = self.xlim
        return self.x0 + (v - lo) / ((hi - lo) or 1.0) * (self.x1 - self.x0)

    def y(self, v: float) -> float:
        lo, hi = self.ylim
        return self.y0 - (v - lo) / ((hi - lo) or 1.0) * (self.y0 - self.y1)

    def frame(self, xlabel: str, ylabel: str, *, yticks: bool = True) -> list[str]:
        out = [f'<rect x="{self.x0}" y="{self.y1}" width="{self.x1 - self.x0}" height="{self.y0 - self.y1}" fill="none" stroke="#999"/>']
        for t in _ticks(*self.xlim):
            if self.xlim[0] - 1e-9 <= t <= self.xlim[1] + 1e-9:
                out.append(f'<text x="{self.x(t):.1f}" y="{self.y0 + 14}" text-anchor="middle">{t:g}</text>')
        if yticks:
            for t in _ticks(*self.ylim):
                if self.ylim[0] - 1e-9 <= t <= self.ylim[1] + 1e-9:
                    out.append(f'<text x="{self.x0 - 4}" y="{self.y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
        out.append(f'<text x="{(self.x0 + self.x1) / 2:.0f}" y="{self.h - 6}" text-anchor="middle">{escape(xlabel)}</text>')
        out.append(f'<text transform="translate(12 {(self.y0 + self.y1) / 2:.0f}) rotate(-90)" text-anchor="middle">{escape(ylabel)}</text>')
        return out


def _svg(name: str, w: int, h: int, body: Sequence[str]) -> str:
    return f'<svg class="plot" data-plot="{name}" viewBox="0 0 {w} {h}" width="{w}" height="{h}" font-size="11" role="img">' + "".join(body) + "</svg>"


def _limits(values: Sequence[float], pad: float = 0.03) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    span = hi - lo or max(abs(hi), 1.0) * 0.1
    return lo - pad * span, hi + pad * span


def histogram(values: Mapping[str, float], flagged: set[str], *, xlabel: str = "Dice after") -> str:
    """Histogram of ``values`` (id -> value) with a red tick under it for each flagged id."""
    if not values:
        return _svg("histogram", _W, 60, ['<text x="10" y="30">no completed pair with this metric yet</text>'])
    xs = np.asarray(list(values.values()), dtype=np.float64)
    xlim = _limits(list(xs))
    counts, edges = np.histogram(xs, bins=min(40, max(8, int(math.sqrt(xs.size)) * 2)), range=xlim)
    ax = _Axes(xlim, (0.0, float(counts.max()) * 1.08))
    body = ax.frame(xlabel, "pairs")
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        if c:
            body.append(f'<rect x="{ax.x(a):.1f}" y="{ax.y(c):.1f}" width="{max(ax.x(b) - ax.x(a) - 1, 1):.1f}" height="{ax.y0 - ax.y(c):.1f}" fill="{OK_COLOUR}" opacity="0.7"/>')
    for pid, v in values.items():
        if pid in flagged:
            body.append(f'<line class="mark" data-id="{escape(pid)}" x1="{ax.x(v):.1f}" x2="{ax.x(v):.1f}" y1="{ax.y0 - 2}" y2="{ax.y0 - 16}" stroke="{FLAG_COLOUR}" stroke-width="2.5"><title>{escape(pid)}: {v:.3f} (flagged)</title></line>')
    return _svg("histogram", ax.w, ax.h, body)


def scatter(points: Mapping[str, tuple[float, float]], flagged: set[str], *, xlabel: str = "Dice before", ylabel: str = "Dice after") -> str:
    """One dot per pair (id -> (x, y)), flagged ones red, with the line y = x (no change)."""
    if not points:
        return _svg("scatter", _W, 60, ['<text x="10" y="30">no completed pair with both values yet</text>'])
    allv = [v for xy in points.values() for v in xy]
    lim = _limits(allv)
    ax = _Axes(lim, lim)
    body = ax.frame(xlabel, ylabel)
    body.append(f'<line x1="{ax.x(lim[0]):.1f}" y1="{ax.y(lim[0]):.1f}" x2="{ax.x(lim[1]):.1f}" y2="{ax.y(lim[1]):.1f}" stroke="#aaa" stroke-dasharray="4 3"/>')
    for pid, (x, y) in sorted(points.items(), key=lambda kv: kv[0] in flagged):  # flagged drawn on top
        colour = FLAG_COLOUR if pid in flagged else OK_COLOUR
        body.append(f'<circle class="mark" data-id="{escape(pid)}" cx="{ax.x(x):.1f}" cy="{ax.y(y):.1f}" r="3.5" fill="{colour}" fill-opacity="0.75"><title>{escape(pid)}: {x:.3f} to {y:.3f}</title></circle>')
    return _svg("scatter", ax.w, ax.h, body)


def boxes(per_label: Mapping[str, Sequence[float]], *, xlabel: str = "Dice after, per structure") -> str:
    """One horizontal box per structure (name -> values over the cohort): quartiles, median,
    whiskers to the furthest value within 1.5 IQR, points beyond."""
    rows = [(name, np.asarray(v, dtype=np.float64)) for name, v in per_label.items() if len(v)]
    if not rows:
        return _svg("boxes", _W, 60, ['<text x="10" y="30">no per-structure Dice (no label maps, or none completed)</text>'])
    label_w = min(200, 12 + 6 * max(len(n) for n, _ in rows))
    row_h, w = 14, 620
    h = 40 + row_h * len(rows) + 10
    lo = min(0.0, min(float(v.min()) for _, v in rows))
    ax = _Axes((lo, 1.0), (0.0, 1.0), w=w, h=h)
    ax.x0, ax.y1, ax.y0 = label_w, 10, h - 40
    body = ax.frame(xlabel, "", yticks=False)
    for i, (name, v) in enumerate(rows):
        cy = ax.y1 + row_h * (i + 0.5)
        q1, med, q3 = (float(q) for q in np.percentile(v, [25, 50, 75]))
        inside = v[(v >= q1 - 1.5 * (q3 - q1)) & (v <= q3 + 1.5 * (q3 - q1))]
        wlo, whi = float(inside.min()), float(inside.max())
        tip = f"{escape(name)}: median {med:.3f}, IQR {q1:.3f} to {q3:.3f}, n={v.size}"
        body.append(f'<g class="box"><title>{tip}</title>'
                    f'<text x="{label_w - 4}" y="{cy + 4:.1f}" text-anchor="end">{escape(name)}</text>'
                    f'<line x1="{ax.x(wlo):.1f}" x2="{ax.x(whi):.1f}" y1="{cy:.1f}" y2="{cy:.1f}" stroke="#555"/>'
                    f'<rect x="{ax.x(q1):.1f}" y="{cy - 5:.1f}" width="{max(ax.x(q3) - ax.x(q1), 1):.1f}" height="10" fill="#cfe0f3" stroke="#555"/>'
                    f'<line x1="{ax.x(med):.1f}" x2="{ax.x(med):.1f}" y1="{cy - 5:.1f}" y2="{cy + 5:.1f}" stroke="#000" stroke-width="2"/>')
        for o in v[(v < wlo) | (v > whi)]:
            body.append(f'<circle cx="{ax.x(float(o)):.1f}" cy="{cy:.1f}" r="1.8" fill="none" stroke="#555"/>')
        body.append("</g>")
    return _svg("boxes", w, h, body)
