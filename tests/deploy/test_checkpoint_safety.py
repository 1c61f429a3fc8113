"""Checkpoints load with torch.load(weights_only=True): a file whose pickle would run code is refused with a
message naming the opt-in, in the library and in every command line that reads checkpoints."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dfine
from dfine.deploy import DeployError
from dfine.model.checkpoint import (UntrustedCheckpointError, extract_state_dict, load_checkpoint,
                                    load_training_checkpoint, read_checkpoint)
from tests.engine.test_train import SYNTH_CFG, tiny_data, tiny_overrides  # noqa: F401
from tests.model_helpers import REPO
from tests.tiny_checkpoint import write_tiny_checkpoint


class _TouchesAFile:
    """Unpickling this calls Path.touch(marker): a stand-in for os.system in a hostile checkpoint."""

    def __init__(self, marker):
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    cfg, weights = write_tiny_checkpoint(root)
    marker = root / "code_ran"
    hostile = root / "hostile.pth"
    state = torch.load(weights, weights_only=True)
    state["payload"] = _TouchesAFile(marker)
    torch.save(state, hostile)
    return str(cfg), str(weights), hostile, marker


def test_library_refuses_code_in_a_checkpoint(tiny):
    cfg, weights, hostile, marker = tiny
    model = dfine.build_model(dfine.load_config(cfg), backend="reference")
    with pytest.raises(UntrustedCheckpointError, match="trusted=True .*--trust-checkpoint"):
        load_checkpoint(model, hostile)
    with pytest.raises(UntrustedCheckpointError):
        load_training_checkpoint(hostile)
    with pytest.raises(DeployError, match="refused"):
        dfine.load_detector(cfg, str(hostile))
    assert not marker.exists()
    load_checkpoint(model, weights)  # the project's own files load as they are
    read_checkpoint(hostile, trusted=True)  # the explicit opt-in runs the pickle
    assert marker.exists()
    marker.unlink()


def test_unreadable_and_directory_checkpoints_are_clear_errors(tiny, tmp_path):
    cfg, weights, _, _ = tiny
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(Path(weights).read_bytes()[:1000])
    with pytest.raises(ValueError, match="could not be read"):
        read_checkpoint(truncated)
    with pytest.raises(FileNotFoundError, match="is a directory"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize("command", ["predict", "export"])
def test_command_lines_refuse_code_in_a_checkpoint(tiny, tmp_path, command):
    cfg, _, hostile, marker = tiny
    image = tmp_path / "im.png"
    import torchvision

    torchvision.io.write_png(torch.zeros(3, 32, 32, dtype=torch.uint8), str(image))
    args = {"predict": ["--input", str(image), "--output", str(tmp_path / "out")],
            "export": ["--output", str(tmp_path / "m.onnx")]}[command]
    proc = subprocess.run([sys.executable, "-m", "dfine", command, "-c", cfg, "-r", str(hostile), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "--trust-checkpoint" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("flag", ["-t", "-r"])
def test_train_py_refuses_code_in_a_checkpoint(tiny, tiny_data, tmp_path, flag):
    _, _, hostile, marker = tiny
    args = ["-c", str(SYNTH_CFG), "--no-progress", "--output-dir", str(tmp_path), "-u",
            *tiny_overrides(tiny_data, epochs=1)]
    proc = subprocess.run([sys.executable, "train.py", *args, flag, str(hostile)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--trust-checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "last.pth").exists()


def test_safetensors_weights_load_everywhere(tiny, tmp_path):
    from safetensors.torch import save_file

    cfg, weights, _, _ = tiny
    state = extract_state_dict(weights)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(path))  # clone: up/reg_scale are shared
    det = dfine.load_detector(cfg, str(path), backend="reference")
    assert det.report.ok
    model = dfine.build_model(dfine.load_config(cfg), backend="reference")
    load_checkpoint(model, path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="could not be read"):
        read_checkpoint(tmp_path / "bad.safetensors")
