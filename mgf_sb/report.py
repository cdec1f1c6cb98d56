"""Tables, ranks, spreads and plots for ``recipes/evaluate.py``.

- :class:`Column`, :func:`column_ranks`, :func:`mean_ranks`, :func:`markdown_table`: the
  report's tables (rows = upstreams or ablation variants, columns = task metrics), each
  metric knowing whether higher or lower is better. A value ``v`` under key ``k`` may
  carry its spread under ``k + "_std"`` (printed ``v ± std``).
- :func:`mean_std`, :func:`within_spread`, :func:`ranking`, :func:`ranking_text`,
  :func:`ranking_changes`: spreads over seeds / folds, and whether a difference (or a
  change of ranking between two heads) is smaller than the spread.
- :func:`compare`, :func:`verdict_lines`: the report's opening answer, per task: is the
  subject (MGF) better, level or worse than each baseline, by how much, against what spread.
- :func:`parse_train_log`: a SpeechBrain ``FileTrainLogger`` file (the pretraining
  recipe's ``train_log.txt``) -> per-epoch train/valid statistics.
- :func:`loss_curves_png`, :func:`bar_chart_png`, :func:`layer_weights_png` (in
  :mod:`mgf_sb.report_plots`, re-exported here): matplotlib figures drawn on an Agg canvas (no
  pyplot, no global backend switch), saved as PNG files of exactly the requested pixel size.
"""

import math
import re

import numpy as np

SPREAD_MARK = "≈"


# ----------------------------------------------------------------------------------------------
# Tables and ranks
# ----------------------------------------------------------------------------------------------
class Column:
    """One metric column: ``key`` in the results dicts, table ``label``, direction, format.

    ``ranked=False`` marks a reference column (e.g. a convex reference beside a probe):
    shown, never bolded, and left out of the ranks by the callers. ``no_skill``: the value a
    useless model gets (a WER of 100 %: no better than an empty transcript; an EER of 50 %);
    a best value at or past it is not bolded as best.
    """

    def __init__(self, key, label, higher_better=True, fmt="{:.2f}", ranked=True, no_skill=None):
        self.key, self.label, self.higher_better, self.fmt = key, label, bool(higher_better), fmt
        self.ranked = bool(ranked)
        self.no_skill = no_skill

    def useless(self, value):
        """True when ``value`` is no better than ``no_skill``."""
        if self.no_skill is None or value is None:
            return False
        return value <= self.no_skill if self.higher_better else value >= self.no_skill

    def like(self, key, label, ranked=True):
        """The same metric (direction, format, no-skill level) under another key and label."""
        return Column(key, label, self.higher_better, self.fmt, ranked, self.no_skill)

    @property
    def arrow(self):
        return "↑" if self.higher_better else "↓"

    def to_dict(self):
        return {"key": self.key, "label": self.label, "higher_better": self.higher_better, "ranked": self.ranked}


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
        row -> mean rank (float) or None (per-column ranks: :func:`column_ranks`).

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


from mgf_sb.report_plots import _number  # noqa: E402  (one definition: a float, or None)


def _std(results, row, key):
    return _number(results.get(row, {}).get(key + "_std"))


