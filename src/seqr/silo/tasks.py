"""The paper's ten tasks: examples, where they come from (JSONL files or Hugging Face `datasets`), and prompts.

Every task is multiple choice: an `Example` holds the input text (and an optional second text), the
choices (label names, or hellaswag's four endings) and the gold index. Data are read from a directory laid
out as `<dir>/<task>/{train,dev}.jsonl` (`data_dir=`, `--data DIR`, or `$SEQR_TASK_DATA`), from a user's own
JSONL file of the same schema (a data silo: pass its path as the task), or from the Hugging Face hub through
the optional `datasets` package (`pip install 'seqr[hf]'`). Scoring lives in `seqr.hf.choices`.
"""
from __future__ import annotations

import json
import os
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from seqr.core.argfmt import BadValue, PathNotFound
from seqr.hf.model_cache import say

DATA_ENV = "SEQR_TASK_DATA"  # default data dir: <dir>/<task>/{train,dev}.jsonl
SCORINGS = ("choices", "letter")
LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class Example:
    """One multiple-choice example; `label` indexes `choices`. Validated on construction."""

    task: str
    id: str
    text: str
    text_pair: str | None
    choices: tuple[str, ...]
    label: int

    def __post_init__(self):
        object.__setattr__(self, "choices", tuple(self.choices) if isinstance(self.choices, (list, tuple))
                           else self.choices)
        where = f"example {self.id!r}"
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"example id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"{where}: task must be a non-empty string, got {self.task!r}")
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"{where}: text must be a non-empty string, got {self.text!r}")
        if self.text_pair is not None and not isinstance(self.text_pair, str):
            raise ValueError(f"{where}: text_pair must be a string or null, got {self.text_pair!r}")
        if not isinstance(self.choices, tuple) or len(self.choices) < 2:
            raise ValueError(f"{where}: needs a list of at least 2 choices, got {self.choices!r}")
        bad = [c for c in self.choices if not isinstance(c, str) or not c.strip()]
        if bad:
            raise ValueError(f"{where}: every choice must be a non-empty string, got {bad[0]!r}")
        if isinstance(self.label, bool) or not isinstance(self.label, int) \
                or not 0 <= self.label < len(self.choices):
            raise ValueError(f"{where}: label must be an int in [0, {len(self.choices)}), got {self.label!r}")

    def prompt(self, tokenizer, scoring: str = "choices") -> str:
        """The chat prompt of this example (what `seqr.hf.choices` scores the answers after)."""
        return build_prompt(self, tokenizer, scoring=scoring)

    def answer(self, choice_index: int, scoring: str = "choices") -> str:
        """The assistant's answer for one choice."""
        return answer_text(self, choice_index, scoring)


@dataclass(frozen=True)
class HFSource:
    """Where a task lives on the Hugging Face hub and how a row maps to an `Example`.

    `text` fields are joined with `join` (dbpedia: title + ": " + content); `choices` names a row field
    holding the choices (hellaswag's endings; else the task's label names are used); `splits` maps seqr's
    split names to the dataset's (any other name is passed through as is)."""

    path: str
    name: str | None
    text: tuple[str, ...]
    pair: str | None = None
    label: str = "label"
    choices: str | None = None
    join: str = ": "
    splits: dict = field(default_factory=lambda: {"train": "train", "dev": "validation"})


@dataclass(frozen=True)
class TaskSpec:
    """A task: its label names in index order (None when each row carries its own choices), the prompt's
    instruction and input labels, and its Hugging Face source."""

    name: str
    labels: tuple[str, ...] | None
    instruction: str
    text_label: str
    pair_label: str | None
    hf: HFSource | None


def _glue(config, text, pair=None, dev="validation"):
    return HFSource("nyu-mll/glue", config, (text,), pair, splits={"train": "train", "dev": dev})


_NLI = ("entailment", "not_entailment")
TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("agnews", ("World", "Sports", "Business", "Sci/Tech"),
             "What is the topic of this news article?", "Article", None,
             # AG News has no validation split: dev reads its test split (as the JSONL data do).
             HFSource("fancyzhx/ag_news", None, ("text",), splits={"train": "train", "dev": "test"})),
    TaskSpec("cola", ("unacceptable", "acceptable"),
             "Is this sentence grammatically acceptable English?", "Sentence", None, _glue("cola", "sentence")),
    TaskSpec("dbpedia", ("Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder",
                         "MeanOfTransportation", "Building", "NaturalPlace", "Village", "Animal", "Plant",
                         "Album", "Film", "WrittenWork"),
             "Which category does this Wikipedia article belong to?", "Article", None,
             HFSource("fancyzhx/dbpedia_14", None, ("title", "content"), splits={"train": "train", "dev": "test"})),
    TaskSpec("hellaswag", None, "Which ending is the most plausible continuation of the context?",
             "Context", None, HFSource("Rowan/hellaswag", None, ("activity_label", "ctx"), choices="endings")),
    TaskSpec("mnli", ("entailment", "neutral", "contradiction"),
             "Does the premise entail the hypothesis, contradict it, or neither (neutral)?", "Premise",
             "Hypothesis", _glue("mnli", "premise", "hypothesis", dev="validation_matched")),
    TaskSpec("mrpc", ("not_equivalent", "equivalent"),
             "Do the two sentences mean the same thing (are they paraphrases)?", "Sentence 1", "Sentence 2",
             _glue("mrpc", "sentence1", "sentence2")),
    TaskSpec("qnli", _NLI, "Does the sentence contain the answer to the question?", "Question", "Sentence",
             _glue("qnli", "question", "sentence")),
    TaskSpec("qqp", ("not_duplicate", "duplicate"), "Do the two questions ask the same thing?", "Question 1",
             "Question 2", _glue("qqp", "question1", "question2")),
    TaskSpec("rte", _NLI, "Does the premise entail the hypothesis?", "Premise", "Hypothesis",
             _glue("rte", "sentence1", "sentence2")),
    TaskSpec("sst2", ("negative", "positive"), "What is the sentiment of this movie review?", "Review", None,
             _glue("sst2", "sentence")),
]}
GENERIC = TaskSpec("", None, "Choose the correct option.", "Input", "Input 2", None)  # silo tasks


