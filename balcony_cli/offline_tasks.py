"""Standard lm-evaluation-harness tasks that read local files instead of the hub.

Each task is a YAML file that includes the harness's own definition of the task, so the prompts,
choices and metrics stay the harness's. Only the dataset changes: a `custom_dataset` function here
reads the local file (the layout of a `BALCONY_DATA_DIR` folder) and maps its fields to the ones the
harness's definition expects. The written folder works with the harness's own CLI too:
`lm_eval --model hf --include_path DIR --tasks hellaswag ...`, with Balcony installed.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from balcony_cli.errors import BadInputError
from balcony_cli.perplexity import DATA_DIR_ENV

ARC_LABELS = ("A", "B", "C", "D", "E")


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _dataset(split: str, records: list[dict]):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(records)})


def _hellaswag(path: Path) -> list[dict]:
    # The harness's process_docs builds its query from activity_label, ctx_a and ctx_b, then strips
    # it. The local file has lost the ctx_a/ctx_b split, so all of ctx goes into ctx_a.
    return [
        {
            "activity_label": r["activity_label"],
            "ctx_a": r["ctx"],
            "ctx_b": "",
            "endings": r["endings"],
            "label": str(r["label"]),
        }
        for r in _read_jsonl(path)
    ]


def _arc(path: Path) -> list[dict]:
    records = []
    for r in _read_jsonl(path):
        labels = list(ARC_LABELS[: len(r["choices"])])
        records.append(
            {
                "question": r["query"].removeprefix("Question: "),
                "choices": {"text": r["choices"], "label": labels},
                "answerKey": labels[r["gold"]],
            }
        )
    return records


def _piqa(path: Path) -> list[dict]:
    labels_path = path.with_name("valid-labels.lst")
    if not labels_path.is_file():
        raise BadInputError(f"PIQA labels not found at {labels_path}; it must sit beside {path.name}")
    labels = [int(line) for line in labels_path.read_text().split()]
    records = _read_jsonl(path)
    if len(labels) != len(records):
        raise BadInputError(f"{labels_path}: {len(labels)} labels for {len(records)} records in {path}")
    return [
        {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": label}
        for r, label in zip(records, labels)
    ]


def _winogrande(path: Path) -> list[dict]:
    # The harness builds the two contexts as sentence[:blank] + option and the continuation as
    # sentence[blank + 1:].strip(). A sentence that starts with the blank, with each full context
    # as an option, gives exactly the local file's contexts and continuation.
    return [
        {
            "sentence": "_ " + r["continuation"],
            "option1": r["context_options"][0],
            "option2": r["context_options"][1],
            "answer": str(r["gold"] + 1),
        }
        for r in _read_jsonl(path)
    ]


def _boolq(path: Path) -> list[dict]:
    records = []
    for r in _read_jsonl(path):
        passage, separator, question = r["query"].removeprefix("Passage: ").rpartition("\nQuestion: ")
        if not separator:
            raise BadInputError(
                f"{path}: a BoolQ query without '\\nQuestion: '; expected the llm-foundry format"
            )
        # The harness's prompt adds the question mark itself.
        records.append({"passage": passage, "question": question.removesuffix("?"), "label": r["gold"]})
    return records


def _lambada(path: Path) -> list[dict]:
    return [{"text": r["context"] + " " + r["continuation"]} for r in _read_jsonl(path)]


def _openbookqa(path: Path) -> list[dict]:
    records = []
    for r in _read_jsonl(path):
        labels = list(ARC_LABELS[: len(r["choices"])])
        records.append(
            {
                "question_stem": r["query"],
                "choices": {"text": r["choices"], "label": labels},
                "answerKey": labels[r["gold"]],
            }
        )
    return records


@dataclass(frozen=True)
class OfflineTask:
    """One harness task and where its local file is under a data folder."""

    name: str
    harness_yaml: str
    """The harness's own task file, relative to lm_eval/tasks."""
    relative_path: str
    split: str
    """The split the harness's definition evaluates."""
    records: Callable[[Path], list[dict]]
    primary_metric: str
    """The metric a table shows for this task."""
    expected_records: int
    """The size of the whole split, as its source documents it."""


