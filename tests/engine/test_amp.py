"""The AMP policy (config amp_dtype): bf16 where the device has it natively, fp16 + GradScaler otherwise or when
asked; on the CPU nothing changes (bf16, no scaler). The CUDA queries are mocked (no GPU needed)."""

import pytest
import torch

import dfine
from dfine.config import ConfigError
from dfine.engine.amp import amp_policy
from tests.engine.test_train import SYNTH_CFG


@pytest.fixture
def gpu(monkeypatch):
    """A mocked GPU; the argument says whether it has native bf16 (A100/H100: yes; T4/V100: no)."""

    def make(bf16: bool, name="NVIDIA T4"):
        calls = []

        def is_bf16_supported(including_emulation=True):
            calls.append(including_emulation)
            return bf16 or including_emulation  # the T4 "supports" bf16 only by emulation

        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        return calls

    return make


def test_off_is_fp32_without_scaler():
    for device in ("cpu", "cuda"):
        policy = amp_policy(False, "float16", device)
        assert not policy.enabled and policy.dtype == torch.float32 and not policy.scaler and policy.name == "off"


def test_cpu_keeps_bf16_without_scaler():
    policy = amp_policy(True, None, "cpu")
    assert policy.enabled and policy.dtype == torch.bfloat16 and not policy.scaler
    assert amp_policy(True, "bfloat16", "cpu").dtype == torch.bfloat16
    fp16 = amp_policy(True, "float16", "cpu")  # asked for: fp16 autocast with its scaler, on the CPU too
    assert fp16.dtype == torch.float16 and fp16.scaler


def test_gpu_with_native_bf16_defaults_to_bf16_without_scaler(gpu):
    calls = gpu(True, "NVIDIA H200")
    policy = amp_policy(True, None, "cuda")
    assert policy.dtype == torch.bfloat16 and not policy.scaler and policy.name == "bfloat16"
    assert calls == [False]  # native support asked, not emulation
    fp16 = amp_policy(True, "float16", "cuda")
    assert fp16.dtype == torch.float16 and fp16.scaler
    assert not amp_policy(True, "float16", "cuda", scaler_enabled=False).scaler  # config scaler.enabled: False


def test_gpu_without_native_bf16_defaults_to_fp16_with_scaler(gpu):
    gpu(False)
    policy = amp_policy(True, None, "cuda:0")
    assert policy.dtype == torch.float16 and policy.scaler
    with pytest.raises(ConfigError, match=r"amp_dtype: bfloat16 needs .* NVIDIA T4 has none: set amp_dtype: float16"):
        amp_policy(True, "bfloat16", "cuda")


def test_bad_dtype_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"amp_dtype must be one of \['bfloat16', 'float16'\].*'float32'"):
        amp_policy(True, "float32", "cpu")
    with pytest.raises(ConfigError, match=r"'amp_dtype'.*'float32' is not supported"):
        dfine.load_config(SYNTH_CFG, overrides=["amp_dtype=float32"])


def test_config_default_and_override():
    assert dfine.load_config(SYNTH_CFG).get("amp_dtype") is None
    assert dfine.load_config(SYNTH_CFG, overrides=["amp_dtype=float16"])["amp_dtype"] == "float16"


def test_autocast_context():
    policy = amp_policy(True, None, "cpu")
    with policy.autocast("cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with amp_policy(False, None, "cpu").autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
