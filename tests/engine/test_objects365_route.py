"""The Objects365 route: its published configs load and build, and -t maps the class rows between an
Objects365 (366 classes) and a COCO (80) model by the published table, tensor by tensor, in both directions;
into any other class count the class-shaped tensors are re-initialised and named in the log."""

from pathlib import Path

import pytest
import torch

import dfine
from dfine.config import config_section, config_value
from dfine.engine import Trainer
from dfine.model.checkpoint import class_row_mapping, class_shaped_keys, load_checkpoint
from dfine.model.classes import OBJ365_IDS_FOR_COCO

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "dfine"
SIZES = "nsmlx"
# facts file: Objects365 pretraining epochs; obj2coco / obj2custom epochs and stop epochs
PRETRAIN_EPOCHS = {"n": 48, "s": 36, "m": 36, "l": 24, "x": 24}
TUNE_EPOCHS = {"n": (64, 56), "s": (64, 56), "m": (56, 48), "l": (36, 30), "x": (36, 30)}
# a small D-FINE-N: fewer queries at 128 px keep the models tiny
TINY = ["eval_spatial_size=[128, 128]", "DFINETransformer.num_queries=20", "DFINETransformer.num_denoising=20",
        "DFINEPostProcessor.num_top_queries=20"]
ARCH_SECTIONS = ("HGNetv2", "HybridEncoder", "DFINETransformer")


def route_configs():
    for size in SIZES:
        yield size, "obj365", CONFIGS / "objects365" / f"dfine_hgnetv2_{size}_obj365.yml"
        yield size, "obj2coco", CONFIGS / "objects365" / f"dfine_hgnetv2_{size}_obj2coco.yml"
        if size != "n":  # the release has no N obj2custom config
            yield size, "obj2custom", CONFIGS / "custom" / "objects365" / f"dfine_hgnetv2_{size}_obj2custom.yml"


def architecture(cfg):
    sections = {name: dict(config_section(cfg, name)) for name in ARCH_SECTIONS}
    sections["HGNetv2"].pop("pretrained")
    sections["DFINETransformer"].pop("num_classes")
    return sections


@pytest.mark.parametrize("size,route,path", list(route_configs()), ids=[f"{s}-{r}" for s, r, _ in route_configs()])
def test_route_configs_load_with_the_published_values(size, route, path):
    cfg = dfine.load_config(path)
    coco = dfine.load_config(CONFIGS / f"dfine_hgnetv2_{size}_coco.yml")
    assert architecture(cfg) == architecture(coco)  # the same model as the size's COCO config
    expected_classes = {"obj365": 366, "obj2coco": 80, "obj2custom": 777}[route]
    assert config_value(cfg, "DFINETransformer.num_classes") == expected_classes
    assert config_value(cfg, "remap_mscoco_category") is (route == "obj2coco")
    epochs = config_value(cfg, "epochs")
    stop = config_value(cfg, "train_dataloader.collate_fn.stop_epoch")
    assert stop == config_value(cfg, "train_dataloader.dataset.transforms.policy.epoch")
    if route == "obj365":
        assert (epochs, stop) == (PRETRAIN_EPOCHS[size], 500)
        assert config_value(cfg, "train_dataloader.dataset.category_map") == "identity"  # label = Objects365 id
        assert config_value(cfg, "val_dataloader.dataset.category_map") == "identity"
    else:
        assert (epochs, stop) == TUNE_EPOCHS[size]
        assert config_value(cfg, "ema.warmups") == 0 and config_value(cfg, "lr_warmup_scheduler.warmup_duration") == 0
        assert config_value(cfg, "train_dataloader.collate_fn.ema_restart_decay") == 0.9999
    if route == "obj2custom":
        assert config_value(cfg, "HGNetv2.pretrained") is False
    if size == "s" and route != "obj365":  # the facts file's example: S obj2coco
        assert config_value(cfg, "optimizer.lr") == 0.00025 and config_value(cfg, "optimizer.weight_decay") == 0.000125
        assert [g.get("lr") for g in cfg["optimizer"]["params"]] == [0.000125, 0.000125, None]
        assert config_value(cfg, "train_dataloader.collate_fn.base_size_repeat") == 10


def test_obj365_model_builds_with_366_class_rows():
    cfg = dfine.load_config(CONFIGS / "objects365" / "dfine_hgnetv2_n_obj365.yml", TINY)
    model = dfine.build_model(cfg, backend="reference")
    state = model.state_dict()
    keys = class_shaped_keys(state)
    assert len(keys) == 2 + 2 * 3 + 1  # enc_score_head, 3 decoder score heads, denoising_class_embed
    for key in keys:
        assert state[key].shape[0] == (367 if "denoising_class_embed" in key else 366), key
    coco = dfine.build_model(dfine.load_config(CONFIGS / "objects365" / "dfine_hgnetv2_n_obj2coco.yml", TINY),
                             backend="reference").state_dict()
    assert list(coco) == list(state)  # same tensors; only the class rows differ
    assert [k for k in state if state[k].shape != coco[k].shape] == keys


# ------------------------------------------------------------------------------------------------
# the class-row mapping of -t


