"""The small training loop, batching and greedy decoding the notebooks share.

None of this is graded: the notebooks teach *what* is trained (a prompt, a prefix); this module
is how it is trained. Under nbgrader (``NBGRADER_EXECUTION`` set) progress bars are silent,
because nbgrader scores a test cell 0 if it writes anything to stderr.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

__all__ = [
    "ForwardFn",
    "TrainResult",
    "batches",
    "encode_examples",
    "GenerateFn",
    "evaluate",
    "generate_cached",
    "greedy_generate",
    "is_grading",
    "seed_everything",
    "train",
]

ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``forward(input_ids (B, T), attention_mask (B, T)) -> logits (B, T, vocab)`` over real tokens."""

IGNORE_INDEX = -100


def is_grading() -> bool:
    """True inside an nbgrader autograde/validate kernel."""
    return bool(os.environ.get("NBGRADER_EXECUTION"))


def _progress_disabled() -> bool:
    return is_grading() or os.environ.get("TQDM_DISABLE", "") not in ("", "0")


def seed_everything(seed: int) -> None:
    """Seed Python and torch (CPU and CUDA) random generators."""
    random.seed(seed)
    torch.manual_seed(seed)


def encode_examples(
    tokenizer, examples: Sequence, max_length: int | None = None, with_target: bool = True
) -> dict[str, torch.Tensor]:
    """Tokenise ``prompt + target + eos`` per example, right-padded.

    Returns ``input_ids`` and ``attention_mask`` of shape ``(batch, seq)`` and ``labels`` of
    the same shape with ``-100`` on prompt and padding positions, so the loss covers only the
    target and its eos. With ``with_target=False`` only the prompts are encoded (for generation).
    """
    if len(examples) == 0:
        raise ValueError("encode_examples needs at least one example")
    rows, label_rows = [], []
    for ex in examples:
        prompt_ids = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        if with_target:
            target_ids = tokenizer(ex.target, add_special_tokens=False)["input_ids"]
            target_ids = target_ids + [tokenizer.eos_token_id]
        else:
            target_ids = []
        ids = prompt_ids + target_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + target_ids
        if max_length is not None and len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
        rows.append(ids)
        label_rows.append(labels)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labs) in enumerate(zip(rows, label_rows)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(labs)] = torch.tensor(labs)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if with_target:
        out["labels"] = labels
    return out


