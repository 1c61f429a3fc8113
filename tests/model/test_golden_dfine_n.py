"""Parity with the published D-FINE-N: golden outputs from the release on the same weights."""

import pytest
import torch

import dfine
from tests.conftest import require_backend
from tests.model_helpers import build, match_queries, shared_file

LOGIT_TOL = 1e-4
BOX_TOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    outputs = torch.load(shared_file("reference", "golden", "dfine_n_outputs.pt"), weights_only=False)
    state = torch.load(shared_file("reference", "golden", "dfine_n_state_dict.pt"), weights_only=False)
    return outputs, state


def _model(state, backend="reference", overrides=None, device="cpu"):
    model, cfg = build("n", overrides, backend=backend)
    model.load_state_dict(state, strict=True)
    return model.eval().to(device), cfg


def _close(a, b, tol, what):
    err = (a.cpu() - b.cpu()).abs().max().item()
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol}"
    return err


def _record_intermediates(model):
    names = {"backbone", "encoder", "decoder.enc_output", "decoder.enc_score_head", "decoder.enc_bbox_head",
             "decoder.pre_bbox_head", "decoder.dec_score_head.2", "decoder.decoder.lqe_layers.2"}
    names |= {f"decoder.decoder.layers.{i}" for i in range(3)} | {f"decoder.dec_bbox_head.{i}" for i in range(3)}
    got = {"decoder.query_pos_head": []}
    hooks = []
    for name, module in model.named_modules():
        if name in names:
            hooks.append(module.register_forward_hook(lambda m, i, o, n=name: got.__setitem__(n, o)))
    hooks.append(model.decoder.query_pos_head.register_forward_hook(
        lambda m, i, o: got["decoder.query_pos_head"].append(o)))
    return got, hooks


def _compare_final(out, golden_out):
    out = {k: out[k].cpu() for k in ("pred_boxes", "pred_logits")}
    idx = match_queries(golden_out["pred_boxes"][0], out["pred_boxes"][0])
    box_err = _close(out["pred_boxes"][0, idx], golden_out["pred_boxes"][0], BOX_TOL, "pred_boxes")
    logit_err = _close(out["pred_logits"][0, idx], golden_out["pred_logits"][0], LOGIT_TOL, "pred_logits")
    return box_err, logit_err


def _compare_post(post_result, golden_out):
    labels, boxes, scores = (post_result[k].cpu() for k in ("labels", "boxes", "scores"))
    # the lowest golden entries may be replaced by near-ties: compare the top 250 one-to-one
    g_boxes, g_labels, g_scores = (golden_out[k][0][:250] for k in ("post_boxes", "post_labels", "post_scores"))
    dist = torch.cdist(g_boxes, boxes, p=1) + 1e6 * (g_labels[:, None] != labels[None]).float()
    idx = dist.argmin(-1)
    assert idx.unique().numel() == idx.numel()
    assert torch.equal(labels[idx], g_labels)
    _close(boxes[idx], g_boxes, 640 * BOX_TOL, "post boxes (pixels)")
    _close(scores[idx], g_scores, 2.5e-5, "post scores")


def test_golden_eval_front_to_back(golden, device):
    golden_out, state = golden
    model, cfg = _model(state, device=device)
    got, hooks = _record_intermediates(model)
    with torch.no_grad():
        out = model(golden_out["input"].to(device))
    for h in hooks:
        h.remove()
    ref = golden_out["intermediates"]
    # front to back, so the first failure names the first module that differs
    for a, b in zip(got["backbone"], ref["backbone"]):
        _close(a, b, 1e-4, "backbone")
    for a, b in zip(got["encoder"], ref["encoder"]):
        _close(a, b, 1e-4, "encoder")
    _close(got["decoder.enc_output"], ref["decoder.enc_output"], 1e-4, "enc_output")
    _close(got["decoder.enc_score_head"], ref["decoder.enc_score_head"], LOGIT_TOL, "enc_score_head")
    # per-query intermediates are compared after matching queries by the final boxes
    idx = match_queries(golden_out["pred_boxes"][0], out["pred_boxes"][0].cpu()).to(device)
    _close(got["decoder.enc_bbox_head"][0, idx], ref["decoder.enc_bbox_head"][0], 1e-4, "enc_bbox_head")
    for i, (a, b) in enumerate(zip(got["decoder.query_pos_head"], ref["decoder.query_pos_head"])):
        _close(a[0, idx], b[0], 1e-4, f"query_pos_head call {i}")
    for i in range(3):
        _close(got[f"decoder.decoder.layers.{i}"][0, idx], ref[f"decoder.decoder.layers.{i}"][0], 1e-4, f"layer {i}")
        _close(got[f"decoder.dec_bbox_head.{i}"][0, idx], ref[f"decoder.dec_bbox_head.{i}"][0], 1e-4, f"dec_bbox_head {i}")
    _close(got["decoder.pre_bbox_head"][0, idx], ref["decoder.pre_bbox_head"][0], 1e-4, "pre_bbox_head")
    _close(got["decoder.dec_score_head.2"][0, idx], ref["decoder.dec_score_head.2"][0], LOGIT_TOL, "dec_score_head 2")
    _close(got["decoder.decoder.lqe_layers.2"][0, idx], ref["decoder.decoder.lqe_layers.2"][0], LOGIT_TOL, "lqe 2")

    _compare_final(out, golden_out)
    post = dfine.build_postprocessor(cfg)
    post.remap_mscoco_category = False  # golden post_labels are class indices
    result = post(out, torch.tensor([[640, 640]], device=device))
    _compare_post(result[0], golden_out)


