"""Tables, ranks and plots for ``recipes/evaluate.py`` (no plotting library needed).

- :func:`markdown_table` / :func:`mean_ranks`: the report's tables (rows = upstreams
  or ablation variants, columns = task metrics), each metric knowing whether higher
  or lower is better.
- :func:`parse_train_log`: a SpeechBrain ``FileTrainLogger`` file (the pretraining
  recipe's ``train_log.txt``) -> per-epoch train/valid statistics.
- :func:`loss_curves_png` and :func:`bar_chart_png`: PNG plots drawn with numpy and
  written by :func:`write_png` (zlib + struct), with a 3x5 pixel font for labels, so
  the report needs nothing beyond the project's dependencies.
"""

import math
import re
import struct
import zlib

import numpy as np


# ----------------------------------------------------------------------------------------------
# Tables and ranks
# ----------------------------------------------------------------------------------------------
class Column:
    """One metric column: ``key`` in the results dicts, table ``label``, direction, format."""

    def __init__(self, key, label, higher_better=True, fmt="{:.2f}"):
        self.key, self.label, self.higher_better, self.fmt = key, label, bool(higher_better), fmt

    @property
    def arrow(self):
        return "↑" if self.higher_better else "↓"

    def to_dict(self):
        return {"key": self.key, "label": self.label, "higher_better": self.higher_better}