def task_spec(task: str) -> TaskSpec:
    """The spec of a task name; ValueError (BadValue) listing the ten when it is unknown."""
    if task not in TASKS:
        raise BadValue(f"unknown task {task!r}; known tasks: {', '.join(TASKS)} (or a path to a JSONL file)")
    return TASKS[task]


# --- loading --------------------------------------------------------------------------------------------
def load_task(task: str | os.PathLike, split: str = "train", *, data_dir: str | os.PathLike | None = None,
              source: str = "auto", max_examples: int | None = None, seed: int = 0) -> list[Example]:
    """The examples of one task and split ("train" or "dev").

    `task`: one of the ten names, or the path of a JSONL file of the same schema (a silo; `{split}` in the
    path is replaced by `split`, and rows without a `task` field get the file's stem). `source`: "jsonl"
    reads `<data_dir>/<task>/<split>.jsonl` (`data_dir` defaults to `$SEQR_TASK_DATA`); "hf" reads the
    Hugging Face dataset (dev = its validation split); "auto" uses jsonl when `data_dir` is given or
    `$SEQR_TASK_DATA` names an existing dir, else hf, and says which on stderr. `max_examples`: a random
    subset of that size, the same for the same `seed` (and nested across sizes), kept in file order.
    """
    if source not in ("auto", "jsonl", "hf"):
        raise ValueError(f"source must be 'auto', 'jsonl' or 'hf', got {source!r}")
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise ValueError(f"max_examples must be a positive int or None, got {max_examples!r}")
    if _is_path(task):
        path = Path(os.fspath(task).replace("{split}", split)).expanduser()
        return _subset(read_jsonl(path, default_task=path.stem.split(".")[0]), max_examples, seed)
    spec = task_spec(task)
    env = os.environ.get(DATA_ENV)
    if source == "auto":
        if data_dir is None and env and Path(env).expanduser().is_dir():
            data_dir = env
        source = "jsonl" if data_dir is not None else "hf"
        why = (f"data dir {os.fspath(data_dir)!r}" if data_dir is not None else
               f"no data dir given and ${DATA_ENV} {'is unset' if not env else f'= {env!r} is not a dir'}")
        say(f"{task}/{split}: reading {'JSONL files' if source == 'jsonl' else 'Hugging Face datasets'} ({why})")
    if source == "hf":
        return load_hf(spec, split, max_examples=max_examples, seed=seed)
    if data_dir is None:
        if not env:
            raise ValueError(f"source='jsonl' needs data_dir= (--data DIR) or ${DATA_ENV}")
        data_dir = env
    root = Path(data_dir).expanduser()
    path = root / task / f"{split}.jsonl"
    if not path.is_file():
        have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else None
        raise PathNotFound(f"no {split!r} split of {task!r}: {str(path)!r} does not exist "
                           + (f"(task dirs in {str(root)!r}: {have})" if have is not None
                              else f"({str(root)!r} is not a directory)"))
    rows = read_jsonl(path, default_task=task)
    for ex in rows:
        if ex.task != task or (spec.labels is not None and ex.choices != spec.labels):
            want = f"task {task!r}" + (f" with choices {list(spec.labels)}" if spec.labels else "")
            raise ValueError(f"{path}: row {ex.id!r} has task {ex.task!r} and choices {list(ex.choices)}; "
                             f"expected {want}")
    return _subset(rows, max_examples, seed)


def _is_path(task) -> bool:
    s = os.fspath(task)
    return isinstance(task, os.PathLike) or "/" in s or os.sep in s or s.endswith(".jsonl") or "{split}" in s


