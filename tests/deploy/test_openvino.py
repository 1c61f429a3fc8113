"""OpenVINO as a CPU runtime (dfine.deploy.runners.OpenVinoRunner, dfine.deploy.openvino_ir, predict --backend
openvino): the same detections as PyTorch, the converted-model cache, one-line errors.

One dynamic export of a small D-FINE-N (module-scoped), read by OpenVINO: it must equal PyTorch at batch 1 and 3
and at a non-square size, to the tolerances of the onnxruntime tests (tests/deploy/test_export.py, which also
export every architecture: OpenVINO reads the same standard-ONNX graph).
"""

import json
import sys
import warnings

import pytest
import torch
import torchvision

import dfine
from dfine.__main__ import main as dfine_main
from dfine.apps import predict as predict_mod
from dfine.deploy import DeployError, OpenVinoRunner, TorchRunner, export_onnx, openvino_runner
from dfine.deploy import openvino_ir
from tests.conftest import require_backend
from tests.deploy.test_export import FUSED, _assert_same, _inputs, _main, _random_detector, _same_results
from tests.model_helpers import config_path

import onnx  # noqa: E402
import openvino  # noqa: E402,F401  (requirements.txt: a missing install must fail, not skip)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(detector running the fused ops, OpenVinoRunner of its dynamic-batch, dynamic-size export)."""
    detector, _ = _random_detector("n", backend=FUSED)
    path = tmp_path_factory.mktemp("ov_n") / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(detector, path, (320, 320), dynamic_batch=True, dynamic_size=True)
    return detector, OpenVinoRunner(path, threads=2)


@pytest.mark.parametrize("n,h,w", [(1, 320, 320), (3, 256, 384)])
def test_openvino_equals_pytorch(exported, n, h, w):
    """The graph in OpenVINO against the PyTorch model with the reference ops (what the graph was traced from)."""
    detector, runner = exported
    assert runner.input_size == (None, None)
    images, sizes = _inputs(n, h, w, seed=n * 1000 + h + w)
    dfine.set_backend(detector, "reference")
    try:
        ref = TorchRunner(detector)(images, sizes)
    finally:
        dfine.set_backend(detector, FUSED)
    got = runner(images, sizes)
    assert got[0].shape == (n, 30)
    _assert_same(ref, got, sizes)


def test_openvino_equals_fused_ops(exported):
    require_backend("cpp")
    detector, runner = exported
    images, sizes = _inputs(2, 256, 384, seed=7)
    _assert_same(TorchRunner(detector)(images, sizes), runner(images, sizes), sizes)


def test_openvino_input_too_small_is_a_clear_error(exported):
    """32 x 32 gives fewer positions than num_queries: one line saying so, not OpenVINO's C++ trace."""
    _, runner = exported
    with pytest.raises(DeployError, match=r"images \[1, 3, 32, 32\] - the images are too small") as info:
        runner(torch.rand(1, 3, 32, 32), torch.tensor([[32, 32]]))
    assert "\n" not in str(info.value) and "Exception from" not in str(info.value)


def test_runner_errors(tmp_path, monkeypatch):
    with pytest.raises(DeployError, match="missing.onnx.* does not exist"):
        OpenVinoRunner(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(DeployError, match="openvino cannot read .*junk.onnx") as info:
        OpenVinoRunner(tmp_path / "junk.onnx")
    assert "\n" not in str(info.value)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), tmp_path / "id.onnx")
    with pytest.raises(DeployError, match="is not a D-FINE export"):
        OpenVinoRunner(tmp_path / "id.onnx")
    with pytest.raises(DeployError, match="--backend openvino runs on the CPU; got --device cuda"):
        OpenVinoRunner(tmp_path / "id.onnx", device="cuda")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(DeployError, match=r"openvino is not installed \(pip install openvino\)"):
        OpenVinoRunner(tmp_path / "id.onnx")


# predict --backend openvino: the checkpoint converted once, then read from the cache


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ov_cli")
    cfg_file = root / "tiny.yml"
    cfg_file.write_text(
        f"__include__: ['{config_path('n')}']\n"
        "eval_spatial_size: [320, 320]\n"
        "DFINETransformer:\n  num_queries: 60\n  num_denoising: 0\n"
        "DFINEPostProcessor:\n  num_top_queries: 30\n"
    )
    detector, _ = _random_detector("n", seed=2, config=cfg_file)
    with torch.no_grad():
        for head in detector.model.decoder.dec_score_head:
            if isinstance(head, torch.nn.Linear):
                head.bias.fill_(2.0)  # scores above the threshold
    torch.save({"model": detector.model.state_dict()}, root / "tiny.pth")
    images = root / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(120, 200), (90, 150)]):
        torchvision.io.write_png(torch.randint(0, 255, (3, h, w), dtype=torch.uint8), str(images / f"im{i}.png"))
    return cfg_file, root / "tiny.pth", images


@pytest.fixture(scope="module")
def torch_results(ckpt, tmp_path_factory):
    """predict's COCO results with the PyTorch model (fused ops) on the two images."""
    cfg, weights, images = ckpt
    return predict_mod.predict(str(cfg), str(weights), str(images), str(tmp_path_factory.mktemp("pt")),
                               backend=FUSED)["results"]