def _ranks(values, higher_better):
    """1 = best; ties share the mean of their ranks. ``values``: list of floats."""
    order = sorted(range(len(values)), key=lambda i: -values[i] if higher_better else values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def mean_ranks(results, columns, rows=None):
    """Mean rank of each row over the columns (1 = best on every metric).

    Each column ranks the rows that have a value for it (ties get the average
    rank); a row's mean is taken over the columns where it has a value. Rows
    without any value get None.

    Arguments
    ---------
    results : dict
        row -> {column key -> float or None}.
    columns : list of Column
    rows : list of str, optional
        The rows to rank (default: all of ``results``).

    Returns
    -------
    dict
        row -> mean rank (float) or None; ``per_column`` ranks under key ``"_ranks"``
        are not included: use :func:`column_ranks` for those.

    Example
    -------
    >>> cols = [Column("acc", "acc"), Column("wer", "wer", higher_better=False)]
    >>> mean_ranks({"a": {"acc": 80, "wer": 20}, "b": {"acc": 70, "wer": 10}, "c": {"acc": 70, "wer": 30}}, cols)
    {'a': 1.5, 'b': 1.75, 'c': 2.75}
    """
    per_column = column_ranks(results, columns, rows)
    rows = list(results) if rows is None else list(rows)
    out = {}
    for r in rows:
        got = [per_column[c.key][r] for c in columns if r in per_column[c.key]]
        out[r] = sum(got) / len(got) if got else None
    return out


def column_ranks(results, columns, rows=None):
    """column key -> {row -> rank} over the rows having a value for that column."""
    rows = list(results) if rows is None else list(rows)
    per_column = {}
    for c in columns:
        have = [r for r in rows if _number(results.get(r, {}).get(c.key)) is not None]
        ranks = _ranks([float(results[r][c.key]) for r in have], c.higher_better)
        per_column[c.key] = dict(zip(have, ranks))
    return per_column


def _number(v):
    if v is None or isinstance(v, bool):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def markdown_table(results, columns, rows=None, row_header="upstream", ranks=None, notes=None, bold_best=True):
    """A markdown table: one row per entry of ``results``, one column per metric.

    Arguments
    ---------
    results : dict
        row -> {column key -> value}; a missing value shows ``notes[row]`` or ``—``.
    columns : list of Column
    rows : list of str, optional
        Row order (default: ``results`` order).
    ranks : dict, optional
        row -> mean rank; adds a "mean rank" column.
    notes : dict, optional
        row -> text shown in the cells without a value (e.g. "failed").
    bold_best : bool
        Bold the best value of each column.

    Example
    -------
    >>> print(markdown_table({"a": {"acc": 81.234}, "b": {"acc": None}}, [Column("acc", "Acc (%)")]))
    | upstream | Acc (%) ↑ |
    |---|---|
    | a | **81.23** |
    | b | — |
    """
    rows = list(results) if rows is None else list(rows)
    notes = notes or {}
    best = {}
    if bold_best:
        for c in columns:
            vals = [_number(results.get(r, {}).get(c.key)) for r in rows]
            vals = [v for v in vals if v is not None]
            if vals:
                best[c.key] = max(vals) if c.higher_better else min(vals)
    header = [row_header] + [f"{c.label} {c.arrow}" for c in columns] + (["mean rank ↓"] if ranks is not None else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r)]
        for c in columns:
            v = _number(results.get(r, {}).get(c.key))
            if v is None:
                cells.append(notes.get(r, "—"))
                continue
            text = c.fmt.format(v)
            std = _number(results.get(r, {}).get(c.key + "_std"))
            if std is not None:
                text += " ± " + c.fmt.format(std)
            cells.append(f"**{text}**" if best.get(c.key) == v else text)
        if ranks is not None:
            cells.append("—" if ranks.get(r) is None else f"{ranks[r]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Train logs
# ----------------------------------------------------------------------------------------------
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf"


def parse_train_log(path):
    """Reads a SpeechBrain FileTrainLogger file.

    Lines look like ``epoch: 3, lr: 4.76e-04, step: 27 - train loss: 2.91, train
    frame: 6.78e-01 - valid loss: 3.56, ...``. Lines without ``epoch:`` (e.g. the
    final test line) are ignored; a resumed run that re-logs an epoch keeps the
    last entry for it.

    Returns
    -------
    list of dict
        ``{"epoch": int, "meta": {...}, "train": {...}, "valid": {...}}`` sorted by epoch.
    """
    entries = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = [p.strip() for p in line.strip().split(" - ")]
            if not parts or not parts[0].startswith("epoch:"):
                continue
            entry = {"meta": {}, "train": {}, "valid": {}}
            for i, part in enumerate(parts):
                for item in part.split(", "):
                    if ":" not in item:
                        continue
                    key, _, value = item.partition(":")
                    key, value = key.strip(), value.strip()
                    if i == 0:
                        m = re.fullmatch(_NUM, value)
                        entry["meta"][key] = float(value) if m else value
                        continue
                    stage, _, name = key.partition(" ")
                    if stage in ("train", "valid") and re.fullmatch(_NUM, value):
                        entry[stage][name] = float(value)
            try:
                entry["epoch"] = int(float(entry["meta"]["epoch"]))
            except (KeyError, ValueError):
                continue
            entries[entry["epoch"]] = entry
    return [entries[k] for k in sorted(entries)]


# ----------------------------------------------------------------------------------------------
# PNG writing and raster drawing
# ----------------------------------------------------------------------------------------------
def write_png(path, image):
    """Writes an (H, W, 3) uint8 array as an 8-bit RGB PNG (no compression library needed)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)
    return path


def read_png(path):
    """Reads back a PNG written by :func:`write_png` (RGB, 8 bit, filter 0) -> (H, W, 3) uint8."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    pos, idat, size = 8, b"", None
    while pos < len(data):
        n = struct.unpack(">I", data[pos:pos + 4])[0]
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if zlib.crc32(kind + body) & 0xFFFFFFFF != struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]:
            raise ValueError(f"{path}: bad CRC in chunk {kind!r}")
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h = size
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    if rows[:, 0].any():
        raise ValueError(f"{path}: only filter type 0 is supported")
    return rows[:, 1:].reshape(h, w, 3).copy()


