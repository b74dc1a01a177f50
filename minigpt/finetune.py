"""Fine-tuning a pretrained GPT: classification, instruction following.

- Data: ``load_sms_spam``, ``load_sst2`` and ``load_instructions`` read the course's
  files (``minigpt.data``) or the public downloads, and raise ``DataFormatError``
  naming the file and line of any malformed row. ``balanced_split`` downsamples
  the majority class and splits train/validation/test.
- Classification: ``GPTClassifier`` replaces the language-model head with a small
  linear head read at the last real (non-padding) token, the only position that
  has seen the whole text under a causal mask. ``GenerativeClassifier`` keeps the
  language model whole: a label token before the text, and the label under which
  the text is most likely wins. ``train_classifier`` and ``evaluate_classifier``
  fine-tune and score either.
- Instruction tuning: ``format_prompt`` writes the Alpaca-style prompt,
  ``InstructionCollator`` pads a batch and masks the prompt and the padding out of
  the loss (target -100, which ``GPT`` ignores), ``train_instructions`` trains.
- ``resize_token_embeddings`` grows a model's vocabulary for characters its
  pretraining text never had (a Shakespeare model has never seen "£" or "7").

Low-rank adapters (LoRA) live in ``minigpt.lora``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt import data
from minigpt.linear import Linear
from minigpt.model import GPT
from minigpt.train import clip_grad_norm, configure_optimizer, lr_at

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_INTRO",
    "BagOfWords",
    "DataFormatError",
    "FinetuneConfig",
    "GPTClassifier",
    "GenerativeClassifier",
    "InstructionCollator",
    "InstructionExample",
    "balanced_split",
    "confusion_matrix",
    "encode_texts",
    "evaluate_classifier",
    "format_prompt",
    "instruction_loss",
    "load_instructions",
    "load_sms_spam",
    "load_sst2",
    "resize_token_embeddings",
    "tokenize_instruction",
    "train_classifier",
    "train_instructions",
]

IGNORE_INDEX = -100  # targets with this value do not count in GPT's loss

Encode = Callable[[str], list[int]]


class DataFormatError(ValueError):
    """A data file has a row that cannot be parsed; the message names file and line."""


# --------------------------------------------------------------------------- loaders


def _read_lines(file: Path) -> list[str]:
    """Lines of a text file split on "\\n" only.

    Not ``str.splitlines``: the course's SST-2 copy has a stray "\\r" at the end of
    every sentence (before the tab), which splitlines would treat as a line break.
    A UTF-8 byte-order mark is dropped; "\\r" is stripped per field by the callers.
    """
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{file} is not UTF-8 text: {e}") from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    return lines


def _bad_row(file: Path, lineno: int, line: str, expected: str) -> DataFormatError:
    shown = line if len(line) <= 80 else line[:77] + "..."
    return DataFormatError(f"{file}, line {lineno}: expected {expected}, got {shown!r}")


def load_sms_spam(path: str | os.PathLike[str] | None = None) -> list[tuple[str, int]]:
    """The UCI SMS Spam Collection as ``(text, label)`` pairs, label 1 = spam, 0 = ham.

    Reads lines ``label<TAB>text`` (the UCI download and the course copy; CRLF line
    endings and surrounding spaces are tolerated). ``path`` defaults to
    ``minigpt.data.path("sms-spam")``. Blank lines are skipped.

    Raises:
        DataFormatError: a line without a tab, with a label other than ham/spam, or
            with an empty text; the message names the file and line number.
    """
    file = Path(path) if path is not None else data.path("sms-spam")
    out = []
    for lineno, line in enumerate(_read_lines(file), start=1):
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        label, text = label.strip().lower(), text.strip()
        if not tab or label not in ("ham", "spam") or not text:
            raise _bad_row(file, lineno, line, "'ham<TAB>text' or 'spam<TAB>text'")
        out.append((text, int(label == "spam")))
    if not out:
        raise DataFormatError(f"{file} has no messages")
    return out


def load_sst2(
    split: str = "train", path: str | os.PathLike[str] | None = None
) -> list[tuple[str, int]]:
    """GLUE's SST-2 as ``(sentence, label)`` pairs, label 1 = positive, 0 = negative.

    Reads GLUE's TSV: a header ``sentence<TAB>label`` then one row per sentence.
    Sentences are stripped (GLUE's download ends each one with a space, the
    course copy may not; it may have CRLF line endings). ``path`` defaults to
    ``minigpt.data.path("sst2-train")`` or ``"sst2-dev"`` by ``split``.

    Raises:
        DataFormatError: a row that is not ``sentence<TAB>0|1`` (for example GLUE's
            unlabelled test.tsv), naming the file and line number.
    """
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev', got {split!r}")
    file = Path(path) if path is not None else data.path(f"sst2-{split}")
    out = []
    for lineno, line in enumerate(_read_lines(file), start=1):
        if not line.strip():
            continue
        sentence, tab, label = line.rpartition("\t")
        sentence, label = sentence.strip(), label.strip()
        if lineno == 1 and (sentence, label) == ("sentence", "label"):
            continue  # the header
        if not tab or label not in ("0", "1") or not sentence:
            raise _bad_row(file, lineno, line, "'sentence<TAB>label' with label 0 or 1")
        out.append((sentence, int(label)))
    if not out:
        raise DataFormatError(f"{file} has no sentences")
    return out


@dataclass(frozen=True)
class InstructionExample:
    """One instruction-following example; ``input`` may be empty."""

    instruction: str
    input: str
    output: str


def _json_records(file: Path, text: str) -> Iterable[tuple[int, object]]:
    """(line number, value) for each element of a JSON list, or each line of JSON Lines."""
    decoder = json.JSONDecoder()

    def lineno(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip_ws(0)
    if not text.startswith("[", pos):  # JSON Lines: one object per line
        for i, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{file}, line {i}: not valid JSON: {e.msg}") from e
        return
    pos = skip_ws(pos + 1)
    if text.startswith("]", pos):
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{file}, line {e.lineno}: not valid JSON: {e.msg}") from e
        yield lineno(pos), value
        pos = skip_ws(end)
        if text.startswith(",", pos):
            pos = skip_ws(pos + 1)
        elif text.startswith("]", pos):
            if skip_ws(pos + 1) != len(text):
                raise DataFormatError(f"{file}, line {lineno(pos)}: text after the closing ']'")
            return
        else:
            raise DataFormatError(f"{file}, line {lineno(pos)}: expected ',' or ']' in the list")


def load_instructions(path: str | os.PathLike[str] | None = None) -> list[InstructionExample]:
    """Instruction data as ``InstructionExample`` records.

    Reads a JSON list of objects with string fields ``instruction``, ``output`` and
    optionally ``input`` (the course copy and the public download; extra fields,
    such as the preference data's ``chosen``/``rejected``, are ignored). JSON Lines
    (one object per line) works too. ``path`` defaults to
    ``minigpt.data.path("instruction-data")``.

    Raises:
        DataFormatError: invalid JSON or a record without the needed string
            fields, naming the file and the line where the record starts.
    """
    file = Path(path) if path is not None else data.path("instruction-data")
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{file} is not UTF-8 text: {e}") from e
    out = []
    for lineno, rec in _json_records(file, text):
        if not isinstance(rec, dict):
            raise DataFormatError(
                f"{file}, line {lineno}: expected an object with 'instruction' and "
                f"'output', got {type(rec).__name__}"
            )
        fields = {}
        for key in ("instruction", "input", "output"):
            value = rec.get(key, "" if key == "input" else None)
            if not isinstance(value, str):
                problem = "is missing" if value is None else f"is a {type(value).__name__}"
                raise DataFormatError(
                    f"{file}, line {lineno}: field {key!r} {problem}; expected a string"
                )
            fields[key] = value
        if not fields["instruction"].strip():
            raise DataFormatError(f"{file}, line {lineno}: 'instruction' is empty")
        out.append(InstructionExample(**fields))
    if not out:
        raise DataFormatError(f"{file} has no examples")
    return out


def balanced_split(
    examples: Sequence[tuple[str, int]],
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
) -> list[list[tuple[str, int]]]:
    """Downsample every class to the size of the smallest, shuffle, and split.

    With SMS spam (4,827 ham, 747 spam) this keeps all 747 spam and 747 random
    ham, so accuracy is not inflated by always answering "ham" (87% of the raw
    data). Returns one list per fraction (default train/validation/test); the
    fractions must sum to at most 1.
    """
    if not fractions or any(f <= 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"fractions must be positive and sum to at most 1, got {fractions}")
    rng = random.Random(seed)
    by_label: dict[int, list[tuple[str, int]]] = {}
    for ex in examples:
        by_label.setdefault(ex[1], []).append(ex)
    if len(by_label) < 2:
        raise ValueError(f"need at least two classes to balance, got labels {sorted(by_label)}")
    n = min(len(v) for v in by_label.values())
    kept = []
    for label in sorted(by_label):
        kept += rng.sample(by_label[label], n)
    rng.shuffle(kept)
    splits, start = [], 0
    for f in fractions:
        end = start + round(f * len(kept))
        splits.append(kept[start:end])
        start = end
    return splits


# --------------------------------------------------------------------------- tokens


def encode_texts(
    texts: Sequence[str], encode: Encode, max_length: int, pad_id: int = 0
) -> tuple[Tensor, Tensor]:
    """Encode, truncate to ``max_length`` tokens and right-pad a batch of texts.

    Returns ``idx`` (B, T) with T the longest (truncated) length and ``lengths``
    (B,) the number of real tokens in each row. An empty encoding is an error:
    there would be no token to read a prediction from.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    rows = []
    for text in texts:
        ids = list(encode(text))[:max_length]
        if not ids:
            raise ValueError(f"text {text!r} encodes to no tokens")
        rows.append(ids)
    if not rows:
        raise ValueError("no texts to encode")
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return idx, lengths


@torch.no_grad()
def resize_token_embeddings(model: GPT, vocab_size: int) -> GPT:
    """Grow ``model``'s vocabulary to ``vocab_size`` ids, in place.

    New embedding rows start at the mean of the existing ones (a neutral token,
    not a random direction the network never saw). A tied output head follows
    the embedding; an untied one gets new rows the same way. Shrinking is refused.
    """
    old = model.config.vocab_size
    if vocab_size < old:
        raise ValueError(f"can only grow the vocabulary: {vocab_size} < {old}")
    if vocab_size == old:
        return model

    def grow(weight: Tensor) -> Tensor:
        extra = weight.mean(dim=0, keepdim=True).expand(vocab_size - old, -1)
        return torch.cat([weight, extra])  # (vocab_size, C)

    wte = nn.Embedding(vocab_size, model.config.n_embd, device=model.wte.weight.device)
    wte.weight.copy_(grow(model.wte.weight))
    wte.weight.requires_grad_(model.wte.weight.requires_grad)
    tied = model.lm_head.weight is model.wte.weight
    model.wte = wte
    if isinstance(model.lm_head, nn.Linear):
        head = Linear(model.config.n_embd, vocab_size, bias=False, device=wte.weight.device)
        if tied:
            head.weight = wte.weight
        else:
            head.weight.copy_(grow(model.lm_head.weight))
        model.lm_head = head
    model.config.vocab_size = vocab_size
    return model


# --------------------------------------------------------------------------- classification


def _check_lengths(idx: Tensor, lengths: Tensor | None) -> Tensor:
    """``lengths`` (B,) on ``idx``'s device, checked to lie in [1, T]; None means T for every row."""
    if idx.dim() != 2:
        raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
    B, T = idx.shape
    if lengths is None:
        return torch.full((B,), T, dtype=torch.long, device=idx.device)
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")
    if int(lengths.min()) < 1 or int(lengths.max()) > T:
        raise ValueError(f"lengths must be in [1, {T}], got {lengths.tolist()[:8]}")
    return lengths.to(idx.device)


def _check_labels(idx: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    if labels.shape != (idx.shape[0],):
        raise ValueError(f"labels must have shape ({idx.shape[0]},), got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {labels.tolist()[:8]}")
    return labels.to(idx.device)


class GPTClassifier(nn.Module):
    """A pretrained GPT with its language-model head replaced by a classifier.

    The GPT's ``lm_head`` becomes the identity, so the GPT returns its final
    hidden states (B, T, C); ``head`` (a new ``nn.Linear(C, num_classes)``) reads
    the hidden state of each sequence's last real token. Under the causal mask
    that is the only position that has seen the whole text, and right padding
    after it cannot leak in.

    Args:
        gpt: the pretrained model (changed in place: its head is removed).
        num_classes: number of labels K.
    """

    def __init__(self, gpt: GPT, num_classes: int) -> None:
        super().__init__()
        if not isinstance(gpt, GPT):
            raise TypeError(f"GPTClassifier wraps a minigpt GPT, got {type(gpt).__name__}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.gpt = gpt
        self.num_classes = num_classes
        gpt.lm_head = nn.Identity()  # the GPT now returns hidden states
        device = gpt.wte.weight.device
        self.head = nn.Linear(gpt.config.n_embd, num_classes, device=device)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def block_size(self) -> int:
        return self.gpt.config.block_size

    def forward(self, idx: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Class logits.

        Args:
            idx: (B, T) token ids, right-padded.
            lengths: (B,) number of real tokens per row (1..T); None means no padding.
        Returns:
            (B, num_classes) logits.
        """
        hidden, _ = self.gpt(idx)  # (B, T, C); the GPT validates idx
        lengths = _check_lengths(idx, lengths)
        rows = torch.arange(idx.shape[0], device=idx.device)
        return self.head(hidden[rows, lengths - 1])  # the last real token's state (B, C) -> (B, K)

    def loss(self, idx: Tensor, lengths: Tensor | None, labels: Tensor) -> Tensor:
        """Mean cross-entropy of the class logits against ``labels`` (B,)."""
        return F.cross_entropy(self(idx, lengths), _check_labels(idx, labels, self.num_classes))

    def train_only(self, blocks: int | str = 1) -> tuple[int, int]:
        """Choose what fine-tuning updates; returns ``(trainable, total)`` parameters.

        ``blocks=0``: the head only (a linear probe on frozen features);
        ``blocks=n``: the head, the final norm and the last ``n`` transformer blocks;
        ``blocks="all"``: every parameter.
        """
        n_layer = self.gpt.config.n_layer
        if blocks == "all":
            for p in self.parameters():
                p.requires_grad_(True)
        elif isinstance(blocks, int) and not isinstance(blocks, bool) and 0 <= blocks <= n_layer:
            for p in self.parameters():
                p.requires_grad_(False)
            trainable = [self.head]
            if blocks > 0:
                trainable += [self.gpt.ln_f, *self.gpt.h[n_layer - blocks :]]
            for module in trainable:
                for p in module.parameters():
                    p.requires_grad_(True)
        else:
            raise ValueError(
                f"blocks must be 'all' or an integer in [0, {n_layer}], got {blocks!r}"
            )
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())


class GenerativeClassifier(nn.Module):
    """Classification by the language model itself: which label makes the text most likely?

    Every class k gets a new *label token* (ids ``V .. V + K - 1``, appended to the GPT's
    vocabulary with ``resize_token_embeddings``). To classify, the text is read after
    every label token in turn; the class logits are the log-likelihoods
    log p(text | label k), summed over the text's real tokens, so that with equal class
    priors (a balanced training set) their softmax is Bayes' rule, p(label k | text).

    Fine-tuning (``loss``) is language modelling on ``<label> text``, the next-token
    loss of the text's tokens after its true label token, which teaches how each class
    is written, plus ``discriminative`` times the cross-entropy of the class logits,
    which teaches which label wins. ``GPTClassifier`` learns from one label per text
    through a new head; this learns from every token of every text through the
    pretrained output head, which helps when labelled texts are few. Classifying costs
    K forward passes instead of one (training too, with the cross-entropy term).

    Args:
        gpt: the pretrained model (changed in place: K label tokens join its vocabulary).
        num_classes: number of labels K.
        discriminative: weight of the cross-entropy term (0 = language modelling alone,
            one forward pass per step). On SMS spam 1.0 scored about 2 points better
            than 0 (``benchmarks/finetune.py``).
    """

    def __init__(self, gpt: GPT, num_classes: int, discriminative: float = 1.0) -> None:
        super().__init__()
        if not isinstance(gpt, GPT):
            raise TypeError(f"GenerativeClassifier wraps a minigpt GPT, got {type(gpt).__name__}")
        if not discriminative >= 0:
            raise ValueError(f"discriminative must be >= 0, got {discriminative}")
        self.discriminative = float(discriminative)
        if not isinstance(gpt.lm_head, nn.Linear):
            raise ValueError("the GPT has no language-model head (is it inside a GPTClassifier?)")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.gpt = gpt
        self.num_classes = num_classes
        first = gpt.config.vocab_size
        resize_token_embeddings(gpt, first + num_classes)
        self.label_ids = list(range(first, first + num_classes))  # the label tokens

    @property
    def block_size(self) -> int:
        """The longest text: the label token plus all but the last text token are read."""
        return self.gpt.config.block_size

    def _sequences(self, idx: Tensor, lengths: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs ``<label> x_1 .. x_{T-1}`` and targets ``x_1 .. x_T`` (padding -> -100), (B, T)."""
        first = torch.tensor(self.label_ids, device=idx.device)[labels]  # (B,)
        inputs = torch.cat([first[:, None], idx[:, :-1]], dim=1)  # (B, T)
        pad = torch.arange(idx.shape[1], device=idx.device)[None, :] >= lengths[:, None]
        return inputs, idx.masked_fill(pad, IGNORE_INDEX)

    def _token_log_probs(self, idx: Tensor, lengths: Tensor) -> Tensor:
        """(K, B, T): log p(x_t | label k, x_<t) for every label k, 0 at padding."""
        if int(idx.max()) >= self.label_ids[0]:
            raise ValueError("idx holds a label token: texts must use the original vocabulary")
        B, K = idx.shape[0], self.num_classes
        # all K readings in one batch: row k * B + b is text b after label k
        labels = torch.arange(K, device=idx.device).repeat_interleave(B)  # (K * B,)
        inputs, targets = self._sequences(idx.repeat(K, 1), lengths.repeat(K), labels)
        logits, _ = self.gpt(inputs)  # (K * B, T, V)
        logp = -F.cross_entropy(
            logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )  # (K * B, T), 0 at padding
        return logp.view(K, B, -1)

    def forward(self, idx: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Class logits: log p(text | label k) for every k.

        Args:
            idx: (B, T) token ids of the texts, right-padded; ids below the label tokens.
            lengths: (B,) number of real tokens per row (1..T); None means no padding.
        Returns:
            (B, num_classes) log-likelihoods (nats, summed over each text's tokens).
        """
        lengths = _check_lengths(idx, lengths)
        return self._token_log_probs(idx, lengths).sum(dim=2).T  # (B, K)

    def loss(self, idx: Tensor, lengths: Tensor | None, labels: Tensor) -> Tensor:
        """The training loss for (B, T) texts and their (B,) labels, a scalar.

        The mean next-token loss of the texts' tokens after their true label tokens,
        plus ``discriminative`` times the cross-entropy of the class logits
        (``forward``) against ``labels``. The second term reads every text after every
        label: K times the work of the language-model loss alone.
        """
        lengths = _check_lengths(idx, lengths)
        labels = _check_labels(idx, labels, self.num_classes)
        if not self.discriminative:
            inputs, targets = self._sequences(idx, lengths, labels)
            _, loss = self.gpt(inputs, targets)
            return loss
        logp = self._token_log_probs(idx, lengths)  # (K, B, T)
        rows = torch.arange(idx.shape[0], device=idx.device)
        lm = -logp[labels, rows].sum() / lengths.sum()  # the true labels' readings
        return lm + self.discriminative * F.cross_entropy(logp.sum(dim=2).T, labels)


Classifier = GPTClassifier | GenerativeClassifier


# --------------------------------------------------------------------------- instructions

PROMPT_INTRO = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def format_prompt(example: InstructionExample, intro: str = PROMPT_INTRO) -> str:
    """The Alpaca-style prompt for ``example``, ending where the response begins.

    The "### Input:" section is left out when the example has no input. ``intro``
    is the preamble; ``intro=""`` drops it (105 characters matter to a model
    with a short context; the ### headings still carry the structure).
    """
    prompt = f"{intro}\n\n" if intro else ""
    prompt += f"### Instruction:\n{example.instruction}"
    if example.input:
        prompt += f"\n\n### Input:\n{example.input}"
    return prompt + "\n\n### Response:\n"


def tokenize_instruction(
    example: InstructionExample, encode: Encode, intro: str = PROMPT_INTRO
) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)`` for one example (see ``format_prompt`` for ``intro``)."""
    return list(encode(format_prompt(example, intro))), list(encode(example.output))


class InstructionCollator:
    """Turn (prompt_ids, response_ids) pairs into a padded training batch.

    Each example becomes ``prompt + response (+ eos)``; inputs are all but the
    last token and targets all but the first (the next token at each position).
    Targets that predict a prompt token (when ``mask_prompt``) and every padding
    position are set to ``ignore_index`` (-100), so the loss only scores the
    response: the model learns to answer, not to reproduce the template.

    Args:
        pad_id: token id used to pad inputs (any id: its targets are masked).
        eos_id: appended to every response when given, so the model learns to stop.
        max_length: longest input kept (sequences are cut at the end), usually the
            model's block_size.
        mask_prompt: mask the prompt's targets (True) or train on them too.
        ignore_index: the target value the loss ignores.

    Calling it on a list of pairs returns ``(inputs, targets)``, both (B, T) long.
    """

    def __init__(
        self,
        pad_id: int,
        eos_id: int | None = None,
        max_length: int | None = None,
        mask_prompt: bool = True,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.max_length = max_length
        self.mask_prompt = mask_prompt
        self.ignore_index = ignore_index

    def __call__(
        self, batch: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> tuple[Tensor, Tensor]:
        if not batch:
            raise ValueError("cannot collate an empty batch")
        rows = []
        for prompt, response in batch:
            seq = [*prompt, *response] + ([] if self.eos_id is None else [self.eos_id])
            if len(seq) < 2:
                raise ValueError("each example needs at least two tokens (prompt + response)")
            if self.max_length is not None:
                seq = seq[: self.max_length + 1]
            inputs, targets = seq[:-1], seq[1:]
            if self.mask_prompt:
                # target j is token j+1: it belongs to the prompt while j+1 < len(prompt)
                n = min(max(len(prompt) - 1, 0), len(targets))
                targets[:n] = [self.ignore_index] * n
            rows.append((inputs, targets))
        T = max(len(i) for i, _ in rows)
        inputs = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), T), self.ignore_index, dtype=torch.long)
        for b, (i, t) in enumerate(rows):
            inputs[b, : len(i)] = torch.tensor(i, dtype=torch.long)
            targets[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        return inputs, targets


def instruction_loss(model: GPT, inputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over the unmasked targets of a collated batch.

    A batch whose targets are all masked (every response cut off by max_length)
    has nothing to learn from; its loss is 0, not NaN.
    """
    if bool((targets == IGNORE_INDEX).all()):
        return torch.zeros((), device=inputs.device, requires_grad=True)
    _, loss = model(inputs, targets)
    return loss


# --------------------------------------------------------------------------- training


@dataclass
class FinetuneConfig:
    """Settings of ``train_classifier`` / ``train_instructions``.

    Attributes:
        steps: optimizer steps (the loop also stops at ``time_limit``).
        batch_size: examples per step.
        lr: peak AdamW learning rate (linear warmup, then cosine decay to lr / 10 at
            ``steps``, as in ``minigpt.train``).
        warmup_steps: steps of linear warmup.
        weight_decay: AdamW weight decay on matrices (never on biases and norms).
        grad_clip: clip the gradient norm to this (0 = off).
        max_length: longest sequence in tokens (None = the model's block_size).
        time_limit: stop after this many seconds of training (None = no limit); the
            learning-rate schedule then follows whichever of steps and time runs out first.
        eval_every: evaluate on the validation data every this many steps (0 = never).
        keep_best: with validation data and ``eval_every`` (``train_classifier``),
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
        seed: seeds the batch order and dropout.
    """

    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_length: int | None = None
    time_limit: float | None = None
    eval_every: int = 0
    keep_best: bool = False
    bucket_by_length: bool = True
    dropout: float | None = None
    ema: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be at least 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1) or None, got {self.dropout}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ValueError(f"ema must be a decay in (0, 1) or None, got {self.ema}")


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


def _fit(
    model: nn.Module,
    loss_fn: Callable[[list], Tensor],
    examples: Sequence,
    cfg: FinetuneConfig,
    evaluate: Callable[[], float] | None = None,
    lengths: Sequence[int] | None = None,
) -> dict[str, list[float]]:
    """The shared loop: shuffled minibatches (of similar lengths when ``lengths`` are
    given), then chapter 05's pieces (``minigpt.train``): AdamW with decay on matrices
    only, linear warmup + cosine decay to lr/10, clipping."""
    if not examples:
        raise ValueError("no training examples")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters: unfreeze something first")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout
    if cfg.dropout is not None:
        for module in model.modules():
            if isinstance(module, GPT):
                module.set_dropout(cfg.dropout)
    # chapter 05's optimizer (only the trainable parameters; no decay on vectors)
    opt = configure_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    history: dict[str, list[float]] = {"step": [], "loss": [], "eval_step": [], "eval": []}
    queue: list[list[int]] = []
    start = time.perf_counter()
    model.train()
    step_seconds = 0.0
    best: tuple[float, list[Tensor]] | None = None  # with cfg.keep_best: (accuracy, weights)
    ema = [p.detach().clone() for p in trainable] if cfg.ema else None
    for step in range(cfg.steps):
        elapsed = time.perf_counter() - start
        # stop before a step that would end past the limit (a step takes about the last one's time)
        if cfg.time_limit is not None and elapsed + step_seconds > cfg.time_limit:
            break
        if not queue:
            queue = _epoch_batches(len(examples), cfg.batch_size, gen, lengths)
        batch = [examples[i] for i in queue.pop()]
        # progress through the schedule: by steps, or by time when a time limit ends training
        # first (so the learning rate still decays to its minimum by the end)
        virtual = step
        if cfg.time_limit is not None and step >= cfg.warmup_steps:
            virtual = max(step, round(cfg.steps * elapsed / cfg.time_limit))
        lr = lr_at(
            virtual,
            lr=cfg.lr,
            min_lr=cfg.lr / 10,
            warmup_steps=cfg.warmup_steps,
            decay_steps=cfg.steps,
        )
        for group in opt.param_groups:
            group["lr"] = lr
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
        if evaluate is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            with _weights_swapped_in(trainable, ema):
                best = _evaluate(model, evaluate, step + 1, history, best, cfg.keep_best)
    last_evaluated = bool(history["eval_step"]) and history["eval_step"][-1] == len(history["step"])
    if evaluate is not None and cfg.eval_every and cfg.keep_best and not last_evaluated:
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
    history: dict[str, list[float]],
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


def train_classifier(
    model: Classifier,
    train: Sequence[tuple[str, int]],
    encode: Encode,
    config: FinetuneConfig | None = None,
    val: Sequence[tuple[str, int]] | None = None,
) -> dict[str, list[float]]:
    """Fine-tune ``model`` on (text, label) pairs with its own ``loss``.

    That is cross-entropy of the class logits for a ``GPTClassifier``, and the
    language-model loss of each text after its label token (plus the cross-entropy
    of the class logits) for a ``GenerativeClassifier``. Only parameters with ``requires_grad`` change (see
    ``GPTClassifier.train_only`` and ``minigpt.lora.apply_lora``). Returns the history:
    ``step``, ``loss`` and, with ``val`` and ``config.eval_every``, ``eval_step`` and
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
    return _fit(model, loss_fn, train, cfg, evaluate if val else None, lengths)


@torch.no_grad()
def evaluate_classifier(
    model: Classifier,
    examples: Sequence[tuple[str, int]],
    encode: Encode,
    batch_size: int = 64,
    max_length: int | None = None,
) -> tuple[float, Tensor]:
    """Accuracy and the (N,) predicted labels on (text, label) pairs.

    Texts are batched by length (less padding to compute), results are returned
    in the input order.
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    max_length = max_length or model.block_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    encoded = [list(encode(t))[:max_length] for t, _ in examples]
    order = sorted(range(len(examples)), key=lambda i: len(encoded[i]))
    preds = torch.empty(len(examples), dtype=torch.long)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        idx, lengths = encode_texts([examples[i][0] for i in chunk], encode, max_length)
        logits = model(idx.to(device), lengths.to(device))
        preds[chunk] = logits.argmax(dim=-1).cpu()
    model.train(was_training)
    labels = torch.tensor([y for _, y in examples])
    return (preds == labels).float().mean().item(), preds


def confusion_matrix(preds: Tensor, labels: Tensor, num_classes: int = 2) -> Tensor:
    """(K, K) counts: row = true label, column = predicted label."""
    preds, labels = torch.as_tensor(preds).long(), torch.as_tensor(labels).long()
    if preds.shape != labels.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} differ")
    flat = labels * num_classes + preds
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def train_instructions(
    model: GPT,
    train: Sequence[InstructionExample],
    encode: Encode,
    config: FinetuneConfig | None = None,
    collator: InstructionCollator | None = None,
    intro: str = PROMPT_INTRO,
) -> dict[str, list[float]]:
    """Instruction-tune a language model on the responses of ``train``.

    The default collator pads with id 0, masks the prompts and cuts sequences
    at the model's block size; ``intro`` is the prompt's preamble (see
    ``format_prompt``). Returns the history (``step``, ``loss``).
    """
    cfg = config or FinetuneConfig()
    device = next(model.parameters()).device
    collate = collator or InstructionCollator(
        pad_id=0, max_length=cfg.max_length or model.config.block_size
    )
    tokenized = [tokenize_instruction(ex, encode, intro) for ex in train]

    def loss_fn(batch: list[tuple[list[int], list[int]]]) -> Tensor:
        inputs, targets = collate(batch)
        return instruction_loss(model, inputs.to(device), targets.to(device))

    lengths = [len(p) + len(r) for p, r in tokenized] if cfg.bucket_by_length else None
    return _fit(model, loss_fn, tokenized, cfg, lengths=lengths)


# --------------------------------------------------------------------------- a baseline


class BagOfWords(nn.Module):
    """Logistic regression on word and word-pair counts: the baseline to beat.

    ``BagOfWords.fit(train)`` builds the vocabulary (lower-cased words and adjacent
    word pairs seen at least ``min_count`` times) and trains the weights with
    AdamW; ``predict(texts)`` returns labels. One weight per n-gram and class,
    summed by an ``nn.EmbeddingBag``, so it trains on all of SST-2 in seconds.
    """

    def __init__(self, vocab: dict[str, int], num_classes: int = 2) -> None:
        super().__init__()
        self.vocab = vocab
        self.weights = nn.EmbeddingBag(len(vocab) + 1, num_classes, mode="sum")  # +1: unknown
        nn.init.zeros_(self.weights.weight)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    @staticmethod
    def ngrams(text: str) -> list[str]:
        words = text.lower().split()
        return words + [f"{a} {b}" for a, b in itertools.pairwise(words)]

    def _ids(self, text: str) -> list[int]:
        unk = len(self.vocab)
        return [self.vocab.get(g, unk) for g in self.ngrams(text)] or [unk]

    def _logits(self, bags: Sequence[list[int]]) -> Tensor:
        offsets = torch.tensor([0, *(len(b) for b in bags[:-1])]).cumsum(0)
        ids = torch.tensor([i for b in bags for i in b], dtype=torch.long)
        return self.weights(ids, offsets) + self.bias  # (B, num_classes)

    def forward(self, texts: Sequence[str]) -> Tensor:
        """(B,) texts -> (B, num_classes) logits."""
        return self._logits([self._ids(t) for t in texts])

    @torch.no_grad()
    def predict(self, texts: Sequence[str]) -> Tensor:
        return self(texts).argmax(dim=-1)

    @classmethod
    def fit(
        cls,
        train: Sequence[tuple[str, int]],
        *,
        epochs: int = 3,
        batch_size: int = 256,
        lr: float = 0.02,
        weight_decay: float = 0.0,
        min_count: int = 2,
        seed: int = 0,
    ) -> BagOfWords:
        counts: dict[str, int] = {}
        for text, _ in train:
            for g in cls.ngrams(text):
                counts[g] = counts.get(g, 0) + 1
        vocab = {g: i for i, g in enumerate(sorted(g for g, c in counts.items() if c >= min_count))}
        model = cls(vocab, num_classes=max(y for _, y in train) + 1)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        labels = torch.tensor([y for _, y in train])
        bags = [model._ids(text) for text, _ in train]  # n-gram ids, computed once
        for _ in range(epochs):
            for batch in torch.randperm(len(train), generator=gen).split(batch_size):
                logits = model._logits([bags[i] for i in batch.tolist()])
                loss = F.cross_entropy(logits, labels[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return model.eval()
