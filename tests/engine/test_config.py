"""Config loading: includes, recursive merge, overrides, backend selection, strict keys, clear errors."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dfine
from dfine.config import ConfigError, config_section, config_value
from dfine.config.schema import SCHEMA, Section
from dfine.data.transforms import default_ops
from dfine.engine.data_config import loader_settings
from dfine.engine.optim import build_lr_scheduler, build_warmup
from dfine.loss import DFINECriterion, HungarianMatcher
from dfine.model import DFINEPostProcessor, DFINETransformer, HGNetv2, HybridEncoder
from tests.model_helpers import config_path

REPO = Path(__file__).resolve().parents[2]


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
                                             "lr_scheduler.milestones=[1, 2]", "seed=3"])
    assert n["DFINETransformer"]["num_denoising"] == 0 and n["HGNetv2"]["use_lab"] is False
    assert n["lr_scheduler"]["milestones"] == [1, 2] and n["seed"] == 3
    s = dfine.load_config(config_path("s"))
    assert s["DFINETransformer"]["num_denoising"] == 100 and "seed" not in s
    assert s["lr_scheduler"]["milestones"] == [500]
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


# ------------------------------------------------------------------------------------------------
# strict configs: every key is declared in dfine.config.schema


def _yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _shown(path) -> str:
    """How the error message names a file (relative to the working directory when below it)."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def test_misspelt_key_in_a_file(tmp_path):
    cfg = _yaml(tmp_path / "foo.yml", f"__include__: ['{config_path('n')}']\nDFINETransformer:\n  num_querys: 10\n")
    with pytest.raises(ConfigError) as err:
        dfine.load_config(cfg)
    assert str(err.value) == (f"unknown config key 'DFINETransformer.num_querys' in {_shown(cfg)} "
                              "(did you mean 'num_queries'?)")
    assert isinstance(err.value, ValueError)


def test_misspelt_key_in_an_included_file(tmp_path):
    base = _yaml(tmp_path / "base.yml", f"__include__: ['{config_path('n')}']\nHybridEncoder:\n  hiden_dim: 64\n")
    top = _yaml(tmp_path / "top.yml", "__include__: ['base.yml']\nepochs: 3\n")
    with pytest.raises(ConfigError, match=r"^unknown config key 'HybridEncoder.hiden_dim' in .*base\.yml "
                                          r"\(did you mean 'hidden_dim'\?\)$") as err:
        dfine.load_config(top)
    assert _shown(base) in str(err.value) and "top.yml" not in str(err.value)
    # a top-level typo; and a key of another section is suggested with its full path
    bad = _yaml(tmp_path / "bad.yml", f"__include__: ['{config_path('n')}']\nepoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch' in .*bad\.yml \(did you mean 'epochs'\?\)"):
        dfine.load_config(bad)
    bad = _yaml(tmp_path / "bad2.yml", f"__include__: ['{config_path('n')}']\nnum_top_queries: 3\n")
    with pytest.raises(ConfigError, match=r"did you mean 'DFINEPostProcessor.num_top_queries'\?"):
        dfine.load_config(bad)


def test_misspelt_key_in_an_override():
    with pytest.raises(ConfigError) as err:
        dfine.load_config(config_path("n"), ["epochs=3", "DFINETransformer.num_querys=10"])
    assert str(err.value) == ("unknown config key 'DFINETransformer.num_querys' in the -u override "
                              "'DFINETransformer.num_querys=10' (did you mean 'num_queries'?)")
    with pytest.raises(ConfigError, match=r"unknown config key 'new' in the -u override 'new.section.value=1'"):
        dfine.load_config(config_path("n"), ["new.section.value=1"])
    # inside a weight_dict and inside an optimizer parameter group
    with pytest.raises(ConfigError, match=r"'DFINECriterion.weight_dict.loss_vf' .*did you mean 'loss_vfl'"):
        dfine.load_config(config_path("n"), ["DFINECriterion.weight_dict={loss_vf: 1}"])
    with pytest.raises(ConfigError, match=r"'optimizer.params\[0\].lrr' .*did you mean 'lr'"):
        dfine.load_config(config_path("n"), ["optimizer.params=[{params: backbone, lrr: 0.1}]"])