# 3x5 pixel glyphs, rows top to bottom ('#' = ink). Lower case is drawn as upper case.
_GLYPHS = {
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "### ..# ### #.. ###",
    "3": "### ..# ### ..# ###", "4": "#.# #.# ### ..# ..#", "5": "### #.. ### ..# ###",
    "6": "### #.. ### #.# ###", "7": "### ..# ..# ..# ..#", "8": "### #.# ### #.# ###",
    "9": "### #.# ### ..# ###", "A": ".#. #.# ### #.# #.#", "B": "##. #.# ##. #.# ##.",
    "C": ".## #.. #.. #.. .##", "D": "##. #.# #.# #.# ##.", "E": "### #.. ##. #.. ###",
    "F": "### #.. ##. #.. #..", "G": ".## #.. #.# #.# .##", "H": "#.# #.# ### #.# #.#",
    "I": "### .#. .#. .#. ###", "J": "..# ..# ..# #.# .#.", "K": "#.# #.# ##. #.# #.#",
    "L": "#.. #.. #.. #.. ###", "M": "#.# ### ### #.# #.#", "N": "##. #.# #.# #.# #.#",
    "O": ".#. #.# #.# #.# .#.", "P": "##. #.# ##. #.. #..", "Q": ".#. #.# #.# ##. .##",
    "R": "##. #.# ##. #.# #.#", "S": ".## #.. .#. ..# ##.", "T": "### .#. .#. .#. .#.",
    "U": "#.# #.# #.# #.# ###", "V": "#.# #.# #.# #.# .#.", "W": "#.# #.# ### ### #.#",
    "X": "#.# #.# .#. #.# #.#", "Y": "#.# #.# .#. .#. .#.", "Z": "### ..# .#. #.. ###",
    ".": "... ... ... ... .#.", "-": "... ... ### ... ...", ":": "... .#. ... .#. ...",
    "%": "#.# ..# .#. #.. #.#", "/": "..# ..# .#. #.. #..", "(": "..# .#. .#. .#. ..#",
    ")": "#.. .#. .#. .#. #..", "_": "... ... ... ... ###", "+": "... .#. ### .#. ...",
    ",": "... ... ... .#. #..", "=": "... ### ... ### ...", "?": "### ..# .#. ... .#.",
    "<": "..# .#. #.. .#. ..#", ">": "#.. .#. ..# .#. #..", "[": "##. #.. #.. #.. ##.",
    "]": ".## ..# ..# ..# .##", "*": "... #.# .#. #.# ...", "'": ".#. .#. ... ... ...",
    "|": ".#. .#. .#. .#. .#.", "#": "#.# ### #.# ### #.#", " ": "... ... ... ... ...",
}
_FONT = {ch: np.array([[c == "#" for c in row] for row in rows.split()], dtype=bool) for ch, rows in _GLYPHS.items()}

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
BLACK, GREY, LIGHT, WHITE = (0, 0, 0), (120, 120, 120), (225, 225, 225), (255, 255, 255)


