"""HGNetv2 B0-B6: output strides and channels; pretrained weights from a local file."""

import pytest
import torch

from dfine.model.hgnetv2 import ARCHS, FrozenBatchNorm2d, HGNetv2


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_strides_and_channels(name):
    net = HGNetv2(name, return_idx=[0, 1, 2, 3]).eval()
    with torch.no_grad():
        feats = net(torch.rand(1, 3, 64, 96))
    assert [f.shape[-2:] for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert [f.shape[1] for f in feats] == [s[2] for s in ARCHS[name][1]] == net.out_channels


def test_freeze_and_pretrained_file(tmp_path):
    src = HGNetv2("B0", use_lab=True)
    torch.save(src.state_dict(), tmp_path / "PPHGNetV2_B0_stage1.pth")
    net = HGNetv2("B0", use_lab=True, pretrained=True, local_model_dir=str(tmp_path), freeze_at=0, freeze_norm=True)
    assert torch.equal(net.stages[2].blocks[0].aggregation[0].conv.weight, src.stages[2].blocks[0].aggregation[0].conv.weight)
    assert not any(p.requires_grad for p in net.stem.parameters())
    assert all(p.requires_grad for p in net.stages.parameters())
    assert isinstance(net.stem.stem1.bn, FrozenBatchNorm2d)
    with pytest.raises(ValueError, match="B9"):
        HGNetv2("B9")


def to_channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
def test_stem_pool_cpu_form_equals_max_pool(channels_last):
    """The CPU form of the stem's pool (dfine.deploy.optimize_for_cpu) gives the pooling op's values."""
    from dfine.deploy.cpu import ShiftedMaxPool2x2, optimize_for_cpu
    from dfine.model.hgnetv2 import StemBlock

    max_pool_2x2_stride1 = ShiftedMaxPool2x2()

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 17, 12, generator=gen).relu()  # ReLU zeros: windows with ties
    x[0, 0, 3, 4] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want = torch.nn.MaxPool2d(2, stride=1, ceil_mode=True)(x)
    got = max_pool_2x2_stride1(x)
    assert got.shape == want.shape == (2, 5, 16, 11)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(got[0, 0, 2:4, 3:5]).all()

    # the stem: optimize_for_cpu swaps in the shifted maxima, values unchanged
    stem = StemBlock(3, 16, 16).eval()
    img = torch.randn(1, 3, 33, 47, generator=gen)
    if channels_last:  # both in one layout: oneDNN's NHWC convolutions round differently from NCHW
        stem, img = stem.to(memory_format=torch.channels_last), to_channels_last(img)
    with torch.no_grad():
        slow = stem(img)
        counts = optimize_for_cpu(stem, channels_last=channels_last, prepack_linear=False)
        fast = stem(img)
    assert isinstance(stem.pool, ShiftedMaxPool2x2) and counts["max_pool"] == 1
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)
