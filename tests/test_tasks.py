"""Tasks and scoring: examples and their validation, JSONL / silo / (fake) Hugging Face loading, prompts, and
KV-cache batched choice scoring against a brute-force one-forward-per-choice reference on a tiny random Llama."""
from __future__ import annotations

import functools
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from tiny_chat import chat_tokenizer, tiny_chat_llama

from seqr.hf import choices as scoring

from seqr.silo import tasks
from seqr.silo.tasks import TASKS, Example, answer_text, build_prompt, load_task

REAL_DATA = Path(os.environ.get(tasks.DATA_ENV) or "/work/shared/data/tasks")
README_COUNTS = {"agnews": (1200, 300), "cola": (1200, 300), "dbpedia": (900, 225), "hellaswag": (1200, 300),
                 "mnli": (1200, 300), "mrpc": (1200, 300), "qnli": (1200, 300), "qqp": (1200, 300),
                 "rte": (1200, 300), "sst2": (1200, 300)}
README_LABELS = {
    "agnews": "World, Sports, Business, Sci/Tech", "cola": "unacceptable, acceptable",
    "dbpedia": "Company, EducationalInstitution, Artist, Athlete, OfficeHolder, MeanOfTransportation, Building, "
               "NaturalPlace, Village, Animal, Plant, Album, Film, WrittenWork",
    "mnli": "entailment, neutral, contradiction", "mrpc": "not_equivalent, equivalent",
    "qnli": "entailment, not_entailment", "rte": "entailment, not_entailment", "qqp": "not_duplicate, duplicate",
    "sst2": "negative, positive"}


@pytest.fixture(scope="module")
def reference(model, tok):
    """Brute-force choice scores of mixed_examples(), computed once."""
    return brute_force(model, tok, mixed_examples(), "choices")


def mixed_examples() -> list[Example]:
    """Different prompt lengths, answer lengths (1 token to many) and numbers of choices (2 to 5)."""
    return [
        Example("sst2", "a", "a fine film", None, ("negative", "positive"), 1),
        Example("mnli", "b", "A man plays a guitar on a long stage tonight.", "A person makes music.",
                ("entailment", "neutral", "contradiction"), 0),
        Example("silo", "c", "x", None, ("p", "pos", "q r s t u v", "ne", "z"), 3),
        Example("hellaswag", "d", "Cooking: He cracks two eggs into a bowl and", None,
                ("whisks them.", "throws the bowl out of the window.", "sings.", "eats the shells raw."), 0),
        Example("rte", "e", "Paris is the capital of France.", "France has a capital.",
                ("entailment", "not_entailment"), 0),
    ]


def brute_force(model, tok, examples, scoring):
    """One forward per (example, choice) on the unpadded prompt + answer ids; summed answer-token log-probs."""
    out = []
    for ex in examples:
        prompt = tok(build_prompt(ex, tok, scoring=scoring), add_special_tokens=False).input_ids
        row = []
        for c in range(len(ex.choices)):
            ans = tok(answer_text(ex, c, scoring), add_special_tokens=False).input_ids
            ids = torch.tensor([prompt + ans])
            with torch.no_grad():
                lp = model(input_ids=ids).logits[0].double().log_softmax(-1)  # (T, V)
            row.append(sum(lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(ans)))
        out.append(row)
    return out


def assert_scores_close(got, want, atol=1e-4):
    assert [len(g) for g in got] == [len(w) for w in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.tensor(g, dtype=torch.float64), torch.tensor(w, dtype=torch.float64),
                                   atol=atol, rtol=0)


# --- scoring --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [2, 8])
def test_batched_kv_scoring_matches_brute_force(model, tok, reference, batch_size):
    exs = mixed_examples()
    got = scoring.choice_logprobs(model, tok, exs, batch_size=batch_size, progress=False)
    want = reference
    assert [len(r) for r in got] == [len(ex.choices) for ex in exs]
    assert_scores_close(got, want)


def test_second_forward_sees_one_row_per_choice(model, tok, monkeypatch):
    """Two forwards per batch: the prompts (B rows), then every (example, choice) pair at once (M rows)."""
    calls = []
    real = type(model).forward

    @functools.wraps(real)
    def spy(self, *a, **k):
        calls.append(tuple(k["input_ids"].shape))
        return real(self, *a, **k)

    monkeypatch.setattr(type(model), "forward", spy)
    exs = mixed_examples()
    scoring.choice_logprobs(model, tok, exs, batch_size=8, progress=False)
    assert len(calls) == 2 and calls[0][0] == 5 and calls[1][0] == sum(len(ex.choices) for ex in exs)


