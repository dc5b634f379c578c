"""`balcony bench`: prefill latency, decode speed, time to first token and memory of every row.

Each row (full model, exit k, and the naive and pruned baselines) is an ordinary transformers model,
so all rows are timed the same way in one process. Every figure is the median of several repeats after
a warm-up, with the device synchronised around each timed region, on seeded random token ids.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from balcony_cli.errors import BadInputError

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_LENGTHS = (128, 512, 2048)
DEFAULT_BATCH_SIZES = (1, 8)
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class BenchRequest:
    """A benchmark run's settings, resolved from flags and defaults."""

    checkpoint: Path
    exits: list[int] | None = None
    """Exits to measure; None means every exit of the checkpoint."""
    baselines: list[str] = field(default_factory=list)
    prompt_lengths: list[int] = field(default_factory=lambda: list(DEFAULT_PROMPT_LENGTHS))
    batch_sizes: list[int] = field(default_factory=lambda: list(DEFAULT_BATCH_SIZES))
    """Decode batch sizes; the first is the one speedups are reported at."""
    decode_prompt: int = 128
    """Prompt length before the timed decode steps, and for time to first token."""
    new_tokens: int = 32
    """Decode steps timed per repeat."""
    repeats: int = 5
    warmup: int = 1
    threads: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    calibration_text: Path | None = None
    allow_base_mismatch: bool = False

    def validate(self) -> None:
        """Check everything that can be checked before loading a model."""
        for flag, values in (("--prompt-lengths", self.prompt_lengths), ("--batch-sizes", self.batch_sizes)):
            if not values or any(v <= 0 for v in values):
                raise BadInputError(f"{flag} {','.join(map(str, values))}: expected positive integers")
        for flag, value in (
            ("--new-tokens", self.new_tokens),
            ("--repeats", self.repeats),
            ("--decode-prompt", self.decode_prompt),
        ):
            if value <= 0:
                raise BadInputError(f"{flag} {value}: expected a positive integer")
        if self.warmup < 0:
            raise BadInputError(f"--warmup {self.warmup}: expected 0 or more")
        if self.threads is not None and self.threads <= 0:
            raise BadInputError(f"--threads {self.threads}: expected a positive integer")
        if self.dtype not in DTYPES:
            raise BadInputError(f"--dtype {self.dtype}: expected one of {', '.join(DTYPES)}")
        unknown = [b for b in self.baselines if b not in ("naive", "prune")]
        if unknown:
            raise BadInputError(f"--baselines {','.join(unknown)}: expected a comma list of naive, prune")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BadInputError(f"--device {self.device}: no CUDA GPU is available; use --device cpu")
        if self.device not in ("cpu", "mps") and not self.device.startswith("cuda"):
            raise BadInputError(f"--device {self.device}: expected cpu, cuda or cuda:N")


# Timing and memory.


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Run `function` `warmup` times untimed, then `repeats` times; return each run's seconds."""
    for _ in range(warmup):
        function()
    _synchronize(device)
    seconds = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        function()
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def spread(values: list[float]) -> dict[str, float | int]:
    """Summarise repeated measurements as median, min, max and count."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "repeats": len(values),
    }


def _rss_bytes() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


class PeakMemory:
    """Peak memory while a block runs: allocated memory on CUDA, process RSS sampled every 2 ms on CPU.

    RSS covers the whole process (the shared base weights included), so rows differ only by what they
    allocate on top: activations and the KV cache.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())


# One row.


