"""Crash safety with real SIGKILLs: a killed run resumes to the same weights, and saves are atomic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import assert_same_run, read_losses
from safetensors.torch import load_file

from balcony_cli.checkpoint import WEIGHTS_NAME


def command(model_dir, corpus_dir, output, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "balcony_cli", "train", str(model_dir), "--exits", "1,3", "--data", str(corpus_dir),
        "-o", str(output), "--seq-len", "32", "--batch-size", "2", "--lr", "0.01", "--no-perplexity",
        "--eval-every", "0", *extra,
    ]


def environment() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1")


def latest_step(output: Path) -> int:
    latest = output / "checkpoints" / "latest"
    try:
        return int(latest.read_text().removeprefix("step-"))
    except (FileNotFoundError, ValueError):
        return 0


def kill_when(process: subprocess.Popen, condition, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "timed out waiting to kill the run"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_sigkill_then_resume_matches_uninterrupted(tiny_model_dir, corpus_dir, tmp_path):
    extra = ("--max-steps", "60", "--save-every", "3")
    straight = tmp_path / "straight"
    subprocess.run(command(tiny_model_dir, corpus_dir, straight, *extra), env=environment(), check=True,
                   capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(tiny_model_dir, corpus_dir, killed, *extra), env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(process, lambda: latest_step(killed) >= 9)
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "train_summary.json").exists()
    assert latest_step(killed) < 60

    resumed = subprocess.run(command(tiny_model_dir, corpus_dir, killed, *extra, "--resume"), env=environment(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(read_losses(killed)) == 60 // 10  # log_every defaults to 10 steps
    assert_same_run(straight, killed)


def test_sigkill_during_saves_leaves_loadable_checkpoint(tiny_model_dir, corpus_dir, tmp_path):
    """Save every step, so that most kills land inside a save; the latest checkpoint must still load."""
    output = tmp_path / "run"
    extra = ("--max-steps", "400", "--save-every", "1")
    for round_ in range(3):
        resume = ("--resume",) if round_ else ()
        process = subprocess.Popen(command(tiny_model_dir, corpus_dir, output, *extra, *resume), env=environment(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = latest_step(output)
        kill_when(process, lambda start=start: latest_step(output) >= start + 5 + 3 * round_)
        step = latest_step(output)
        checkpoint = output / "checkpoints" / f"step-{step:07d}"
        assert json.loads((checkpoint / "state.json").read_text())["step"] == step
        assert load_file(str(checkpoint / "balcony.safetensors"))
        assert torch.load(checkpoint / "trainer.pt", weights_only=False)["optimizer"]["state"]

    finished = subprocess.run(command(tiny_model_dir, corpus_dir, output, "--max-steps", "400", "--save-every",
                                      "50", "--resume"), env=environment(), capture_output=True, text=True,
                              timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert (output / WEIGHTS_NAME).is_file()
    assert not list((output / "checkpoints").glob(".*.tmp")), "temporary files of killed saves were kept"
