"""Network shapes, probability outputs, heads, Sobel input, and that they learn."""

from __future__ import annotations

import pytest
import torch

from pipeline.losses import iid_clustering_loss, iid_segmentation_loss
from pipeline.models import ClusterNet, SegmentationNet, Sobel


@pytest.mark.parametrize("in_channels", [3, 4])
@pytest.mark.parametrize("sobel", ["none", "append", "replace"])
def test_segmentation_net_outputs_probabilities_at_input_size(in_channels, sobel):
    net = SegmentationNet(in_channels, n_clusters_a=6, n_clusters_b=3, n_subheads=2, sobel=sobel)
    x = torch.randn(2, in_channels, 34, 30)
    for head, k in (("A", 6), ("B", 3)):
        outs = net(x, head=head)
        assert len(outs) == 2
        for out in outs:
            assert out.shape == (2, k, 34, 30)
            assert torch.allclose(out.sum(1), torch.ones(2, 34, 30), atol=1e-5)
            assert (out >= 0).all()
    # independent sub-heads: different initialisations, different outputs
    assert not torch.allclose(outs[0], outs[1])


def test_trunk_matches_reference_architecture():
    net = SegmentationNet(3)
    convs = [m for m in net.trunk if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512]
    assert [c.dilation[0] for c in convs] == [1, 1, 1, 1, 2, 2]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.trunk) == 1
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.trunk) == 6
    assert net.features(torch.randn(1, 3, 20, 20)).shape == (1, 512, 10, 10)


def test_sobel_channels():
    x = torch.zeros(1, 4, 8, 8)
    x[:, :3, :, 4:] = 1.0  # vertical edge in colour, flat infrared
    x[:, 3] = 0.5
    app = Sobel("append")(x)
    rep = Sobel("replace")(x)
    assert app.shape[1] == 6 and rep.shape[1] == 3
    assert torch.equal(app[:, :4], x)
    assert rep[0, 0, 4, 3].item() > 0  # dx responds at the edge
    assert rep[0, 1, 4, 3].item() == 0  # dy does not
    assert torch.equal(rep[:, 2], x[:, 3])  # infrared kept


def test_wrong_input_channels_is_a_clear_error():
    net = SegmentationNet(4)
    with pytest.raises(ValueError, match=r"expected input \(n, 4, H, W\)"):
        net(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="head must be"):
        net(torch.randn(1, 4, 16, 16), head="C")
    with pytest.raises(ValueError, match="n_clusters_b"):
        SegmentationNet(3, n_clusters_b=1)


@pytest.mark.parametrize("trunk, size", [("small", 8), ("small", 28), ("resnet34", 64)])
def test_cluster_net(trunk, size):
    net = ClusterNet(in_channels=3, n_clusters_a=20, n_clusters_b=5, n_subheads=3, trunk=trunk)
    outs = net(torch.randn(4, 3, size, size), head="A")
    assert len(outs) == 3
    assert all(o.shape == (4, 20) for o in outs)
    assert torch.allclose(outs[0].sum(1), torch.ones(4), atol=1e-5)


def test_bad_trunk_is_a_clear_error():
    with pytest.raises(ValueError, match="trunk must be one of"):
        ClusterNet(trunk="vgg")


def test_segmentation_net_learns_with_iid_loss():
    # Two textures in one image: a few Adam steps must raise the dense MI.
    torch.manual_seed(0)
    x = torch.zeros(2, 3, 24, 24)
    x[:, :, :, :12] = torch.rand(2, 3, 24, 12) * 0.2
    x[:, :, :, 12:] = 0.8 + torch.rand(2, 3, 24, 12) * 0.2
    net = SegmentationNet(3, n_clusters_a=4, n_clusters_b=2, n_subheads=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    first = last = None
    for _ in range(8):
        (p,) = net(x)
        (q,) = net(x + 0.05 * torch.randn_like(x))
        out = iid_segmentation_loss(p, q, half_window=2)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = out.loss.item() if first is None else first
        last = out.loss.item()
    assert last < first


def test_cluster_net_learns_with_iid_loss():
    torch.manual_seed(0)
    centres = torch.randn(3, 1, 8, 8) * 2
    x = centres.repeat(10, 1, 1, 1) + 0.1 * torch.randn(30, 1, 8, 8)
    net = ClusterNet(1, n_clusters_a=6, n_clusters_b=3, n_subheads=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        (p,) = net(x)
        (q,) = net(x + 0.1 * torch.randn_like(x))
        out = iid_clustering_loss(p, q)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]


def test_cluster_net_rescales_every_image_to_its_input_size():
    torch.manual_seed(0)
    net = ClusterNet(1, n_clusters_a=6, n_clusters_b=3, n_subheads=2, input_size=16).eval()
    plain = ClusterNet(1, n_clusters_a=6, n_clusters_b=3, n_subheads=2).eval()
    plain.load_state_dict(net.state_dict())  # the rescale holds no weights
    x = torch.rand(4, 1, 28, 28)
    small = torch.nn.functional.interpolate(
        x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False
    )
    with torch.no_grad():
        for got, want in zip(net(x), plain(small), strict=True):
            torch.testing.assert_close(got, want)
        # An image already at the size passes untouched, whatever size it came from.
        torch.testing.assert_close(net(small)[0], plain(small)[0])
    with pytest.raises(ValueError, match="input_size must be an integer >= 0, got -1"):
        ClusterNet(input_size=-1)