def random_ids(vocab_size: int, batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


def cache_size(cache) -> dict[str, int]:
    """Count the layers a KV cache contains and its bytes per cached token (summed over the batch)."""
    layers = getattr(cache, "layers", [])
    tokens = cache.get_seq_length()
    total = 0
    for layer in layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return {"layers": len(layers), "bytes_per_token": total // tokens if tokens else 0}


@torch.no_grad()
def decode_steps(model: nn.Module, prompt: torch.Tensor, steps: int) -> tuple[Any, float]:
    """Prefill `prompt`, then greedily decode `steps` tokens one at a time with the KV cache.

    Returns the cache and the seconds spent in the decode steps only.
    """
    device = prompt.device
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache = out.cache
    next_ids = out.logits[:, -1:].argmax(-1)  # (batch, 1)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=next_ids, cache=cache, use_cache=True)
        cache = out.cache
        next_ids = out.logits[:, -1:].argmax(-1)
    _synchronize(device)
    return cache, time.perf_counter() - start


@torch.no_grad()
def measure_row(model: nn.Module, request: BenchRequest, device: torch.device) -> dict[str, Any]:
    """Time prefill, decode and time to first token of one row, and its peak memory and cache size."""
    vocab = model.get_input_embeddings().weight.shape[0]
    figures: dict[str, Any] = {"prefill": {}, "decode": {}}
    with PeakMemory(device) as memory:
        for length in request.prompt_lengths:
            ids = random_ids(vocab, 1, length, request.seed).to(device)
            seconds = timed(
                lambda ids=ids: model(input_ids=ids, use_cache=True, logits_to_keep=1),
                device,
                request.repeats,
                request.warmup,
            )
            figures["prefill"][str(length)] = {
                f"{key}_s" if key != "repeats" else key: value for key, value in spread(seconds).items()
            }
        prompt = random_ids(vocab, 1, request.decode_prompt, request.seed + 1).to(device)
        ttft = timed(
            lambda: model.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False),
            device,
            request.repeats,
            request.warmup,
        )
        figures["time_to_first_token_s"] = spread(ttft)
        for batch in request.batch_sizes:
            prompt = random_ids(vocab, batch, request.decode_prompt, request.seed + 2).to(device)
            rates = []
            for repeat in range(request.warmup + request.repeats):
                cache, seconds = decode_steps(model, prompt, request.new_tokens)
                if repeat >= request.warmup:
                    rates.append(batch * request.new_tokens / seconds)
            figures["decode"][str(batch)] = {"tokens_per_s": spread(rates)}
        figures["kv_cache"] = cache_size(cache)
    figures["peak_memory_bytes"] = memory.peak
    return figures


@torch.no_grad()
def component_times(model: nn.Module, request: BenchRequest, device: torch.device) -> dict[str, Any]:
    """Time one decode token's parts: the embedding lookup, one decoder layer, and final norm + LM head.

    On a CPU, fixed costs per layer call make these differ from what FLOPs predict, which is why the
    measured speedup of an exit can beat or miss its FLOP ideal.
    """
    from balcony_cli.architectures import layout_for

    layout = layout_for(model.config)
    ids = random_ids(model.get_input_embeddings().weight.shape[0], 1, 1, request.seed).to(device)
    position_ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    hidden = layout.embed(model, ids, position_ids)
    layer = layout.layers(model)[0]
    norm, head = layout.final_norm(model), layout.head(model)
    parts = {
        "embedding": lambda: layout.embed(model, ids, position_ids),
        "decoder_layer": lambda: layout.call_layer(model, layer, hidden, position_ids),
        "norm_and_head": lambda: head(norm(hidden)),
    }
    repeats = max(20, request.repeats)
    return {name: spread(timed(part, device, repeats, request.warmup + 2)) for name, part in parts.items()}


@dataclass
class BenchResult:
    """Every row's figures, and the settings and hardware they were measured on."""

    rows: list[dict[str, Any]]
    components: dict[str, Any]
    hardware: dict[str, Any]
    checkpoint: dict[str, Any]
    base_fingerprint: str


def hardware(device: torch.device) -> dict[str, Any]:
    info = {
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def check_max_length(model: nn.Module, request: BenchRequest) -> None:
    config = model.config
    maximum = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if maximum is None:
        return
    longest = max([*request.prompt_lengths, request.decode_prompt + request.new_tokens])
    if longest > maximum:
        raise BadInputError(
            f"prompt length {longest} (with --new-tokens) is above the model's maximum of {maximum} "
            "positions; pass shorter --prompt-lengths or --decode-prompt"
        )


def bench(request: BenchRequest, on_row: Callable[[str, int, int], None] | None = None) -> BenchResult:
    """Measure every requested row in one process; `on_row(name, index, total)` runs as each row starts."""
    from balcony_cli.baselines import pruned_layers
    from balcony_cli.checkpoint import base_source, checkpoint_fingerprint, load_balcony, read_balcony_config
    from balcony_cli.compute import ComputeProfile
    from balcony_cli.harness import build_row, row_plan

    request.validate()
    config = read_balcony_config(request.checkpoint)
    exits = config["exits"] if request.exits is None else request.exits
    missing = [k for k in exits if k not in config["exits"]]
    if missing:
        raise BadInputError(
            f"--exits {','.join(map(str, missing))}: this checkpoint has exits "
            f"{','.join(map(str, config['exits']))}"
        )
    if "prune" in request.baselines and request.calibration_text is None:
        raise BadInputError(
            "--baselines prune needs a calibration text: pass --calibration-text FILE or set "
            "BALCONY_DATA_DIR to a folder with gutenberg/books/*.txt"
        )
    if request.threads is not None:
        torch.set_num_threads(request.threads)
    device = torch.device(request.device)
    model, config = load_balcony(
        request.checkpoint,
        dtype=getattr(torch, request.dtype),
        allow_base_mismatch=request.allow_base_mismatch,
    )
    model.to(device)
    check_max_length(model.base, request)
    profile = ComputeProfile.of(model.base)

    keep: dict[int, list[int]] = {}
    if "prune" in request.baselines:
        from balcony_cli.loading import load_tokenizer

        keep = pruned_layers(model.base, load_tokenizer(base_source(config)), request.calibration_text, exits)
    plan = row_plan(exits, request.baselines)

    rows = []
    for index, (kind, k) in enumerate(plan):
        row = build_row(model, kind, k, pruned_keep=keep.get(k))
        if on_row is not None:
            on_row(row.name, index, len(plan))
        figures = measure_row(row.model, request, device)
        rows.append(
            {
                "name": row.name,
                "kind": row.kind,
                "k": row.k,
                "layers": row.layers,
                "relative_compute": profile.relative_compute(row.layers),
                "ideal_speedup": profile.ideal_speedup(row.layers),
                **figures,
            }
        )

    reference = str(request.batch_sizes[0])
    full_rate = rows[0]["decode"][reference]["tokens_per_s"]["median"]
    for row in rows:
        speedup = row["decode"][reference]["tokens_per_s"]["median"] / full_rate
        row["speedup"] = {
            "batch_size": request.batch_sizes[0],
            "decode": speedup,
            "achieved_over_ideal": speedup / row["ideal_speedup"],
        }
        for batch in request.batch_sizes:
            full_batch = rows[0]["decode"][str(batch)]["tokens_per_s"]["median"]
            row["decode"][str(batch)]["speedup"] = (
                row["decode"][str(batch)]["tokens_per_s"]["median"] / full_batch
            )

    components = component_times(model.base, request, device)
    layer_s = components["decoder_layer"]["median"]
    fixed_s = components["embedding"]["median"] + components["norm_and_head"]["median"]
    for row in rows:
        # The decode speedup that the measured parts predict, for comparison with the FLOP ideal.
        row["component_speedup"] = (fixed_s + profile.num_layers * layer_s) / (
            fixed_s + row["layers"] * layer_s
        )

    return BenchResult(
        rows=rows,
        components=components,
        hardware=hardware(device),
        checkpoint={
            "path": str(Path(request.checkpoint).resolve()),
            "base_model": config["base_model"]["spec"],
            "num_layers": config["base_model"]["num_layers"],
            "exits": config["exits"],
            "trained": bool(config.get("trained")),
            "fingerprint": checkpoint_fingerprint(request.checkpoint),
        },
        base_fingerprint=config["base_fingerprint"],
    )


# The trade-off plot.


def read_eval_document(path: Path, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Read a `balcony eval --json` file and check that it comes from the same checkpoint."""
    import json

    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInputError(
            f"--eval-json {str(path)!r}: file not found. Run `balcony eval --json` first"
        ) from None
    except json.JSONDecodeError as error:
        raise BadInputError(f"--eval-json {str(path)!r}: invalid JSON ({error})") from None
    if not isinstance(document, dict) or "rows" not in document or "checkpoint" not in document:
        raise BadInputError(f"--eval-json {str(path)!r}: not a `balcony eval --json` document (no rows)")
    theirs = document["checkpoint"].get("fingerprint")
    if theirs != checkpoint["fingerprint"]:
        raise BadInputError(
            f"--eval-json {str(path)!r}: evaluated checkpoint {document['checkpoint'].get('path')!r} "
            f"({theirs}), but this bench measured {checkpoint['path']!r} ({checkpoint['fingerprint']}); "
            "evaluate this checkpoint with `balcony eval --json`"
        )
    return document


MARKERS = {
    "full": ("*", "black"),
    "exit": ("o", "tab:blue"),
    "pruned": ("s", "tab:orange"),
    "naive": ("x", "tab:red"),
}
LABELS = {
    "full": "full model",
    "exit": "Balcony exit",
    "pruned": "pruned (block influence)",
    "naive": "naive early exit",
}


def plot_tradeoff(
    path: Path,
    bench_rows: list[dict[str, Any]],
    eval_document: dict[str, Any],
    title: str,
    size_inches: tuple[float, float] = (7.0, 5.0),
    dpi: int = 100,
) -> None:
    """Draw accuracy (the eval average) against measured decode speedup, one marker style per row kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = {row["name"]: row.get("average") for row in eval_document["rows"]}
    figure, axes = plt.subplots(figsize=size_inches, dpi=dpi)
    plotted = set()
    for row in bench_rows:
        value = accuracy.get(row["name"])
        if value is None:
            continue
        marker, colour = MARKERS[row["kind"]]
        label = LABELS[row["kind"]] if row["kind"] not in plotted else None
        plotted.add(row["kind"])
        axes.scatter(row["speedup"]["decode"], value, marker=marker, color=colour, s=70, label=label)
        axes.annotate(
            row["name"],
            (row["speedup"]["decode"], value),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    if not plotted:
        plt.close(figure)
        raise BadInputError(
            "--eval-json: none of its rows matches a benchmarked row; evaluate the same exits"
        )
    tasks = sorted({task for row in eval_document["rows"] for task in row.get("tasks", {})})
    axes.set_xlabel(
        f"measured decode speedup over the full model (batch {bench_rows[0]['speedup']['batch_size']})"
    )
    axes.set_ylabel(f"average accuracy ({', '.join(tasks)})")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