def batches(
    tokenizer,
    examples: Sequence,
    batch_size: int,
    seed: int = 0,
    device: torch.device | str | None = None,
    max_length: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """An endless, seeded stream of shuffled training batches (reshuffled every epoch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(examples) == 0:
        raise ValueError("no training examples")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for b in range(max(1, len(order) // batch_size)):
            chunk = [examples[i] for i in order[b * batch_size : (b + 1) * batch_size]]
            enc = encode_examples(tokenizer, chunk, max_length=max_length)
            yield {k: v.to(device) if device is not None else v for k, v in enc.items()}


@dataclass
class TrainResult:
    """What a training run did: the loss of every step, its length and its time."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    stopped: str = "step budget reached"

    @property
    def final_loss(self) -> float:
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else math.nan


def train(
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    params: Iterable[torch.nn.Parameter] | Iterable[dict],
    data: Iterable[dict[str, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    warmup_steps: int = 0,
    seed: int = 0,
    time_budget_s: float | None = None,
    desc: str = "training",
) -> TrainResult:
    """Train ``params`` with AdamW on ``loss_fn(batch)`` for ``steps`` steps.

    Args:
        loss_fn: maps a batch to a scalar loss.
        params: the ONLY tensors that are updated (anything else keeps its value, whatever its
            ``requires_grad``), or AdamW parameter groups.
        data: batches, e.g. :func:`batches`; cycled if it runs out.
        steps: the step budget; ``time_budget_s`` may stop earlier (reported in ``stopped``).
        warmup_steps: linear warm-up, then constant learning rate.

    Returns:
        a :class:`TrainResult` with the per-step losses.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    params = list(params)
    flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    if not flat:
        raise ValueError("no parameters to train: pass the prompt / prefix parameters")
    frozen = [i for i, p in enumerate(flat) if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"{len(frozen)} of the parameters to train have requires_grad=False: nothing would "
            "update them"
        )
    seed_everything(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if warmup_steps > 0:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup_steps)
        )
    else:
        scheduler = None
    result = TrainResult()
    start = time.perf_counter()
    iterator = iter(data)
    bar = _progress_bar(total=steps, desc=desc, disable=_progress_disabled())
    try:
        for step in range(steps):
            try:
                batch = next(iterator)
            except StopIteration:
                iterator = iter(data)
                try:
                    batch = next(iterator)
                except StopIteration:
                    raise ValueError(
                        f"the data ran out after {step} steps and cannot be restarted: pass a "
                        "list or course.batches(...), which never runs out"
                    ) from None
            loss = loss_fn(batch)
            if not torch.isfinite(loss):
                result.stopped = f"loss became {loss.item()} at step {step}: lower the lr"
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(flat, max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            result.losses.append(loss.item())
            result.steps = step + 1
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{result.final_loss:.3f}")
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                result.stopped = f"time budget of {time_budget_s:g} s reached"
                break
    finally:
        result.seconds = time.perf_counter() - start
        loss = f", loss {result.final_loss:.3f}" if result.losses else ""
        _close_bar(bar, f"{desc}: {result.steps}/{steps} steps in {result.seconds:.1f} s{loss}")
    return result


def _progress_bar(iterable=None, **kwargs):
    """A tqdm bar (``leave=False``). In a notebook its widget is shown under a display id, so
    that :func:`_close_bar` can replace it by one line of text: a saved notebook then holds no
    view of a widget that is gone ("Error displaying widget: model not found" on reopening)."""
    bar_class = tqdm
    try:
        from tqdm.notebook import tqdm as notebook_bar
    except ImportError:  # no ipywidgets: tqdm.auto is the terminal bar
        notebook_bar = None
    if notebook_bar is None or not issubclass(bar_class, notebook_bar) or kwargs.get("disable"):
        return bar_class(iterable, leave=False, **kwargs)
    from IPython.display import display

    bar = bar_class(iterable, leave=False, display=False, **kwargs)
    bar.course_display = display(bar.container, display_id=True)
    return bar


def _close_bar(bar, summary: str) -> None:
    """Close ``bar``; in a notebook, leave ``summary`` where its widget was."""
    bar.close()
    handle = getattr(bar, "course_display", None)
    if handle is not None:
        handle.update({"text/plain": summary}, raw=True)


@torch.no_grad()
def greedy_generate(
    forward: ForwardFn,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    device: torch.device | str | None = None,
) -> list[str]:
    """Greedy continuation of each prompt, stopping at eos.

    ``forward`` sees right-padded ``input_ids``/``attention_mask`` and recomputes the whole
    sequence every step (no incremental cache), which keeps any prompt or prefix method correct
    by construction; the models here are small enough for that.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if any(len(e) == 0 for e in enc):
        raise ValueError("every prompt must have at least one token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    lengths = torch.tensor([len(e) for e in enc])
    width = int(lengths.max()) + max_new_tokens
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
    done = torch.zeros(len(enc), dtype=torch.bool)
    new_tokens: list[list[int]] = [[] for _ in enc]
    rows = torch.arange(len(enc))
    for _ in range(max_new_tokens):
        cur = int(lengths.max())
        mask = (torch.arange(cur)[None, :] < lengths[:, None]).long()
        logits = forward(ids[:, :cur].to(device), mask.to(device))
        nxt = logits[rows.to(logits.device), (lengths - 1).to(logits.device)].argmax(-1).cpu()
        for i in range(len(enc)):
            if done[i]:
                continue
            tok = int(nxt[i])
            if tok == eos:
                done[i] = True
                continue
            new_tokens[i].append(tok)
            ids[i, lengths[i]] = tok
            lengths[i] += 1
        if bool(done.all()):
            break
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in new_tokens]


GenerateFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``(input_ids, attention_mask, max_new_tokens) -> new token ids (B, <= max_new_tokens)``;
inputs are LEFT-padded, as ``model.generate`` wants them."""


@torch.no_grad()
def generate_cached(
    generate: GenerateFn,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    device: torch.device | str | None = None,
) -> list[str]:
    """Greedy continuations through ``generate`` (typically ``model.generate`` with a key/value
    cache, so each new token costs one position, not the whole sequence)."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    if int(enc["attention_mask"].sum(1).min()) == 0:
        raise ValueError("every prompt must have at least one token")
    out = generate(enc["input_ids"].to(device), enc["attention_mask"].to(device), max_new_tokens)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out.cpu()]


def evaluate(
    task,
    forward: ForwardFn | None,
    tokenizer,
    examples: Sequence,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    show_progress: bool = True,
    generate: GenerateFn | None = None,
) -> dict:
    """Generate for ``examples`` greedily and score with ``task.score``.

    Give either ``forward`` (right-padded ids and mask -> logits; the whole sequence is
    recomputed for every new token: always correct, slow for long outputs) or ``generate``
    (left-padded ids, mask, max_new_tokens -> new ids, e.g. ``model.generate`` with a cache:
    fast). Returns the task's metrics plus ``"predictions"`` (the generated strings, in order).
    """
    if (forward is None) == (generate is None):
        raise ValueError("evaluate needs exactly one of forward= or generate=")
    predictions: list[str] = []
    chunks = range(0, len(examples), batch_size)
    bar = _progress_bar(
        chunks,
        desc=f"evaluating {task.name}",
        disable=_progress_disabled() or not show_progress,
    )
    for start in bar:
        prompts = [ex.prompt for ex in examples[start : start + batch_size]]
        if generate is not None:
            predictions += generate_cached(
                generate, tokenizer, prompts, task.max_new_tokens, device
            )
        else:
            predictions += greedy_generate(forward, tokenizer, prompts, task.max_new_tokens, device)
    _close_bar(bar, f"evaluated {len(examples)} {task.name} examples")
    metrics = task.score(predictions, list(examples))
    return {**metrics, "predictions": predictions}
