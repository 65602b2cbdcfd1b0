"""Metrics from confusion counts against scikit-learn and brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from pipeline.metrics import (
    ConfusionAccumulator,
    ari_from_counts,
    cluster_scores,
    confusion_counts,
    matched_names,
    nmi_from_counts,
)


def counts_of(pred: np.ndarray, target: np.ndarray, k: int, m: int) -> np.ndarray:
    return confusion_counts(torch.from_numpy(pred), torch.from_numpy(target), k, m).numpy()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 100_000),
    k=st.integers(1, 8),
    m=st.integers(1, 8),
    n=st.integers(1, 300),
)
def test_nmi_and_ari_equal_sklearn(seed, k, m, n):
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, k, n)
    target = rng.integers(0, m, n)
    if seed % 3 == 0:  # correlated labelings too, not only independent ones
        target = np.where(rng.random(n) < 0.7, pred % m, target)
    counts = counts_of(pred, target, k, m)
    assert nmi_from_counts(counts) == pytest.approx(
        normalized_mutual_info_score(target, pred), abs=1e-10
    )
    assert ari_from_counts(counts) == pytest.approx(adjusted_rand_score(target, pred), abs=1e-10)


def brute_force_acc(counts: np.ndarray) -> float:
    k, m = counts.shape
    best = 0
    # every injective assignment of classes to clusters (clusters may stay unmatched when k > m)
    for classes in itertools.permutations(range(max(k, m)), k):
        best = max(best, sum(counts[i, c] for i, c in enumerate(classes) if c < m))
    return best / counts.sum()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 100_000), k=st.integers(1, 5), m=st.integers(1, 5))
def test_hungarian_acc_equals_best_permutation(seed, k, m):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 50, size=(k, m))
    counts[0, 0] += 1  # never empty
    assert cluster_scores(counts).acc == pytest.approx(brute_force_acc(counts), abs=1e-12)


def test_majority_mapping_for_overclustering():
    # 4 clusters, 2 classes: clusters 0 and 2 are mostly class 1, 1 and 3 mostly class 0.
    counts = np.array([[1, 9], [8, 2], [0, 5], [7, 3]])
    scores = cluster_scores(counts, many_to_one=True)
    assert scores.mapping == (1, 0, 1, 0)
    assert scores.acc == pytest.approx((9 + 8 + 5 + 7) / counts.sum())
    one_to_one = cluster_scores(counts)
    assert one_to_one.acc == pytest.approx((9 + 8) / counts.sum())
    assert sorted(c for c in one_to_one.mapping if c >= 0) == [0, 1]


def test_counts_ignore_index_and_valid_mask():
    pred = torch.tensor([[0, 1, 2], [2, 1, 0]])
    target = torch.tensor([[0, 255, 1], [1, 1, 0]])
    valid = torch.tensor([[True, True, True], [True, False, True]])
    counts = confusion_counts(pred, target, 3, 2, valid=valid)
    want = np.zeros((3, 2), int)
    for p, t in [(0, 0), (2, 1), (2, 1), (0, 0)]:
        want[p, t] += 1
    assert counts.numpy().tolist() == want.tolist()


def test_streamed_and_merged_counts_equal_one_pass():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 6, size=(10, 16, 16))
    target = rng.integers(0, 3, size=(10, 16, 16))
    target[rng.random(target.shape) < 0.1] = 255
    whole = counts_of(pred.ravel(), target.ravel(), 6, 3)
    workers = [ConfusionAccumulator(6, 3), ConfusionAccumulator(6, 3)]
    for i in range(10):  # batches alternate between two "workers"
        workers[i % 2].update(torch.from_numpy(pred[i]), torch.from_numpy(target[i]))
    merged = workers[0].counts + workers[1].counts  # what all_reduce does across workers
    assert merged.numpy().tolist() == whole.tolist()
    assert cluster_scores(merged).n == int((target != 255).sum())


def test_perfect_clustering_under_relabelling():
    target = np.repeat(np.arange(4), 25)
    pred = (target + 2) % 4
    scores = cluster_scores(counts_of(pred, target, 4, 4))
    assert scores.acc == 1.0 and scores.nmi == pytest.approx(1.0) and scores.ari == 1.0
    assert scores.mapping == (2, 3, 0, 1)


def test_large_counts_do_not_overflow():
    # 1e10 pixels: n^2 exceeds int64, the pair counts must stay exact.
    counts = np.array([[4_000_000_000, 1_000_000_000], [1_000_000_000, 4_000_000_000]])
    small = counts // 1_000_000_000
    assert ari_from_counts(counts) == pytest.approx(ari_from_counts(small * 1_000_000), rel=1e-5)
    assert 0 < ari_from_counts(counts) < 1


def test_empty_counts_are_a_clear_error():
    with pytest.raises(ValueError, match="no counted pixels"):
        cluster_scores(np.zeros((3, 3), int))


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="pred shape"):
        confusion_counts(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 2, 2)


def test_matched_names_follow_the_hungarian_matching():
    classes = ["roads", "buildings", "trees"]
    counts = np.array([[0, 7, 1], [6, 0, 2], [1, 1, 9], [0, 2, 0]])
    # More clusters than classes: the one left unmatched has no name.
    assert matched_names(counts, classes) == ["buildings", "roads", "trees", ""]
    assert matched_names(torch.from_numpy(counts[:2]), classes) == ["buildings", "roads"]
    # Data without labels: nothing counted, nothing named (a matching of zeros is arbitrary).
    assert matched_names(np.zeros((3, 3), int), classes) == ["", "", ""]
    with pytest.raises(ValueError, match=r"counts of shape \(4, 3\) for 2 class names"):
        matched_names(counts, classes[:2])


@pytest.mark.parametrize(
    "seed, k, m, many", [(0, 3, 3, False), (1, 5, 3, False), (2, 5, 3, True), (3, 2, 4, False)]
)
def test_miou_equals_a_brute_force_count_over_pixels(seed, k, m, many):
    from pipeline.metrics import cluster_scores

    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 20, (k, m))
    counts[:, -1] = 0 if m == 4 else counts[:, -1]  # a class never present (m = 4)
    scores = cluster_scores(counts, many_to_one=many)
    # Every pixel spelled out: its cluster, its truth, its predicted class (-1: none).
    clusters = np.repeat(np.repeat(np.arange(k), m), counts.ravel())
    truth = np.repeat(np.tile(np.arange(m), k), counts.ravel())
    pred = np.array(scores.mapping)[clusters]
    want = []
    for c in range(m):
        inter = np.sum((pred == c) & (truth == c))
        union = np.sum((pred == c) | (truth == c))
        want.append(inter / union if union else np.nan)
    np.testing.assert_allclose(scores.iou, want)
    assert scores.miou == pytest.approx(np.nanmean(want))
