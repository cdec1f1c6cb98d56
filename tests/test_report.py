"""mgf_sb.report: spreads, rankings under several heads, and the matplotlib plots (real PNGs, exact sizes)."""

import matplotlib.image as mpimg
import numpy as np
import pytest

from mgf_sb import report as rp


def rgb(hex_colour):
    return np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])


def count_colour(img, hex_colour, tol=3):
    """Pixels of ``img`` (H, W, 4 floats from imread) within ``tol`` of ``hex_colour``."""
    px = (img[..., :3] * 255).round().astype(int)
    return int((np.abs(px - rgb(hex_colour)).sum(-1) <= tol).sum())


# ----------------------------------------------------------------------------------------------
# Spreads and rankings
# ----------------------------------------------------------------------------------------------
def test_mean_std_and_within_spread():
    values = np.random.RandomState(0).normal(50.0, 2.0, size=400)
    mean, std, n = rp.mean_std(list(values) + [None, float("nan")])
    assert n == 400 and abs(mean - 50.0) < 0.4 and abs(std - 2.0) < 0.3
    assert std == pytest.approx(np.std(values))  # population std (ddof=0), as the IEMOCAP folds
    assert rp.within_spread(50.0, 51.0, 1.5, None) and not rp.within_spread(50.0, 52.0, 1.5, 0.1)
    assert not rp.within_spread(50.0, 50.5)  # no spread measured: never "within"


def test_ranking_text_marks_neighbours_within_the_spread():
    col = rp.Column("wer", "WER", higher_better=False)
    res = {"a": {"wer": 20.0, "wer_std": 3.0}, "b": {"wer": 22.0, "wer_std": 1.0}, "c": {"wer": 30.0},
           "d": {"wer": None}}
    assert rp.ranking(res, col) == ["a", "b", "c"]
    assert rp.ranking_text(res, col) == "a (20.00) ≈ b (22.00) better than c (30.00)"
    res["d"]["wer"] = 30.0
    assert rp.ranking_text(res, col) == "a (20.00) ≈ b (22.00) better than c (30.00) = d (30.00)"


def test_ranking_changes_between_heads():
    lin, big = rp.Column("acc/linear", "acc"), rp.Column("acc/bilstm", "acc")
    same = {"a": {"acc/linear": 70, "acc/bilstm": 80}, "b": {"acc/linear": 60, "acc/bilstm": 75}}
    assert rp.ranking_changes(same, [lin, big])["changed"] is False
    tie = {"a": {"acc/linear": 70, "acc/bilstm": 80}, "b": {"acc/linear": 70, "acc/bilstm": 75}}
    assert rp.ranking_changes(tie, [lin, big])["changed"] is False  # a tie broken is not a swap
    swapped = {"a": {"acc/linear": 70, "acc/linear_std": 1, "acc/bilstm": 74, "acc/bilstm_std": 1},
               "b": {"acc/linear": 60, "acc/linear_std": 1, "acc/bilstm": 80, "acc/bilstm_std": 1},
               "c": {"acc/linear": 50, "acc/bilstm": 40}}
    r = rp.ranking_changes(swapped, [lin, big])
    assert r["orders"] == {"acc/linear": ["a", "b", "c"], "acc/bilstm": ["b", "a", "c"]}
    assert r["swaps"] == [("a", "b", "acc/linear", "acc/bilstm", False)]  # 10 and 6 points, spread 1: real
    swapped["a"]["acc/bilstm_std"] = 7.0  # under bilstm the 6-point gap is now inside the spread
    assert rp.ranking_changes(swapped, [lin, big])["swaps"][0][-1] is True


def test_table_marks_differences_smaller_than_the_spread():
    cols = [rp.Column("ua", "UA"), rp.Column("ua/convex", "UA convex", ranked=False)]
    res = {"mgf": {"ua": 60.0, "ua_std": 4.0, "ua/convex": 70.0}, "fbank": {"ua": 57.0, "ua_std": 1.0,
                                                                             "ua/convex": 65.0},
           "random": {"ua": 40.0, "ua_std": 2.0}}
    lines = rp.markdown_table(res, cols).splitlines()
    assert lines[2] == "| mgf | **60.00 ± 4.00** | 70.00 |"  # a reference column is never bolded
    assert lines[3] == "| fbank | 57.00 ± 1.00 ≈ | 65.00 |"  # 3 < 4: not a real difference
    assert lines[4] == "| random | 40.00 ± 2.00 | — |"
    assert rp.Column("x", "x", ranked=False).to_dict()["ranked"] is False


# ----------------------------------------------------------------------------------------------
# Plots: valid PNGs of the documented pixel size, drawn with the data
# ----------------------------------------------------------------------------------------------
def test_bar_chart(tmp_path):
    path = rp.bar_chart_png(str(tmp_path / "bars.png"), ["acc\nlinear", "acc\nbilstm", "EER"],
                            {"mgf": [70.0, 30.0, 10.0], "fbank": [20.0, None, 12.0]},
                            errors={"mgf": [2.0, None, 1.0], "fbank": [1.0, None, None]}, title="t", ylabel="%")
    img = mpimg.imread(path)
    w, h = rp.bar_chart_size(3, 2)
    assert img.shape == (h, w, 4)
    n_mgf, n_fbank = count_colour(img, rp.PALETTE[0]), count_colour(img, rp.PALETTE[1])
    # bar areas follow the values: mgf 70+30+10 = 110 vs fbank 20+12 = 32 (+ the legend swatches)
    assert n_mgf > 2.5 * n_fbank > 0
    big = rp.bar_chart_png(str(tmp_path / "big.png"), ["a"], {"x": [1.0]}, size=(800, 300))
    assert mpimg.imread(big).shape == (300, 800, 4)