def test_letter_scoring_matches_last_position_and_needs_one_forward(model, tok, monkeypatch):
    exs = mixed_examples()
    want = []
    for ex in exs:  # brute force: the letters' log-probs at the prompt's last position
        ids = tok(build_prompt(ex, tok, scoring="letter"), add_special_tokens=False).input_ids
        with torch.no_grad():
            lp = model(input_ids=torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)
        want.append([lp[tok.convert_tokens_to_ids(tasks.LETTERS[c])].item() for c in range(len(ex.choices))])
    calls = []
    real = type(model).forward
    monkeypatch.setattr(type(model), "forward",
                        functools.wraps(real)(lambda self, *a, **k: calls.append(1) or real(self, *a, **k)))
    got = scoring.choice_logprobs(model, tok, exs, scoring="letter", batch_size=3, progress=False)
    assert len(calls) == 2  # two batches, one forward each
    assert_scores_close(got, want)


def test_accuracy_is_argmax_share_and_bf16_runs(model, tok, reference):
    exs = mixed_examples()
    want = sum(max(range(len(r)), key=r.__getitem__) == ex.label for r, ex in zip(reference, exs)) / len(exs)
    assert scoring.accuracy(model, tok, exs, progress=False) == want
    bf = tiny_chat_llama(len(tok), dtype=torch.bfloat16)
    got = scoring.choice_logprobs(bf, tok, exs, batch_size=3, progress=False)
    for g, r in zip(got, reference):
        assert all(torch.isfinite(torch.tensor(g))) and torch.allclose(torch.tensor(g), torch.tensor(r), atol=0.5)


def test_routed_seqr_model_matches_brute_force(tok, tmp_path):
    """With a seqr library attached, prompt tokens are routed in the first forward and answer tokens in the
    second; routing is per token, so the scores still equal one full forward per choice."""
    import seqr
    from peft_factory import make_adapter

    for i, name in enumerate(["x", "y"]):
        make_adapter(tmp_path / name, seed=i + 1, base=tiny_chat_llama(len(tok)))
    routed = seqr.attach(tiny_chat_llama(len(tok)), seqr.LoraLibrary.from_peft({n: tmp_path / n for n in "xy"}))
    exs = mixed_examples()[:3]
    got = scoring.choice_logprobs(routed, tok, exs, batch_size=2, progress=False)
    assert_scores_close(got, brute_force(routed, tok, exs, "choices"))


# --- prompts --------------------------------------------------------------------------------------------
def test_build_prompt_uses_chat_template_with_input_and_options(tok):
    ex = mixed_examples()[1]
    p = build_prompt(ex, tok)
    assert p.startswith("<|im_start|>user\n") and p.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "Premise: " + ex.text in p and "Hypothesis: " + ex.text_pair in p and TASKS["mnli"].instruction in p
    assert all(f"- {c}" in p for c in ex.choices)
    letter = build_prompt(ex, tok, scoring="letter")
    assert "A. entailment\nB. neutral\nC. contradiction" in letter and "letter" in letter
    assert answer_text(ex, 2) == "contradiction" and answer_text(ex, 2, "letter") == "C"
    with pytest.raises(ValueError, match="'bogus'"):
        build_prompt(ex, tok, scoring="bogus")
    with pytest.raises(ValueError, match="choice index 3"):
        answer_text(ex, 3)


# --- real data ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"no task data at {REAL_DATA}")
def test_real_jsonl_counts_labels_and_subsets():
    for task, (n_train, n_dev) in README_COUNTS.items():
        train, dev = (load_task(task, s, data_dir=REAL_DATA, source="jsonl") for s in ("train", "dev"))
        assert (len(train), len(dev)) == (n_train, n_dev), task
        assert not {e.id for e in train} & {e.id for e in dev}, task
        if task == "hellaswag":
            assert all(len(e.choices) == 4 for e in dev) and {e.label for e in dev} == {0, 1, 2, 3}
        else:
            assert TASKS[task].labels == tuple(README_LABELS[task].split(", ")), task
            assert {e.choices for e in train + dev} == {TASKS[task].labels}, task
    a = load_task("rte", "dev", data_dir=REAL_DATA, max_examples=50, seed=3)
    b = load_task("rte", "dev", data_dir=REAL_DATA, max_examples=50, seed=3)
    c = load_task("rte", "dev", data_dir=REAL_DATA, max_examples=20, seed=3)
    d = load_task("rte", "dev", data_dir=REAL_DATA, max_examples=50, seed=4)
    assert a == b and len(a) == 50 and {e.id for e in c} < {e.id for e in a} and a != d


def test_auto_source_prefers_env_data_dir(tmp_path, monkeypatch, capsys):
    write(tmp_path / "sst2" / "dev.jsonl", [row("s1")])
    monkeypatch.setenv(tasks.DATA_ENV, str(tmp_path))
    assert [e.id for e in load_task("sst2", "dev")] == ["s1"]
    assert "JSONL" in capsys.readouterr().err


# --- silos and malformed rows ---------------------------------------------------------------------------
def row(id, **kw):
    r = {"task": "sst2", "id": id, "text": "good", "text_pair": None, "choices": ["negative", "positive"],
         "label": 1}
    r.update(kw)
    return r


def write(path: Path, rows, raw: str = ""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + raw)