class Canvas:
    """A white RGB raster with rectangles, lines and 3x5-font text."""

    def __init__(self, width, height):
        self.img = np.full((int(height), int(width), 3), 255, dtype=np.uint8)

    @property
    def width(self):
        return self.img.shape[1]

    @property
    def height(self):
        return self.img.shape[0]

    def rect(self, x0, y0, x1, y1, color):
        """Fills [x0, x1) x [y0, y1) (clipped)."""
        x0, x1 = sorted((int(round(x0)), int(round(x1))))
        y0, y1 = sorted((int(round(y0)), int(round(y1))))
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, self.width), min(y1, self.height)
        if x1 > x0 and y1 > y0:
            self.img[y0:y1, x0:x1] = color

    def line(self, x0, y0, x1, y1, color, width=1):
        """A straight line (dense point sampling), ``width`` pixels thick."""
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        xs, ys = np.linspace(x0, x1, n), np.linspace(y0, y1, n)
        r0 = -(width // 2)
        for dx in range(r0, r0 + width):
            for dy in range(r0, r0 + width):
                xi = np.clip(np.round(xs + dx).astype(int), 0, self.width - 1)
                yi = np.clip(np.round(ys + dy).astype(int), 0, self.height - 1)
                self.img[yi, xi] = color

    def text_size(self, text, scale=2):
        return len(text) * 4 * scale - scale, 5 * scale

    def text(self, x, y, text, color=BLACK, scale=2, anchor="left"):
        """Draws ``text`` with its top at ``y``; anchor: left | center | right of ``x``."""
        w, _ = self.text_size(text, scale)
        if anchor == "center":
            x -= w / 2
        elif anchor == "right":
            x -= w
        x, y = int(round(x)), int(round(y))
        for i, ch in enumerate(str(text).upper()):
            glyph = _FONT.get(ch, _FONT["?"])
            big = np.kron(glyph, np.ones((scale, scale), dtype=bool))
            gx = x + i * 4 * scale
            ys, xs = np.nonzero(big)
            ys, xs = ys + y, xs + gx
            keep = (xs >= 0) & (xs < self.width) & (ys >= 0) & (ys < self.height)
            self.img[ys[keep], xs[keep]] = color

    def save(self, path):
        return write_png(path, self.img)


def _fmt_tick(v):
    if v == 0:
        return "0"
    a = abs(v)
    if float(v).is_integer() and a < 100000:
        return str(int(v))
    if a >= 1000 or a < 0.01:
        return f"{v:.1e}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if a >= 1 else f"{v:.3f}"


def _legend(canvas, x, y, names, colors, scale=2):
    """Colour swatches and names from (x, y), left to right, wrapping at the canvas edge."""
    cx, cy = x, y
    for name, color in zip(names, colors):
        w = 14 + canvas.text_size(name, scale)[0] + 16
        if cx + w > canvas.width - 10 and cx > x:
            cx, cy = x, cy + 16
        canvas.rect(cx, cy, cx + 10, cy + 10, color)
        canvas.text(cx + 14, cy, name, scale=scale)
        cx += w
    return cy + 16


def loss_curves_png(path, panels, title="", width_per_panel=300, height=260):
    """One panel per curve group, side by side, each with its own y range.

    Arguments
    ---------
    path : str
        Output PNG.
    panels : dict
        panel title -> {series name -> (xs, ys)}; e.g. ``{"frame": {"train": ([1, 2], [0.9, 0.7])}}``.
        Series keep the same colour in every panel (by name).
    title : str
    """
    names = []
    for series in panels.values():
        names += [n for n in series if n not in names]
    colors = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    n = max(len(panels), 1)
    top = 44
    canvas = Canvas(width_per_panel * n + 20, height + top + 10)
    canvas.text(10, 8, title)
    _legend(canvas, 10, 26, names, [colors[n_] for n_ in names])
    for p, (ptitle, series) in enumerate(panels.items()):
        ox = 10 + p * width_per_panel
        x0, x1 = ox + 60, ox + width_per_panel - 14
        y0, y1 = top + 22, top + height - 30
        canvas.text((x0 + x1) / 2, top + 4, ptitle, anchor="center")
        pts = [(float(x), float(y)) for xs, ys in series.values() for x, y in zip(xs, ys)
               if y is not None and math.isfinite(float(y))]
        canvas.line(x0, y0, x0, y1, BLACK)
        canvas.line(x0, y1, x1, y1, BLACK)
        if not pts:
            canvas.text((x0 + x1) / 2, (y0 + y1) / 2, "NO DATA", GREY, anchor="center")
            continue
        xmin, xmax = min(p_[0] for p_ in pts), max(p_[0] for p_ in pts)
        ymin, ymax = min(p_[1] for p_ in pts), max(p_[1] for p_ in pts)
        if xmax == xmin:
            xmin, xmax = xmin - 1, xmax + 1
        pad = (ymax - ymin) * 0.05 or abs(ymax) * 0.05 or 1.0
        ymin, ymax = ymin - pad, ymax + pad

        def tx(v):
            return x0 + (v - xmin) / (xmax - xmin) * (x1 - x0)

        def ty(v):
            return y1 - (v - ymin) / (ymax - ymin) * (y1 - y0)

        for k in range(5):  # horizontal grid + y ticks
            v = ymin + (ymax - ymin) * k / 4
            canvas.line(x0 + 1, ty(v), x1, ty(v), LIGHT)
            canvas.text(x0 - 4, ty(v) - 5, _fmt_tick(v), anchor="right")
        for v in sorted({xmin, xmax}):
            canvas.text(tx(v), y1 + 6, _fmt_tick(v), anchor="center")
        canvas.text((x0 + x1) / 2, y1 + 18, "EPOCH", GREY, anchor="center")
        for name, (xs, ys) in series.items():
            xy = [(tx(float(x)), ty(float(y))) for x, y in zip(xs, ys) if y is not None and math.isfinite(float(y))]
            for a, b in zip(xy, xy[1:]):
                canvas.line(a[0], a[1], b[0], b[1], colors[name], width=2)
            for a in xy:
                canvas.rect(a[0] - 2, a[1] - 2, a[0] + 3, a[1] + 3, colors[name])
    return canvas.save(path)


def bar_chart_png(path, groups, series, title="", ylabel="", height=320, group_width=None):
    """Grouped bars: one group per column (e.g. task metric), one bar per series (e.g. upstream).

    Arguments
    ---------
    path : str
    groups : list of str
        Group labels (x axis).
    series : dict
        series name -> list of values (one per group; None = missing, drawn as an ``X``).
    title, ylabel : str
    """
    names = list(series)
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(names))]
    n_bars = max(len(names), 1)
    bar_w = 14
    if group_width is None:
        group_width = max(n_bars * bar_w + 30, max((len(g) * 8 + 16 for g in groups), default=60))
    width = 70 + len(groups) * group_width + 20
    canvas = Canvas(max(width, 360), height)
    canvas.text(10, 8, title)
    legend_bottom = _legend(canvas, 10, 26, names, colors)
    x0, x1, y0, y1 = 70, 70 + len(groups) * group_width, legend_bottom + 14, height - 44
    vals = [float(v) for vs in series.values() for v in vs if _number(v) is not None]
    vmax = max(vals + [0.0])
    vmin = min(vals + [0.0])
    if vmax == vmin:
        vmax = vmin + 1.0
    step = 10 ** math.floor(math.log10((vmax - vmin) / 4)) if vmax > vmin else 1
    for m in (1, 2, 2.5, 5, 10):
        if (vmax - vmin) / (step * m) <= 6:
            step *= m
            break
    lo, hi = math.floor(vmin / step) * step, math.ceil(vmax / step) * step

    def ty(v):
        return y1 - (v - lo) / (hi - lo) * (y1 - y0)

    t = lo
    while t <= hi + 1e-9:
        canvas.line(x0 + 1, ty(t), x1, ty(t), LIGHT)
        canvas.text(x0 - 4, ty(t) - 5, _fmt_tick(t), anchor="right")
        t += step
    if ylabel:
        canvas.text(10, y0 - 14, ylabel, GREY)
    canvas.line(x0, y0, x0, y1, BLACK)
    canvas.line(x0, ty(0) if lo < 0 else y1, x1, ty(0) if lo < 0 else y1, BLACK)
    for g, label in enumerate(groups):
        gx = x0 + g * group_width + (group_width - n_bars * bar_w) / 2
        for i, name in enumerate(names):
            v = series[name][g] if g < len(series[name]) else None
            bx = gx + i * bar_w
            if _number(v) is None:
                canvas.text(bx + bar_w / 2, ty(max(lo, 0)) - 12, "X", GREY, anchor="center")
                continue
            canvas.rect(bx + 1, ty(max(lo, 0) if v >= 0 else 0), bx + bar_w - 1, ty(float(v)), colors[i])
        canvas.text(x0 + g * group_width + group_width / 2, y1 + 8, label, anchor="center")
    return canvas.save(path)