def test_golden_after_deploy(golden, device):
    golden_out, state = golden
    model, cfg = _model(state, device=device)
    model.deploy()
    with torch.no_grad():
        out = model(golden_out["input"].to(device))
    _compare_final(out, golden_out)
    post = dfine.build_postprocessor(cfg).deploy()
    labels, boxes, scores = post(out, torch.tensor([[640, 640]], device=device))
    _compare_post({"labels": labels[0], "boxes": boxes[0], "scores": scores[0]}, golden_out)


def test_golden_after_deploy_with_onednn_linear(golden):
    """What `predict` runs on the CPU: deploy() plus the linear layers through oneDNN."""
    from dfine.deploy.cpu import OneDNNLinear, onednn_linear_available, prepack_linear_weights

    assert onednn_linear_available()  # the pinned torch (CPU build with oneDNN) has them
    golden_out, state = golden
    model, cfg = _model(state)
    model.deploy()
    assert prepack_linear_weights(model) > 0
    assert any(isinstance(m, OneDNNLinear) for m in model.modules())
    with torch.no_grad():
        out = model(golden_out["input"])
    _compare_final(out, golden_out)
    post = dfine.build_postprocessor(cfg).deploy()
    labels, boxes, scores = post(out, torch.tensor([[640, 640]]))
    _compare_post({"labels": labels[0], "boxes": boxes[0], "scores": scores[0]}, golden_out)


def test_golden_train_mode_outputs(device):
    losses = torch.load(shared_file("reference", "golden", "dfine_n_losses.pt"), weights_only=False)
    state = torch.load(shared_file("reference", "golden", "dfine_n_state_dict.pt"), weights_only=False)
    model, _ = _model(state, device=device)
    model.decoder.num_denoising = 0  # deterministic, as the golden run; keeps the checkpoint layout
    model.train()
    targets = [{k: v.to(device) for k, v in t.items()} for t in losses["targets"]]
    out = model(losses["input"].to(device), targets)
    out = {k: out[k].detach().cpu() for k in ("pred_boxes", "pred_logits")}
    for b in range(losses["input"].shape[0]):
        idx = match_queries(losses["train_pred_boxes"][b], out["pred_boxes"][b].detach())
        _close(out["pred_boxes"][b, idx].detach(), losses["train_pred_boxes"][b], BOX_TOL, "train pred_boxes")
        _close(out["pred_logits"][b, idx].detach(), losses["train_pred_logits"][b], LOGIT_TOL, "train pred_logits")


def test_cpp_backend_equals_reference(golden, device):
    require_backend("cpp", device)
    _, state = golden
    ref_model, _ = _model(state, backend="reference", device=device)
    cpp_model, _ = _model(state, backend="cpp", device=device)
    x = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        a, b = ref_model(x), cpp_model(x)
    idx = match_queries(a["pred_boxes"][0], b["pred_boxes"][0])
    _close(b["pred_boxes"][0, idx], a["pred_boxes"][0], 1e-4, "cpp boxes")
    _close(b["pred_logits"][0, idx], a["pred_logits"][0], 1e-4, "cpp logits")


def test_triton_backend_equals_reference(golden, device):
    require_backend("triton", device)
    _, state = golden
    ref_model, _ = _model(state, backend="reference", device=device)
    tri_model, _ = _model(state, backend="triton", device=device)
    x = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        a, b = ref_model(x), tri_model(x)
    idx = match_queries(a["pred_boxes"][0], b["pred_boxes"][0])
    _close(b["pred_boxes"][0, idx], a["pred_boxes"][0], 1e-4, "triton boxes")
    _close(b["pred_logits"][0, idx], a["pred_logits"][0], 1e-4, "triton logits")