def dark_inside_bars(img, colour):
    """Dark pixels with the bar ``colour`` 3 px to their left and right: a line drawn over a bar."""
    px = (img[..., :3] * 255).round().astype(int)
    bar = np.abs(px - rgb(colour)).sum(-1) <= 3
    dark = px.sum(-1) < 150
    return int((dark[:, 3:-3] & bar[:, :-6] & bar[:, 6:]).sum())


def test_bar_chart_draws_error_bars(tmp_path):
    kw = dict(groups=["a", "b"], series={"mgf": [50.0, 40.0]})
    plain = mpimg.imread(rp.bar_chart_png(str(tmp_path / "p.png"), **kw))
    with_err = mpimg.imread(rp.bar_chart_png(str(tmp_path / "e.png"), errors={"mgf": [8.0, None]}, **kw))
    # the lower half of an error bar (black) runs down inside its bar; only the first bar has one
    assert dark_inside_bars(plain, rp.PALETTE[0]) == 0
    assert dark_inside_bars(with_err, rp.PALETTE[0]) > 15


def test_layer_weights_heat_map(tmp_path):
    weights = {"timit / linear": [0.0, 0.25, 0.75], "iemocap / attentive": [0.5, 0.5]}
    img = mpimg.imread(rp.layer_weights_png(str(tmp_path / "lw.png"), weights, title="mgf"))
    w, h = rp.layer_weights_size(2, 3)
    assert img.shape == (h, w, 4)
    # the largest weight gets viridis' top colour, a zero weight its bottom colour (cells are large)
    assert count_colour(img, "#fde725", tol=12) > 500 and count_colour(img, "#440154", tol=12) > 500


def test_loss_curves_panels_and_size(tmp_path):
    panels = {"frame": {"train": ([1, 2, 3], [0.9, 0.8, 0.7]), "valid": ([1, 2, 3], [1.0, 0.95, float("nan")])},
              "phoneme": {}}
    img = mpimg.imread(rp.loss_curves_png(str(tmp_path / "l.png"), panels, title="loss"))
    assert img.shape == (rp.loss_curves_size(2)[1], rp.loss_curves_size(2)[0], 4)
    assert count_colour(img, rp.PALETTE[0]) > 50 and count_colour(img, rp.PALETTE[1]) > 30


# ----------------------------------------------------------------------------------------------
# The report answers the question (issue 29)
# ----------------------------------------------------------------------------------------------
def test_lower_is_better_ranking_says_better_not_greater():
    col = rp.Column("eer", "EER (%)", higher_better=False)
    assert rp.ranking_text({"mgf": {"eer": 35.0}, "random": {"eer": 25.0}}, col) == \
        "random (25.00) better than mgf (35.00)"


def test_a_useless_best_value_is_not_bolded():
    col = rp.Column("wer", "WER (%)", higher_better=False, no_skill=100.0)
    lines = rp.markdown_table({"a": {"wer": 100.0}, "b": {"wer": 143.8}}, [col]).splitlines()
    assert lines[2] == "| a | 100.00 |"  # the best of two useless values is not marked best
    lines = rp.markdown_table({"a": {"wer": 40.0}, "b": {"wer": 143.8}}, [col]).splitlines()
    assert lines[2] == "| a | **40.00** |"
    assert col.like("wer/linear", "WER · linear").no_skill == 100.0


def test_verdict_per_task_better_level_worse_with_the_spread():
    acc, eer = rp.Column("acc", "acc"), rp.Column("eer", "EER", higher_better=False)
    res = {"mgf": {"acc": 60.0, "acc_std": 2.0, "eer": 30.0}, "fbank": {"acc": 61.0, "acc_std": 1.0, "eer": 20.0},
           "random": {"acc": 50.0, "acc_std": 1.0, "eer": 40.0}}
    lines = rp.verdict_lines(res, [("Task A", [acc]), ("Task B", [eer]), ("Task C", [rp.Column("x", "x")])])
    assert lines == [
        "**Task A**",
        "- vs fbank: **level** on acc (60.00 vs 61.00, -1.00; spread ±2.00)",
        "- vs random: **better** on acc (60.00 vs 50.00, +10.00; spread ±2.00)",
        "**Task B**",
        "- vs fbank: **worse** on EER (30.00 vs 20.00, +10.00; no spread: one seed)",
        "- vs random: **better** on EER (30.00 vs 40.00, -10.00; no spread: one seed)",
        "**Task C**",
        "- no result for mgf yet",
    ]


def test_bar_chart_puts_each_direction_on_its_own_axis(tmp_path):
    groups, series = ["acc", "WER"], {"mgf": [60.0, 150.0]}
    one = rp.bar_chart_png(str(tmp_path / "one.png"), groups, series)
    two = rp.bar_chart_png(str(tmp_path / "two.png"), groups, series, lower_better=[False, True])
    # one shared axis: the 150 bar dwarfs the 60 one; two axes: each bar fills its own axis
    def bar_heights(path):
        img = mpimg.imread(path)
        px = (img[..., :3] * 255).round().astype(int)
        mask = np.abs(px - rgb(rp.PALETTE[0])).sum(-1) <= 3
        cols = np.where(mask.any(0))[0]
        runs = np.split(cols, np.where(np.diff(cols) > 1)[0] + 1)
        heights = [int(mask[:, r].any(1).sum()) for r in runs]
        return [h for h in heights if h > 20]  # bars, not the legend swatch
    h1, h2 = bar_heights(one), bar_heights(two)
    assert len(h1) == 2 and len(h2) == 2
    assert h1[0] < 0.5 * h1[1]  # shared axis
    assert h2[0] > 0.7 * h2[1]  # own axes
