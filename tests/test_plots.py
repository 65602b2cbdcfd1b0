"""The run's figures read at a glance: what each shows, checked on the figure objects and on the
pure functions that build their pixels (nothing here looks at a PNG's pixels)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from matplotlib import pyplot as plt

from pipeline import IGNORE_INDEX, plots
from pipeline.evaluate import Evaluation
from pipeline.metrics import cluster_scores

CLASSES = ["roads", "buildings", "vegetation"]


def evaluation(counts: np.ndarray, examples: list | None = None) -> Evaluation:
    """One sub-head's evaluation of ``counts`` (K, M), with a diagonal joint."""
    k = counts.shape[0]
    return Evaluation(
        counts=counts[None],
        losses=np.zeros(1),
        joints=(np.eye(k) / k)[None],
        mi=np.array([np.log(k)]),
        scores=[cluster_scores(counts) if counts.sum() else None],
        best=0,
        masses=np.full((1, k), 1 / k),
        agreement=np.full(1, np.nan),
        examples=examples or [],
    )


def texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_joint_ticks_are_cluster_ids_thinned_for_many_clusters():
    for k, expected in ((3, ["0", "1", "2"]), (70, [str(t) for t in range(0, 70, 10)])):
        fig = plots.plot_joint(np.eye(k) / k, mi=float(np.log(k)))
        fig.canvas.draw()  # the labels the PNG shows
        for ax in fig.axes[:2]:
            for axis in (ax.xaxis, ax.yaxis):
                assert [t.get_text() for t in axis.get_ticklabels()] == expected
        plots.close(fig)


def test_integer_ticks_choose_round_steps():
    assert plots.integer_ticks(1).tolist() == [0]
    assert plots.integer_ticks(12).tolist() == list(range(12))
    assert plots.integer_ticks(13).tolist() == list(range(0, 13, 2))
    assert plots.integer_ticks(45).tolist() == list(range(0, 45, 5))


def test_confusion_cells_show_counts_fractions_names_and_iou():
    counts = np.array([[8, 2, 0], [1, 1, 3], [0, 6, 2]])
    scores = cluster_scores(counts)  # mapping 0 -> roads, 1 -> vegetation, 2 -> buildings
    fig = plots.plot_confusion(counts, CLASSES, subhead=2)
    shown = texts(fig)
    # rows in the order of the matched classes: z=0, then z=2 (buildings), then z=1
    assert shown[:9] == [
        "8\n0.80", "2\n0.20", "0\n0.00",
        "0\n0.00", "6\n0.75", "2\n0.25",
        "1\n0.20", "1\n0.20", "3\n0.60",
    ]  # fmt: skip
    assert shown[9:] == [f"{v:.2f}" for v in scores.iou]
    matrix = fig.axes[0]
    assert [t.get_text() for t in matrix.get_xticklabels()] == CLASSES
    assert [t.get_text() for t in matrix.get_yticklabels()] == [
        "z=0 → roads",
        "z=2 → buildings",
        "z=1 → vegetation",
    ]
    title = fig.get_suptitle()
    assert f"ACC {scores.acc:.3f}" in title and f"mIoU {scores.miou:.3f}" in title
    assert "sub-head 2" in title
    plots.close(fig)