def test_user_silo_loads_with_task_from_rows_or_stem(tmp_path):
    write(tmp_path / "legal-train.jsonl", [{"id": "l1", "text": "Is it legal?", "choices": ["yes", "no", "maybe"],
                                            "label": 2}, row("l2", task="legal")])
    got = load_task(str(tmp_path / "legal-{split}.jsonl"), "train")
    assert [(e.task, e.id, e.choices, e.label) for e in got] == [("legal-train", "l1", ("yes", "no", "maybe"), 2),
                                                              ("legal", "l2", ("negative", "positive"), 1)]
    assert load_task(tmp_path / "legal-train.jsonl", "dev", max_examples=1)[0].id in ("l1", "l2")
    assert "Choose the correct option." in build_prompt(got[0], chat_tokenizer())


@pytest.mark.parametrize("raw, match", [
    ("{not json\n", "not valid JSON"),
    ('{"id": "x", "text": "t", "label": 0}\n', r"lacks field\(s\) \['choices'\]"),
    ('{"id": "x", "text": "t", "choices": ["a", "b"], "label": 2}\n', r"'x'.*label must be an int in \[0, 2\)"),
    ('{"id": "x", "text": "", "choices": ["a", "b"], "label": 0}\n', "'x'.*text must be a non-empty"),
    ('{"id": "x", "text": "t", "choices": ["a"], "label": 0}\n', "at least 2 choices"),
    ('{"id": "s1", "text": "t", "choices": ["a", "b"], "label": 0}\n', "duplicate id 's1'.*line 1"),
])
def test_malformed_rows_name_file_and_line(tmp_path, raw, match):
    path = tmp_path / "silo.jsonl"
    write(path, [row("s1")], raw)
    with pytest.raises(ValueError, match=match) as e:
        load_task(str(path), "train")
    assert f"{path}:2:" in str(e.value)


def test_unknown_task_and_missing_split_are_named(tmp_path):
    with pytest.raises(ValueError, match="'sst3'") as e:
        load_task("sst3", "dev", data_dir=tmp_path)
    assert all(t in str(e.value) for t in TASKS)
    with pytest.raises(FileNotFoundError, match="sst2.*dev.jsonl"):
        load_task("sst2", "dev", data_dir=tmp_path)
    write(tmp_path / "cola" / "dev.jsonl", [row("s1")])  # sst2 rows in cola's file
    with pytest.raises(ValueError, match="expected task 'cola'"):
        load_task("cola", "dev", data_dir=tmp_path)


# --- Hugging Face datasets (faked: no network) ----------------------------------------------------------
FAKE_HF = {
    ("nyu-mll/glue", "sst2", "validation"): [{"sentence": "it 's a charming journey . ", "label": 1, "idx": 0}],
    ("nyu-mll/glue", "mnli", "validation_matched"): [
        {"premise": "The cat sat.", "hypothesis": "A cat exists.", "label": 0, "idx": 0},
        {"premise": "It rained.", "hypothesis": "It was dry.", "label": 2, "idx": 1}],
    ("fancyzhx/dbpedia_14", None, "train"): [{"label": 13, "title": "Dune", "content": " A 1965 novel."}],
    ("Rowan/hellaswag", None, "validation"): [{
        "activity_label": "Baking cookies", "ctx": "A woman adds flour to a bowl. [title] She",
        "endings": ["stirs it.", "flies away [step] far.", "sleeps.", "sings."], "label": "1"}],
}


@pytest.fixture
def fake_datasets(monkeypatch):
    calls = []

    def load_dataset(path, name=None, *, split):
        calls.append((path, name, split))
        return FAKE_HF[(path, name, split)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.delenv(tasks.DATA_ENV, raising=False)
    return calls


def test_hf_loading_maps_fields_and_labels(fake_datasets, capsys):
    (sst,) = load_task("sst2", "dev")  # auto, no data dir -> hf
    assert "Hugging Face" in capsys.readouterr().err
    assert (sst.text, sst.text_pair, sst.choices, sst.label) == ("it 's a charming journey .", None,
                                                                 ("negative", "positive"), 1)
    mnli = load_task("mnli", "dev", source="hf")
    assert [(e.text, e.text_pair, e.choices[e.label]) for e in mnli] == [
        ("The cat sat.", "A cat exists.", "entailment"), ("It rained.", "It was dry.", "contradiction")]
    (db,) = load_task("dbpedia", "train", source="hf")
    assert (db.text, db.choices[db.label]) == ("Dune: A 1965 novel.", "WrittenWork")
    (hs,) = load_task("hellaswag", "dev", source="hf")
    assert hs.text == "Baking cookies: A woman adds flour to a bowl.. She"
    assert hs.choices == ("stirs it.", "flies away far.", "sleeps.", "sings.") and hs.label == 1
    assert fake_datasets == [("nyu-mll/glue", "sst2", "validation"), ("nyu-mll/glue", "mnli", "validation_matched"),
                             ("fancyzhx/dbpedia_14", None, "train"), ("Rowan/hellaswag", None, "validation")]
    assert len({e.id for e in mnli}) == 2


def test_hf_without_datasets_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(ImportError, match=r"seqr\[hf\]"):
        load_task("sst2", "dev", source="hf")
