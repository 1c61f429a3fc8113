"""Class metadata travels with the model: train.py's checkpoints record the dataset's class names, category ids and
config (loadable with weights_only=True); predict / visualize / export use them, --classes overrides, a checkpoint
without them gets COCO (80 classes) or numbered names with a notice, and the exported ONNX carries them."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import dfine
from dfine.__main__ import main as cli
from dfine.apps import predict as predict_mod
from dfine.apps.visualize import visualize
from dfine.engine import Trainer
from dfine.model.checkpoint import checkpoint_metadata, read_checkpoint, save_safetensors
from dfine.model.classes import COCO_CLASS_NAMES, read_classes_file, resolve_classes
from dfine.model.postprocessor import MSCOCO_CATEGORY_IDS
from dfine.data.synthetic import make_synthetic_coco
from tests.engine.test_train import SYNTH_CFG, tiny_config
from tests.model_helpers import config_path

# the synthetic dataset's categories (dfine/data/synthetic.py): odd ids, so label != category id
NAMES = ["circle", "square", "triangle", "cross", "ring"]
IDS = [1, 3, 5, 7, 9]
BOOSTED = 2  # the label every detection gets in the `boosted` checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch (one step) of training on 4 synthetic images; a config file for the inference commands; a copy
    of the last checkpoint whose score heads favour label BOOSTED for every query; two images."""
    root = tmp_path_factory.mktemp("classes")
    tiny_data = make_synthetic_coco(root / "syn", seed=0, num_train=4, num_val=2, image_size=128)
    cfg = tiny_config(tiny_data, epochs=1, **{"val_dataloader.total_batch_size": 2})
    Trainer(cfg, output_dir=root / "run", progress=False).fit()
    cfg_file = root / "tiny.yml"
    cfg_file.write_text(f"__include__: ['{SYNTH_CFG}']\neval_spatial_size: [128, 128]\n"
                        "DFINETransformer:\n  num_queries: 20\n  num_denoising: 20\n"
                        "DFINEPostProcessor:\n  num_top_queries: 20\n")
    ckpt = torch.load(root / "run" / "last.pth", weights_only=True)
    for key, value in ckpt["ema"]["module"].items():
        if ".dec_score_head." in key and key.endswith(".bias"):
            value[BOOSTED] += 30.0
    torch.save(ckpt, root / "boosted.pth")
    torch.save({"model": ckpt["ema"]["module"]}, root / "bare.pth")  # weights only, no metadata
    images = root / "images"
    images.mkdir()
    for path in sorted(Path(tiny_data["val_images"]).iterdir()):
        shutil.copy(path, images / path.name)
    return {"cfg": cfg, "cfg_file": cfg_file, "run": root / "run", "boosted": root / "boosted.pth",
            "bare": root / "bare.pth", "images": images, "data": tiny_data}


def drawn_texts(monkeypatch):
    """Collect the label texts predict draws."""
    seen = []
    real = predict_mod.draw_bounding_boxes

    def recording(image, boxes, labels=None, **kwargs):
        seen.extend(labels or [])
        return real(image, boxes, labels=labels, **kwargs)

    monkeypatch.setattr(predict_mod, "draw_bounding_boxes", recording)
    return seen


def test_train_checkpoints_record_classes_and_config(trained):
    expected = {"num_classes": 5, "names": NAMES, "category_ids": IDS, "category_map": "contiguous",
                "annotation_file": str(trained["data"]["train_annotations"])}
    for name in ("last.pth", "best.pth", "best_stg1.pth"):
        ckpt = torch.load(trained["run"] / name, weights_only=True)  # plain values only: safe loading holds
        assert ckpt["classes"] == expected, name
        assert ckpt["config"] == json.loads(json.dumps(trained["cfg"])), name
        assert checkpoint_metadata(ckpt) == {"classes": expected, "config": ckpt["config"]}
    det = dfine.load_detector(trained["cfg_file"], trained["run"] / "last.pth", backend="reference", deploy=False)
    assert det.classes.names == tuple(NAMES) and det.classes.category_ids == tuple(IDS) and det.classes.notice is None


def test_predict_writes_the_dataset_category_ids_and_draws_its_names(trained, tmp_path, monkeypatch):
    seen = drawn_texts(monkeypatch)
    out = predict_mod.predict(str(trained["cfg_file"]), str(trained["boosted"]), str(trained["images"]),
                              str(tmp_path), threshold=0.5, backend="reference")
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 2 * 20 and {r["category_id"] for r in results} == {IDS[BOOSTED]}
    assert len(seen) == 40 and all(text.startswith(NAMES[BOOSTED] + " ") for text in seen)
    categories = json.loads((tmp_path / "images.json").read_text())["categories"]
    assert categories == [{"id": i, "name": n} for i, n in zip(IDS, NAMES)] == out["categories"]


def test_classes_file_formats(tmp_path, trained):
    recorded = {"names": NAMES, "category_ids": IDS}
    text = tmp_path / "names.txt"
    text.write_text("a\nb\n\n  c \nd\ne\n")
    info = resolve_classes(5, recorded, text)
    assert info.names == ("a", "b", "c", "d", "e") and info.category_ids == tuple(IDS)  # names only: ids kept
    assert resolve_classes(5, None, text).category_ids == (0, 1, 2, 3, 4)  # nothing recorded: id = label
    by_id = tmp_path / "by_id.json"
    by_id.write_text(json.dumps({"30": "z", "10": "x", "20": "y"}))
    info = resolve_classes(5, recorded, by_id)
    assert info.names == ("x", "y", "z", "class 3", "class 4") and info.category_ids == (10, 20, 30, None, None)
    coco = resolve_classes(5, None, trained["data"]["val_annotations"])  # an annotation file's 'categories'
    assert coco.names == tuple(NAMES) and coco.category_ids == tuple(IDS)
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(["p", "q"]))
    assert read_classes_file(listed, 5) == (["p", "q"], None)
    for name, bad, message in (("six.json", json.dumps(list("abcdef")), "names 6 classes but the model has num_classes 5"),
                               ("broken.json", "{not json", "not valid JSON"),
                               ("keys.json", json.dumps({"x": "a"}), "category ids"),
                               ("empty.txt", "\n\n", "names no classes")):
        path = tmp_path / name
        path.write_text(bad)
        with pytest.raises(ValueError, match=message):
            read_classes_file(path, 5)


