"""Multiple-choice scoring of `Example`s with a causal LM: the log-likelihood of each choice's answer.

An example is anything with `id`, `choices`, `prompt(tokenizer, scoring)` and `answer(choice, scoring)` (e.g.
`seqr.silo.tasks.Example`): the prompt format belongs to the tasks, the scoring to the model.

Per batch of examples, two forwards in all: (1) the left-padded prompts with the KV cache on, keeping only
the last position's logits (the first answer token's distribution); (2) the cache gathered to one row per
(example, choice) and every choice's remaining answer tokens, right-padded, in one forward. When every
answer is a single token (letter scoring) the second forward is skipped. Prompt and answer are tokenized
separately and their ids concatenated, so the answer boundary is exact.
"""
from __future__ import annotations

import torch

from seqr.hf.compat import cache_kw, forward_params, keep_last, returned_cache
from seqr.hf.layers import select_rows


def encode(examples: list, tokenizer, scoring: str = "choices"):
    """Token ids of every prompt, and of every choice's answer per example: (prompts, answers)."""
    prompts = tokenizer([ex.prompt(tokenizer, scoring) for ex in examples],
                        add_special_tokens=False)["input_ids"]
    flat = [ex.answer(c, scoring) for ex in examples for c in range(len(ex.choices))]
    flat_ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    answers, k = [], 0
    for ex in examples:
        answers.append(flat_ids[k:k + len(ex.choices)])
        k += len(ex.choices)
        for c, ids in enumerate(answers[-1]):
            if not ids:
                raise ValueError(f"example {ex.id!r}: answer {ex.answer(c, scoring)!r} encodes to no tokens")
    return prompts, answers


def choice_logprobs(model, tokenizer, examples: list, *, scoring: str = "choices", batch_size: int = 8,
                  progress: bool = True) -> list[list[float]]:
    """Per example, per choice: the summed log-probability of the choice's answer tokens after the prompt.

    Batches group examples of similar prompt length (the results come back in input order). Runs under
    torch.no_grad(); any causal LM whose forward takes attention_mask, position_ids and a DynamicCache
    (a routed seqr model included); fp32 or bf16 (log-probs are computed in fp32)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    from tqdm import tqdm

    examples = list(examples)
    prompts, answers = encode(examples, tokenizer, scoring)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token")
    order = sorted(range(len(examples)), key=lambda i: -len(prompts[i]))
    out: list[list[float] | None] = [None] * len(examples)
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    with torch.no_grad():
        for batch in tqdm(batches, desc="score", disable=not progress or not batches, leave=False):
            scores = _score_batch(model, [prompts[i] for i in batch], [answers[i] for i in batch], pad)
            for i, s in zip(batch, scores):
                out[i] = s
    return out


def accuracy(model, tokenizer, examples: list, *, scoring: str = "choices", batch_size: int = 8,
             progress: bool = True) -> float:
    """Share of examples whose highest-scoring choice is the gold label (ties go to the first choice)."""
    examples = list(examples)
    if not examples:
        raise ValueError("accuracy of no examples")
    scores = choice_logprobs(model, tokenizer, examples, scoring=scoring, batch_size=batch_size, progress=progress)
    right = sum(max(range(len(s)), key=s.__getitem__) == ex.label for s, ex in zip(scores, examples))
    return right / len(examples)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _score_batch(model, prompts: list[list[int]], answers: list[list[list[int]]], pad: int) -> list[list[float]]:
    """Scores of one batch: prompts[b] (ids) and answers[b][c] (ids of choice c of example b)."""
    dev, params = _device(model), forward_params(model)
    B, Lp = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, Lp), pad, dtype=torch.long)  # (B, Lp) left-padded prompts
    mask = torch.zeros((B, Lp), dtype=torch.long)  # (B, Lp) 1 on real tokens
    for b, p in enumerate(prompts):
        ids[b, Lp - len(p):] = torch.tensor(p)
        mask[b, Lp - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, Lp) positions count real tokens only
    flat = [a for ch in answers for a in ch]  # M answers, example-major
    Lc = max(len(a) for a in flat) - 1  # the rest of the answers: tokens 2..n are predicted in forward (2)
    first = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=Lc > 0, **keep_last(params))
    logp0 = first.logits[:, -1].float().log_softmax(-1)  # (B, V) first answer token given the prompt

    owner = torch.tensor([b for b, ch in enumerate(answers) for _ in ch], device=dev)  # (M,) example of each row
    head = torch.tensor([a[0] for a in flat], device=dev)  # (M,) first answer token
    scores = logp0[owner, head]  # (M,)
    if Lc > 0:
        M = len(flat)
        cid = torch.full((M, Lc), pad, dtype=torch.long)  # (M, Lc) answer tokens 1..n-1 (inputs), right-padded
        tgt = torch.zeros((M, Lc), dtype=torch.long)  # (M, Lc) answer tokens 2..n (targets)
        cmask = torch.zeros((M, Lc), dtype=torch.long)  # (M, Lc)
        for m, a in enumerate(flat):
            n = len(a) - 1
            cid[m, :n], tgt[m, :n], cmask[m, :n] = torch.tensor(a[:-1]), torch.tensor(a[1:]), 1
        cid, tgt, cmask = cid.to(dev), tgt.to(dev), cmask.to(dev)
        cache = returned_cache(first)
        if not hasattr(cache, "batch_select_indices"):
            raise TypeError(f"{type(model).__name__} returned a {type(cache).__name__} cache; choice scoring "
                            f"needs a transformers Cache (DynamicCache) with batch_select_indices")
        cache.batch_select_indices(owner)  # every layer's keys/values: (B, h, Lp, d) -> (M, h, Lp, d)
        select_rows(model, owner)  # a routed model's per-prompt choices follow their rows
        cpos = mask.sum(-1)[owner, None] + torch.arange(Lc, device=dev)  # (M, Lc) continue after the prompt
        amask = torch.cat([mask[owner], cmask], dim=1)  # (M, Lp + Lc) prompt mask + answer mask
        logits = model(input_ids=cid, attention_mask=amask, position_ids=cpos, use_cache=True,
                       **{cache_kw(params): cache}).logits.float()  # (M, Lc, V)
        lp = logits.gather(-1, tgt[..., None])[..., 0] - logits.logsumexp(-1)  # (M, Lc)
        scores = scores + torch.where(cmask.bool(), lp, torch.zeros_like(lp)).sum(-1)  # (M,)
    scores = scores.tolist()
    out, k = [], 0
    for ch in answers:
        out.append(scores[k:k + len(ch)])
        k += len(ch)
    return out