@pytest.fixture(scope="module")
def dynamic_onnx(ckpt, tmp_path_factory):
    """The checkpoint exported by the command line with a dynamic input size."""
    cfg, weights, _ = ckpt
    path = tmp_path_factory.mktemp("ov_onnx") / "m.onnx"
    assert dfine_main(["export", "-c", str(cfg), "-r", str(weights), "--output", str(path), "--dynamic-size"]) == 0
    return path


def test_predict_openvino_converts_once_and_matches_pytorch(ckpt, torch_results, tmp_path, monkeypatch):
    cfg, weights, images = ckpt
    cache = tmp_path / "cache"
    ov_out = predict_mod.predict(str(cfg), str(weights), str(images), str(tmp_path / "ov"), backend="openvino",
                                 cache_dir=cache)
    _same_results(torch_results, ov_out["results"])
    (entry,) = [p for p in cache.iterdir()]  # one finished entry, no work directory left behind
    assert (entry / "model.xml").is_file() and (entry / "model.bin").is_file()
    assert json.loads((entry / "source.json").read_text())["checkpoint"] == str(weights)
    # float32 weights in the IR (save_model would halve them to float16 by default)
    n_params = sum(v.numel() for v in torch.load(weights)["model"].values() if v.is_floating_point())
    assert (entry / "model.bin").stat().st_size > 3 * n_params

    # the second run reads the cache: no model is loaded or exported
    def refuse(*args, **kwargs):
        raise AssertionError("converted again although the cache holds the model")

    monkeypatch.setattr(openvino_ir, "load_detector", refuse)
    monkeypatch.setattr(openvino_ir, "export_onnx", refuse)
    again = predict_mod.predict(str(cfg), str(weights), str(images), str(tmp_path / "ov2"), backend="openvino",
                                cache_dir=cache)
    assert again["results"] == ov_out["results"]
    runner, _, _ = openvino_runner(str(cfg), str(weights), cache_dir=cache)
    assert runner.cache_entry == entry and runner.input_size == (320, 320)
    monkeypatch.undo()

    # another checkpoint (here: other bytes) is another entry; the trusted flag too
    changed = tmp_path / "changed.pth"
    state = torch.load(weights)
    next(iter(state["model"].values())).add_(0.5)
    torch.save(state, changed)
    key = openvino_ir.openvino_cache_key(dfine.load_config(str(cfg)), str(weights))
    assert entry.name == key
    assert openvino_ir.openvino_cache_key(dfine.load_config(str(cfg)), str(changed)) != key
    assert openvino_ir.openvino_cache_key(dfine.load_config(str(cfg)), str(weights), trusted=True) != key


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DFINE_CACHE_DIR", str(tmp_path / "d"))
    assert openvino_ir.default_cache_dir() == tmp_path / "d" / "openvino"
    monkeypatch.delenv("DFINE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert openvino_ir.default_cache_dir() == tmp_path / "x" / "dfine" / "openvino"


def test_cli_openvino(ckpt, torch_results, dynamic_onnx, tmp_path, capsys, monkeypatch):
    cfg, weights, images = ckpt
    monkeypatch.setenv("DFINE_CACHE_DIR", str(tmp_path / "default"))
    monkeypatch.chdir(tmp_path)
    code, out = _main(capsys, "predict", "-c", cfg, "-r", weights, "--input", images, "--output", tmp_path / "o",
                      "--backend", "openvino", "--onnx", dynamic_onnx)
    assert code == 0 and "2 image(s)" in out, out
    _same_results(torch_results, json.loads((tmp_path / "o" / "results.json").read_text()))
    # --cache-dir none: converted in a temporary directory, nothing kept
    code, out = _main(capsys, "predict", "-c", cfg, "-r", weights, "--input", images / "im0.png", "--output",
                      tmp_path / "o2", "--backend", "openvino", "--cache-dir", "none")
    assert code == 0 and "1 image(s)" in out, out
    assert not (tmp_path / "none").exists() and not (tmp_path / "default").exists()


def test_cli_openvino_errors(ckpt, dynamic_onnx, tmp_path, capsys):
    cfg, weights, images = ckpt
    common = ["predict", "-c", cfg, "-r", weights, "--input", images, "--output", tmp_path / "o"]
    cases = [
        (["--backend", "openvino", "--onnx", tmp_path / "missing.onnx"], "missing.onnx' (ONNX or OpenVINO .xml) does not exist"),
        (["--backend", "openvino", "--device", "cuda"], "--backend openvino runs on the CPU"),
        (["--backend", "openvino", "--compile"], "--compile applies to the PyTorch model, not to --backend openvino"),
        (["--backend", "reference", "--cache-dir", tmp_path], "--cache-dir is only used with --backend openvino"),
    ]
    for extra, message in cases:
        code, out = _main(capsys, *common, *extra)
        assert code == 2 and out.startswith("error: ") and message in out and out.count("\n") == 1, (extra, out)
    # a config whose input size is too small for num_queries, with a dynamic-size graph: one line says so
    small = tmp_path / "small.yml"
    small.write_text(f"__include__: ['{cfg}']\neval_spatial_size: [32, 32]\n")
    code, out = _main(capsys, "predict", "-c", small, "-r", weights, "--input", images / "im0.png", "--output",
                      tmp_path / "o", "--backend", "openvino", "--onnx", dynamic_onnx)
    assert code == 2 and out.startswith("error: ") and out.count("\n") == 1, out
    assert "images [1, 3, 32, 32] - the images are too small" in out, out