def read_jsonl(path: str | os.PathLike, *, default_task: str) -> list[Example]:
    """All rows of a JSONL file as examples; errors name the file and line. Rows need `id`, `text`,
    `choices`, `label`; `task` defaults to `default_task`, `text_pair` to null. Ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise PathNotFound(f"task file {str(path)!r} does not exist")
    out, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in ("id", "text", "choices", "label") if k not in row]
            if missing:
                raise ValueError(f"{where}: row {row.get('id')!r} lacks field(s) {missing}")
            try:
                ex = Example(row.get("task") or default_task, row["id"], row["text"], row.get("text_pair"),
                             row["choices"], row["label"])
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from e
            if ex.id in seen:
                raise ValueError(f"{where}: duplicate id {ex.id!r} (first on line {seen[ex.id]})")
            seen[ex.id] = lineno
            out.append(ex)
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


def subset_indices(n: int, k: int | None, seed: int) -> list[int]:
    """Sorted indices of a seeded random subset of size min(k, n) of range(n); all of them when k is None.
    Subsets for the same seed are nested: the first k of one fixed permutation."""
    if k is None or k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), n)[:k])


def _subset(rows: list, k: int | None, seed: int) -> list:
    return [rows[i] for i in subset_indices(len(rows), k, seed)]


def load_hf(spec: TaskSpec, split: str, *, max_examples: int | None = None, seed: int = 0) -> list[Example]:
    """A task's split from the Hugging Face hub via `datasets.load_dataset` (imported here: optional)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"loading {spec.name!r} from the Hugging Face hub needs the `datasets` package "
                          f"(pip install 'seqr[hf]'), or give JSONL data: --data DIR or ${DATA_ENV}") from e
    hf = spec.hf
    hf_split = hf.splits.get(split, split)
    args = (hf.path,) if hf.name is None else (hf.path, hf.name)
    ds = datasets.load_dataset(*args, split=hf_split)
    idx = subset_indices(len(ds), max_examples, seed)
    return [hf_example(spec, ds[i], f"{spec.name}-hf{hf_split}-{i}") for i in idx]


def hf_example(spec: TaskSpec, row: dict, id: str) -> Example:
    """Map one Hugging Face row to an Example (hellaswag: cleaned text, string label -> int)."""
    hf = spec.hf
    parts = [row[f] for f in hf.text]
    label = row[hf.label]
    if label in ("", None, -1):
        raise ValueError(f"{hf.path} row {id!r} has no gold label ({label!r}); is it an unlabelled test split?")
    if spec.name == "hellaswag":
        text = _hellaswag_clean(parts[0] + ": " + parts[1])
        choices = tuple(_hellaswag_clean(e) for e in row[hf.choices])
    else:
        text, choices = hf.join.join(p.strip() for p in parts), spec.labels
    return Example(spec.name, id, text, row[hf.pair].strip() if hf.pair else None, choices, int(label))


def _hellaswag_clean(text: str) -> str:
    """The standard HellaSwag cleaning (as lm-eval-harness): ' [title]' -> '. ', drop [markup], no double spaces."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


# --- prompts --------------------------------------------------------------------------------------------
def _check_scoring(scoring: str) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")


def user_message(example: Example, scoring: str = "choices") -> str:
    """The user turn: instruction, input(s), the options (lettered for scoring='letter'), what to answer."""
    _check_scoring(scoring)
    spec = TASKS.get(example.task, GENERIC)
    if scoring == "letter" and len(example.choices) > len(LETTERS):
        raise ValueError(f"example {example.id!r}: {len(example.choices)} choices; letter scoring allows "
                         f"at most {len(LETTERS)}")
    lines = [spec.instruction, "", f"{spec.text_label}: {example.text}"]
    if example.text_pair is not None:
        lines.append(f"{spec.pair_label or GENERIC.pair_label}: {example.text_pair}")
    lines += ["", "Options:"]
    if scoring == "letter":
        lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(example.choices)]
        lines += ["", "Answer with the letter of the correct option only."]
    else:
        lines += [f"- {c}" for c in example.choices]
        lines += ["", "Answer with the correct option only, exactly as written."]
    return "\n".join(lines)


def build_prompt(example: Example, tokenizer, *, scoring: str = "choices") -> str:
    """The full prompt text through the tokenizer's chat template, ending with the assistant turn's opening
    (`add_generation_prompt=True`); the answer (`answer_text`) follows it directly. Tokenize it with
    `add_special_tokens=False`: the template already holds the special tokens."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat_template; seqr's prompts need one")
    messages = [{"role": "user", "content": user_message(example, scoring)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def answer_text(example: Example, choice_index: int, scoring: str = "choices") -> str:
    """The assistant's answer for one choice: the choice text, or its letter (scoring='letter'). Without the
    template's end-of-turn token."""
    _check_scoring(scoring)
    if not 0 <= choice_index < len(example.choices):
        raise ValueError(f"example {example.id!r}: choice index {choice_index} out of range "
                         f"[0, {len(example.choices)})")
    return LETTERS[choice_index] if scoring == "letter" else example.choices[choice_index]


def check_task(parser, task, data_dir, max_examples: int | None = None, seed: int = 0) -> list[Example]:
    """A CLI's early check that `task`'s train split can be read (before any model loads): its examples, or
    `parser.error` (one line naming the task, exit 2)."""
    try:
        return load_task(task, "train", data_dir=data_dir, max_examples=max_examples, seed=seed)
    except (ValueError, KeyError, FileNotFoundError, ImportError) as e:
        parser.error(str(e).strip(chr(39) + chr(34)))
