"""Check `balcony export` on a trained checkpoint: plain transformers against the toolkit's own exit.

    PYTHONPATH=$PWD python benchmarks/export_check.py --checkpoint balcony-out --exit 20 \\
        --output-root exports --json exports/export-check.json --overwrite

Steps:
1. Export exit K with the `balcony export` command: hf, and gguf as f32, f16 and q8_0, into
   OUTPUT_ROOT/export-{hf,gguf-f32,gguf-f16,gguf-q8_0}. Write the full base model the same ways into
   OUTPUT_ROOT/export-full-*: save_pretrained (fp32) and the same GGUF writer as the exits use.
2. Record the toolkit's reference: `BalconyModel.generate(..., exit=K)`, 64 greedy tokens for each
   prompt, and exit K's logits over prompt + continuation.
3. In a fresh Python process that never imports balcony_cli, load every export with plain
   transformers, encode the prompts with the export's own tokenizer, generate 64 greedy tokens and
   compare tokens and logits with the reference.
4. Report weight file sizes of each exit export against the full model written the same way.

It writes one JSON document (--json) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
)
NEW_TOKENS = 64
GGUF_TYPES = ("f32", "f16", "q8_0")


def weights_bytes(directory: Path) -> int:
    """Sum the sizes of the weight files of an export: *.safetensors or *.gguf."""
    return sum(
        path.stat().st_size for path in directory.iterdir() if path.suffix in (".safetensors", ".gguf")
    )


def run_exports(checkpoint: Path, exit: int, root: Path, overwrite: bool) -> dict[str, dict]:
    """Export exit `exit` in every format through the CLI; return {label: {"path", "gguf_file"}}."""
    exports = {}
    jobs = [("hf", ["--format", "hf"])] + [
        (f"gguf-{t}", ["--format", "gguf", "--gguf-type", t]) for t in GGUF_TYPES
    ]
    for label, flags in jobs:
        output = root / f"export-{label}"
        command = [
            sys.executable,
            "-m",
            "balcony_cli",
            "export",
            "-c",
            str(checkpoint),
            "--exit",
            str(exit),
            "-o",
            str(output),
            *flags,
            "--json",
            "-",
        ] + (["--overwrite"] if overwrite else [])
        print("$", " ".join(command), flush=True)
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            sys.exit(f"export {label} failed with exit code {completed.returncode}:\n{completed.stderr}")
        [row] = json.loads(completed.stdout)["exports"]
        exports[label] = {"path": str(output), "gguf_file": row["gguf_file"]}
    return exports


def write_full_model(model, config: dict, root: Path, overwrite: bool) -> dict[str, dict]:
    """Write the full base model as fp32 HF and as GGUF of each type, with balcony_cli's own writer."""
    import shutil

    from balcony_cli.checkpoint import base_source, check_output_dir
    from balcony_cli.export import gguf_file_name
    from balcony_cli.gguf_export import write_gguf
    from balcony_cli.loading import load_tokenizer

    source = base_source(config)
    written = {}
    for label in ("hf", *(f"gguf-{t}" for t in GGUF_TYPES)):
        output = root / f"export-full-{label}"
        check_output_dir(output, overwrite=overwrite)
        shutil.rmtree(output, ignore_errors=True)
        output.mkdir(parents=True)
        gguf_file = None
        if label == "hf":
            model.base.save_pretrained(output)
            load_tokenizer(source).save_pretrained(output)
        else:
            gguf_type = label.removeprefix("gguf-")
            gguf_file = gguf_file_name(None, gguf_type)
            write_gguf(
                model.base,
                source,
                output / gguf_file,
                gguf_type=gguf_type,
                name=f"{config['base_model']['spec']}",
            )
        written[label] = {"path": str(output), "gguf_file": gguf_file}
    return written


def record_reference(model, config: dict, exit: int, path: Path) -> None:
    """Save the toolkit's exit-`exit` generations and logits for PROMPTS to `path` (torch.save)."""
    import torch

    from balcony_cli.checkpoint import base_source
    from balcony_cli.loading import load_tokenizer

    tokenizer = load_tokenizer(base_source(config))
    eos = model.exit_model(exit).generation_config.eos_token_id
    entries = []
    with torch.no_grad():
        for prompt in PROMPTS:
            input_ids = tokenizer(prompt, return_tensors="pt").input_ids
            sequence = model.generate(input_ids, exit=exit, **generate_kwargs(eos))
            logits = model(sequence, exit=exit).logits[0]
            entries.append(
                {"prompt": prompt, "input_ids": input_ids[0], "sequence": sequence[0], "logits": logits}
            )
    torch.save({"exit": exit, "eos_token_id": eos, "entries": entries}, path)