def test_classes_option_overrides_on_the_command_line(trained, tmp_path, capsys):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"101": "alpha", "102": "beta", "103": "gamma", "104": "delta", "105": "eps"}))
    args = ["predict", "-c", str(trained["cfg_file"]), "-r", str(trained["boosted"]), "--input",
            str(trained["images"]), "--output", str(tmp_path / "out"), "--backend", "reference", "--threshold", "0.5"]
    assert cli(args + ["--classes", str(names)]) == 0
    assert {r["category_id"] for r in json.loads((tmp_path / "out" / "results.json").read_text())} == {103}
    too_many = tmp_path / "many.txt"
    too_many.write_text("\n".join("abcdef"))
    capsys.readouterr()
    assert cli(args + ["--classes", str(too_many)]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("error: --classes file") and "num_classes 5" in out[0]


def test_checkpoint_without_metadata_gets_numbered_names_and_a_notice(trained, tmp_path, capsys, monkeypatch):
    seen = drawn_texts(monkeypatch)
    args = ["predict", "-c", str(trained["cfg_file"]), "-r", str(trained["bare"]), "--input", str(trained["images"]),
            "--output", str(tmp_path), "--backend", "reference", "--threshold", "0.5"]
    assert cli(args) == 0
    err = capsys.readouterr().err
    assert "notice:" in err and "records no class names" in err and "--classes" in err
    assert {r["category_id"] for r in json.loads((tmp_path / "results.json").read_text())} == {BOOSTED}  # = label
    assert seen and all(text.startswith(f"class {BOOSTED} ") for text in seen)


def test_published_coco_checkpoints_get_the_coco_classes(tmp_path):
    info = resolve_classes(80, coco_config=True)  # no metadata, 80 classes, a COCO config
    assert info.names == tuple(COCO_CLASS_NAMES) and info.category_ids == tuple(MSCOCO_CATEGORY_IDS)
    assert info.notice is None and info.name(0) == "person" and info.category_id(79) == 90
    assert "COCO" in resolve_classes(80, coco_config=False).notice  # 80 classes of a custom config: said so
    cfg = dfine.load_config(config_path("n"), ["eval_spatial_size=[128, 128]", "DFINETransformer.num_queries=20"])
    model = dfine.build_model(cfg, backend="reference")
    torch.save({"ema": {"module": model.state_dict()}}, tmp_path / "dfine_n_coco.pth")  # the release's layout
    det = dfine.load_detector(cfg, tmp_path / "dfine_n_coco.pth", backend="reference")
    assert det.classes.names[:2] == ("person", "bicycle") and det.classes.category_ids[-1] == 90
    assert det.classes.notice is None


def test_safetensors_metadata_carries_the_classes(trained, tmp_path):
    ckpt = read_checkpoint(trained["run"] / "last.pth")
    path = tmp_path / "model.safetensors"
    save_safetensors(ckpt["ema"]["module"], path, {"classes": ckpt["classes"], "config": ckpt["config"]})
    assert checkpoint_metadata(path) == {"classes": ckpt["classes"], "config": ckpt["config"]}
    det = dfine.load_detector(trained["cfg_file"], path, backend="reference")
    assert det.report.ok and det.classes.names == tuple(NAMES) and det.classes.category_ids == tuple(IDS)


def test_onnx_export_carries_the_names(trained, tmp_path, capsys, monkeypatch):
    import onnx

    path = tmp_path / "model.onnx"
    assert cli(["export", "-c", str(trained["cfg_file"]), "-r", str(trained["boosted"]), "--output", str(path)]) == 0
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["names"]) == NAMES and json.loads(props["category_ids"]) == IDS
    assert props["num_classes"] == "5"
    # the file names the classes even when the checkpoint given beside it records none
    seen = drawn_texts(monkeypatch)
    capsys.readouterr()
    args = ["predict", "-c", str(trained["cfg_file"]), "-r", str(trained["bare"]), "--input", str(trained["images"]),
            "--output", str(tmp_path / "out"), "--backend", "onnxruntime", "--onnx", str(path), "--threshold", "0.5"]
    assert cli(args) == 0
    assert "notice" not in capsys.readouterr().err
    assert {r["category_id"] for r in json.loads((tmp_path / "out" / "results.json").read_text())} == {IDS[BOOSTED]}
    assert seen and all(text.startswith(NAMES[BOOSTED] + " ") for text in seen)


def test_visualize_names_the_labels(trained, tmp_path):
    image = sorted(trained["images"].iterdir())[0]
    vis = visualize(str(trained["cfg_file"]), str(trained["boosted"]), str(image), str(tmp_path / "fdr.png"), top=1,
                    backend="reference")
    assert vis.classes.names == tuple(NAMES)
    legend = [t.get_text() for t in vis.axes[0, 1].get_legend().get_texts()]
    assert len(legend) == 1 and f": {NAMES[BOOSTED]} " in legend[0]
