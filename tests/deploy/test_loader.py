"""dfine.load_detector (the one loader of predict, export, visualize, --test-only and the benchmarks),
optimize_for_cpu (the CPU inference forms, applied explicitly) and the model's single numeric path."""

import pytest
import torch

import dfine
from dfine.apps.predict import load_runner
from dfine.deploy import DeployError, Detector, DetectorGraph, optimize_for_cpu
from dfine.deploy.cpu import OneDNNLinear, ShiftedMaxPool2x2, ShortSoftmax
from tests.tiny_checkpoint import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg, weights = write_tiny_checkpoint(tmp_path_factory.mktemp("loader"))
    return str(cfg), str(weights)


def _images(seed=0):
    return torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(seed))


def test_load_detector_deployed_cpu(tiny):
    cfg, weights = tiny
    det = dfine.load_detector(cfg, weights, backend="reference")
    assert isinstance(det, Detector) and det.report.ok and det.input_size == (320, 320)
    assert not det.model.training
    assert any(".conv_bn_fused." in k for k in det.model.state_dict())  # deployed
    # the CPU forms were applied, and say so
    assert det.optimizations["max_pool"] == 1 and det.optimizations["softmax"] >= 3
    assert det.optimizations["relu_inplace"] > 10
    assert isinstance(det.model.backbone.stem.pool, ShiftedMaxPool2x2)
    graph = det.graph()
    assert isinstance(graph, DetectorGraph)
    labels, boxes, scores = graph(_images(), torch.tensor([[640, 480]]))
    assert labels.shape == scores.shape == (1, 20) and boxes.shape == (1, 20, 4)


def test_optimize_for_cpu_keeps_the_values(tiny):
    cfg, weights = tiny
    plain = dfine.load_detector(cfg, weights, backend="reference", optimize=False)
    fast = dfine.load_detector(cfg, weights, backend="reference", optimize=True)
    assert plain.optimizations is None
    assert isinstance(plain.model.backbone.stem.pool, torch.nn.MaxPool2d)
    assert not any(isinstance(m, (ShortSoftmax, OneDNNLinear)) for m in plain.model.modules())
    x = _images(1)
    with torch.no_grad():
        a, b = plain.model(x), fast.model(x)
    # oneDNN's blocked GEMM and the channels_last convolutions round differently; the top-k selection
    # over 50 queries is the same
    torch.testing.assert_close(b["pred_logits"], a["pred_logits"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(b["pred_boxes"], a["pred_boxes"], rtol=1e-3, atol=1e-3)


def test_model_has_one_numeric_path(tiny):
    """Grad mode does not change what an eval-mode model computes (no grad-mode branches in the layers)."""
    cfg, weights = tiny
    det = dfine.load_detector(cfg, weights, backend="reference", deploy=True, optimize=False)
    x = _images(2)
    with torch.no_grad():
        a = det.model(x)
    b = det.model(x)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(a[key], b[key].detach()), key


def test_load_detector_not_deployed_and_from_a_config_dict(tiny):
    cfg, weights = tiny
    det = dfine.load_detector(dfine.load_config(cfg), weights, backend="reference", deploy=False)
    assert det.optimizations is None  # "auto": only for a deployed model on the CPU
    assert not any(".conv_bn_fused." in k for k in det.model.state_dict()) and not det.model.training
    init = dfine.load_detector(cfg, None, backend="reference")  # no checkpoint: initial weights (benchmarks)
    assert init.report is None


def test_flags_that_do_not_combine_are_errors(tiny, tmp_path):
    cfg, weights = tiny
    with pytest.raises(DeployError, match="config file .* does not exist"):
        dfine.load_detector(str(tmp_path / "missing.yml"), weights)
    with pytest.raises(DeployError, match="is a directory"):
        dfine.load_detector(cfg, str(tmp_path))
    with pytest.raises(DeployError, match="backend must be one of"):
        dfine.load_detector(cfg, weights, backend="onnxruntime")
    with pytest.raises(DeployError, match="optimize=True .* device is cuda"):
        dfine.load_detector(cfg, weights, device="cuda", optimize=True)
    with pytest.raises(DeployError, match="optimize must be"):
        dfine.load_detector(cfg, weights, optimize="yes")
    with pytest.raises(DeployError, match="overrides apply to a config file"):
        dfine.load_detector(dfine.load_config(cfg), weights, overrides=["epochs=1"])
    with pytest.raises(DeployError, match="--compile applies to the PyTorch model"):
        load_runner(cfg, weights, backend="onnxruntime", compiled=True)
    with pytest.raises(DeployError, match="--onnx is only used with --backend onnxruntime"):
        load_runner(cfg, weights, backend="reference", onnx="model.onnx")
    other = tmp_path / "other.pth"
    torch.save({"model": {"not.a.key": torch.zeros(1)}}, other)
    with pytest.raises(DeployError, match="does not fit"):
        dfine.load_detector(cfg, str(other))


def test_optimize_for_cpu_counts_what_it_replaced():
    model = torch.nn.Sequential(torch.nn.MaxPool2d(2, 1), torch.nn.MaxPool2d(3, 1), torch.nn.Softmax(-1),
                                torch.nn.Softmax(1))
    counts = optimize_for_cpu(model, channels_last=False, prepack_linear=False)
    assert counts == {"max_pool": 1, "softmax": 1, "relu_inplace": 0, "linear": 0}
    assert isinstance(model[0], ShiftedMaxPool2x2) and isinstance(model[1], torch.nn.MaxPool2d)
    assert isinstance(model[2], ShortSoftmax) and isinstance(model[3], torch.nn.Softmax)
