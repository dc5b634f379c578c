"""Two gloo ranks on the CPU through `accelerate launch`, against one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from balcony_cli.checkpoint import WEIGHTS_NAME

ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable))


def train_command(model_dir, corpus, output, batch_size):
    return [
        "-m", "balcony_cli", "train", str(model_dir), "--exits", "1,3", "--data", str(corpus),
        "-o", str(output), "--max-steps", "4", "--seq-len", "32", "--batch-size", str(batch_size),
        "--lr", "0.01", "--no-perplexity", "--save-every", "0", "--eval-every", "0",
        # Fixed, whatever the defaults and the machine's bf16 support: the runs must agree to fp32 rounding.
        "--init", "copy-last", "--precision", "fp32",
    ]


@pytest.mark.skipif(ACCELERATE is None, reason="the accelerate launcher is not installed")
def test_two_ranks_match_one_process(tiny_model_dir, corpus_dir, tmp_path):
    environment = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    # With accelerate 1.16 and no GPU, --multi_gpu plus ACCELERATE_USE_CPU gives two gloo ranks;
    # a plain --num_processes 2 starts one process.
    two = tmp_path / "two"
    launched = subprocess.run(
        [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no",
         *train_command(tiny_model_dir, corpus_dir, two, batch_size=2)],
        env=environment, capture_output=True, text=True, timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    one = tmp_path / "one"
    single = subprocess.run(
        [sys.executable, *train_command(tiny_model_dir, corpus_dir, one, batch_size=4)],
        env=environment, capture_output=True, text=True, timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    summary_two = json.loads((two / "train_summary.json").read_text())
    summary_one = json.loads((one / "train_summary.json").read_text())
    # World size 2: each step consumed 2 processes x 2 blocks x 32 tokens.
    assert summary_two["train_tokens"] == 4 * 2 * 2 * 32
    assert summary_two["train_tokens"] == summary_one["train_tokens"]
    # Only rank 0 prints the result.
    assert launched.stdout.count("Trained 4 steps") == 1

    # The two runs see the same blocks per step; DDP averages two half-batch gradients, which equals
    # the full-batch mean up to float32 rounding, and Adam keeps the drift at that scale.
    weights_two = load_file(str(two / WEIGHTS_NAME))
    weights_one = load_file(str(one / WEIGHTS_NAME))
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(ACCELERATE is None, reason="the accelerate launcher is not installed")
def test_multi_gpu_launch_without_cpu_flag_rejected(tiny_model_dir, corpus_dir, tmp_path):
    environment = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    environment["OMP_NUM_THREADS"] = "1"
    output = tmp_path / "out"
    launched = subprocess.run(
        [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no",
         *train_command(tiny_model_dir, corpus_dir, output, batch_size=2)],
        env=environment, capture_output=True, text=True, timeout=600,
    )
    assert launched.returncode != 0
    assert "set ACCELERATE_USE_CPU=true" in launched.stderr + launched.stdout
    assert not output.exists()
