"""What a careless user or a failing machine does to a training run: weights of another size (-t), a full
disk while saving, a killed save's temporary file, a resumed run that already finished, epochs < 1."""

import pytest
import torch

import dfine
from dfine.config import ConfigError
from dfine.engine.trainer import NothingToTrainError, PartialLoadError, Trainer
from dfine.model import checkpoint as checkpoint_mod
from dfine.model.checkpoint import save_atomic
from tests.engine.test_train import tiny_config, tiny_data  # noqa: F401
from tests.model_helpers import config_path


def test_tuning_from_another_size_is_refused_unless_allowed(tiny_data, tmp_path):  # noqa: F811
    torch.manual_seed(0)
    small = dfine.build_model(dfine.load_config(config_path("s")), backend="reference")
    torch.save({"model": small.state_dict()}, tmp_path / "s.pth")
    trainer = Trainer(tiny_config(tiny_data), output_dir=tmp_path / "a", progress=False)
    with pytest.raises(PartialLoadError, match=r"model.s encoder .*--allow-partial-load"):
        trainer.tune_from(tmp_path / "s.pth")
    trainer.tune_from(tmp_path / "s.pth", allow_partial=True)
    log = (tmp_path / "a" / "log.txt").read_text()
    assert "| part | tensors | loaded |" in log and "| backbone |" in log and "| decoder |" in log


def test_tuning_with_another_class_count_loads_backbone_and_encoder(tiny_data, tmp_path):  # noqa: F811
    torch.manual_seed(0)
    trainer = Trainer(tiny_config(tiny_data), output_dir=tmp_path / "b", progress=False)
    other = dfine.build_model(dfine.load_config(str(tiny_config.__globals__["SYNTH_CFG"]),
                                                overrides=["num_classes=7", "DFINETransformer.num_queries=20"]),
                              backend="reference")
    torch.save({"model": other.state_dict()}, tmp_path / "seven.pth")
    trainer.tune_from(tmp_path / "seven.pth")  # only class-shaped decoder tensors differ: no refusal
    log = (tmp_path / "b" / "log.txt").read_text()
    row = next(line for line in log.splitlines() if line.startswith("| decoder |"))
    assert int(row.split("|")[4]) > 0  # re-initialised score heads are reported


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_atomic({"epoch": 1}, path)
    before = path.read_bytes()

    def full_disk(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint_mod.torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write checkpoint .*disk full.*previous file is intact"):
        save_atomic({"epoch": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary file left


def test_stale_temporaries_are_removed_and_a_finished_run_is_not_resumed_silently(tiny_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pth.k3j2_x.tmp").write_bytes(b"x" * 100)  # what kill -9 during save_atomic leaves
    (out / "notes.tmp").write_text("not ours")
    trainer = Trainer(tiny_config(tiny_data, epochs=1), output_dir=out, progress=False)
    trainer.fit()
    assert not (out / "last.pth.k3j2_x.tmp").exists() and (out / "notes.tmp").exists()
    assert "removed 1 temporary file(s)" in (out / "log.txt").read_text()
    again = Trainer(tiny_config(tiny_data, epochs=1), output_dir=out, progress=False)
    again.resume(out / "last.pth")
    with pytest.raises(NothingToTrainError, match="already finished epoch 0 .*-u epochs=2"):
        again.fit()


def test_epochs_below_one_is_a_config_error(tiny_data):  # noqa: F811
    with pytest.raises(ConfigError, match="epochs must be at least 1, got -1"):
        Trainer(tiny_config(tiny_data, epochs=-1), progress=False)