def test_override_with_a_bad_value_names_the_key():
    with pytest.raises(ConfigError) as err:
        dfine.load_config(config_path("n"), ["epochs=abc"])
    assert str(err.value) == "config key 'epochs' in the -u override 'epochs=abc': expected an integer, got 'abc'"
    with pytest.raises(ConfigError, match=r"'HGNetv2.use_lab' in the -u override .*expected true or false, got 1"):
        dfine.load_config(config_path("n"), ["HGNetv2.use_lab=1"])
    with pytest.raises(ConfigError, match=r"'eval_spatial_size' .*expected 2 values, got \[320\]"):
        dfine.load_config(config_path("n"), ["eval_spatial_size=[320]"])
    with pytest.raises(ConfigError, match=r"'HybridEncoder.in_channels\[1\]' .*expected an integer, got 'x'"):
        dfine.load_config(config_path("n"), ["HybridEncoder.in_channels=[1, x]"])
    with pytest.raises(ConfigError, match=r"'HGNetv2' .*expected a mapping"):
        dfine.load_config(config_path("n"), ["HGNetv2=3"])
    with pytest.raises(ConfigError, match="Section.key=value"):
        dfine.load_config(config_path("n"), ["=3"])
    # YAML 1.1 reads 1e-4 as a string: a number key takes it as the number
    cfg = dfine.load_config(config_path("n"), ["optimizer.lr=1e-4"])
    assert cfg["optimizer"]["lr"] == 1e-4


@pytest.mark.parametrize("override, key, supported", [
    ("HybridEncoder.act=relu", "HybridEncoder.act", "'silu'"),
    ("DFINETransformer.cross_attn_method=bilinear", "DFINETransformer.cross_attn_method", "'default' or 'discrete'"),
    ("DFINETransformer.query_select_method=agnostic", "DFINETransformer.query_select_method", "'default'"),
    ("optimizer.type=SGD", "optimizer.type", "'AdamW'"),
    ("lr_scheduler.type=CosineAnnealingLR", "lr_scheduler.type", "'MultiStepLR'"),
    ("scaler.type=NativeScaler", "scaler.type", "'GradScaler'"),
    ("ema.type=Other", "ema.type", "'ModelEMA'"),
    ("train_dataloader.dataset.return_masks=true", "train_dataloader.dataset.return_masks", "False"),
    ("train_dataloader.collate_fn.type=Other", "train_dataloader.collate_fn.type", "'BatchImageCollateFunction'"),
    ("DFINECriterion.matcher.type=SimOTA", "DFINECriterion.matcher.type", "'HungarianMatcher'"),
    ("DFINECriterion.share_matched_indices=true", "DFINECriterion.share_matched_indices", "False"),
    ("DFINECriterion.losses=[vfl, masks]", "DFINECriterion.losses[1]", "'vfl', 'boxes', 'local'"),
    ("evaluator.iou_types=[bbox, segm]", "evaluator.iou_types", "['bbox']"),
    ("use_focal_loss=false", "use_focal_loss", "True"),
    ("ops_backend=cuda", "ops_backend", "'auto' or 'reference'"),
    ("task=segmentation", "task", "'detection'"),
    ("model=RTDETR", "model", "'DFINE'"),
])
def test_a_value_we_cannot_honour_is_an_error(override, key, supported):
    with pytest.raises(ConfigError) as err:
        dfine.load_config(config_path("n"), [override])
    msg = str(err.value)
    assert msg.startswith(f"config key '{key}' in the -u override") and "is not supported here" in msg, msg
    assert supported in msg, msg


def test_policy_names_known_op_types():
    with pytest.raises(ConfigError, match=r"transforms.policy.ops\[0\]' .*'Zoom' is not supported here"):
        dfine.load_config(config_path("n"), ["train_dataloader.dataset.transforms.policy.ops=[Zoom]"])
    with pytest.raises(ConfigError, match=r"transforms.policy.name' .*'stop_epoch'"):
        dfine.load_config(config_path("n"), ["train_dataloader.dataset.transforms.policy.name=no_aug"])
    cfg = dfine.load_config(config_path("n"), ["train_dataloader.dataset.transforms.policy.ops=[RandomZoomOut]"])
    assert loader_settings(cfg, "train")["policy_ops"] == ["RandomZoomOut"]


def _ops_yaml(ops) -> str:
    def item(op):
        return "{" + ", ".join(f"{k}: {v}" for k, v in op.items()) + "}"
    return "[" + ", ".join(item(op) for op in ops) + "]"


