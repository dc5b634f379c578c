"""`balcony eval`: harness scores per row, offline task files, the registered model and the JSON document."""

from __future__ import annotations

import json

import lm_eval
import pytest
import torch
from conftest import char_tokenizer, tiny_model
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from balcony_cli.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_balcony
from balcony_cli.cli import app
from balcony_cli.harness import BalconyLM, build_row
from balcony_cli.insert import insert
from balcony_cli.offline_tasks import OFFLINE_TASKS, expand_task_names, load_records, write_task_files

runner = CliRunner()

SENTENCES = [f"The {i}th fox jumps over {i % 7} lazy dogs near river {i % 5}." for i in range(40)]


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


@pytest.fixture
def data_dir(tmp_path):
    """A folder laid out like the shared data folder, with a few records per task."""
    root = tmp_path / "data"
    write_jsonl(
        root / "hellaswag/hellaswag_val.jsonl",
        [
            {
                "idx": i,
                "activity_label": "Foxes",
                "ctx": f"The {i}th fox",
                "label": i % 4,
                "endings": ["jumps over dogs.", "eats a cake.", "sings loudly.", "runs to river."],
            }
            for i in range(5)
        ],
    )
    arc = [
        {
            "query": f"Question: What does fox {i} jump over?",
            "choices": ["dogs", "cats", "trees", "rivers"],
            "gold": i % 4,
        }
        for i in range(6)
    ]
    write_jsonl(root / "arc/arc_easy_test.jsonl", arc)
    write_jsonl(root / "arc/arc_challenge_test.jsonl", arc[:4])
    write_jsonl(
        root / "piqa/valid.jsonl",
        [{"goal": f"Feed fox {i}", "sol1": "Use a bowl.", "sol2": "Use a hat."} for i in range(4)],
    )
    (root / "piqa/valid-labels.lst").write_text("0\n1\n0\n1\n")
    write_jsonl(
        root / "winogrande/winogrande_dev.jsonl",
        [
            {
                "context_options": [f"Fox {i} beat the dog so the fox", f"Fox {i} beat the dog so the dog"],
                "continuation": "was happy.",
                "gold": i % 2,
            }
            for i in range(4)
        ],
    )
    write_jsonl(
        root / "boolq/boolq_dev.jsonl",
        [
            {
                "query": f"Passage: Fox {i} jumps over dogs.\nQuestion: does the fox jump?",
                "choices": ["no", "yes"],
                "gold": 1,
            }
            for i in range(3)
        ],
    )
    write_jsonl(
        root / "lambada/lambada_openai_test.jsonl",
        [{"context": f"The {i}th fox jumps over the lazy", "continuation": "dogs"} for i in range(3)],
    )
    write_jsonl(
        root / "openbookqa_copa/openbookqa_test.jsonl",
        [
            {"query": f"Fox {i} likes to", "choices": ["jump", "swim", "fly", "dig"], "gold": 0}
            for i in range(3)
        ],
    )
    (root / "wikitext2_raw").mkdir()
    (root / "wikitext2_raw/wiki.test.raw").write_text("\r\n".join(SENTENCES))
    (root / "gutenberg/books").mkdir(parents=True)
    (root / "gutenberg/books/a_book.txt").write_text(" ".join(SENTENCES[::-1]))
    return root


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny Llama checkpoint with exits 1 and 2 whose weights moved away from copy-last, marked trained."""
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    char_tokenizer().save_pretrained(base_dir)
    directory = tmp_path / "ckpt"
    insert(str(base_dir), [1, 2], directory)
    torch.manual_seed(1)
    weights = {
        name: tensor + 0.3 * torch.randn_like(tensor)
        for name, tensor in load_file(str(directory / WEIGHTS_NAME)).items()
    }
    save_file(weights, str(directory / WEIGHTS_NAME))
    config = json.loads((directory / CONFIG_NAME).read_text())
    config["trained"] = True
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    return directory


def direct_loglikelihood(model, exit, tokenizer, context: str, continuation: str) -> float:
    """Sum the log-probabilities of the continuation's tokens from forward(exit=k), by hand."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_length = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([whole]), exit=exit).logits[0]  # (seq, vocab)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return sum(
        log_probs[position - 1, whole[position]].item() for position in range(context_length, len(whole))
    )


