"""D-FINE decoder: anchor-based query selection, gated decoder layers with deformable
cross-attention, Fine-grained Distribution Refinement (FDR) and Localization Quality Estimation."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfine.model.conv_bn import ConvBN
from dfine.model.deformable_attention import MSDeformableAttention
from dfine.model.denoising import contrastive_denoising_group
from dfine.ops._backend import symbolic_shapes
from dfine.ops.fdr import fdr_decode, weighting_function


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def prior_prob_bias(prob: float = 0.01) -> float:
    return -math.log((1 - prob) / prob)


class MLP(nn.Module):
    def __init__(self, in_dim, hidden_dim, out_dim, num_layers):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class Gate(nn.Module):
    """Sigmoid gates choosing between the self-attention stream and the cross-attention result."""

    def __init__(self, dim):
        super().__init__()
        self.gate = nn.Linear(2 * dim, 2 * dim)
        self.norm = nn.LayerNorm(dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, x1, x2):
        g1, g2 = torch.sigmoid(self.gate(torch.cat([x1, x2], -1))).chunk(2, -1)
        return self.norm(g1 * x1 + g2 * x2)


class LQE(nn.Module):
    """Localization Quality Estimation: a small MLP on the top-k corner probabilities adds one
    quality logit to every class logit."""

    def __init__(self, k=4, hidden_dim=64, num_layers=2, reg_max=32):
        super().__init__()
        self.k = k
        self.reg_max = reg_max
        self.reg_conf = MLP(4 * (k + 1), hidden_dim, 1, num_layers)
        nn.init.zeros_(self.reg_conf.layers[-1].weight)
        nn.init.zeros_(self.reg_conf.layers[-1].bias)

    def forward(self, scores, lqe_stats):
        return scores + self.reg_conf(lqe_stats.flatten(-2))


class DecoderLayer(nn.Module):
    def __init__(self, d_model=256, n_head=8, dim_feedforward=1024, dropout=0.0, num_levels=3, num_points=(3, 6, 3),
                 backend="auto", cross_attn_method="default"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformableAttention(d_model, n_head, num_levels, num_points, backend=backend,
                                                method=cross_attn_method)
        self.dropout2 = nn.Dropout(dropout)
        self.gateway = Gate(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, target, reference_points, value, spatial_shapes, attn_mask=None, query_pos=None):
        q = k = target + query_pos
        attn, _ = self.self_attn(q, k, value=target, attn_mask=attn_mask, need_weights=False)
        target = self.norm1(target + self.dropout1(attn))
        cross = self.cross_attn(target + query_pos, reference_points, value, spatial_shapes)
        target = self.gateway(target, self.dropout2(cross))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(target))))
        return self.norm3((target + self.dropout4(ffn)).clamp(min=-65504, max=65504))


class TransformerDecoder(nn.Module):
    """The FDR loop. Holds `up`/`reg_scale` (shared with the parent) for the state-dict layout."""

    def __init__(self, hidden_dim, layer: DecoderLayer, num_layers, up, reg_scale, reg_max=32, eval_idx=-1,
                 backend="auto"):
        super().__init__()
        self.backend = backend  # for the fused FDR decode; set_backend() switches it with the rest
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx
        self.up = up
        self.reg_scale = reg_scale
        self.reg_max = reg_max
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self.lqe_layers = nn.ModuleList([LQE(4, 64, 2, reg_max) for _ in range(num_layers)])
        self.project = None  # constant bins, set by deploy()
        self.reg_scale_value = None  # python float of reg_scale, set by deploy(): no tensor->float in the graph

    def convert_to_deploy(self):
        self.project = weighting_function(self.reg_max, self.up, self.reg_scale).detach()
        self.reg_scale_value = float(self.reg_scale.reshape(-1)[0])
        self.layers = self.layers[: self.eval_idx + 1]
        self.lqe_layers = nn.ModuleList(
            [nn.Identity() if i != self.eval_idx else m for i, m in enumerate(self.lqe_layers)]
        )

    def forward(self, target, ref_points_unact, memory, spatial_shapes, bbox_head, score_head, query_pos_head,
                pre_bbox_head, attn_mask=None, all_layers=False):
        """Returns (logits, boxes, corners, refs, pre_boxes, pre_scores); in eval only the eval_idx layer's.

        ``all_layers=True`` (eval) runs every layer and appends a list with one dict per layer:
        ``{"pred_corners": [B, Q, 4*(reg_max+1)] accumulated bin logits, "pred_boxes": [B, Q, 4] cxcywh,
        "ref_points": [B, Q, 4]}`` (the FDR state of each layer, for inspection)."""
        project = self.project if self.project is not None else weighting_function(self.reg_max, self.up, self.reg_scale)
        project = project.to(memory.device)
        # after deploy() a python float: the fused ops take reg_scale as a float, and reading it from the
        # parameter inside forward would be a tensor->float sync (a graph break under torch.compile)
        reg_scale = self.reg_scale_value if self.reg_scale_value is not None else self.reg_scale
        layer_trace = [] if all_layers else None
        output = target
        output_detach = 0
        corners_prev = 0
        ref_detach = torch.sigmoid(ref_points_unact)
        logits, boxes, corners_list, refs = [], [], [], []
        pre_boxes = pre_scores = ref0 = None
        for i, layer in enumerate(self.layers):
            query_pos = query_pos_head(ref_detach).clamp(min=-10, max=10)
            output = layer(output, ref_detach.unsqueeze(2), memory, spatial_shapes, attn_mask, query_pos)
            if i == 0:
                # the layer-0 refinement fixes the reference of every later FDR step
                pre_boxes = torch.sigmoid(pre_bbox_head(output) + inverse_sigmoid(ref_detach))
                if self.training or self.eval_idx == 0:
                    pre_scores = score_head[0](output)
                ref0 = pre_boxes.detach()
            corners = bbox_head[i](output + output_detach) + corners_prev
            # fused softmax-expectation-distance2bbox + LQE statistics (dfine.ops.fdr_decode)
            box, lqe_stats = fdr_decode(corners, project, ref0, reg_scale, backend=self.backend)
            if layer_trace is not None:
                layer_trace.append({"pred_corners": corners, "pred_boxes": box, "ref_points": ref0})
            if self.training or i == self.eval_idx:
                scores = self.lqe_layers[i](score_head[i](output), lqe_stats)
                logits.append(scores)
                boxes.append(box)
                corners_list.append(corners)
                refs.append(ref0)
                if not self.training and layer_trace is None:
                    break
            corners_prev = corners
            ref_detach = box.detach()
            output_detach = output.detach()
        if layer_trace is not None:
            return logits, boxes, corners_list, refs, pre_boxes, pre_scores, layer_trace
        return logits, boxes, corners_list, refs, pre_boxes, pre_scores


def generate_anchors(spatial_shapes, grid_size=0.05, eps=1e-2, device="cpu", dtype=torch.float32):
    """Logit-space anchors [1, S, 4] for every cell of every level and the [1, S, 1] validity mask."""
    anchors = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        gy, gx = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
        cxcy = torch.stack([(gx + 0.5) / w, (gy + 0.5) / h], -1).reshape(-1, 2)
        wh = torch.full_like(cxcy, grid_size * 2.0 ** lvl)
        anchors.append(torch.cat([cxcy, wh], -1))
    anchors = torch.cat(anchors, 0)[None].to(device)
    valid = ((anchors > eps) & (anchors < 1 - eps)).all(-1, keepdim=True)
    anchors = torch.log(anchors / (1 - anchors))
    anchors = torch.where(valid, anchors, torch.full_like(anchors, float("inf")))
    return anchors, valid


class DFINETransformer(nn.Module):
    def __init__(self, num_classes=80, hidden_dim=256, num_queries=300, feat_channels=(512, 1024, 2048),
                 feat_strides=(8, 16, 32), num_levels=3, num_points=(3, 6, 3), nhead=8, num_layers=6,
                 dim_feedforward=1024, dropout=0.0, activation="relu", num_denoising=100, label_noise_ratio=0.5,
                 box_noise_scale=1.0, learn_query_content=False, eval_spatial_size=None, eval_idx=-1, eps=1e-2,
                 aux_loss=True, cross_attn_method="default", query_select_method="default", reg_max=32,
                 reg_scale=4.0, up=0.5, layer_scale=1, mlp_act="relu", backend="auto"):
        super().__init__()
        if cross_attn_method not in MSDeformableAttention.METHODS:
            raise ValueError(f"DFINETransformer: cross_attn_method must be one of {MSDeformableAttention.METHODS}, "
                             f"got {cross_attn_method!r}")
        if query_select_method != "default":
            raise ValueError("DFINETransformer: only query_select_method 'default' is supported")
        if learn_query_content:
            raise ValueError("DFINETransformer: learn_query_content=True is not supported (published configs use False)")
        if layer_scale != 1:
            raise ValueError("DFINETransformer: only layer_scale=1 is supported (all published configs)")
        feat_channels = list(feat_channels)
        self.hidden_dim = hidden_dim
        self.nhead = nhead
        self.feat_strides = list(feat_strides)
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.eps = eps
        self.num_layers = num_layers
        self.eval_spatial_size = list(eval_spatial_size) if eval_spatial_size else None
        self.aux_loss = aux_loss
        self.reg_max = reg_max
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self._anchor_cache = {}

        self.input_proj = nn.ModuleList()
        for c in feat_channels:
            if c == hidden_dim:
                self.input_proj.append(nn.Identity())
            else:
                self.input_proj.append(ConvBN(c, hidden_dim))
        # extra levels (strided 3x3 convs) exist in the release for num_levels > len(feat_channels);
        # no published config uses them.
        if num_levels != len(feat_channels):
            raise ValueError(f"DFINETransformer: num_levels ({num_levels}) must equal len(feat_channels) ({len(feat_channels)})")

        self.up = nn.Parameter(torch.tensor([float(up)]), requires_grad=False)
        reg_scale_t = torch.tensor([reg_scale]) if isinstance(reg_scale, int) else torch.tensor([float(reg_scale)])
        self.reg_scale = nn.Parameter(reg_scale_t, requires_grad=False)
        if self.eval_spatial_size:
            shapes = [(self.eval_spatial_size[0] // s, self.eval_spatial_size[1] // s) for s in self.feat_strides]
            anchors, valid = generate_anchors(shapes, eps=eps)
            self.register_buffer("anchors", anchors)
            self.register_buffer("valid_mask", valid)
        layer = DecoderLayer(hidden_dim, nhead, dim_feedforward, dropout, num_levels, num_points, backend=backend,
                             cross_attn_method=cross_attn_method)
        self.decoder = TransformerDecoder(hidden_dim, layer, num_layers, self.up, self.reg_scale, reg_max, eval_idx,
                                          backend=backend)

        if num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
            nn.init.normal_(self.denoising_class_embed.weight[:-1])
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2)
        self.enc_output = nn.Sequential(OrderedDict([("proj", nn.Linear(hidden_dim, hidden_dim)),
                                                     ("norm", nn.LayerNorm(hidden_dim))]))
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.eval_idx = self.decoder.eval_idx
        self.dec_score_head = nn.ModuleList([nn.Linear(hidden_dim, num_classes) for _ in range(num_layers)])
        self.pre_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.dec_bbox_head = nn.ModuleList([MLP(hidden_dim, hidden_dim, 4 * (reg_max + 1), 3) for _ in range(num_layers)])
        self._reset_parameters()

    def _reset_parameters(self):
        bias = prior_prob_bias(0.01)
        nn.init.constant_(self.enc_score_head.bias, bias)
        for head in self.dec_score_head:
            nn.init.constant_(head.bias, bias)
        for mlp in [self.enc_bbox_head, self.pre_bbox_head, *self.dec_bbox_head]:
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        nn.init.xavier_uniform_(self.enc_output.proj.weight)
        for layer in self.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)
        for proj in self.input_proj:
            if isinstance(proj, ConvBN):
                nn.init.xavier_uniform_(proj.conv.weight)

    def convert_to_deploy(self):
        self.dec_score_head = nn.ModuleList(
            [nn.Identity() if i != self.eval_idx else m for i, m in enumerate(self.dec_score_head)]
        )
        self.dec_bbox_head = nn.ModuleList(
            [m if i <= self.eval_idx else nn.Identity() for i, m in enumerate(self.dec_bbox_head)]
        )

    # ---------------------------------------------------------------------------------------
    def _flatten_memory(self, feats):
        feats = [proj(f) for proj, f in zip(self.input_proj, feats)]
        if symbolic_shapes():  # export: keep the traced sizes (dynamic H, W in the graph)
            shapes = [(f.shape[2], f.shape[3]) for f in feats]
        else:
            shapes = [(int(f.shape[2]), int(f.shape[3])) for f in feats]
        memory = torch.cat([f.flatten(2).permute(0, 2, 1) for f in feats], 1)
        return memory, shapes

    def _anchors_for(self, shapes, device, dtype):
        if symbolic_shapes():  # export: anchors computed in the graph from the traced sizes, never cached
            anchors, valid = generate_anchors(shapes, eps=self.eps, device=device)
            return anchors.to(dtype), valid
        if (not self.training and self.eval_spatial_size and hasattr(self, "anchors")
                and shapes == [(self.eval_spatial_size[0] // s, self.eval_spatial_size[1] // s) for s in self.feat_strides]):
            return self.anchors.to(dtype), self.valid_mask
        key = (tuple(shapes), str(device), dtype)
        if key not in self._anchor_cache:
            anchors, valid = generate_anchors(shapes, eps=self.eps, device=device)
            self._anchor_cache[key] = (anchors.to(dtype), valid)
        return self._anchor_cache[key]

    def _select_queries(self, memory, shapes):
        anchors, valid = self._anchors_for(shapes, memory.device, memory.dtype)
        memory = valid.to(memory.dtype) * memory
        output_memory = self.enc_output(memory)
        enc_logits = self.enc_score_head(output_memory)
        if not symbolic_shapes() and enc_logits.shape[1] < self.num_queries:
            raise ValueError(
                f"DFINETransformer: the input is too small: its feature maps {shapes} hold {enc_logits.shape[1]} "
                f"positions, fewer than num_queries={self.num_queries}; use a larger image"
            )
        _, topk_ind = enc_logits.amax(-1).topk(self.num_queries, dim=-1)  # amax: no argmax, ~3x faster
        idx = topk_ind.unsqueeze(-1)
        topk_memory = output_memory.gather(1, idx.expand(-1, -1, output_memory.shape[-1]))
        topk_anchors = anchors.expand(memory.shape[0], -1, -1).gather(1, idx.expand(-1, -1, 4))
        enc_bbox_unact = self.enc_bbox_head(topk_memory) + topk_anchors
        enc_topk_logits = enc_logits.gather(1, idx.expand(-1, -1, enc_logits.shape[-1])) if self.training else None
        return topk_memory.detach(), enc_bbox_unact, enc_topk_logits

    def forward(self, feats, targets=None, return_layers=False):
        """Eval: {"pred_logits", "pred_boxes"}; with ``return_layers=True`` also "layers", one dict per
        decoder layer ({"pred_corners", "pred_boxes", "ref_points"}, see TransformerDecoder.forward).
        Training: the loss inputs (per-layer outputs are in "aux_outputs")."""
        if return_layers and self.training:
            raise ValueError("DFINETransformer: return_layers=True is for eval mode; in training the per-layer "
                             "outputs are in out['aux_outputs']")
        memory, shapes = self._flatten_memory(feats)
        use_dn = self.training and self.num_denoising > 0 and targets is not None
        if use_dn:
            dn_content, dn_ref_unact, attn_mask, dn_meta = contrastive_denoising_group(
                targets, self.num_classes, self.num_queries, self.denoising_class_embed,
                self.num_denoising, self.label_noise_ratio, self.box_noise_scale,
            )
        else:
            dn_content = dn_ref_unact = attn_mask = dn_meta = None

        content, enc_bbox_unact, enc_topk_logits = self._select_queries(memory, shapes)
        ref_unact = enc_bbox_unact.detach()
        if dn_content is not None:
            content = torch.cat([dn_content, content], 1)
            ref_unact = torch.cat([dn_ref_unact, ref_unact], 1)

        logits, boxes, corners, refs, pre_boxes, pre_logits, *trace = self.decoder(
            content, ref_unact, memory, shapes, self.dec_bbox_head, self.dec_score_head, self.query_pos_head,
            self.pre_bbox_head, attn_mask, all_layers=return_layers,
        )
        if not self.training:
            out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
            if return_layers:
                out["layers"] = trace[0]
            return out
        return self._training_outputs(logits, boxes, corners, refs, pre_boxes, pre_logits, enc_bbox_unact,
                                      enc_topk_logits, dn_meta)

    def _training_outputs(self, logits, boxes, corners, refs, pre_boxes, pre_logits, enc_bbox_unact, enc_topk_logits,
                          dn_meta):
        dn = None
        if dn_meta is not None:
            split = dn_meta["dn_num_split"]

            def cut(ts):
                pairs = [t.split(split, dim=1) for t in ts]
                return [p[0] for p in pairs], [p[1] for p in pairs]

            dn_logits, logits = cut(logits)
            dn_boxes, boxes = cut(boxes)
            dn_corners, corners = cut(corners)
            dn_refs, refs = cut(refs)
            dn_pre_logits, pre_logits = pre_logits.split(split, dim=1)
            dn_pre_boxes, pre_boxes = pre_boxes.split(split, dim=1)
            dn = (dn_logits, dn_boxes, dn_corners, dn_refs, dn_pre_logits, dn_pre_boxes)

        out = {
            "pred_logits": logits[-1], "pred_boxes": boxes[-1], "pred_corners": corners[-1], "ref_points": refs[-1],
            "up": self.up, "reg_scale": self.reg_scale,
        }
        if self.aux_loss:
            out["aux_outputs"] = _aux_list(logits[:-1], boxes[:-1], corners[:-1], refs[:-1], corners[-1], logits[-1])
            out["enc_aux_outputs"] = [{"pred_logits": enc_topk_logits, "pred_boxes": torch.sigmoid(enc_bbox_unact)}]
            out["pre_outputs"] = {"pred_logits": pre_logits, "pred_boxes": pre_boxes}
            out["enc_meta"] = {"class_agnostic": False}
            if dn is not None:
                dl, db, dc, dr, dpl, dpb = dn
                out["dn_outputs"] = _aux_list(dl, db, dc, dr, dc[-1], dl[-1])
                out["dn_pre_outputs"] = {"pred_logits": dpl, "pred_boxes": dpb}
                out["dn_meta"] = dn_meta
        return out


def _aux_list(logits, boxes, corners, refs, teacher_corners, teacher_logits):
    return [
        {"pred_logits": l, "pred_boxes": b, "pred_corners": c, "ref_points": r,
         "teacher_corners": teacher_corners, "teacher_logits": teacher_logits}
        for l, b, c, r in zip(logits, boxes, corners, refs)
    ]
