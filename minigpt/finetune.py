"""Fine-tuning: one loop that adapts a pretrained GPT to a task.

``fit`` is the loop: shuffled minibatches of examples (of similar lengths, so
batches pad little), a loss the caller defines, and chapter 05's pieces from
``minigpt.optim``: AdamW with decay on matrices only, the same warmup + cosine
schedule (``lr_at``, following the clock when a time limit ends training),
gradient clipping. With validation it evaluates every ``eval_interval`` steps and
can keep the best weights (``keep_best``) or an average of the last ones (``ema``).
Its settings, ``FinetuneConfig``, share ``TrainConfig``'s vocabulary
(``max_steps``, ``eval_interval``, ...) through ``minigpt.optim.OptimConfig``.

``train_classifier`` fits a ``minigpt.classify`` classifier on (text, label) pairs;
``train_instructions`` fits a language model on instruction data
(``minigpt.instruct``). Low-rank adapters live in ``minigpt.lora``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from minigpt.classify import Classifier, Encode, encode_texts, evaluate_classifier
from minigpt.files import check_bool, check_int, check_number
from minigpt.instruct import (
    PROMPT_INTRO,
    InstructionCollator,
    InstructionExample,
    instruction_loss,
    tokenize_instruction,
)
from minigpt.model import GPT
from minigpt.optim import OptimConfig, clip_grad_norm, configure_optimizer, set_lr

__all__ = [
    "FinetuneConfig",
    "History",
    "fit",
    "init_new_tokens",
    "train_classifier",
    "train_instructions",
]

History = dict[str, list[float]]


@dataclass
class FinetuneConfig(OptimConfig):
    """Settings of ``fit`` (``train_classifier``, ``train_instructions``).

    The optimisation settings are ``OptimConfig``'s, shared with ``TrainConfig``
    (``max_steps``, ``batch_size``, ``lr``, ``min_lr`` (lr / 10), ``warmup_steps``,
    ``weight_decay``, ``grad_clip``, ``eval_interval`` (0 = never), ``time_limit``,
    ``seed``, ...), with defaults for fine-tuning. With a ``time_limit`` the loop
    stops before a step that would end past it, and the schedule follows the clock.

    Attributes:
        max_length: longest sequence in tokens (None = the model's block_size).
        keep_best: with validation data and ``eval_interval`` (``train_classifier``),
            end with the trainable weights that scored the highest validation accuracy
            (the last step is evaluated too; ties go to the later weights) instead of
            the last ones: early stopping, chosen after the fact.
        bucket_by_length: batch examples of similar lengths together (less padding).
        dropout: set the GPT's dropout to this for fine-tuning (``GPT.set_dropout``;
            None = keep the model's own, usually 0 for a small pretrained model).
        ema: keep an exponential moving average of the trainable weights with this
            decay per step (e.g. 0.99: an average over about the last 100 steps), and
            evaluate, keep and return the average instead of the last weights, which
            jump around from batch to batch (None = off).
    """

    max_steps: int = 200
    batch_size: int = 16
    lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_interval: int = 0
    max_length: int | None = None
    keep_best: bool = False
    bucket_by_length: bool = True
    dropout: float | None = None
    ema: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "max_length", 1, optional=True)
        check_bool(self, "keep_best")
        check_bool(self, "bucket_by_length")
        check_number(self, "dropout", 0, 1, below=True, optional=True)
        check_number(self, "ema", 0, 1, above=True, below=True, optional=True)


def _epoch_batches(
    n: int, batch_size: int, gen: torch.Generator, lengths: Sequence[int] | None
) -> list[list[int]]:
    """One epoch of shuffled batches of example indices, consumed from the end.

    With ``lengths``, examples are sorted by length inside windows of 32 batches, so
    a batch holds texts of similar length and pads little (SMS messages run from 2
    to 900 characters; padding to the longest in a random batch wastes about half
    the compute). The order of the batches is shuffled again.
    """
    perm = torch.randperm(n, generator=gen).tolist()
    if lengths is not None:
        w = 32 * batch_size
        perm = [i for s in range(0, n, w) for i in sorted(perm[s : s + w], key=lengths.__getitem__)]
    batches = [perm[s : s + batch_size] for s in range(0, n, batch_size)]
    if lengths is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
    return batches[::-1]


def fit(
    model: nn.Module,
    loss_fn: Callable[[list], Tensor],
    examples: Sequence,
    cfg: FinetuneConfig,
    evaluate: Callable[[], float] | None = None,
    lengths: Sequence[int] | None = None,
) -> History:
    """Fine-tune the trainable parameters of ``model`` on ``examples``; returns the history.

    Args:
        model: any module; only parameters with ``requires_grad`` change.
        loss_fn: ``loss_fn(batch)`` -> scalar loss for a list of examples.
        examples: the training examples (anything ``loss_fn`` understands).
        cfg: the ``FinetuneConfig``.
        evaluate: ``evaluate()`` -> a score where higher is better (e.g. accuracy),
            run in eval mode every ``cfg.eval_interval`` steps.
        lengths: one length per example: batches then group similar lengths.
    Returns:
        ``{"step", "loss", "eval_step", "eval"}`` lists. The model ends in eval mode.
    """
    if not examples:
        raise ValueError("no training examples")
    if lengths is not None and len(lengths) != len(examples):
        raise ValueError(f"lengths has {len(lengths)} entries for {len(examples)} examples")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout
    if cfg.dropout is not None:
        for module in model.modules():
            if isinstance(module, GPT):
                module.set_dropout(cfg.dropout)
    # chapter 05's optimizer (only the trainable parameters; no decay on vectors)
    opt = configure_optimizer(
        model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    history: History = {"step": [], "loss": [], "eval_step": [], "eval": []}
    queue: list[list[int]] = []
    start = time.perf_counter()
    model.train()
    step_seconds = 0.0
    best: tuple[float, list[Tensor]] | None = None  # with cfg.keep_best: (accuracy, weights)
    ema = [p.detach().clone() for p in trainable] if cfg.ema else None
    for step in range(cfg.max_steps):
        elapsed = time.perf_counter() - start
        # stop before a step that would end past the limit (a step takes about the last one's time)
        if cfg.time_limit is not None and elapsed + step_seconds > cfg.time_limit:
            break
        if not queue:
            queue = _epoch_batches(len(examples), cfg.batch_size, gen, lengths)
        batch = [examples[i] for i in queue.pop()]
        # the schedule follows the steps, or the clock when a time limit ends training
        # first (so the learning rate still decays to its minimum by the end)
        fraction = None if cfg.time_limit is None else elapsed / cfg.time_limit
        set_lr(opt, cfg.lr_at(step, fraction))
        loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            clip_grad_norm(trainable, cfg.grad_clip)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for average, p in zip(ema, trainable, strict=True):
                    average.lerp_(p, 1.0 - cfg.ema)
        history["step"].append(step)
        history["loss"].append(loss.item())
        step_seconds = time.perf_counter() - start - elapsed
        if evaluate is not None and cfg.eval_interval and (step + 1) % cfg.eval_interval == 0:
            with _weights_swapped_in(trainable, ema):
                best = _evaluate(model, evaluate, step + 1, history, best, cfg.keep_best)
    last_evaluated = bool(history["eval_step"]) and history["eval_step"][-1] == len(history["step"])
    if evaluate is not None and cfg.eval_interval and cfg.keep_best and not last_evaluated:
        with _weights_swapped_in(trainable, ema):
            best = _evaluate(model, evaluate, len(history["step"]), history, best, True)
    final = best[1] if best is not None else ema  # the best evaluated, or the average
    if final is not None:
        _load_weights(trainable, final)
    model.eval()
    return history


@contextlib.contextmanager
def _weights_swapped_in(params: list[Tensor], weights: list[Tensor] | None) -> Iterator[None]:
    """Inside the block ``params`` hold ``weights`` (no change when None); restored after."""
    if weights is None:
        yield
        return
    saved = [p.detach().clone() for p in params]
    _load_weights(params, weights)
    try:
        yield
    finally:
        _load_weights(params, saved)


@torch.no_grad()
def _load_weights(params: list[Tensor], weights: list[Tensor]) -> None:
    """Copy ``weights`` into ``params`` in place, one for one."""
    for p, w in zip(params, weights, strict=True):
        p.copy_(w)


def _evaluate(
    model: nn.Module,
    evaluate: Callable[[], float],
    step: int,
    history: History,
    best: tuple[float, list[Tensor]] | None,
    keep_best: bool,
) -> tuple[float, list[Tensor]] | None:
    """Evaluate and log it; with ``keep_best``, return the best (score, copy of the
    trainable weights) so far."""
    model.eval()
    score = evaluate()
    model.train()
    history["eval_step"].append(step)
    history["eval"].append(score)
    if not keep_best or (best is not None and score < best[0]):
        return best
    trainable = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    return (score, trainable)


@torch.no_grad()
def init_new_tokens(model: GPT, ids: Sequence[int], seed: int = 0) -> None:
    """Give the token ids ``ids`` fresh, distinct embeddings, in place.

    A token that never occurs in the pretraining text gets no gradient as an input,
    and as an output (with tied weights) only the push that makes it unlikely: all
    such rows end up pointing the same way, and the model cannot tell them apart
    (ten digits a model never saw have cosine similarity near 1). Fine-tuning then
    has to separate them before it can copy or compare them, which is slow. Each
    row here is redrawn like the trained rows: their per-dimension mean plus
    Gaussian noise with their per-dimension standard deviation.

    Args:
        model: a ``GPT``; its ``wte`` (and a tied ``lm_head``) change.
        ids: the new tokens' ids (at least one other row must stay to learn from).
        seed: seeds the noise.
    """
    weight = model.wte.weight
    new = sorted(set(int(i) for i in ids))
    if not new:
        return
    if new[0] < 0 or new[-1] >= weight.shape[0]:
        raise ValueError(f"token ids must be in 0..{weight.shape[0] - 1}, got {new[0]}..{new[-1]}")
    keep = torch.ones(weight.shape[0], dtype=torch.bool)
    keep[new] = False
    if not keep.any():
        raise ValueError("every row is new: there are no trained embeddings to imitate")
    trained = weight[keep]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(new), weight.shape[1], generator=g).to(weight)
    weight[new] = trained.mean(dim=0) + noise * trained.std(dim=0)


def train_classifier(
    model: Classifier,
    train: Sequence[tuple[str, int]],
    encode: Encode,
    config: FinetuneConfig | None = None,
    val: Sequence[tuple[str, int]] | None = None,
) -> History:
    """Fine-tune ``model`` on (text, label) pairs with its own ``loss``.

    That is cross-entropy of the class logits for a ``GPTClassifier``, and the
    language-model loss of each text after its label token (plus the cross-entropy
    of the class logits) for a ``GenerativeClassifier``. Only parameters with ``requires_grad`` change (see
    ``GPTClassifier.train_only`` and ``minigpt.lora.apply_lora``). Returns the history:
    ``step``, ``loss`` and, with ``val`` and ``config.eval_interval``, ``eval_step`` and
    ``eval`` (accuracy).
    """
    cfg = config or FinetuneConfig()
    max_length = cfg.max_length or model.block_size
    device = next(model.parameters()).device

    def loss_fn(batch: list[tuple[str, int]]) -> Tensor:
        idx, lengths = encode_texts([t for t, _ in batch], encode, max_length)
        labels = torch.tensor([y for _, y in batch], device=device)
        return model.loss(idx.to(device), lengths.to(device), labels)

    def evaluate() -> float:
        return evaluate_classifier(model, val, encode, max_length=max_length)[0]

    lengths = [min(len(encode(t)), max_length) for t, _ in train] if cfg.bucket_by_length else None
    return fit(model, loss_fn, train, cfg, evaluate if val else None, lengths)


def train_instructions(
    model: GPT,
    train: Sequence[InstructionExample],
    encode: Encode,
    config: FinetuneConfig | None = None,
    collator: InstructionCollator | None = None,
    intro: str = PROMPT_INTRO,
    prompt: Callable[[InstructionExample], str] | None = None,
) -> History:
    """Instruction-tune a language model on the responses of ``train``.

    The default collator pads with id 0, masks the prompts and cuts sequences
    at the model's block size; ``intro`` is the prompt's preamble (see
    ``format_prompt``). ``prompt`` writes an example's prompt instead of the
    course template (``intro`` is then unused). Returns the history (``step``, ``loss``).
    """
    cfg = config or FinetuneConfig()
    device = next(model.parameters()).device
    collate = collator or InstructionCollator(
        pad_id=0, max_length=cfg.max_length or model.config.block_size
    )
    if prompt is None:
        tokenized = [tokenize_instruction(ex, encode, intro) for ex in train]
    else:
        tokenized = [(list(encode(prompt(ex))), list(encode(ex.output))) for ex in train]

    def loss_fn(batch: list[tuple[list[int], list[int]]]) -> Tensor:
        inputs, targets = collate(batch)
        return instruction_loss(model, inputs.to(device), targets.to(device))

    lengths = [len(p) + len(r) for p, r in tokenized] if cfg.bucket_by_length else None
    return fit(model, loss_fn, tokenized, cfg, lengths=lengths)
