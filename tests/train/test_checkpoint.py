"""train_state: SIGKILL + resume equals an uninterrupted run; corrupt states raise CheckpointError."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from netcarve.errors import CheckpointError
from netcarve.train import TrainConfig, fit, load_train_state, read_train_state
from netcarve.train.checkpoint import get_rng_state, set_rng_state

from ._helpers import digits_loaders, lenet, max_abs_diff, strip_seconds, weights

CHILD = Path(__file__).resolve().parent / "_train_child.py"
EPOCHS = 4


def _child(out: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, NETCARVE_NO_PROGRESS="1")
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(out), str(EPOCHS), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(p: subprocess.Popen, what: str, timeout: float = 240) -> None:
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail(f"{what} did not finish in {timeout} s")
    assert p.returncode == 0, f"{what} failed ({p.returncode}):\n{err[-3000:]}"


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(s) for s in path.read_text().splitlines() if s.strip()]


@pytest.mark.parametrize("variant", ["supervised", "kd"])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, variant):
    extra = ["--kd"] if variant == "kd" else []
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = _child(ref_dir, *extra)  # the uninterrupted run, in parallel with the victim
    victim = _child(run_dir, "--sleep", "0.03", *extra)  # ~0.7 s per epoch: room to kill mid-epoch
    try:
        deadline = time.monotonic() + 180
        while not _metrics(run_dir):
            if victim.poll() is not None:
                pytest.fail(
                    f"the run to be killed exited early ({victim.returncode}):\n{victim.stderr.read()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail("no epoch finished within 180 s")
            time.sleep(0.01)
        time.sleep(0.2)  # into the next epoch
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    done = read_train_state(run_dir)["epoch"]
    assert 1 <= done < EPOCHS, "the victim finished before it was killed; slow it down"
    seen = [r["epoch"] for r in _metrics(run_dir)]  # appended right after each commit
    assert seen == list(range(1, len(seen) + 1)) and len(seen) in (done - 1, done)
    assert not (run_dir / "final.safetensors").exists()

    _finish(_child(run_dir, "--resume", *extra), "the resumed run")
    _finish(ref, "the reference run")

    res = json.loads((run_dir / "result.json").read_text())
    ref_res = json.loads((ref_dir / "result.json").read_text())
    assert res["resumed_from"] == done and ref_res["resumed_from"] == 0
    assert [r["epoch"] for r in res["history"]] == list(range(1, EPOCHS + 1))
    assert strip_seconds(res["history"]) == strip_seconds(ref_res["history"])
    assert _metrics(run_dir) == res["history"]  # metrics.jsonl continuous, no duplicate epochs
    got, want = load_file(str(run_dir / "final.safetensors")), load_file(str(ref_dir / "final.safetensors"))
    assert max_abs_diff(got, want) <= 1e-6
    names = sorted(p.name for p in (run_dir / "train_state").iterdir())
    assert names == [f"extra-e{EPOCHS:04d}.pt", f"model-e{EPOCHS:04d}.safetensors", "state.json"]


# ------------------------------------------------------------------------------------------ corruption


@pytest.fixture()
def one_epoch(tmp_path):
    train, test = digits_loaders(batch_size=64, seed=1, subset=(200, 100))
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, seed=0)
    model = lenet(8)
    fit(model, train, test, cfg, out_dir=tmp_path, progress=False)
    return tmp_path, (train, test, cfg.replace(epochs=2)), weights(model)


def _files(out: Path) -> dict[str, Path]:
    state = read_train_state(out)
    return {role: out / "train_state" / e["file"] for role, e in state["files"].items()}


@pytest.mark.parametrize("role", ["model", "extra"])
def test_truncated_file_raises_checkpoint_error(one_epoch, role):
    out, (train, test, cfg), _ = one_epoch
    path = _files(out)[role]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{path.name}.*truncated"):
        fit(lenet(8), train, test, cfg, out_dir=out, resume=True, progress=False)


def test_flipped_byte_raises_checkpoint_error(one_epoch):
    out, (train, test, cfg), _ = one_epoch
    path = _files(out)["model"]
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        fit(lenet(8), train, test, cfg, out_dir=out, resume=True, progress=False)


def test_truncated_or_missing_state_files(one_epoch):
    out, (train, test, cfg), _ = one_epoch
    model_file = _files(out)["model"]
    state = out / "train_state" / "state.json"
    text = state.read_text()
    model_file.unlink()
    with pytest.raises(CheckpointError, match=rf"{model_file.name}: missing"):
        fit(lenet(8), train, test, cfg, out_dir=out, resume=True, progress=False)
    state.write_text(text[: len(text) // 3])
    with pytest.raises(CheckpointError, match="state.json.*unreadable"):
        fit(lenet(8), train, test, cfg, out_dir=out, resume=True, progress=False)
    state.write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not a netcarve training state"):
        read_train_state(out)


def test_load_into_wrong_model_leaves_it_untouched(one_epoch):
    out, _, saved = one_epoch
    other = lenet(16)
    before = weights(other)
    with pytest.raises(CheckpointError, match="do not fit.*shape mismatch"):
        load_train_state(out, other)
    assert max_abs_diff(weights(other), before) == 0.0
    right = lenet(8, seed=3)
    meta, extra = load_train_state(out, right)
    assert meta["epoch"] == 1 and {"optimizer", "scheduler", "rng", "aux"} <= set(extra)
    assert max_abs_diff(weights(right), saved) == 0.0


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = get_rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a
