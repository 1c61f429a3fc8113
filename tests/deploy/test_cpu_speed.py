"""The CPU training-speed settings (dfine/cpu_speed.py): channels_last gives the same numbers
as NCHW, and retaining freed memory really stops large blocks from being faulted in again."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dfine.deploy.cpu import resolve_channels_last, to_memory_format
from tests.model_helpers import IN_CI, REPO, build, match_queries


def _perturbed_n(seed=0):
    torch.manual_seed(seed)
    model, _ = build("n", backend="auto")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and "up" not in name.split(".")[-1] and "reg_scale" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _features_and_grads(model, x):
    """Backbone + hybrid encoder in training mode (every convolution and BatchNorm of the model), and
    the gradients of all their parameters. The decoder after it has no 4-d tensors; comparing its
    outputs directly would only measure which near-tied queries the top-k selection picks."""
    feats = model.encoder(model.backbone(x))
    sum(f.square().mean() + f.mean() for f in feats).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [f.detach().contiguous() for f in feats], grads


def _relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _flat(grads):
    return torch.cat([grads[k].flatten() for k in sorted(grads)])


def test_channels_last_gradients_match_nchw():
    """Every convolution forward and backward, with BatchNorm statistics fixed (as `batchnorm_eval`
    trains): channels_last and NCHW agree to fp32 rounding (measured ~1e-6 relative on one machine's CPU and
    8e-5 on an AMD EPYC, where oneDNN picks other kernels; features stay within 1e-5)."""
    x = torch.rand(2, 3, 256, 320, generator=torch.Generator().manual_seed(1))
    models = []
    for channels_last in (False, True):
        model = to_memory_format(_perturbed_n().train(), channels_last)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        models.append(model)
    conv = models[1].backbone.stem.stem1.conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    feats_a, grads_a = _features_and_grads(models[0], x)
    feats_b, grads_b = _features_and_grads(models[1], to_memory_format(x, True))
    assert len(feats_a) == len(feats_b) == 2 and feats_b[0].shape == feats_a[0].shape
    for a, b in zip(feats_a, feats_b):
        assert _relative(b, a) < 1e-5
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 100
    assert _relative(_flat(grads_b), _flat(grads_a)) < 3e-4


def test_channels_last_training_batchnorm_stays_accurate():
    """Training-mode BatchNorm: PyTorch's channels_last kernel computes batch statistics less exactly
    than the NCHW one (measured vs fp64 on this random net: 1e-4 vs 1.5e-5 relative on the encoder
    outputs, far inside bf16 autocast's error). Bound it, so a worse regression would show."""
    import copy

    x = torch.rand(2, 3, 256, 320, generator=torch.Generator().manual_seed(1))
    model = _perturbed_n().train()
    truth, _ = _features_and_grads(copy.deepcopy(model).double(), x.double())
    feats, _ = _features_and_grads(to_memory_format(model, True), to_memory_format(x, True))
    for f, t in zip(feats, truth):
        assert _relative(f, t) < 1e-3


def _assert_same_detections(a, b):
    idx = match_queries(a["pred_boxes"][0], b["pred_boxes"][0])
    torch.testing.assert_close(b["pred_boxes"][0, idx], a["pred_boxes"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(b["pred_logits"][0, idx], a["pred_logits"][0], rtol=0, atol=1e-4)


def test_channels_last_eval_and_deploy_match_nchw():
    x = torch.rand(1, 3, 288, 256, generator=torch.Generator().manual_seed(2))
    nchw = _perturbed_n().eval()
    nhwc = to_memory_format(_perturbed_n().eval(), True)
    with torch.no_grad():
        _assert_same_detections(nchw(x), nhwc(to_memory_format(x, True)))
        nchw.deploy()
        nhwc.deploy()
        _assert_same_detections(nchw(x), nhwc(to_memory_format(x, True)))


def test_to_memory_format_leaves_other_things_alone():
    t = torch.rand(2, 3, 4, 5)
    assert to_memory_format(t, False) is t
    assert to_memory_format(t, True).is_contiguous(memory_format=torch.channels_last)
    v = torch.rand(3, 4)
    assert to_memory_format(v, True) is v


@pytest.mark.parametrize(
    "setting, device, expected",
    [(None, "cpu", True), ("auto", "cpu", True), (None, "cuda", False), ("auto", "cuda", False),
     (True, "cuda", True), (False, "cpu", False), ("false", "cpu", False), ("on", "cuda", True)],
)
def test_resolve_channels_last(setting, device, expected):
    assert resolve_channels_last(setting, device) is expected


def test_resolve_channels_last_rejects_nonsense():
    with pytest.raises(ValueError, match="channels_last must be true, false or auto"):
        resolve_channels_last("sometimes", "cpu")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_retain_freed_memory_stops_refaulting_large_blocks():
    """In a fresh process: a 64 MB block freed and allocated again faults all of its pages in again
    by default (glibc mmaps it), and almost none once retain_freed_memory() is in effect and the heap
    has grown (how far depends on where ASLR puts it: 1 to 3 blocks measured)."""
    script = textwrap.dedent(
        """
        import resource, sys
        sys.path.insert(0, sys.argv[1])
        import torch
        from dfine.deploy.cpu import retain_freed_memory

        def refaults():
            torch.ones(16 * 2**20).sum()  # 64 MB, touched, freed
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            torch.ones(16 * 2**20).sum()
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        default = refaults()
        applied = retain_freed_memory()
        for _ in range(8):  # the heap grows to hold a few aligned blocks, then stops growing
            refaults()
        print(default, int(applied), refaults())
        """
    )
    out = subprocess.run([sys.executable, "-c", script, str(REPO)], capture_output=True, text=True, check=True)
    default, applied, retained = map(int, out.stdout.split())
    assert applied == 1
    pages = 64 * 2**20 // 4096
    assert default > pages // 2  # fresh mmap: (nearly) every page faulted in again
    assert retained < pages // 20, (default, retained)


def _jemalloc_path():
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    return next((line.split()[-1] for line in out.splitlines() if "libjemalloc.so.2 " in line), None)


def test_loaded_allocator_sees_jemalloc():
    """scripts/setup.sh installs jemalloc (CI always has it); main.sh preloads it for training."""
    path = _jemalloc_path()
    if path is None:
        if IN_CI:
            pytest.fail("libjemalloc.so.2 is missing: scripts/setup.sh should have installed libjemalloc2")
        pytest.skip("libjemalloc.so.2 is not installed")
    code = "from dfine.deploy.cpu import loaded_allocator as a; print(a())"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    env = dict(os.environ, LD_PRELOAD=path, MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1")
    pre = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO, env=env)
    assert plain.stdout.split() == ["system"] and pre.stdout.split() == ["jemalloc"]


# --- linear layers through oneDNN with prepacked weights (inference) ---------------------------


@pytest.fixture(autouse=True)
def _onednn_for_every_size(monkeypatch):
    """The small layers of these tests would otherwise stay on F.linear (ONEDNN_MIN_MACS)."""
    import dfine.deploy.cpu

    monkeypatch.setattr(dfine.deploy.cpu, "ONEDNN_MIN_MACS", 0)


def _onednn_linear(in_features=48, out_features=20, bias=True, seed=0):
    from dfine.deploy.cpu import OneDNNLinear, onednn_linear_available

    assert onednn_linear_available()  # the pinned CPU torch has oneDNN's linear ops
    torch.manual_seed(seed)
    plain = torch.nn.Linear(in_features, out_features, bias=bias)
    return plain, OneDNNLinear(plain)


def test_onednn_linear_leaves_small_products_to_mkl(monkeypatch):
    import dfine.deploy.cpu

    monkeypatch.setattr(dfine.deploy.cpu, "ONEDNN_MIN_MACS", 10**9)
    plain, fast = _onednn_linear()
    with torch.no_grad():
        assert torch.equal(fast(torch.ones(3, 48)), plain(torch.ones(3, 48)))
    assert fast._packed is None


@pytest.mark.parametrize("shape", [(7, 48), (2, 33, 48), (1, 0, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_linear_in_inference(shape, bias):
    plain, fast = _onednn_linear(bias=bias)
    x = torch.randn(shape)
    with torch.no_grad():
        out = fast(x)
        assert out.shape == plain(x).shape
        assert torch.allclose(out, plain(x), atol=1e-5, rtol=1e-5)
    assert fast._packed is not None  # the oneDNN path ran (packed on the first CPU fp32 call)
    assert set(fast.state_dict()) == set(plain.state_dict())
    assert fast.weight is plain.weight  # same parameters: a drop-in replacement


def test_onednn_linear_repacks_when_the_weight_changes():
    plain, fast = _onednn_linear()
    x = torch.randn(5, 48)
    with torch.no_grad():
        fast(x)
        first = fast._packed
        fast.load_state_dict({"weight": torch.randn(20, 48), "bias": torch.randn(20)})
        assert torch.allclose(fast(x), torch.nn.functional.linear(x, fast.weight, fast.bias), atol=1e-5)
        assert fast._packed is not first
        fast.weight.mul_(-2.0)  # in-place update: a stale packed copy would give the old answer
        assert torch.allclose(fast(x), torch.nn.functional.linear(x, fast.weight, fast.bias), atol=1e-5)


def test_onednn_linear_can_be_copied_and_saved(tmp_path):
    import copy

    plain, fast = _onednn_linear()
    x = torch.randn(6, 48)
    with torch.no_grad():
        expected = fast(x)  # packs the weight (an opaque oneDNN tensor)
        torch.save(fast, tmp_path / "m.pt")
        for other in (copy.deepcopy(fast), torch.load(tmp_path / "m.pt", weights_only=False)):
            assert torch.allclose(other(x), expected, atol=1e-6)
            assert other._packed is not None  # rebuilt on the first call


def test_onednn_linear_uses_plain_linear_for_autograd_and_other_dtypes():
    plain, fast = _onednn_linear()
    x = torch.randn(4, 48, requires_grad=True)
    fast(x).square().sum().backward()
    grad_fast, grad_w = x.grad.clone(), fast.weight.grad.clone()
    x.grad = None
    plain.weight.grad = None
    plain(x).square().sum().backward()
    assert torch.equal(grad_fast, x.grad) and torch.equal(grad_w, plain.weight.grad)
    with torch.no_grad():
        x64 = torch.randn(3, 48, dtype=torch.float64)
        fast64 = fast.double()
        assert torch.allclose(fast64(x64), torch.nn.functional.linear(x64, fast64.weight, fast64.bias))


def test_prepack_linear_weights_replaces_linears_but_not_attention_internals():
    from dfine.deploy.cpu import OneDNNLinear, prepack_linear_weights

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected, expected_attn = model(x), attn(x, x, x)[0]
        assert prepack_linear_weights(model) == 2 and prepack_linear_weights(attn) == 0
        assert isinstance(model[0], OneDNNLinear) and isinstance(model[2], OneDNNLinear)
        assert torch.allclose(model(x), expected, atol=1e-5)
        assert torch.allclose(attn(x, x, x)[0], expected_attn)


def test_onednn_linear_model_still_traces_for_export():
    """Under tracing (ONNX export, torch.jit.trace) the module takes F.linear, so the graph has no
    oneDNN-private op."""
    from dfine.deploy.cpu import prepack_linear_weights

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)).eval()
    prepack_linear_weights(model)
    x = torch.randn(2, 8)
    traced = torch.jit.trace(model, x)
    assert "mkldnn" not in str(traced.inlined_graph)
    with torch.no_grad():
        assert torch.allclose(traced(x), model(x), atol=1e-5)


def test_predict_loader_prepacks_linears_on_the_cpu(tmp_path):
    from dfine.deploy.cpu import OneDNNLinear
    from tests.model_helpers import load_predictor

    model, _ = build("n", backend="auto")
    ckpt = tmp_path / "n.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    loaded, _, _ = load_predictor(str(REPO / "configs" / "dfine" / "dfine_hgnetv2_n_coco.yml"), str(ckpt))
    assert sum(isinstance(m, OneDNNLinear) for m in loaded.modules()) > 10
