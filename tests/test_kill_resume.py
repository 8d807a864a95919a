"""Crash safety of `python -m grpo fit`: SIGKILL a real run, resume it, and get the weights of a run
that was never interrupted; a checkpoint is never left half-written, even when the kill lands in
the middle of writing it.

Lightning writes a checkpoint with `lightning.fabric.utilities.cloud_io._atomic_save`: the bytes go
to a temporary file inside an fsspec transaction, renamed over the target on commit. fsspec makes
that temporary file in TMPDIR, so the rename is atomic only when TMPDIR is on the checkpoint's
filesystem; across filesystems `shutil.move` copies into the target in place (last test).
"""
from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch
from fsspec.implementations.local import LocalFileOpener
from lightning.fabric.utilities.cloud_io import _atomic_save

from grpo.cli import main
from tests.run_helpers import one_thread, run_grpo, tiny_config

STEPS = 6  # the same max_steps for every run: the LR schedule depends on it


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def _kill(proc) -> None:
    """A test that fails early must not leave its run behind."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _assert_same_training_state(got: dict, want: dict) -> None:
    """Trainable weights, optimizer moments and the sampler's RNG are bit-identical."""
    assert got["global_step"] == want["global_step"] == STEPS
    assert got["state_dict"].keys() == want["state_dict"].keys() and want["state_dict"]
    differ = [k for k in want["state_dict"] if not torch.equal(got["state_dict"][k], want["state_dict"][k])]
    assert not differ, f"{len(differ)} of {len(want['state_dict'])} trainable tensors differ, e.g. {differ[:2]}"
    (opt_got,), (opt_want,) = got["optimizer_states"], want["optimizer_states"]
    for i, state in opt_want["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_got["state"][i][name], state[name]), f"optimizer {name} of param {i}"
    assert all(torch.equal(g, w) for g, w in zip(got["sampler_rng"], want["sampler_rng"], strict=True))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The reference: the same config, run straight to STEPS in this process (one thread, as the subprocesses)."""
    root = tmp_path_factory.mktemp("straight")
    cfg = tiny_config(root / "cfg.yaml", root, STEPS, root / "ckpt")
    with one_thread():
        main(["fit", "-c", str(cfg)])
    return _load(root / "ckpt" / "last.ckpt")


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(tmp_path, uninterrupted):
    """SIGKILL from outside as soon as a checkpoint exists; `fit --ckpt_path last.ckpt` finishes the run."""
    ckpt_dir = tmp_path / "ckpt"
    pace = {"class_path": "tests.run_helpers.Pace", "init_args": {"seconds": 0.5}}  # a window to kill in
    cfg = tiny_config(tmp_path / "cfg.yaml", tmp_path, STEPS, ckpt_dir, callbacks=(pace,))
    proc = run_grpo(["fit", "-c", cfg], tmp_path / "killed.log", wait=False)
    try:
        deadline = time.monotonic() + 300
        while not (ckpt_dir / "last.ckpt").exists():
            assert proc.poll() is None, "ended before a checkpoint:\n" + (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        _kill(proc)
    step = _load(ckpt_dir / "last.ckpt")["global_step"]
    assert 1 <= step < STEPS, f"killed at step {step}: not mid-training"

    with one_thread():
        main(["fit", "-c", str(cfg), "--ckpt_path", str(ckpt_dir / "last.ckpt")])
    _assert_same_training_state(_load(ckpt_dir / "last.ckpt"), uninterrupted)


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, uninterrupted):
    """The run kills itself halfway through writing last.ckpt at step 3: the half-written bytes are in
    a temporary file beside it, last.ckpt is still the intact step-2 checkpoint, and resuming from it finishes
    the run exactly."""
    ckpt_dir, tmpdir = tmp_path / "ckpt", tmp_path / "tmpdir"
    tmpdir.mkdir()
    kill = {"class_path": "tests.run_helpers.KillDuringSave", "init_args": {"nth": 3}}
    killed_cfg = tiny_config(tmp_path / "killed.yaml", tmp_path, STEPS, ckpt_dir, callbacks=(kill,))
    proc = run_grpo(["fit", "-c", killed_cfg], tmp_path / "killed.log", wait=False, TMPDIR=str(tmpdir))
    try:
        assert proc.wait(timeout=300) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    finally:
        _kill(proc)

    partial = list(ckpt_dir.glob(".last.ckpt.tmp-*"))  # AtomicCheckpointIO's temporary file beside the target
    assert len(partial) == 1 and partial[0].read_bytes()[:2] == b"PK", f"found {list(ckpt_dir.iterdir())}"
    with pytest.raises(Exception):
        _load(partial[0])
    assert partial[0].stat().st_size < (ckpt_dir / "last.ckpt").stat().st_size
    assert _load(ckpt_dir / "last.ckpt")["global_step"] == 2, "last.ckpt must still be the step-2 checkpoint"

    cfg = tiny_config(tmp_path / "cfg.yaml", tmp_path, STEPS, ckpt_dir)  # the same run, minus the kill
    with one_thread():
        main(["fit", "-c", str(cfg), "--ckpt_path", str(ckpt_dir / "last.ckpt")])
    _assert_same_training_state(_load(ckpt_dir / "last.ckpt"), uninterrupted)


def _fail_halfway(monkeypatch) -> None:
    """Every file write puts half its bytes on disk, then fails (a full disk, an I/O error)."""
    original = LocalFileOpener.write

    def write(opener, data):
        original(opener, data[:len(data) // 2])
        raise OSError("simulated I/O error halfway through the write")

    monkeypatch.setattr(LocalFileOpener, "write", write)


def test_interrupted_save_leaves_the_old_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    """Lightning's `_atomic_save` over an existing checkpoint, failing halfway: the old file is intact and
    loads, and the transaction discarded its temporary file."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmpdir"))
    (tmp_path / "tmpdir").mkdir()
    path = tmp_path / "last.ckpt"
    _atomic_save({"global_step": 1, "w": torch.arange(1000.0)}, path)
    _fail_halfway(monkeypatch)
    with pytest.raises(OSError, match="halfway"):
        _atomic_save({"global_step": 2, "w": torch.zeros(1000)}, path)
    old = _load(path)
    assert old["global_step"] == 1 and torch.equal(old["w"], torch.arange(1000.0))
    assert not list((tmp_path / "tmpdir").iterdir())


def _other_filesystem_dir(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's folder")
    return Path(tempfile.mkdtemp(dir=shm))


def test_atomic_checkpoint_io_keeps_the_old_checkpoint_when_a_save_dies(tmp_path, monkeypatch):
    """Our `AtomicCheckpointIO` (installed by `AdapterCheckpoint`): a save dying halfway leaves the
    previous checkpoint intact and no temporary file, whatever filesystem $TMPDIR is on (Lightning's
    fsspec transaction copies across filesystems in place, and a crash in that copy destroys it)."""
    from callbacks.export import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    real_save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("simulated crash in the middle of a save")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="middle of a save"):
        io.save_checkpoint({"global_step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert _load(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "temporary file left behind"
