"""Draws load.sh's results as an SVG bar chart: each path's figures as a ratio to the better
of nginx and HAProxy (1.0 = the best plain proxy; for req/s higher is better, for the rest
lower is better). No plotting library: the SVG is a few rectangles and labels.

    python3 benches/e2e/chart.py results.tsv out.svg
"""

import sys

COLS = {  # column index in results.tsv -> (label, higher is better)
    1: ("req/s at saturation", True),
    2: ("CPU µs per request", False),
    4: ("p99 at 500 req/s", False),
    5: ("p99.9 at 500 req/s", False),
    6: ("added p50, unloaded", False),
    7: ("added time to first byte", False),
    10: ("RSS after the run", False),
}
COLORS = ["#7f8c8d", "#95a5a6", "#c8a165", "#2e86de", "#54a0ff"]


def main(src, dst):
    rows = [line.rstrip("\n").split("\t") for line in open(src, encoding="utf-8")]
    direct, proxies = rows[0], rows[1:]
    base_calm, base_ttfb = float(direct[6]), float(direct[7])

    def value(row, col):
        v = float(row[col])
        # Added latencies are over the direct path's, floored at 10 µs (timer noise).
        if col == 6:
            v = max(v - base_calm, 10.0)
        if col == 7:
            v = max(v - base_ttfb, 10.0)
        return v

    groups = []
    for col, (label, higher) in COLS.items():
        ref = [value(r, col) for r in proxies[:2]]
        best = max(ref) if higher else min(ref)
        groups.append((label, higher, [value(r, col) / best for r in proxies]))

    bar, gap, left, width = 14, 16, 190, 420
    top = 50
    height = top + len(groups) * (len(proxies) * bar + gap) + 30 + len(proxies) * 18
    biggest = max(max(g[2]) for g in groups)
    scale = width / max(biggest, 1.0) / 1.1
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 80}" height="{height}" font-family="sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="10" y="20" font-size="14" font-weight="bold">byokd and the plain proxies, as a ratio to the better of nginx and HAProxy</text>',
        f'<text x="10" y="38" fill="#555">1.0 = the better plain proxy; req/s: longer is better; all others: shorter is better</text>',
    ]
    y = top
    for label, higher, ratios in groups:
        out.append(f'<text x="{left - 8}" y="{y + len(proxies) * bar / 2 + 4}" text-anchor="end">{label}</text>')
        for i, r in enumerate(ratios):
            w = r * scale
            out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar - 2}" fill="{COLORS[i % len(COLORS)]}"/>')
            out.append(f'<text x="{left + w + 4:.1f}" y="{y + bar - 4}" font-size="10">{r:.2f}</text>')
            y += bar
        y += gap
    one = left + scale
    out.append(f'<line x1="{one:.1f}" y1="{top - 4}" x2="{one:.1f}" y2="{y - gap + 4}" stroke="#c0392b" stroke-dasharray="4 3"/>')
    y += 10
    for i, r in enumerate(proxies):
        out.append(f'<rect x="{left}" y="{y}" width="12" height="12" fill="{COLORS[i % len(COLORS)]}"/>')
        out.append(f'<text x="{left + 18}" y="{y + 10}">{r[0]}</text>')
        y += 18
    out.append("</svg>")
    with open(dst, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