@pytest.mark.parametrize("kind,exit", [("exit", 1), ("exit", 2), ("full", None)])
def test_harness_loglikelihood_equals_forward(checkpoint, kind, exit):
    model, _ = load_balcony(checkpoint)
    tokenizer = char_tokenizer()
    lm = BalconyLM(pretrained=build_row(model, kind, exit), tokenizer=tokenizer, batch_size=2)
    pairs = [("The 3th fox", " jumps over"), ("A dog", " sleeps."), ("River", " 4")]
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)
    ]
    scores = [score for score, _ in lm.loglikelihood(requests)]
    for (context, continuation), score in zip(pairs, scores):
        assert score == pytest.approx(
            direct_loglikelihood(model, exit, tokenizer, context, continuation), abs=1e-4
        )


def test_exit_scores_differ_from_full(checkpoint):
    """A wrapper that ran the full model for every exit would give equal loglikelihoods."""
    model, _ = load_balcony(checkpoint)
    tokenizer = char_tokenizer()
    request = [
        Instance(request_type="loglikelihood", doc={}, arguments=("The 3th fox", " jumps over"), idx=0)
    ]
    scores = {
        exit: BalconyLM(
            pretrained=build_row(model, "exit" if exit else "full", exit), tokenizer=tokenizer
        ).loglikelihood(request)[0][0]
        for exit in (1, 2, None)
    }
    assert scores[1] != pytest.approx(scores[None], abs=1e-3)
    assert scores[2] != pytest.approx(scores[None], abs=1e-3)
    assert scores[1] != pytest.approx(scores[2], abs=1e-3)


def test_local_records_have_harness_fields(data_dir):
    expected = {
        "hellaswag": (5, {"activity_label", "ctx_a", "ctx_b", "endings", "label"}),
        "arc_easy": (6, {"question", "choices", "answerKey"}),
        "arc_challenge": (4, {"question", "choices", "answerKey"}),
        "piqa": (4, {"goal", "sol1", "sol2", "label"}),
        "winogrande": (4, {"sentence", "option1", "option2", "answer"}),
        "boolq": (3, {"passage", "question", "label"}),
        "lambada_openai": (3, {"text"}),
        "openbookqa": (3, {"question_stem", "choices", "answerKey"}),
    }
    assert set(expected) == set(OFFLINE_TASKS)
    for name, (count, fields) in expected.items():
        records = load_records(name, data_dir)
        assert len(records) == count, name
        assert set(records[0]) == fields, name
    arc = load_records("arc_easy", data_dir)[1]
    assert arc["question"] == "What does fox 1 jump over?"
    assert arc["answerKey"] == "B"
    assert load_records("piqa", data_dir)[1]["label"] == 1
    boolq = load_records("boolq", data_dir)[0]
    assert boolq["passage"] == "Fox 0 jumps over dogs."
    assert boolq["question"] == "does the fox jump"


def test_task_files_give_harness_prompts_and_whole_split(data_dir, tmp_path):
    write_task_files(tmp_path / "tasks", data_dir)
    tasks = lm_eval.tasks.get_task_dict(
        list(OFFLINE_TASKS), TaskManager(include_path=str(tmp_path / "tasks"))
    )
    counts = {}
    for name, task in tasks.items():
        docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
        counts[name] = len(docs)
    assert counts == {name: len(load_records(name, data_dir)) for name in OFFLINE_TASKS}
    hellaswag = tasks["hellaswag"].validation_docs()[2]
    assert tasks["hellaswag"].doc_to_text(hellaswag) == "Foxes: The 2th fox"
    assert (
        tasks["arc_easy"].doc_to_text(tasks["arc_easy"].test_docs()[0])
        == "Question: What does fox 0 jump over?\nAnswer:"
    )
    winogrande = tasks["winogrande"]
    doc = winogrande.validation_docs()[1]
    assert winogrande.doc_to_choice(doc) == ["Fox 1 beat the dog so the fox", "Fox 1 beat the dog so the dog"]
    assert winogrande.doc_to_target(doc) == "was happy."
    assert tasks["lambada_openai"].doc_to_target(tasks["lambada_openai"].test_docs()[0]) == " dogs"


def test_task_names_expand_and_suggest():
    assert expand_task_names("arc,hellaswag", offline=True) == ["arc_easy", "arc_challenge", "hellaswag"]
    with pytest.raises(Exception, match="did you mean hellaswag"):
        expand_task_names("helaswag", offline=True)


