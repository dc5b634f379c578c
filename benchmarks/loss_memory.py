"""Peak memory and speed of one training step: chunked KL against naive full-logit KL.

Each variant runs in its own process, so that its peak is its own: on CPU the process's maximum
resident set (model and Python runtime included), on CUDA the peak allocated memory. The model has SmolLM2-135M's shape (30 layers, hidden 576, vocabulary
49,152) with random weights: memory and speed do not depend on the weight values.

    python benchmarks/loss_memory.py [--seq-len 2048] [--exits 10,15,20] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def smollm2_shaped_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(variant: str, seq_len: int, exits: list[int], chunk_tokens: int, repeats: int) -> dict:
    import torch

    from balcony_cli.distill import distillation_losses, naive_distillation_losses
    from balcony_cli.model import BalconyModel

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = BalconyModel(smollm2_shaped_model(), exits).to(device)
    model.train()
    input_ids = torch.randint(0, 49152, (1, seq_len), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    baseline = peak_memory_mib(device) if device.type == "cuda" else None
    timings, loss_value = [], None
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = model(input_ids, exit="all")
        hidden = [out.exit_hidden[k] for k in model.exits]
        if variant == "chunked":
            losses = distillation_losses(model.head, out.full_hidden, hidden, chunk_tokens=chunk_tokens)
        else:
            losses = naive_distillation_losses(model.head, out.full_hidden, hidden)
        losses.sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
        loss_value = losses.detach().cpu().tolist()
        del out, hidden, losses
    grad_norm = float(torch.stack([p.grad.norm() for p in model.balcony_parameters()]).norm())
    return {
        "variant": variant,
        "device": device.type,
        "peak_memory_mib": peak_memory_mib(device),
        "baseline_memory_mib": baseline,
        "losses": loss_value,
        "grad_norm": grad_norm,
        "step_seconds": timings,
        "tokens_per_s": seq_len / min(timings[1:] or timings),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens in the one sequence (default 2048)")
    parser.add_argument("--exits", default="10,15,20", help="comma-separated exits (default 10,15,20)")
    parser.add_argument(
        "--chunk-tokens", type=int, default=256,
        help="tokens per loss chunk; 256 as in the SmolLM2 CPU recipes (default 256)",
    )
    parser.add_argument(
        "--repeats", type=int, default=2,
        help="training steps per variant; tokens/s uses the fastest after the first (default 2)",
    )
    parser.add_argument("--variant", choices=["chunked", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the results as one JSON document to this path")
    args = parser.parse_args()
    exits = [int(k) for k in args.exits.split(",")]

    if args.variant:
        print(json.dumps(run_variant(args.variant, args.seq_len, exits, args.chunk_tokens, args.repeats)))
        return

    results = {}
    for variant in ("chunked", "naive"):
        completed = subprocess.run(
            [sys.executable, __file__, "--variant", variant, "--seq-len", str(args.seq_len), "--exits", args.exits,
             "--chunk-tokens", str(args.chunk_tokens), "--repeats", str(args.repeats)],
            capture_output=True, text=True, check=True,
        )
        results[variant] = json.loads(completed.stdout.strip().splitlines()[-1])
    chunked, naive = results["chunked"], results["naive"]
    loss_gap = max(abs(a - b) for a, b in zip(chunked["losses"], naive["losses"]))
    document = {
        "schema_version": 1,
        "settings": {"seq_len": args.seq_len, "exits": exits, "vocab_size": 49152, "chunk_tokens": args.chunk_tokens,
                     "repeats": args.repeats, "dtype": "float32"},
        "results": results,
        "max_loss_difference": loss_gap,
        "peak_ratio_chunked_over_naive": chunked["peak_memory_mib"] / naive["peak_memory_mib"],
    }
    for variant, result in results.items():
        print(f"{variant:8s} peak {result['peak_memory_mib']:8.0f} MiB  {result['tokens_per_s']:7.1f} tokens/s  "
              f"losses {', '.join(f'{x:.6f}' for x in result['losses'])}  ({result['device']}, "
              f"{result['threads']} threads)")
    print(f"max loss difference {loss_gap:.2e}; peak ratio chunked/naive {document['peak_ratio_chunked_over_naive']:.2f}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(document, file, indent=2)


if __name__ == "__main__":
    main()