def tiny_model(num_classes, seed):
    torch.manual_seed(seed)
    cfg = dfine.load_config(CONFIGS / "dfine_hgnetv2_n_coco.yml", TINY + [f"num_classes={num_classes}"])
    model = dfine.build_model(cfg, backend="reference")
    with torch.no_grad():  # every class row distinct (the score-head biases start equal)
        for key in class_shaped_keys(model.state_dict()):
            model.state_dict()[key].copy_(torch.randn_like(model.state_dict()[key]))
    return model, cfg


def test_table_pairs():
    forward, text = class_row_mapping(366, 80)
    assert forward[0] == (0, 1) and forward[1] == (1, 47) and forward[79] == (79, 227) and "Objects365" in text
    assert len({s for _, s in forward}) == 80  # one Objects365 row per COCO class
    backward, _ = class_row_mapping(80, 366)
    assert backward == [(s, d) for d, s in forward]
    assert class_row_mapping(366, 5) is None and class_row_mapping(80, 80) is None and class_row_mapping(5, 80) is None


def test_obj365_to_coco_copies_rows_by_the_table(tmp_path):
    source, _ = tiny_model(366, seed=1)
    src = {k: v.clone() for k, v in source.state_dict().items()}
    torch.save({"model": src}, tmp_path / "obj365.pth")
    target, _ = tiny_model(80, seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_checkpoint(target, tmp_path / "obj365.pth", strict=False, skip_mismatched=True, map_classes=True)
    own = target.state_dict()
    keys = class_shaped_keys(own)
    assert sorted(report.mapped_keys) == sorted(keys) and not report.skipped_keys and report.ok
    rows = torch.tensor(OBJ365_IDS_FOR_COCO) + 1
    for key in keys:  # COCO row c <- Objects365 row obj365_ids[c] + 1
        assert torch.equal(own[key][:80], src[key][rows]), key
        if "denoising_class_embed" in key:  # the padding row (last) is the target's own
            torch.testing.assert_close(own[key][80], before[key][80], rtol=0, atol=0)
    for key in own:
        if key not in keys:
            torch.testing.assert_close(own[key], src[key], rtol=0, atol=0, msg=key)


def test_coco_to_obj365_copies_rows_back(tmp_path):
    source, _ = tiny_model(80, seed=3)
    src = {k: v.clone() for k, v in source.state_dict().items()}
    torch.save({"ema": {"module": src}}, tmp_path / "coco.pth")
    target, _ = tiny_model(366, seed=4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_checkpoint(target, tmp_path / "coco.pth", strict=False, skip_mismatched=True, map_classes=True)
    own = target.state_dict()
    keys = class_shaped_keys(own)
    assert sorted(report.mapped_keys) == sorted(keys) and not report.skipped_keys
    rows = torch.tensor(OBJ365_IDS_FOR_COCO) + 1
    untouched = torch.ones(367, dtype=torch.bool)
    untouched[rows] = False
    for key in keys:  # Objects365 row obj365_ids[c] + 1 <- COCO row c
        assert torch.equal(own[key][rows], src[key][:80]), key
        n = own[key].shape[0]  # 366 rows, 367 for the embedding (its padding row last)
        assert torch.equal(own[key][untouched[:n]], before[key][untouched[:n]]), key  # rows the table skips


def test_tune_from_logs_the_mapping_and_reinitialised_tensors(tmp_path):
    source, _ = tiny_model(366, seed=5)
    torch.save({"model": source.state_dict()}, tmp_path / "obj365.pth")
    _, coco_cfg = tiny_model(80, seed=0)
    trainer = Trainer(coco_cfg, output_dir=tmp_path / "coco", progress=False)
    trainer.tune_from(tmp_path / "obj365.pth")
    log = (tmp_path / "coco" / "log.txt").read_text()
    assert "class rows mapped Objects365 (366 classes) -> COCO (80) (9)" in log
    assert not any(line.startswith("re-initialised") for line in log.splitlines())
    src = source.state_dict()
    torch.testing.assert_close(trainer.model.decoder.dec_score_head[2].bias, src["decoder.dec_score_head.2.bias"][
        torch.tensor(OBJ365_IDS_FOR_COCO) + 1], rtol=0, atol=0)
    torch.testing.assert_close(trainer.ema.module.decoder.enc_score_head.weight, trainer.model.decoder.enc_score_head.weight)

    # any other class count: the class-shaped tensors keep their initialisation and are listed by name
    _, custom_cfg = tiny_model(5, seed=0)
    other = Trainer(custom_cfg, output_dir=tmp_path / "custom", progress=False)
    fresh = {k: v.clone() for k, v in other.model.state_dict().items()}
    other.tune_from(tmp_path / "obj365.pth")
    log = (tmp_path / "custom" / "log.txt").read_text()
    keys = class_shaped_keys(fresh)
    line = next(l for l in log.splitlines() if l.startswith("re-initialised"))
    assert f"{len(keys)} tensors" in line and all(k in line for k in keys) and "class rows" not in log
    for key in keys:
        torch.testing.assert_close(other.model.state_dict()[key], fresh[key], rtol=0, atol=0)
    assert "| decoder |" in log  # the per-part load table still comes first
