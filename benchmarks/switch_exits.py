"""Serve requests at different exits from one loaded checkpoint, printing the memory around each.

The checkpoint is loaded once. Each request picks its own exit, so nothing is reloaded and no weights
are copied: the resident set size (RSS) should stay flat from one request to the next, far below
the size of another copy of the model. The script also checks that the set of parameter tensors is
unchanged after the requests.

    python benchmarks/switch_exits.py -c balcony-out [--exits 10,15,20] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

PROMPT = "Once upon a time, there was a little girl named Lucy. She had a pet cat named Tom."


def rss_mib() -> float:
    """Return this process's current resident set size in MiB (Linux)."""
    with open(f"/proc/{os.getpid()}/statm") as file:
        resident_pages = int(file.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--checkpoint", type=Path, default=Path("balcony-out"))
    parser.add_argument("--exits", default="10,15,20", help="Comma-separated exits, one request each.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompt", default=PROMPT)
    args = parser.parse_args()

    import torch

    from balcony_cli.checkpoint import base_source, load_balcony
    from balcony_cli.generate import GenerationSettings, generate_text
    from balcony_cli.loading import load_tokenizer

    print(f"RSS before loading: {rss_mib():,.0f} MiB")
    model, config = load_balcony(args.checkpoint)
    tokenizer = load_tokenizer(base_source(config))
    parameters = {id(param): param.data_ptr() for param in model.parameters()}
    model_mib = sum(param.numel() * param.element_size() for param in model.parameters()) / 2**20
    print(f"RSS after loading: {rss_mib():,.0f} MiB (parameters: {model_mib:,.0f} MiB, torch threads: "
          f"{torch.get_num_threads()})")

    for exit in (int(k) for k in args.exits.split(",")):
        before = rss_mib()
        start = time.perf_counter()
        result = generate_text(
            model, tokenizer, args.prompt, GenerationSettings(exit=exit, max_new_tokens=args.max_new_tokens)
        )
        seconds = time.perf_counter() - start
        after = rss_mib()
        print(f"\nrequest at exit {exit} ({result.layers} of {result.num_layers} layers): {result.new_tokens} tokens "
              f"in {seconds:.2f} s; RSS before {before:,.0f} MiB, after {after:,.0f} MiB ({after - before:+,.0f} MiB)")
        print(f"  {args.prompt}{result.text}")

    unchanged = parameters == {id(param): param.data_ptr() for param in model.parameters()}
    first_layer = model.layout.layers(model.base)[0]
    shared = all(model.layout.layers(model.exit_model(int(k)))[0] is first_layer for k in args.exits.split(","))
    print(f"\nsame parameter tensors before and after the requests: {unchanged}")
    print(f"every exit runs the base's own layer modules: {shared}")


if __name__ == "__main__":
    main()
