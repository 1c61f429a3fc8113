"""FDR math against the values measured on the published release (facts §4)."""

import torch

from dfine.ops.fdr import distance2bbox, fdr_decode, weighting_function

# published W for reg_scale 4 (left half incl. the centre) and reg_scale 8
W4_LEFT = [-4, -2, -1.7881, -1.5912, -1.4082, -1.2381, -1.0801, -0.9332, -0.7967, -0.6698, -0.5518, -0.4422,
           -0.3404, -0.2457, -0.1578, -0.0760, 0]
W8_LEFT = [-8, -4, -3.4913, -3.0344, -2.6239, -2.2552, -1.924, -1.6265, -1.3593, -1.1193, -0.9037, -0.71, -0.536,
           -0.3797, -0.2394, -0.1133, 0]


def test_weighting_function_published_values():
    for reg_scale, left in ((torch.tensor([4]), W4_LEFT), (torch.tensor([8.0]), W8_LEFT)):
        w = weighting_function(32, torch.tensor([0.5]), reg_scale)
        assert w.shape == (33,) and w.dtype == torch.float32
        torch.testing.assert_close(w[:17], torch.tensor(left, dtype=torch.float32), rtol=0, atol=1e-4)
        torch.testing.assert_close(w[16:], -w[:17].flip(0), rtol=0, atol=1e-6)


def test_distance2bbox_zero_and_one_edge():
    ref = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    torch.testing.assert_close(distance2bbox(ref, torch.zeros(1, 4), 4), ref)
    # moving the right edge by d = 4 (= reg_scale) widens the box by w
    out = distance2bbox(ref, torch.tensor([[0.0, 0.0, 4.0, 0.0]]), torch.tensor([4]))
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.5, 0.4, 0.4]]))


def test_fdr_decode_peaked_distribution_and_stats():
    project = weighting_function(32, torch.tensor([0.5]), torch.tensor([4]))
    corners = torch.full((1, 2, 4, 33), -50.0)
    corners[..., 16] = 50.0  # all mass on the centre bin (W = 0): box = reference
    ref = torch.tensor([[[0.3, 0.4, 0.2, 0.2], [0.6, 0.5, 0.1, 0.3]]])
    boxes, stats = fdr_decode(corners.flatten(-2), project, ref, torch.tensor([4]))
    torch.testing.assert_close(boxes, ref)
    assert stats.shape == (1, 2, 4, 5)
    torch.testing.assert_close(stats[..., 0], torch.ones(1, 2, 4))
    torch.testing.assert_close(stats[..., 4], torch.full((1, 2, 4), 0.25))
    # uniform logits: every top-k probability is 1/33, the expectation of a symmetric W is 0
    boxes, stats = fdr_decode(torch.zeros(1, 2, 132), project, ref, torch.tensor([4]))
    torch.testing.assert_close(boxes, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(stats, torch.full((1, 2, 4, 5), 1 / 33))
