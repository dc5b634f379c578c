"""Self-speculative decoding against plain full-model decoding and transformers' assistant_early_exit.

Runs `balcony_cli.speculative_bench.benchmark_speculative` on a checkpoint and a prompts file (one
prompt per line), prints one line per setting and writes the whole result as JSON.

    python benchmarks/speculative.py -c balcony-out --prompts benchmarks/prompts.txt \\
        --draft-exits 10,20 --draft-tokens 2,4 --max-new-tokens 128 --json speculative.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def integers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--checkpoint", type=Path, default=Path("balcony-out"))
    parser.add_argument("--prompts", type=Path, default=Path(__file__).with_name("prompts.txt"))
    parser.add_argument("--draft-exits", type=integers, default=None, help="Default: every exit of the checkpoint.")
    parser.add_argument("--draft-tokens", type=integers, default=[2, 4])
    parser.add_argument("--assistant-exits", type=integers, default=None, help="Default: the draft exits.")
    parser.add_argument("--assistant-tokens", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--stop-at-eos", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads. On a CPU shared with other processes, 1 avoids the stalls that multi-token "
        "matrix products suffer when OpenMP threads wait for busy cores. Default: torch's choice.",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from balcony_cli.checkpoint import base_source, load_balcony
    from balcony_cli.loading import load_tokenizer
    from balcony_cli.speculative_bench import benchmark_speculative, read_prompts

    prompts = read_prompts(args.prompts)
    model, config = load_balcony(args.checkpoint)
    tokenizer = load_tokenizer(base_source(config))
    result = benchmark_speculative(
        model, tokenizer, prompts,
        draft_exits=args.draft_exits or model.exits,
        draft_tokens=args.draft_tokens,
        max_new_tokens=args.max_new_tokens,
        assistant_exits=args.assistant_exits,
        assistant_tokens=args.assistant_tokens,
        repeats=args.repeats,
        stop_at_eos=args.stop_at_eos,
    )

    print(f"{len(prompts)} prompts x {args.max_new_tokens} new tokens, {result.threads} threads, {result.device}")
    print(f"{'setting':<30} {'tokens/s':>9} {'speedup':>8} {'accepted':>9} {'tok/pass':>9} {'identical':>9}")
    for row in result.rows:
        rate = "-" if row.acceptance_rate is None else f"{row.acceptance_rate:.1%}"
        per_pass = "-" if row.tokens_per_full_pass is None else f"{row.tokens_per_full_pass:.2f}"
        print(f"{row.name:<30} {row.tokens_per_s:>9.2f} {row.speedup:>7.2f}x {rate:>9} {per_pass:>9} "
              f"{row.identical!s:>9}")
    for k, value in result.agreement.items():
        print(f"greedy agreement with the full model: exit {k} {value:.1%}, naive exit {k} "
              f"{result.naive_agreement[k]:.1%}")
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