def test_transforms_ops_are_checked_op_by_op(tmp_path):
    """The list builds the pipeline (tests/data/test_transform_ops.py); here: what load_config checks."""
    key = "train_dataloader.dataset.transforms.ops"
    published = default_ops([320, 320], train=True)
    cfg = dfine.load_config(config_path("n"), [f"{key}={_ops_yaml(published)}"])
    assert loader_settings(cfg, "train")["image_size"] == 320
    assert loader_settings(cfg, "train")["ops"] == published
    changed = [dict(op) for op in published]
    changed[2]["p"] = 0.5  # another probability is fine now
    assert dfine.load_config(config_path("n"), [f"{key}={_ops_yaml(changed)}"])["train_dataloader"]["dataset"][
        "transforms"]["ops"][2] == {"type": "RandomIoUCrop", "p": 0.5}
    with pytest.raises(ConfigError) as err:
        dfine.load_config(config_path("n"), [f"{key}={_ops_yaml(published + [{'type': 'GaussianBlur'}])}"])
    assert str(err.value).startswith(f"config key '{key}[9].type' in the -u override")
    assert "unknown transform op 'GaussianBlur'" in str(err.value)
    with pytest.raises(ConfigError, match=r"ops\[4\].q' .*RandomHorizontalFlip has no parameter 'q'"):
        flip = [{"type": "RandomHorizontalFlip", "q": 0.5}]
        dfine.load_config(config_path("n"), [f"{key}={_ops_yaml(published[:4] + flip + published[5:])}"])
    with pytest.raises(ConfigError, match=r"ops\[5\].size' .*expected an integer or a list"):
        dfine.load_config(config_path("n"), [f"{key}=" + _ops_yaml(published).replace("[320, 320]", "big")])
    # in a file, the val list: the file is named
    bad = _yaml(tmp_path / "val.yml", f"__include__: ['{config_path('n')}']\nval_dataloader:\n  dataset:\n"
                                      "    transforms:\n      ops: [{type: Resize, size: [640, 640]}, {type: ToTensor}]\n")
    with pytest.raises(ConfigError, match=r"'val_dataloader.dataset.transforms.ops\[1\].type' in .*val\.yml: .*ToTensor"):
        dfine.load_config(bad)


SHIPPED = sorted(p for p in (REPO / "configs" / "dfine").rglob("*.yml") if "include" not in p.parts)


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO / "configs" / "dfine")) for p in SHIPPED])
def test_every_shipped_config_loads(path):
    cfg = dfine.load_config(path)
    for split in ("train", "val"):
        settings = loader_settings(cfg, split)
        assert settings["batch_size"] == cfg[f"{split}_dataloader"]["total_batch_size"]
    assert isinstance(dfine.build_criterion(cfg, backend="reference"), DFINECriterion)
    assert dfine.build_postprocessor(cfg).num_top_queries == cfg["DFINEPostProcessor"]["num_top_queries"]


@pytest.mark.parametrize("dataset", sorted((REPO / "configs" / "dataset").glob("*.yml")), ids=lambda p: p.name)
def test_every_shipped_dataset_config_loads_through_a_config_that_includes_it(dataset, tmp_path):
    own = _yaml(tmp_path / "own.yml", f"__include__: ['{dataset}', '{REPO / 'configs/runtime.yml'}', "
                                      f"'{REPO / 'configs/dfine/include/dataloader.yml'}', "
                                      f"'{REPO / 'configs/dfine/include/optimizer.yml'}', "
                                      f"'{REPO / 'configs/dfine/include/dfine_hgnetv2.yml'}']\n")
    cfg = dfine.load_config(own)
    assert cfg["train_dataloader"]["dataset"]["type"] == "CocoDetection"
    default = "mscoco" if cfg["remap_mscoco_category"] else "contiguous"  # unless the file names one (Objects365)
    assert loader_settings(cfg, "train")["category_map"] == (cfg["train_dataloader"]["dataset"].get("category_map")
                                                             or default)
    # the dataset file alone: its `ops: ~` means the published pipeline
    alone = dfine.load_config(dataset)
    assert alone["train_dataloader"]["dataset"]["transforms"]["ops"] is None


def test_shipped_transforms_lists_are_the_published_pipelines():
    for path in SHIPPED:
        cfg = dfine.load_config(path)
        ops = cfg["train_dataloader"]["dataset"]["transforms"]["ops"]
        size = loader_settings(cfg, "train")["image_size"]
        assert ops == default_ops(size, train=True), path.name
        assert cfg["train_dataloader"]["dataset"]["transforms"]["policy"]["ops"] == [
            "RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop"]


