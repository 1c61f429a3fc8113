"""Config loading: includes, recursive merge, overrides, backend selection, clear errors."""

import pytest
import torch

import dfine
from tests.model_helpers import config_path


def test_published_sections_and_merge():
    cfg = dfine.load_config(config_path("x"))
    for key in ("DFINE", "HGNetv2", "HybridEncoder", "DFINETransformer", "DFINEPostProcessor", "DFINECriterion",
                "optimizer", "lr_scheduler", "lr_warmup_scheduler", "ema", "train_dataloader", "val_dataloader",
                "epochs", "clip_max_norm", "use_amp", "use_ema", "sync_bn", "num_classes", "remap_mscoco_category",
                "eval_spatial_size", "output_dir"):
        assert key in cfg, key
    # size file wins over the include, untouched include keys survive (recursive merge)
    assert cfg["DFINETransformer"]["reg_scale"] == 8 and cfg["DFINETransformer"]["num_layers"] == 6
    assert cfg["HybridEncoder"]["hidden_dim"] == 384 and cfg["HybridEncoder"]["use_encoder_idx"] == [2]
    assert cfg["use_amp"] is True  # optimizer.yml (later) wins over runtime.yml
    assert cfg["train_dataloader"]["collate_fn"]["stop_epoch"] == 72
    assert cfg["train_dataloader"]["dataset"]["img_folder"].endswith("train2017/")
    assert cfg["DFINECriterion"]["weight_dict"] == {"loss_vfl": 1, "loss_bbox": 5, "loss_giou": 2, "loss_fgl": 0.15,
                                                   "loss_ddf": 1.5}
    assert cfg["DFINECriterion"]["matcher"]["weight_dict"] == {"cost_class": 2, "cost_bbox": 5, "cost_giou": 2}


def test_no_leak_between_loads_and_overrides():
    n = dfine.load_config(config_path("n"), ["DFINETransformer.num_denoising=0", "HGNetv2.use_lab=false",
                                             "new.section.value=[1, 2]"])
    assert n["DFINETransformer"]["num_denoising"] == 0 and n["HGNetv2"]["use_lab"] is False
    assert n["new"]["section"]["value"] == [1, 2]
    s = dfine.load_config(config_path("s"))
    assert s["DFINETransformer"]["num_denoising"] == 100 and "new" not in s
    assert s["HybridEncoder"]["in_channels"] == [256, 512, 1024]
    with pytest.raises(ValueError, match="Section.key=value"):
        dfine.load_config(config_path("n"), ["oops"])
    with pytest.raises(FileNotFoundError, match="nope.yml"):
        dfine.load_config("nope.yml")


def test_backend_from_config_and_keyword():
    cfg = dfine.load_config(config_path("n"), ["ops_backend=reference"])
    model = dfine.build_model(cfg)
    attn = [m for m in model.modules() if type(m).__name__ == "MSDeformableAttention"]
    assert attn and all(m.backend == "reference" for m in attn)
    model = dfine.build_model(cfg, backend="triton")
    assert all(m.backend == "triton" for m in model.modules() if type(m).__name__ == "MSDeformableAttention")
    dfine.set_backend(model, "cpp")
    assert all(m.backend == "cpp" for m in model.modules() if type(m).__name__ == "MSDeformableAttention")
    with pytest.raises(ValueError, match="backend"):
        dfine.build_model(cfg, backend="cuda-magic")


def test_pretrained_missing_weights_error(tmp_path):
    cfg = dfine.load_config(config_path("n"), ["HGNetv2.pretrained=true", f"HGNetv2.local_model_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="PPHGNetV2_B0_stage1.pth"):
        dfine.build_model(cfg)


def test_postprocessor_remap_and_sizes():
    cfg = dfine.load_config(config_path("n"))
    post = dfine.build_postprocessor(cfg)
    logits = torch.full((1, 5, 80), -10.0)
    logits[0, 2, 79] = 5.0  # best: query 2, class 79 -> COCO id 90
    logits[0, 4, 0] = 4.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 5])
    boxes[0, 2] = torch.tensor([0.5, 0.25, 0.5, 0.5])
    post.num_top_queries = 3
    res = post({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[200, 100]]))[0]
    assert res["labels"].tolist()[:2] == [90, 1]
    torch.testing.assert_close(res["boxes"][0], torch.tensor([50.0, 0.0, 150.0, 50.0]))
    post.remap_mscoco_category = False
    labels, boxes_px, scores = post.deploy()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[200, 100]]))
    assert labels[0, :2].tolist() == [79, 0] and boxes_px.shape == (1, 3, 4)


def test_custom_dataset_config_builds_other_class_count(tmp_path):
    cfg_file = tmp_path / "my_n.yml"
    cfg_file.write_text(
        f"__include__: ['{config_path('n').replace('dfine_hgnetv2_n_coco.yml', '../dataset/custom_detection.yml')}',"
        f" '{config_path('n')}']\n"
        "num_classes: 7\nremap_mscoco_category: False\n"
    )
    cfg = dfine.load_config(str(cfg_file))
    model = dfine.build_model(cfg, backend="reference")
    assert model.decoder.enc_score_head.out_features == 7
    assert model.decoder.denoising_class_embed.num_embeddings == 8
    post = dfine.build_postprocessor(cfg)
    assert post.num_classes == 7 and post.remap_mscoco_category is False