def markdown_table(results, columns, rows=None, row_header="upstream", ranks=None, notes=None, bold_best=True):
    """A markdown table: one row per entry of ``results``, one column per metric.

    A value whose distance to its column's best is smaller than the spread (the larger
    of the two ``_std``) is followed by ``≈``: that difference is not a real one.

    Arguments
    ---------
    results : dict
        row -> {column key -> value, column key + "_std" -> spread (optional)}; a
        missing value shows ``notes[row]`` or ``—``.
    columns : list of Column
    rows : list of str, optional
        Row order (default: ``results`` order).
    ranks : dict, optional
        row -> mean rank; adds a "mean rank" column.
    notes : dict, optional
        row -> text shown in the cells without a value (e.g. "failed").
    bold_best : bool
        Bold the best value of each ranked column.

    Example
    -------
    >>> print(markdown_table({"a": {"acc": 81.234, "acc_std": 2.0}, "b": {"acc": 80.0}, "c": {}},
    ...                      [Column("acc", "Acc (%)")]))
    | upstream | Acc (%) ↑ |
    |---|---|
    | a | **81.23 ± 2.00** |
    | b | 80.00 ≈ |
    | c | — |
    """
    rows = list(results) if rows is None else list(rows)
    notes = notes or {}
    best = {}
    for c in columns:
        have = [(r, _number(results.get(r, {}).get(c.key))) for r in rows]
        have = [(r, v) for r, v in have if v is not None]
        if have and c.ranked:
            best[c.key] = (max if c.higher_better else min)(have, key=lambda rv: rv[1])
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
            std = _std(results, r, c.key)
            if std is not None:
                text += " ± " + c.fmt.format(std)
            if c.key in best:
                b_row, b_val = best[c.key]
                if b_val == v:
                    text = f"**{text}**" if bold_best and not c.useless(v) else text
                elif within_spread(v, b_val, std, _std(results, b_row, c.key)):
                    text += " " + SPREAD_MARK
            cells.append(text)
        if ranks is not None:
            cells.append("—" if ranks.get(r) is None else f"{ranks[r]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Spreads and rankings
# ----------------------------------------------------------------------------------------------
def mean_std(values):
    """Mean, population standard deviation (ddof=0) and count of the finite values.

    Example
    -------
    >>> mean_std([1.0, 3.0, None, float("nan")])
    (2.0, 1.0, 2)
    >>> mean_std([])
    (None, None, 0)
    """
    vals = np.array([v for v in (_number(x) for x in values) if v is not None and math.isfinite(v)], dtype=float)
    if not len(vals):
        return None, None, 0
    return float(vals.mean()), float(vals.std()), int(len(vals))


def within_spread(a, b, std_a=None, std_b=None):
    """True when ``|a - b|`` is smaller than the spread, the larger of the two stds.

    Without any spread (one seed, no folds) nothing is "within the spread": False.

    Example
    -------
    >>> within_spread(60.0, 61.0, 1.5, 0.2), within_spread(60.0, 62.0, 1.5, 0.2), within_spread(1, 1.1)
    (True, False, False)
    """
    spread = max([s for s in (_number(std_a), _number(std_b)) if s is not None], default=0.0)
    return spread > 0 and abs(float(a) - float(b)) < spread


def ranking(results, column, rows=None):
    """The rows having a value for ``column``, best first (ties keep the row order)."""
    rows = list(results) if rows is None else list(rows)
    have = [r for r in rows if _number(results.get(r, {}).get(column.key)) is not None]
    sign = -1.0 if column.higher_better else 1.0
    return sorted(have, key=lambda r: sign * float(results[r][column.key]))


def ranking_text(results, column, rows=None):
    """``"mgf (70.00) better than fbank (60.00) ≈ random (59.50)"``, best first whatever the
    metric's direction (an EER: ``random (25.00) better than mgf (35.00)``): ``≈`` joins
    neighbours whose difference is smaller than the spread, ``=`` equal values.

    Example
    -------
    >>> ranking_text({"a": {"x": 1.0, "x_std": 0.5}, "b": {"x": 2.0}, "c": {"x": 0.8}}, Column("x", "x"))
    'b (2.00) better than a (1.00) ≈ c (0.80)'
    """
    order = ranking(results, column, rows)
    parts = []
    for i, r in enumerate(order):
        v = float(results[r][column.key])
        if i:
            p = order[i - 1]
            pv = float(results[p][column.key])
            same = within_spread(v, pv, _std(results, r, column.key), _std(results, p, column.key))
            parts.append("=" if v == pv else SPREAD_MARK if same else "better than")
        parts.append(f"{r} ({column.fmt.format(v)})")
    return " ".join(parts)


def compare(a, b, higher_better, std_a=None, std_b=None):
    """``"better"``, ``"level"`` or ``"worse"``: ``a`` against ``b`` on a metric; level when equal or
    when the difference is smaller than the spread (:func:`within_spread`).

    Example
    -------
    >>> compare(60, 55, True), compare(20, 25, False), compare(60, 61, True, 1.5), compare(60, 61, True)
    ('better', 'better', 'level', 'worse')
    """
    a, b = float(a), float(b)
    if a == b or within_spread(a, b, std_a, std_b):
        return "level"
    return "better" if (a > b) == bool(higher_better) else "worse"


def verdict_lines(results, groups, subject="mgf", others=None):
    """The report's opening: per task, is ``subject`` better, level or worse than each other row?

    Arguments
    ---------
    results : dict
        row -> {key -> value, key + "_std" -> spread}.
    groups : list of (str, list of Column)
        A task's title and its ranked columns (a metric under each head).
    subject : str
        The row judged (MGF).
    others : list of str, optional
        The rows it is judged against (default: every other row of ``results``).

    Returns
    -------
    list of str
        Markdown: for each task, its title, then one line per other row, e.g.
        ``- vs fbank: **worse** on TIMIT frame acc (%) · linear (28.90 vs 33.00, -4.10; no spread: one seed)``.

    Example
    -------
    >>> res = {"mgf": {"acc": 60.0, "acc_std": 1.0}, "fbank": {"acc": 55.0, "acc_std": 1.0}}
    >>> verdict_lines(res, [("TIMIT", [Column("acc", "frame acc")])])
    ['**TIMIT**', '- vs fbank: **better** on frame acc (60.00 vs 55.00, +5.00; spread ±1.00)']
    """
    others = [r for r in (others if others is not None else results) if r != subject]
    lines = []
    for title, cols in groups:
        have = [c for c in cols if _number(results.get(subject, {}).get(c.key)) is not None]
        if not have:
            lines += [f"**{title}**", f"- no result for {subject} yet"]
            continue
        lines.append(f"**{title}**")
        for o in others:
            parts = []
            for c in have:
                ov = _number(results.get(o, {}).get(c.key))
                if ov is None:
                    continue
                sv = _number(results[subject][c.key])
                ss, os_ = _std(results, subject, c.key), _std(results, o, c.key)
                word = compare(sv, ov, c.higher_better, ss, os_)
                spread = max([x for x in (ss, os_) if x is not None], default=None)
                how = f"spread ±{c.fmt.format(spread)}" if spread else "no spread: one seed"
                useless = " (no better than a useless model)" if c.useless(sv) else ""
                parts.append(f"**{word}** on {c.label} ({c.fmt.format(sv)} vs {c.fmt.format(ov)}, "
                             f"{sv - ov:+.2f}; {how}){useless}")
            if parts:
                lines.append(f"- vs {o}: " + "; ".join(parts))
    return lines


def ranking_changes(results, columns, rows=None):
    """Compares the rankings of the same metric under several heads.

    Arguments
    ---------
    results : dict
        row -> {key -> value, key + "_std" -> spread}.
    columns : list of Column
        The same metric under each head (e.g. TIMIT accuracy, linear and bilstm).
    rows : list of str, optional

    Returns
    -------
    dict
        ``orders``: column key -> rows best first; ``changed``: bool (some pair of rows,
        both ranked under two heads, is strictly ordered differently: a tie under one head
        is not a change); ``swaps``: list of
        ``(row_a, row_b, key_1, key_2, within)``, one per swapped pair, ``within`` being
        True when the pair's difference is smaller than the spread under at least one of
        the two heads (so the change is not a real one: one of the two orders is not).

    Example
    -------
    >>> cols = [Column("acc/linear", "lin"), Column("acc/bilstm", "bi")]
    >>> r = ranking_changes({"a": {"acc/linear": 2, "acc/bilstm": 1}, "b": {"acc/linear": 1, "acc/bilstm": 3}}, cols)
    >>> r["changed"], r["swaps"]
    (True, [('a', 'b', 'acc/linear', 'acc/bilstm', False)])
    """
    orders = {c.key: ranking(results, c, rows) for c in columns}
    swaps = []
    for i, c1 in enumerate(columns):
        for c2 in columns[i + 1:]:
            pos1 = {r: k for k, r in enumerate(orders[c1.key])}
            pos2 = {r: k for k, r in enumerate(orders[c2.key])}
            common = [r for r in orders[c1.key] if r in pos2]
            for a_i, a in enumerate(common):
                for b in common[a_i + 1:]:
                    d1 = float(results[a][c1.key]) - float(results[b][c1.key])
                    d2 = float(results[a][c2.key]) - float(results[b][c2.key])
                    if d1 * d2 < 0:  # both directions are the same metric: a sign flip is a swap (ties are not)
                        within = any(within_spread(results[a][c.key], results[b][c.key], _std(results, a, c.key),
                                                   _std(results, b, c.key)) for c in (c1, c2))
                        swaps.append((a, b, c1.key, c2.key, within))
    return {"orders": orders, "changed": bool(swaps), "swaps": swaps}


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


# The plots live in mgf_sb.report_plots; re-exported here for callers.
from mgf_sb.report_plots import (DPI, PALETTE, bar_chart_png, bar_chart_size, layer_weights_png,  # noqa: E402,F401
                                 layer_weights_size, loss_curves_png, loss_curves_size)
