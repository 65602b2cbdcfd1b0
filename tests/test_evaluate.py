"""Evaluation's label-free choice of sub-head, on real shards with a hand-built model whose two
sub-heads differ in the way that matters: one is balanced but blind to the image, one follows
the image but puts few pixels in its second cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import Config
from pipeline.data.format import label_lut, read_manifest
from pipeline.data.read import iter_tiles
from pipeline.evaluate import Evaluation, evaluate_model, format_evaluation, score
from pipeline.metrics import matched_names
from tests.conftest import small_synthetic

BRIGHT_SHARE = 0.05  # of the pixels in sub-head 1's second cluster


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return small_synthetic(tmp_path_factory.mktemp("evaluate"), seed=3, test_fraction=0.25)


class TwoKindsOfSubhead(torch.nn.Module):
    """Head B with 2 clusters in 2 sub-heads. Sub-head 0: near one-hot noise, fresh at every call
    (balanced, I(z, z') ~ 0). Sub-head 1: "brighter than ``threshold``" (follows the image, so
    both views agree, but only ~5% of pixels are bright)."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold
        self.noise = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor, head: str) -> list[torch.Tensor]:
        n, _, h, w = x.shape
        blind = 20 * torch.randn(n, 2, h, w, generator=self.noise)
        bright = 50 * (x.float().mean(1, keepdim=True) - self.threshold)
        follows = torch.cat([torch.zeros_like(bright), bright], 1)
        return [blind.softmax(1), follows.softmax(1)]


def test_the_chosen_subhead_is_the_most_informative_not_the_lowest_lambda_b_loss(shards):
    cfg = Config.from_dict(
        {
            "data": {"shards": str(shards), "batch_size": 8, "merge": "potsdam3"},
            "model": {"in_channels": 3, "n_clusters_b": 2, "n_subheads": 2},
            "loss": {"lamb_b": 1.5, "half_window": 2},
            "pairs": {"crop": 0, "strength": 0.1},  # mild jitter: brightness stays readable
        }
    )
    images = np.concatenate([im for im, _, _ in iter_tiles(shards, ["test"], 64)])
    brightness = images.astype(np.float64).mean(1)
    threshold = float(np.quantile(brightness, 1 - BRIGHT_SHARE))
    lut, classes = label_lut(read_manifest(shards), "potsdam3")

    ev = evaluate_model(TwoKindsOfSubhead(threshold), cfg, shards, ["test"], lut, len(classes))

    # The case the rule exists for: lambda_B = 1.5 adds the clusters' entropies, so the blind,
    # balanced sub-head has the lower training loss although its views do not agree.
    assert ev.losses[0] < ev.losses[1], ev.losses
    assert ev.mi[0] < 0.01 < 0.05 < ev.mi[1], ev.mi
    assert ev.best == 1
    # P(z, z') as plotted (paper Fig. 2): symmetric, summing to 1 per sub-head; the sub-head that
    # follows the image puts its mass on the diagonal, the blind one spreads it (trace ~0.5).
    assert ev.joints.shape == (2, 2, 2)
    np.testing.assert_allclose(ev.joints.sum(axis=(1, 2)), 1.0)
    np.testing.assert_allclose(ev.joints, ev.joints.transpose(0, 2, 1))
    assert np.trace(ev.joints[1]) > 0.9 > 0.6 > np.trace(ev.joints[0]), ev.joints
    assert ev.summary()["eval_mi"] == pytest.approx(ev.mi[1])
    assert ev.summary()["eval_best_subhead"] == 1.0
    table = format_evaluation(ev, classes).splitlines()
    assert table[3].endswith("<- highest MI (lowest lambda=1 loss)")
    assert "<-" not in table[2]
    mapping = matched_names(ev.counts[1], classes)
    assert table[4].startswith("IoU per class, sub-head 1: ")
    assert table[5] == (
        f"clusters of sub-head 1 matched to classes: 0 -> {mapping[0]}, 1 -> {mapping[1]}"
    )


def test_the_overlay_examples_keep_each_images_no_data_mask():
    cfg = Config.from_dict(
        {
            "data": {"shards": "unused"},
            "model": {"in_channels": 3, "n_clusters_b": 2, "n_subheads": 2},
            "loss": {"half_window": 1},
            "pairs": {"crop": 0},
        }
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 12, 12, generator=gen)
    valid = torch.ones(3, 12, 12, dtype=torch.bool)
    valid[0, :4] = False  # a nodata border on the first image
    labels = torch.zeros(3, 12, 12, dtype=torch.uint8)
    lut = torch.full((256,), 255, dtype=torch.int64)
    lut[0] = 0
    batch = {"x": x, "label": labels, "valid": valid}
    tally = score(TwoKindsOfSubhead(0.5), [batch], cfg, lut, 1, cfg.pairs, n_examples=2)
    examples = Evaluation.of(tally).examples
    assert len(examples) == 2
    np.testing.assert_array_equal(examples[0][3], valid[0].numpy())
    np.testing.assert_array_equal(examples[1][3], valid[1].numpy())
    # Without a mask every pixel has data: the overlays then have nothing to grey out.
    plain = score(TwoKindsOfSubhead(0.5), [{"x": x, "label": labels}], cfg, lut, 1, cfg.pairs, 1)
    assert plain.examples[0][3] is None


class AlikeAlikeBlind(torch.nn.Module):
    """Head B with 2 clusters in 3 sub-heads: "brighter than 0.5", the same with its clusters
    swapped, and fresh noise."""

    def __init__(self):
        super().__init__()
        self.noise = torch.Generator().manual_seed(1)

    def forward(self, x: torch.Tensor, head: str) -> list[torch.Tensor]:
        bright = 50 * (x.mean(1, keepdim=True) - 0.5)
        follows = torch.cat([torch.zeros_like(bright), bright], 1).softmax(1)
        blind = (20 * torch.randn(follows.shape, generator=self.noise)).softmax(1)
        return [follows, follows.flip(1), blind]


def test_sub_head_agreement_is_the_mean_nmi_with_the_others_over_valid_pixels():
    cfg = Config.from_dict(
        {
            "data": {"shards": "unused"},
            "model": {"in_channels": 3, "n_clusters_b": 2, "n_subheads": 3},
            "loss": {"half_window": 1},
            "pairs": {"crop": 0},
        }
    )
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.zeros(4, 16, 16, dtype=torch.uint8)
    valid = torch.ones(4, 16, 16, dtype=torch.bool)
    valid[:, :8] = False  # half of every image has no data: never counted
    lut = torch.zeros(256, dtype=torch.int64)
    batch = {"x": x, "label": labels, "valid": valid}
    ev = Evaluation.of(score(AlikeAlikeBlind(), [batch], cfg, lut, 1, cfg.pairs))
    # The first two partition alike (relabelled): NMI 1 with each other, ~0 with the noise.
    assert ev.agreement[0] == pytest.approx(ev.agreement[1]) and 0.45 < ev.agreement[0] < 0.55
    assert ev.agreement[2] < 0.05
    tally = score(AlikeAlikeBlind(), [batch], cfg, lut, 1, cfg.pairs)
    assert int(tally.between[0, 1].sum()) == int(valid.sum())  # valid pixels only, once each
    assert int(tally.between[1, 0].sum()) == 0