def test_confusion_of_overclustering_with_an_empty_row_warns_nothing():
    counts = np.array([[50, 1, 0], [0, 0, 0], [2, 40, 1], [0, 3, 30], [9, 0, 0], [0, 0, 4]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plots.plot_confusion(counts, CLASSES)
        fig.canvas.draw()
    names = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert names[:3] == ["z=0 → roads", "z=2 → buildings", "z=3 → vegetation"]
    assert names[3:] == ["z=1 (unmatched)", "z=4 (unmatched)", "z=5 (unmatched)"]
    shown = texts(fig)
    assert shown[9:12] == ["0\n–"] * 3  # the empty row: no fraction to show, no NaN
    assert "nan" not in " ".join(shown).lower()
    plots.close(fig)


def test_row_fractions_of_an_empty_row_are_zero_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = plots.row_fractions(np.array([[0, 0], [1, 3]]))
    np.testing.assert_array_equal(out, [[0, 0], [0.25, 0.75]])


def test_count_text_stays_short():
    assert plots.count_text(999_999) == "999,999"
    assert plots.count_text(1_234_567) == "1.23M"
    assert plots.count_text(5_000_000_000) == "5G"


def test_errors_mark_exactly_where_the_matched_prediction_disagrees():
    mapping = np.array([2, 0, -1])  # cluster 2 matched to no class
    pred = np.array([[0, 1, 2], [0, 1, 0]])
    truth = np.array([[2, 1, 0], [IGNORE_INDEX, 0, 2]])
    valid = np.array([[True, True, True], [True, True, False]])
    wrong = np.array([[False, True, True], [False, False, False]])
    np.testing.assert_array_equal(plots.error_mask(pred, truth, mapping, valid), wrong)

    image = np.full((3, 2, 3), 0.2)
    rgb = plots.error_image(pred, truth, mapping, image, valid)
    red = np.all(rgb == plots.ERROR_RGB, axis=-1)
    grey = np.all(rgb == plots.IGNORED_RGB, axis=-1)
    np.testing.assert_array_equal(red, wrong)
    np.testing.assert_array_equal(grey, [[False, False, False], [True, False, True]])
    # right pixels: the image, faded
    np.testing.assert_allclose(rgb[0, 0], plots.FADE * 0.2 + 1 - plots.FADE)


def test_ignored_pixels_are_grey_and_unmatched_clusters_are_not():
    label = np.array([[0, 1], [IGNORE_INDEX, 2]])
    rgb = plots.label_rgb(label, 3)
    palette = plots.class_palette(3)
    np.testing.assert_array_equal(rgb[1, 0], plots.IGNORED_RGB)
    np.testing.assert_array_equal(rgb[[0, 0, 1], [0, 1, 1]], palette[[0, 1, 2]])
    no_data = plots.label_rgb(label, 3, valid=np.array([[True, False], [True, True]]))
    np.testing.assert_array_equal(no_data[0, 1], plots.IGNORED_RGB)

    pred = plots.prediction_rgb(
        np.array([[0, 1], [2, 2]]), np.array([1, -1, 0]), 3, np.array([[True, True], [True, False]])
    )
    np.testing.assert_array_equal(pred[0, 0], palette[1])
    np.testing.assert_array_equal(pred[0, 1], plots.UNMATCHED_RGB)
    np.testing.assert_array_equal(pred[1, 1], plots.IGNORED_RGB)
    assert not np.allclose(plots.UNMATCHED_RGB, plots.IGNORED_RGB)


def test_class_palette_has_no_grey_to_confuse_with_ignored():
    for n in (3, 9, 10, 27):
        colours = plots.class_palette(n)
        assert len(colours) == n
        assert (colours.max(axis=1) - colours.min(axis=1) > 0.05).all(), n
    assert len({tuple(c) for c in plots.class_palette(9)}) == 9


def test_masses_use_no_class_colour_and_count_epochs_from_one():
    history = [{"epoch": e, "mass_0": 0.2, "mass_1": 0.3, "mass_2": 0.5} for e in range(3)]
    fig = plots.plot_masses(history)
    ax = fig.axes[0]
    lines = [line for line in ax.get_lines() if line.get_label().startswith("z=")]
    assert [line.get_label() for line in lines] == ["z=0", "z=1", "z=2"]
    assert all(list(line.get_xdata()) == [1, 2, 3] for line in lines)
    colours = np.array([matplotlib_rgb(line.get_color()) for line in lines])
    for palette in (plots.class_palette(3), plots.class_palette(10)):
        distance = np.linalg.norm(colours[:, None] - palette[None], axis=-1)
        assert distance.min() > 0.15
    fig.canvas.draw()
    assert all(t.get_text().isdigit() for t in ax.get_xticklabels() if t.get_text())
    assert ax.get_ylabel() == "fraction of pixels"
    plots.close(fig)


def matplotlib_rgb(colour) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(colour)


def example(size: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    truth = np.zeros((size, size), dtype=np.uint8)
    truth[:, size // 2 :] = 1
    truth[0] = IGNORE_INDEX
    pred = truth.astype(np.int64) % 2
    pred[-1] = 0
    return np.full((3, size, size), 0.5), pred, truth


def test_overlays_have_an_errors_column_and_an_ignored_legend_entry():
    ev = evaluation(np.array([[30, 2], [1, 25]]), [example(), example()])
    fig = plots.overlay_figure(ev, ["a", "b"])
    titles = [ax.get_title() for ax in fig.axes[:4]]
    assert titles == ["image", "prediction (matched)", "ground truth", "errors"]
    assert len(fig.axes) == 8
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["a", "b", "ignored / no data", "prediction ≠ truth"]
    assert "7% wrong" in texts(fig)  # 4 of the 56 labelled pixels
    plots.close(fig)


def test_overlays_without_labels_show_the_clusters_and_no_data():
    image, pred, truth = example()
    valid = np.ones(pred.shape, dtype=bool)
    valid[:2, :2] = False  # an example that keeps its no-data mask
    ev = evaluation(np.zeros((2, 2), dtype=np.int64), [example(), (image, pred, truth, valid)])
    fig = plots.overlay_figure(ev, ["a", "b"])
    assert [ax.get_title() for ax in fig.axes[:2]] == ["image", "clusters"]
    assert len(fig.axes) == 4
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["z=0", "z=1", "no data"]
    shown = fig.axes[3].get_images()[0].get_array()
    np.testing.assert_array_equal(shown[0, 0], plots.IGNORED_RGB)
    plots.close(fig)


@pytest.mark.parametrize("k", [3, 6])
def test_write_plots_draws_the_errors_and_warns_nothing(tmp_path, k):
    counts = np.zeros((k, 3), dtype=np.int64)
    counts[np.arange(k), np.arange(k) % 3] = 100
    counts[-1] = 0
    history = [{"epoch": e, "epochs_done": e + 1, "mass_0": 1.0} for e in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = plots.write_plots(evaluation(counts, [example()]), CLASSES, history, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["confusion.json", "confusion.png", "joint.png", "masses.png", "overlays.png"]
    png = plt.imread(tmp_path / "overlays.png")[..., :3]
    red = np.abs(png - plots.ERROR_RGB).max(axis=-1) < 2 / 255
    assert red.sum() > 100  # the errors column's wrong pixels, drawn large
