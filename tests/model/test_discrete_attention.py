"""cross_attn_method: discrete (the published nearest-cell sampling, no GridSample) against a direct
per-point computation, in the module, in a training step and in the config."""

import math

import pytest
import torch

import dfine
from dfine.engine.optim import build_optimizer
from dfine.model.deformable_attention import MSDeformableAttention
from dfine.ops import ms_deform_attn_discrete
from tests.model_helpers import build

TINY = ["DFINETransformer.num_queries=40", "DFINEPostProcessor.num_top_queries=20"]


def _direct(value, shapes, locations, weights, num_points_list):
    """Loop over batch, queries, heads and points; read value at the published rounded cell:
    x = int(loc_x * W + 0.5), y = int(loc_y * H + 0.5), both clamped to [0, H - 1] (x also to W - 1)."""
    B, S, M, D = value.shape
    Q = locations.shape[1]
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    levels = [lvl for lvl, n in enumerate(num_points_list) for _ in range(n)]
    out = torch.zeros(B, Q, M, D, dtype=torch.float64)
    for b in range(B):
        for q in range(Q):
            for m in range(M):
                for p, lvl in enumerate(levels):
                    h, w = shapes[lvl]
                    lx, ly = (float(c) for c in locations[b, q, m, p])
                    x = min(max(math.trunc(lx * w + 0.5), 0), h - 1, w - 1)
                    y = min(max(math.trunc(ly * h + 0.5), 0), h - 1)
                    cell = value[b, starts[lvl] + y * w + x, m].double()
                    out[b, q, m] += float(weights[b, q, m, p]) * cell
    return out.reshape(B, Q, M * D)


@pytest.mark.parametrize("shapes", [[(6, 6), (3, 3)], [(4, 7), (2, 5)], [(7, 3), (4, 2)]],
                         ids=["square", "wider", "taller"])
def test_discrete_equals_direct_loop(shapes):
    gen = torch.Generator().manual_seed(len(shapes[0]) + shapes[0][1])
    B, Q, M, D, points = 2, 5, 2, 3, [2, 3]
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, M, D, generator=gen)
    # points beyond the map on every side exercise the clamps
    locations = torch.rand(B, Q, M, sum(points), 2, generator=gen) * 1.6 - 0.3
    weights = torch.rand(B, Q, M, sum(points), generator=gen)
    got = ms_deform_attn_discrete(value, shapes, locations, weights, points)
    torch.testing.assert_close(got.double(), _direct(value, shapes, locations, weights, points), rtol=0, atol=1e-5)
    # int64 tensor shapes give the same
    got_t = ms_deform_attn_discrete(value, torch.tensor(shapes), locations, weights, points)
    assert torch.equal(got, got_t)


def test_published_clamp_of_x_by_height():
    """On a 2 x 4 map a point at x = 0.9 rounds to column 4 and is clamped to H - 1 = 1 (published quirk),
    not to W - 1 = 3."""
    h, w = 2, 4
    value = torch.arange(h * w, dtype=torch.float32).reshape(1, h * w, 1, 1)  # cell index as the value
    locations = torch.tensor([0.9, 0.1]).reshape(1, 1, 1, 1, 2)
    weights = torch.ones(1, 1, 1, 1)
    out = ms_deform_attn_discrete(value, [(h, w)], locations, weights, [1])
    assert out.item() == 0 * w + 1  # row round(0.2) = 0, column 1
    # x = 0.3 -> int(1.7) = 1, y = 0.8 -> int(2.1) = 2 -> clamped to row 1: cell 1 * 4 + 1
    locations = torch.tensor([0.3, 0.8]).reshape(1, 1, 1, 1, 2)
    assert ms_deform_attn_discrete(value, [(h, w)], locations, weights, [1]).item() == 5


def test_discrete_input_errors():
    value = torch.randn(1, 10, 2, 3)
    with pytest.raises(ValueError, match="spatial_shapes .* sum to 9 positions"):
        ms_deform_attn_discrete(value, [(3, 3)], torch.rand(1, 4, 2, 2, 2), torch.rand(1, 4, 2, 2), [2])
    with pytest.raises(ValueError, match="method must be one of"):
        MSDeformableAttention(16, 2, 1, [2], method="nearest")


def test_module_discrete_matches_direct_and_trains():
    torch.manual_seed(0)
    attn = MSDeformableAttention(16, 2, 2, [2, 3], method="discrete")
    assert not attn.sampling_offsets.weight.requires_grad and not attn.sampling_offsets.bias.requires_grad
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    shapes = [(5, 6), (3, 3)]
    query = torch.randn(2, 4, 16, requires_grad=True)
    ref = torch.cat([torch.rand(2, 4, 1, 2) * 0.8 + 0.1, torch.rand(2, 4, 1, 2) * 0.5 + 0.1], -1)
    value = torch.randn(2, 39, 16, requires_grad=True)
    out = attn(query, ref, value, shapes)
    # the module's locations and weights, recomputed, through the direct loop
    with torch.no_grad():
        off = attn.sampling_offsets(query).reshape(2, 4, 2, 5, 2)
        w = attn.attention_weights(query).reshape(2, 4, 2, 5).softmax(-1)
        step = attn.num_points_scale[:, None] * ref.reshape(2, 4, 1, 1, 4)[..., 2:] * 0.5
        loc = ref.reshape(2, 4, 1, 1, 4)[..., :2] + off * step
        expected = _direct(value.reshape(2, 39, 2, 8), shapes, loc, w, [2, 3])
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    out.square().sum().backward()
    assert value.grad.abs().sum() > 0 and attn.attention_weights.weight.grad.abs().sum() > 0
    assert attn.sampling_offsets.weight.grad is None  # frozen, as published


def test_discrete_model_trains_and_keeps_the_checkpoint_layout():
    torch.manual_seed(0)
    model, cfg = build("n", TINY + ["DFINETransformer.cross_attn_method=discrete"])
    default, _ = build("n", TINY)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in default.state_dict().items()}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and "sampling_offsets" in n]
    assert len(frozen) == 2 * len(model.decoder.decoder.layers)
    criterion = dfine.build_criterion(cfg)
    optimizer = build_optimizer(model, cfg)
    assert not any(p is q for g in optimizer.param_groups for p in g["params"]
                   for n, q in model.named_parameters() if "sampling_offsets" in n)
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    model.train()
    before = model.decoder.decoder.layers[0].cross_attn.attention_weights.weight.detach().clone()
    offsets_before = model.decoder.decoder.layers[0].cross_attn.sampling_offsets.bias.detach().clone()
    outputs = model(torch.rand(2, 3, 128, 128), targets)
    losses = criterion(outputs, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = model.decoder.decoder.layers[0].cross_attn
    assert not torch.equal(after.attention_weights.weight, before)
    assert torch.equal(after.sampling_offsets.bias, offsets_before)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 128, 160))
    assert out["pred_boxes"].shape == (1, 40, 4) and torch.isfinite(out["pred_logits"]).all()
