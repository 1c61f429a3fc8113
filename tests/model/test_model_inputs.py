"""Any input size in eval, batched inference = per-image inference, training outputs with denoising."""

import pytest
import torch

from tests.model_helpers import build, match_queries


def _random_model(size="n", overrides=None, seed=0):
    torch.manual_seed(seed)
    model, cfg = build(size, overrides)
    # the published init zeroes the box heads; perturb every float tensor so outputs are informative
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and "up" not in name.split(".")[-1] and "reg_scale" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model, cfg


def _on_cpu(out):
    return {k: out[k].cpu() for k in ("pred_logits", "pred_boxes")}


@pytest.fixture(scope="module")
def model_n(device):
    model, _ = _random_model("n")
    return model.eval().to(device)


def test_non_square_input_and_cache(model_n, device):
    x = torch.rand(1, 3, 320, 480).to(device)
    with torch.no_grad():
        out = model_n(x)
    assert out["pred_logits"].shape == (1, 300, 80)
    assert out["pred_boxes"].shape == (1, 300, 4)
    assert torch.isfinite(out["pred_logits"]).all() and torch.isfinite(out["pred_boxes"]).all()
    # anchors generated for the actual map sizes (stride 16: 20x30, stride 32: 10x15) and cached
    keys = [k[0] for k in model_n.decoder._anchor_cache]
    assert ((20, 30), (10, 15)) in keys
    assert any(k[:2] == (10, 15) for k in model_n.encoder._pos_cache)
    anchors, valid = model_n.decoder._anchor_cache[[k for k in model_n.decoder._anchor_cache if k[0] == ((20, 30), (10, 15))][0]]
    assert anchors.shape == (1, 20 * 30 + 10 * 15, 4)
    # first anchor of level 0: centre (0.5/30, 0.5/20) in logit space
    expected = torch.logit(torch.tensor([0.5 / 30, 0.5 / 20, 0.05, 0.05]))
    torch.testing.assert_close(anchors[0, 0].cpu(), expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        again = model_n(x)
    assert torch.equal(again["pred_logits"], out["pred_logits"])


def test_sizes_not_multiple_of_32_and_too_small(model_n, device):
    with torch.no_grad():
        out = model_n(torch.rand(1, 3, 200, 328).to(device))
    assert out["pred_boxes"].shape == (1, 300, 4) and torch.isfinite(out["pred_logits"]).all()
    with pytest.raises(ValueError, match="too small"):
        with torch.no_grad():
            model_n(torch.rand(1, 3, 64, 96).to(device))


def test_position_embedding_is_row_column():
    from dfine.model.hybrid_encoder import sincos_position_embedding

    pe = sincos_position_embedding(w=5, h=3, dim=8)  # [1, 15, 8]
    assert pe.shape == (1, 15, 8)
    # token (row 2, col 4) = index 14: first quarter sin(row * omega_0) = sin(2)
    assert abs(pe[0, 14, 0].item() - torch.sin(torch.tensor(2.0)).item()) < 1e-6
    assert abs(pe[0, 14, 4].item() - torch.sin(torch.tensor(4.0)).item()) < 1e-6


def test_batched_equals_per_image(model_n, device):
    x = torch.rand(2, 3, 320, 480, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        both = _on_cpu(model_n(x))
        for b in range(2):
            single = _on_cpu(model_n(x[b : b + 1]))
            # near-tied encoder scores may list the same predictions in another order
            idx = match_queries(single["pred_boxes"][0], both["pred_boxes"][b])
            assert (idx != torch.arange(300)).sum() < 30
            torch.testing.assert_close(both["pred_boxes"][b, idx], single["pred_boxes"][0], rtol=0, atol=1e-5)
            torch.testing.assert_close(both["pred_logits"][b, idx], single["pred_logits"][0], rtol=0, atol=1e-4)


def test_training_outputs_with_denoising(device):
    model, _ = _random_model("n", seed=3)
    model.train().to(device)
    x = torch.rand(2, 3, 320, 320).to(device)
    targets = [
        {"labels": torch.tensor([1, 5]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
        {"labels": torch.tensor([7]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
    ]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    out = model(x, targets)
    Q, C, L = 300, 80, 3
    assert out["pred_logits"].shape == (2, Q, C) and out["pred_boxes"].shape == (2, Q, 4)
    assert out["pred_corners"].shape == (2, Q, 132) and out["ref_points"].shape == (2, Q, 4)
    assert float(out["up"]) == 0.5 and int(out["reg_scale"]) == 4
    assert len(out["aux_outputs"]) == L - 1
    for aux in out["aux_outputs"]:
        assert set(aux) == {"pred_logits", "pred_boxes", "pred_corners", "ref_points", "teacher_corners", "teacher_logits"}
        assert aux["teacher_corners"] is out["pred_corners"]
    assert out["pre_outputs"]["pred_boxes"].shape == (2, Q, 4)
    assert out["enc_aux_outputs"][0]["pred_logits"].shape == (2, Q, C)
    assert out["enc_meta"] == {"class_agnostic": False}
    meta = out["dn_meta"]
    max_gt = 2
    groups = 100 // max_gt
    assert meta["dn_num_group"] == groups
    num_dn = 2 * max_gt * groups
    assert meta["dn_num_split"] == [num_dn, Q]
    assert len(out["dn_outputs"]) == L
    assert out["dn_outputs"][0]["pred_boxes"].shape == (2, num_dn, 4)
    assert out["dn_pre_outputs"]["pred_logits"].shape == (2, num_dn, C)
    # positives of image 1 are the first slot of every group
    assert torch.equal(meta["dn_positive_idx"][1].cpu(), torch.arange(groups) * 2 * max_gt)

    total = out["pred_logits"].sum() + out["pred_boxes"].sum() + out["pred_corners"].sum()
    total = total + sum(a["pred_corners"].sum() for a in out["dn_outputs"]) + out["enc_aux_outputs"][0]["pred_boxes"].sum()
    total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["decoder.dec_bbox_head.0.layers.2.weight"].abs().sum() > 0
    assert grads["decoder.denoising_class_embed.weight"].abs().sum() > 0
    assert grads["backbone.stem.stem1.conv.weight"].abs().sum() > 0
    assert grads["decoder.decoder.layers.0.cross_attn.sampling_offsets.weight"].abs().sum() > 0


def test_denoising_attention_mask():
    from dfine.model.denoising import contrastive_denoising_group

    embed = torch.nn.Embedding(81, 16, padding_idx=80)
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.rand(2, 4) * 0.5 + 0.2},
               {"labels": torch.tensor([], dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    content, ref, mask, meta = contrastive_denoising_group(targets, 80, 10, embed, num_denoising=8)
    num_dn = meta["dn_num_split"][0]
    assert num_dn == 2 * 2 * 4 and content.shape == (2, num_dn, 16) and ref.shape == (2, num_dn, 4)
    assert mask.shape == (num_dn + 10, num_dn + 10)
    assert mask[num_dn:, :num_dn].all() and not mask[num_dn:, num_dn:].any()
    assert not mask[0:4, 0:4].any() and mask[0:4, 4:num_dn].all() and mask[4:8, 0:4].all()
    # image 1 has no ground truth: all its denoising queries are padding (the padding embedding is zero)
    assert content[1].abs().sum() == 0


def _randomize_norm_stats(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "running_mean") and hasattr(m, "running_var"):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


@pytest.mark.parametrize("size", ["s", "x"])
def test_deploy_equals_eval(size, device):
    """Conv+BN and RepVGG fusion leave the outputs unchanged (S: 3 levels; X: decoder input_proj,
    reg_scale 8, frozen backbone norms)."""
    model, _ = _random_model(size, seed=5)
    _randomize_norm_stats(model)
    model.eval().to(device)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        before = _on_cpu(model(x))
        model.deploy()
        after = _on_cpu(model(x))
    idx = match_queries(before["pred_boxes"][0], after["pred_boxes"][0])
    torch.testing.assert_close(after["pred_boxes"][0, idx], before["pred_boxes"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(after["pred_logits"][0, idx], before["pred_logits"][0], rtol=0, atol=1e-4)


def test_deploy_folds_every_batchnorm_and_refolds_on_load():
    """After deploy() no BatchNorm runs (backbone ConvBNAct and the input projections are folded too),
    the state_dict keeps the published layout, and loading new weights into a deployed model refreshes
    the folded convs (outputs equal a model deployed after loading them)."""
    from dfine.model.hgnetv2 import FrozenBatchNorm2d

    model, _ = _random_model("x", seed=3)
    keys_before = list(model.state_dict())
    model.deploy()
    ran = []
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
            m.register_forward_hook(lambda mod, inp, out: ran.append(mod))
    x = torch.rand(1, 3, 128, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)
    assert ran == []
    assert {k for k in keys_before if ".bn." in k or "input_proj" in k} <= set(model.state_dict())

    other, _ = _random_model("x", seed=4)
    _randomize_norm_stats(other)
    other.deploy()
    model.load_state_dict(other.state_dict())  # a deploy-format state_dict, as published
    with torch.no_grad():
        a, b = model(x), other(x)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=0, atol=1e-5)
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_weight_softmax_matches_torch(dtype):
    """The CPU form of the attention-weight softmax (dfine.deploy.optimize_for_cpu) against fp64."""
    from dfine.deploy.cpu import ShortSoftmax

    softmax_last_dim = ShortSoftmax()

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 8, 12, generator=gen, dtype=dtype) * 5
    x[0, 0, 0] = torch.tensor([1e4] + [-1e4] * 11, dtype=dtype)  # saturated row: one-hot, no overflow
    x[0, 0, 1] = 3.0  # a constant row: uniform
    x = x[:, :, :, :].transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous input
    x.requires_grad_(True)
    got = softmax_last_dim(x)
    exact = x.detach().double().requires_grad_(True)
    want = exact.softmax(-1)  # the truth in fp64; ATen's fp32 softmax is no closer to it
    # fp32: a few units in the last place of values <= 1 (ATen's own fp32 softmax is as far off)
    tol = dict(rtol=3e-6, atol=5e-7) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(got.double(), want, **tol)
    assert got[0, 0, 0, 0] == 1 and torch.all(got[0, 0, 1] == got[0, 0, 1, 0])
    upstream = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    g_got, = torch.autograd.grad(got, x, upstream.to(dtype))
    g_want, = torch.autograd.grad(want, exact, upstream)
    torch.testing.assert_close(g_got.double(), g_want, **tol)


def test_deploy_builds_the_fused_convs_on_the_weights_device():
    """deploy() on a GPU model must not leave new convs on the CPU: the meta device stands in for the GPU here."""
    from dfine.model.hybrid_encoder import ConvNormLayer, VGGBlock

    for block in (ConvNormLayer(4, 8, 3), VGGBlock(4, 8)):
        block.to("meta").eval()
        block.convert_to_deploy()
        assert {p.device.type for p in block.parameters()} == {"meta"}, type(block).__name__
