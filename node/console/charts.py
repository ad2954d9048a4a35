"""Charts as inline SVG, drawn on the server (no script, no chart library).

Every function returns an SVG element as text with every label escaped; the page
embeds it as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

#: Colour per series, stable by order (colour-blind-safe palette, Okabe-Ito).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442",
           "#000000")


def _legend(names: Sequence[str], x: float, y: float) -> list[str]:
    parts = []
    for i, name in enumerate(names):
        parts.append(f'<rect x="{x}" y="{y + i * 16}" width="10" height="10" '
                     f'fill="{PALETTE[i % len(PALETTE)]}"/>'
                     f'<text x="{x + 14}" y="{y + i * 16 + 9}" font-size="11">{escape(name)}</text>')
    return parts


def stacked_bars(title: str, columns: Sequence[str],
                 series: Mapping[str, Sequence[float]], *, width: int = 520,
                 height: int = 220) -> str:
    """Stacked vertical bars: one bar per column (e.g. a day), one colour per series
    (e.g. a decision).  An empty chart says so instead of drawing nothing."""
    names = list(series)
    left, top, bottom, legend_w = 48, 24, 36, 130
    plot_w, plot_h = width - left - legend_w, height - top - bottom
    totals = [sum(series[n][i] for n in names) for i in range(len(columns))]
    peak = max(totals, default=0) or 1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" class="chart" '
           f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
           f'<title>{escape(title)}</title>',
           f'<text x="{left}" y="14" font-size="12" font-weight="bold">{escape(title)}</text>',
           f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
           'stroke="#888"/>',
           f'<text x="{left - 4}" y="{top + 8}" font-size="10" text-anchor="end">{peak:.3g}</text>']
    if not columns:
        out.append(f'<text x="{left + 10}" y="{top + plot_h / 2}" font-size="12">no data yet</text>')
    step = plot_w / max(len(columns), 1)
    bar_w = max(step * 0.7, 2)
    for i, column in enumerate(columns):
        x = left + i * step + (step - bar_w) / 2
        y = top + plot_h
        for k, name in enumerate(names):
            value = series[name][i]
            if not value:
                continue
            h = plot_h * value / peak
            y -= h
            out.append(f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" '
                       f'height="{h:.1f}" fill="{PALETTE[k % len(PALETTE)]}">'
                       f'<title>{escape(column)}: {escape(name)} {value:g}</title></rect>')
        out.append(f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h + 14}" font-size="10" '
                   f'text-anchor="middle">{escape(column[5:] if len(column) == 10 else column)}</text>')
    out.extend(_legend(names, left + plot_w + 12, top))
    out.append("</svg>")
    return "".join(out)


def horizontal_bars(title: str, values: Mapping[str, float], *, unit: str = "",
                    width: int = 520) -> str:
    """One horizontal bar per label (e.g. refusals by reason)."""
    row, top, label_w = 20, 24, 220
    height = top + row * max(len(values), 1) + 10
    peak = max(values.values(), default=0) or 1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" class="chart" '
           f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
           f'<title>{escape(title)}</title>',
           f'<text x="4" y="14" font-size="12" font-weight="bold">{escape(title)}</text>']
    if not values:
        out.append(f'<text x="4" y="{top + 14}" font-size="12">none</text>')
    for i, (label, value) in enumerate(values.items()):
        y = top + i * row
        w = (width - label_w - 60) * value / peak
        out.append(f'<text x="{label_w - 6}" y="{y + 13}" font-size="11" text-anchor="end">'
                   f'{escape(label[:40])}</text>'
                   f'<rect class="bar" x="{label_w}" y="{y + 2}" width="{w:.1f}" height="14" '
                   f'fill="{PALETTE[0]}"><title>{escape(label)}: {value:g}{escape(unit)}</title>'
                   f'</rect><text x="{label_w + w + 4:.1f}" y="{y + 13}" font-size="11">'
                   f'{value:g}{escape(unit)}</text>')
    out.append("</svg>")
    return "".join(out)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) by linear interpolation; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