def generate_kwargs(eos) -> dict:
    # min_new_tokens keeps EOS from ending one side early, so both sides produce exactly NEW_TOKENS.
    return {
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "eos_token_id": eos,
        "pad_token_id": eos[0] if isinstance(eos, list) else eos,
    }


def compare(reference_path: Path, exports: dict[str, dict]) -> dict[str, dict]:
    """Load each export with plain transformers and compare it with the reference (run in a fresh process)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = torch.load(reference_path)
    results = {}
    for label, export in exports.items():
        kwargs = {"gguf_file": export["gguf_file"]} if export["gguf_file"] else {}
        model = AutoModelForCausalLM.from_pretrained(export["path"], dtype=torch.float32, **kwargs).eval()
        tokenizer = AutoTokenizer.from_pretrained(export["path"], **kwargs)
        prompts = []
        with torch.no_grad():
            for entry in reference["entries"]:
                input_ids = tokenizer(entry["prompt"], return_tensors="pt").input_ids
                same_prompt = input_ids[0].tolist() == entry["input_ids"].tolist()
                # Generation starts from the reference ids so that a tokenizer difference shows separately.
                start = entry["input_ids"][None]
                sequence = model.generate(start, **generate_kwargs(reference["eos_token_id"]))[0]
                expected = entry["sequence"][start.shape[1] :].tolist()
                actual = sequence[start.shape[1] :].tolist()
                matching = next(
                    (i for i, (a, b) in enumerate(zip(expected, actual)) if a != b), len(expected)
                )
                logits = model(entry["sequence"][None]).logits[0]
                prompts.append(
                    {
                        "prompt": entry["prompt"],
                        "tokenizer_matches": same_prompt,
                        "tokens_identical": actual == expected,
                        "matching_prefix_tokens": matching,
                        "max_abs_logit_difference": (logits - entry["logits"]).abs().max().item(),
                    }
                )
        results[label] = {
            "tokens_identical": all(p["tokens_identical"] for p in prompts),
            "max_abs_logit_difference": max(p["max_abs_logit_difference"] for p in prompts),
            "prompts": prompts,
        }
        print(
            f"{label}: tokens identical {results[label]['tokens_identical']}, max |logit difference| "
            f"{results[label]['max_abs_logit_difference']:.3g}",
            flush=True,
        )
    if "balcony_cli" in sys.modules:
        raise RuntimeError("the comparison process imported balcony_cli")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="a trained Balcony checkpoint directory")
    parser.add_argument("--exit", type=int, default=20, help="the exit to export and compare")
    parser.add_argument("--output-root", type=Path, help="directory that receives the export-* directories")
    parser.add_argument("--json", type=Path, default=None, help="write the figures as one JSON document")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier export directories")
    sub = parser.add_subparsers(dest="command")
    inner = sub.add_parser("compare", help="step 3 only; the full check runs it in a fresh process")
    inner.add_argument("--reference", type=Path, required=True)
    inner.add_argument("--exports", type=Path, required=True, help="JSON file of {label: {path, gguf_file}}")
    inner.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    if args.command is None and (args.checkpoint is None or args.output_root is None):
        parser.error("--checkpoint and --output-root are required")

    if args.command == "compare":
        exports = json.loads(args.exports.read_text())
        args.result.write_text(json.dumps(compare(args.reference, exports), indent=2))
        return

    from balcony_cli.checkpoint import load_balcony

    exits = run_exports(args.checkpoint, args.exit, args.output_root, args.overwrite)
    model, config = load_balcony(args.checkpoint)
    full = write_full_model(model, config, args.output_root, args.overwrite)
    with tempfile.TemporaryDirectory(prefix="export-check.") as scratch:
        scratch = Path(scratch)
        record_reference(model, config, args.exit, scratch / "reference.pt")
        (scratch / "exports.json").write_text(json.dumps(exits))
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "compare",
            "--reference",
            str(scratch / "reference.pt"),
            "--exports",
            str(scratch / "exports.json"),
            "--result",
            str(scratch / "result.json"),
        ]
        subprocess.run(command, check=True)
        comparison = json.loads((scratch / "result.json").read_text())

    sizes = {}
    for label in exits:
        exit_bytes, full_bytes = (
            weights_bytes(Path(exits[label]["path"])),
            weights_bytes(Path(full[label]["path"])),
        )
        sizes[label] = {"exit_bytes": exit_bytes, "full_bytes": full_bytes, "ratio": exit_bytes / full_bytes}
        print(
            f"{label}: exit {exit_bytes:,} bytes, full {full_bytes:,} bytes ({exit_bytes / full_bytes:.1%})"
        )
    document = {
        "checkpoint": str(args.checkpoint),
        "exit": args.exit,
        "prompts": list(PROMPTS),
        "new_tokens": NEW_TOKENS,
        "exports": exits,
        "full_exports": full,
        "comparison": comparison,
        "sizes": sizes,
    }
    if args.json:
        args.json.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