def test_published_only_keys_are_read_or_checked():
    """Keys of the shipped configs that once were never read now take effect."""
    cfg = dfine.load_config(config_path("n"), ["train_dataloader.collate_fn.base_size=320",
                                               "train_dataloader.collate_fn.base_size_repeat=2",
                                               "train_dataloader.dataset.transforms.policy.epoch=5",
                                               "train_dataloader.collate_fn.stop_epoch=7"])
    settings = loader_settings(cfg, "train")
    assert settings["base_size"] == 320 and settings["base_size_repeat"] == 2
    assert settings["policy_epoch"] == 5 and settings["stop_epoch"] == 7
    assert config_section(cfg, "scaler") == {"type": "GradScaler", "enabled": True}
    off = dfine.load_config(config_path("n"), ["scaler.enabled=false"])
    assert config_value(off, "scaler.enabled") is False


def _signature_defaults(cls, skip=()):
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if name not in ("self",) + tuple(skip)}


@pytest.mark.parametrize("section, cls, skip", [
    ("HGNetv2", HGNetv2, ()),
    ("HybridEncoder", HybridEncoder, ()),
    ("DFINETransformer", DFINETransformer, ("backend",)),
    ("DFINEPostProcessor", DFINEPostProcessor, ()),
    ("DFINECriterion.matcher", HungarianMatcher, ()),
    ("DFINECriterion", DFINECriterion, ("matcher", "temperature", "backend")),
])
def test_schema_declares_the_constructor_arguments_with_their_defaults(section, cls, skip):
    spec = SCHEMA
    for k in section.split("."):
        spec = spec.keys[k]
    expected = _signature_defaults(cls, skip)
    declared = {k: v for k, v in spec.keys.items() if not isinstance(v, Section)}
    published_only = {"type", "boxes_weight_format", "share_matched_indices"}  # checked, not constructor args
    assert set(declared) - published_only == set(expected)
    for name, default in expected.items():
        got = declared[name].default
        norm = list(default) if isinstance(default, tuple) else default
        assert got == norm and type(got) is type(norm), f"{section}.{name}: schema {got!r}, class {default!r}"


def test_values_and_defaults_come_from_the_schema():
    cfg = dfine.load_config(config_path("n"))
    assert config_value(cfg, "max_nonfinite_steps") == 20 and config_value(cfg, "eval_freq") == 1
    assert config_value(cfg, "HGNetv2.name") == "B0"
    dec = config_section(cfg, "DFINETransformer")
    assert dec["num_classes"] == 80 and dec["eval_spatial_size"] == [640, 640]  # from the top level
    assert dec["mlp_act"] == "relu" and dec["num_queries"] == 300
    assert config_section(dict(cfg, num_classes=3), "DFINEPostProcessor")["num_classes"] == 3
    assert config_value({}, "lr_scheduler.milestones") == [] and config_value({}, "epochs") == 1
    assert config_value({"checkpoint_freq": None}, "checkpoint_freq") is None  # a null key stays null
    with pytest.raises(KeyError, match="not a key"):
        config_value(cfg, "no_such_key")
    # hand-made partial sections get the schema defaults
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(opt, {"lr_scheduler": {"milestones": [3]}})
    assert sched.gamma == 0.1 and build_warmup(sched, {}).duration == 0


def test_train_py_prints_a_config_error_as_one_line(tmp_path):
    run = subprocess.run([sys.executable, "train.py", "-c", config_path("n"), "-u", "DFINETransformer.num_querys=5"],
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: unknown config key 'DFINETransformer.num_querys' in the -u override 'DFINETransformer.num_querys=5' "
        "(did you mean 'num_queries'?)"]


def test_command_lines_and_load_detector_report_config_errors(tmp_path, capsys):
    from dfine.__main__ import main

    bad = _yaml(tmp_path / "bad.yml", f"__include__: ['{config_path('n')}']\nHGNetv2:\n  use_labs: true\n")
    code = main(["export", "-c", bad, "-r", str(tmp_path / "none.pth"), "--output", str(tmp_path / "m.onnx")])
    out = capsys.readouterr().out
    assert code == 2 and out.startswith("error: unknown config key 'HGNetv2.use_labs' in ") and "'use_lab'" in out
    with pytest.raises(ConfigError, match="HGNetv2.use_labs"):
        dfine.load_detector(bad)
    with pytest.raises(ConfigError, match=r"override 'HGNetv2.nam=B2' \(did you mean 'name'\?\)"):
        dfine.load_detector(config_path("n"), overrides=["HGNetv2.nam=B2"])