OFFLINE_TASKS: dict[str, OfflineTask] = {
    task.name: task
    for task in (
        OfflineTask(
            "hellaswag",
            "hellaswag/hellaswag.yaml",
            "hellaswag/hellaswag_val.jsonl",
            "validation",
            _hellaswag,
            "acc_norm",
            10042,
        ),
        OfflineTask("arc_easy", "arc/arc_easy.yaml", "arc/arc_easy_test.jsonl", "test", _arc, "acc", 2376),
        OfflineTask(
            "arc_challenge",
            "arc/arc_challenge.yaml",
            "arc/arc_challenge_test.jsonl",
            "test",
            _arc,
            "acc_norm",
            1172,
        ),
        OfflineTask("piqa", "piqa/piqa.yaml", "piqa/valid.jsonl", "validation", _piqa, "acc_norm", 1838),
        OfflineTask(
            "winogrande",
            "winogrande/default.yaml",
            "winogrande/winogrande_dev.jsonl",
            "validation",
            _winogrande,
            "acc",
            1267,
        ),
        OfflineTask(
            "boolq",
            "super_glue/boolq/default.yaml",
            "boolq/boolq_dev.jsonl",
            "validation",
            _boolq,
            "acc",
            3270,
        ),
        OfflineTask(
            "lambada_openai",
            "lambada/lambada_openai.yaml",
            "lambada/lambada_openai_test.jsonl",
            "test",
            _lambada,
            "acc",
            5153,
        ),
        OfflineTask(
            "openbookqa",
            "openbookqa/openbookqa.yaml",
            "openbookqa_copa/openbookqa_test.jsonl",
            "test",
            _openbookqa,
            "acc_norm",
            500,
        ),
    )
}

TASK_GROUPS = {"arc": ("arc_easy", "arc_challenge")}


def load_records(name: str, data_dir: str | Path) -> list[dict]:
    """Read task `name`'s local file under `data_dir`, with the fields the harness's definition expects."""
    task = OFFLINE_TASKS[name]
    path = Path(data_dir) / task.relative_path
    if not path.is_file():
        raise BadInputError(
            f"task {name}: local file not found at {path}; --data-dir (or ${DATA_DIR_ENV}) must point at a "
            f"folder that contains {task.relative_path}"
        )
    return task.records(path)


def local_dataset(task: str, data_dir: str, **metadata):
    """Build the harness's dataset for `task` from local files; the harness calls this as `custom_dataset`.

    The harness passes the task's metadata (such as its version) along with the dataset arguments, so
    the extra keywords are accepted and ignored.
    """
    return _dataset(OFFLINE_TASKS[task].split, load_records(task, data_dir))


def expand_task_names(text: str, offline: bool) -> list[str]:
    """Split a --tasks list, expand groups such as `arc`, and reject unknown names with close matches."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise BadInputError("--tasks is empty; give a comma-separated list such as hellaswag,arc_easy")
    known = [*OFFLINE_TASKS, *TASK_GROUPS] if offline else _harness_task_names()
    expanded: list[str] = []
    for name in names:
        if name not in known and name not in TASK_GROUPS:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            scope = (
                f"offline tasks are {', '.join([*OFFLINE_TASKS, *TASK_GROUPS])}"
                if offline
                else ("not a task of the installed lm-evaluation-harness")
            )
            raise BadInputError(f"--tasks {name!r}: unknown task{hint} ({scope})")
        for member in TASK_GROUPS.get(name, (name,)):
            if member not in expanded:
                expanded.append(member)
    return expanded


def _harness_task_names() -> list[str]:
    from lm_eval.tasks import TaskManager

    return [*TaskManager().all_tasks, *TASK_GROUPS]


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """Return --data-dir, else $BALCONY_DATA_DIR, else None (the hub datasets)."""
    value = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        source = "--data-dir" if data_dir is not None else f"${DATA_DIR_ENV}"
        raise BadInputError(
            f"{source} {str(value)!r}: not a directory; point it at a folder laid out like the "
            "project's shared data folder"
        )
    return path.resolve()


def write_task_files(
    directory: str | Path, data_dir: str | Path, tasks: list[str] | None = None
) -> list[Path]:
    """Write one harness task YAML per offline task into `directory`; return the files written.

    Each file includes the harness's own definition by absolute path and replaces only the dataset.
    A task whose local file is missing raises, so a written folder never points at missing data.
    """
    import lm_eval.tasks

    harness_tasks = Path(lm_eval.tasks.__file__).parent
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in tasks or list(OFFLINE_TASKS):
        task = OFFLINE_TASKS[name]
        path = Path(data_dir) / task.relative_path
        if not path.is_file():
            raise BadInputError(
                f"task {name}: local file not found at {path}; --data-dir must point at a folder that "
                f"contains {task.relative_path}"
            )
        # custom_dataset replaces the hub download. The harness passes dataset_kwargs to it as keywords.
        lines = [
            f"include: {json.dumps(str(harness_tasks / task.harness_yaml))}",
            f"task: {name}",
            "custom_dataset: !function balcony_cli.offline_tasks.local_dataset",
            # Only the evaluated split exists locally, so the other splits are switched off.
            "training_split: null",
            f"validation_split: {task.split if task.split == 'validation' else 'null'}",
            f"test_split: {task.split if task.split == 'test' else 'null'}",
            "dataset_kwargs:",
            f"  task: {name}",
            f"  data_dir: {json.dumps(str(Path(data_dir).resolve()))}",
        ]
        target = directory / f"{name}.yaml"
        target.write_text("\n".join(lines) + "\n")
        written.append(target)
    return written