def eval_argv(checkpoint, data_dir, *extra):
    return [
        "eval",
        "-c",
        str(checkpoint),
        "--tasks",
        "hellaswag,arc_easy,winogrande",
        "--data-dir",
        str(data_dir),
        "--batch-size",
        "2",
        *extra,
    ]


def test_eval_json_holds_every_row(checkpoint, data_dir, tmp_path):
    out = tmp_path / "eval.json"
    result = runner.invoke(
        app,
        eval_argv(
            checkpoint,
            data_dir,
            "--baselines",
            "naive,prune",
            "--perplexity",
            str(data_dir / "wikitext2_raw/wiki.test.raw"),
            "--calibration-text",
            str(data_dir / "gutenberg/books/a_book.txt"),
            "--json",
            str(out),
        ),
    )
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["schema_version"] == 1
    assert document["base_fingerprint"].startswith("sha256:")
    assert document["checkpoint"]["fingerprint"].startswith("sha256:")
    names = [row["name"] for row in document["rows"]]
    assert names == ["full", "exit 1", "pruned 1", "naive 1", "exit 2", "pruned 2", "naive 2"]
    by_name = {row["name"]: row for row in document["rows"]}
    assert by_name["exit 1"]["layers"] == 2
    assert by_name["naive 1"]["layers"] == 1
    assert by_name["pruned 2"]["layers"] == 3
    assert len(by_name["pruned 2"]["kept_layers"]) == 3
    assert by_name["full"]["relative_compute"] == 1.0
    assert by_name["exit 1"]["relative_compute"] < by_name["exit 2"]["relative_compute"] < 1.0
    for row in document["rows"]:
        assert set(row["tasks"]) == {"hellaswag", "arc_easy", "winogrande"}
        assert row["tasks"]["hellaswag"]["samples"] == 5
        assert "acc_norm_stderr" in row["tasks"]["hellaswag"]["metrics"]
        assert row["perplexity"]["value"] > 1
        assert row["perplexity"]["tokens"] > 0
    full_ppl = by_name["full"]["perplexity"]["value"]
    assert by_name["exit 1"]["perplexity"]["value"] != pytest.approx(full_ppl)
    assert by_name["pruned 1"]["perplexity"]["value"] != pytest.approx(full_ppl)


def test_full_row_equals_harness_hf_model(checkpoint, data_dir, tmp_path):
    out = tmp_path / "eval.json"
    result = runner.invoke(
        app, eval_argv(checkpoint, data_dir, "--exits", "1", "--limit", "3", "--json", str(out))
    )
    assert result.exit_code == 0, result.output
    full = json.loads(out.read_text())["rows"][0]
    write_task_files(tmp_path / "tasks", data_dir)
    reference = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'base'},dtype=float32",
        device="cpu",
        batch_size=2,
        tasks=["hellaswag", "arc_easy", "winogrande"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        limit=3,
        log_samples=False,
        bootstrap_iters=1000,
    )
    for task in ("hellaswag", "arc_easy", "winogrande"):
        for metric, value in full["tasks"][task]["metrics"].items():
            assert reference["results"][task][f"{metric},none"] == pytest.approx(value, abs=1e-9), (
                task,
                metric,
            )


def test_registered_model_matches_balcony_eval(checkpoint, data_dir, tmp_path):
    from lm_eval.api.registry import get_model

    import balcony_cli  # noqa: F401  (registers the model)

    assert get_model("balcony") is BalconyLM
    assert get_model("hf").__name__ == "HFLM"
    out = tmp_path / "eval.json"
    result = runner.invoke(app, eval_argv(checkpoint, data_dir, "--exits", "2", "--json", str(out)))
    assert result.exit_code == 0, result.output
    exit_row = json.loads(out.read_text())["rows"][1]
    assert exit_row["name"] == "exit 2"
    write_task_files(tmp_path / "tasks", data_dir)
    output = lm_eval.simple_evaluate(
        model="balcony",
        model_args=f"pretrained={checkpoint},exit=2,batch_size=2",
        tasks=["hellaswag", "arc_easy", "winogrande"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        log_samples=False,
        bootstrap_iters=1000,
    )
    for task in ("hellaswag", "arc_easy", "winogrande"):
        for metric, value in exit_row["tasks"][task]["metrics"].items():
            assert output["results"][task][f"{metric},none"] == pytest.approx(value, abs=1e-9), (task, metric)
