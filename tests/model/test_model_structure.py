"""The built models have exactly the published state-dict layout and parameter counts."""

import pytest
import torch

from dfine.model.checkpoint import load_checkpoint
from tests.model_helpers import build, keys_and_shapes, read_keys, shared_file

TRAIN_PARAMS = {"n": 3_782_693, "s": 10_321_877, "m": 19_590_064, "l": 31_244_152, "x": 62_621_560}
DEPLOY_PARAMS = {"n": 3_753_799, "s": 10_237_491, "m": 19_248_189, "l": 30_724_195, "x": 61_601_635}


@pytest.mark.parametrize("size", ["n", "s", "m", "l", "x"])
def test_state_dict_layout_and_param_counts(size):
    model, _ = build(size)
    expected = read_keys(shared_file("reference", "checkpoint_keys", f"dfine_{size}.txt"))
    mine = keys_and_shapes(model)
    assert sorted(set(expected) - set(mine)) == []
    assert sorted(set(mine) - set(expected)) == []
    assert {k: v for k, v in mine.items() if expected[k] != v} == {}
    assert sum(p.numel() for p in model.parameters()) == TRAIN_PARAMS[size]
    # buffers / non-trainable parameters in the published form
    sd = model.state_dict()
    assert sd["decoder.reg_scale"].dtype == torch.int64
    assert not model.decoder.up.requires_grad and not model.decoder.reg_scale.requires_grad

    model.deploy()
    expected = read_keys(shared_file("reference", "checkpoint_keys", f"dfine_{size}_deploy.txt"))
    mine = keys_and_shapes(model)
    assert mine == expected
    assert sum(p.numel() for p in model.parameters()) == DEPLOY_PARAMS[size]


def test_checkpoint_formats_and_mismatch_report():
    model, _ = build("n")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for wrapped in (sd, {"model": sd}, {"ema": {"module": sd}, "model": {}}):
        other, _ = build("n")
        report = load_checkpoint(other, wrapped)
        assert report.ok
        assert torch.equal(other.state_dict()["decoder.enc_score_head.weight"], sd["decoder.enc_score_head.weight"])

    # another class count: strict loading names the mismatches, skip_mismatched skips them
    few, _ = build("n", ["num_classes=3"])
    with pytest.raises(ValueError, match="decoder.enc_score_head.weight"):
        load_checkpoint(few, sd)
    report = load_checkpoint(few, sd, strict=False, skip_mismatched=True)
    assert "decoder.enc_score_head.weight" in report.skipped_keys
    assert "decoder.denoising_class_embed.weight" in report.skipped_keys
    assert torch.equal(few.state_dict()["decoder.enc_output.proj.weight"], sd["decoder.enc_output.proj.weight"])

    extra = dict(sd, **{"decoder.bogus": torch.zeros(1)})
    del extra["decoder.enc_bbox_head.layers.0.bias"]
    with pytest.raises(ValueError, match="decoder.bogus") as err:
        load_checkpoint(model, extra)
    assert "decoder.enc_bbox_head.layers.0.bias" in str(err.value)


def test_checkpoint_path_errors(tmp_path):
    model, _ = build("n")
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_checkpoint(model, str(tmp_path / "nothere.pth"))
    torch.save({"model": model.state_dict()}, tmp_path / "ck.pth")
    assert load_checkpoint(model, str(tmp_path / "ck.pth")).ok


def test_deploy_format_checkpoint_loads_into_fresh_model():
    torch.manual_seed(0)
    a, _ = build("n")
    with torch.no_grad():
        for m in a.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    a.deploy()
    b, _ = build("n")
    report = load_checkpoint(b, {"model": a.state_dict()})
    assert report.ok and report.deployed
    x = torch.rand(1, 3, 128, 480)
    with torch.no_grad():
        for i in range(2):  # 2 runs: anchors for this size come from the cache the second time
            oa, ob = a(x), b(x)
            assert torch.equal(oa["pred_boxes"], ob["pred_boxes"])
