"""Classification with a pretrained GPT: the data, two classifiers, a baseline.

- Data: ``load_sms_spam`` and ``load_sst2`` read the course's files (``minigpt.data``)
  or the public downloads and raise ``DataFormatError`` naming the file and line of
  any malformed row. ``balanced_split`` downsamples the majority class and splits
  train/validation/test; ``encode_texts`` pads a batch of texts.
- ``GPTClassifier`` reads the GPT's final hidden state at the last real (non-padding)
  token, the only position that has seen the whole text under a causal mask, with
  a small linear head. ``GenerativeClassifier`` keeps the language model whole: a
  label token before the text, and the label under which the text is most likely
  wins. ``evaluate_classifier`` scores either (``minigpt.finetune`` trains them).
- ``BagOfWords``: logistic regression on word counts, the baseline to beat.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt import data
from minigpt.data import DataFormatError
from minigpt.model import GPT

__all__ = [
    "IGNORE_INDEX",
    "BagOfWords",
    "Classifier",
    "DataFormatError",
    "Encode",
    "GPTClassifier",
    "GenerativeClassifier",
    "balanced_split",
    "confusion_matrix",
    "encode_texts",
    "evaluate_classifier",
    "load_sms_spam",
    "load_sst2",
    "read_lines",
]

IGNORE_INDEX = -100  # targets with this value do not count in GPT's loss

Encode = Callable[[str], list[int]]


# --------------------------------------------------------------------------- loaders


def read_lines(file: Path) -> list[str]:
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
    for lineno, line in enumerate(read_lines(file), start=1):
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
    for lineno, line in enumerate(read_lines(file), start=1):
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


# --------------------------------------------------------------------------- classifiers


def _check_lengths(idx: Tensor, lengths: Tensor | None) -> Tensor:
    """``lengths`` (B,) on ``idx``'s device, checked to lie in [1, T]; None means T for every row."""
    if idx.dim() != 2:
        raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
    B, T = idx.shape
    if lengths is None:
        return torch.full((B,), T, dtype=torch.long, device=idx.device)
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")
    if lengths.device.type == "cpu" and (int(lengths.min()) < 1 or int(lengths.max()) > T):
        raise ValueError(f"lengths must be in [1, {T}], got {lengths.tolist()[:8]}")
    return lengths.to(idx.device)


def _check_labels(idx: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    if labels.shape != (idx.shape[0],):
        raise ValueError(f"labels must have shape ({idx.shape[0]},), got {tuple(labels.shape)}")
    on_cpu = labels.device.type == "cpu"  # the range check would sync a GPU
    if on_cpu and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {labels.tolist()[:8]}")
    return labels.to(idx.device)


class GPTClassifier(nn.Module):
    """A pretrained GPT read by a classifier head instead of its language-model head.

    ``GPT.hidden_states`` gives the final hidden states (B, T, C); ``head`` (a new
    ``nn.Linear(C, num_classes)``) reads the hidden state of each sequence's last
    real token. Under the causal mask that is the only position that has seen the
    whole text, and right padding after it cannot leak in. The GPT itself is left
    whole (its ``lm_head`` is simply not used), so it can still be saved, loaded
    and sampled from.

    Args:
        gpt: the pretrained model (its weights are fine-tuned in place).
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
        hidden = self.gpt.hidden_states(idx)  # (B, T, C); the GPT validates idx
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
            trainable: list[nn.Module] = [self.head]
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
    vocabulary with ``GPT.resize_vocab``). To classify, the text is read after
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
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.gpt = gpt
        self.num_classes = num_classes
        first = gpt.config.vocab_size
        gpt.resize_vocab(first + num_classes)
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
        if idx.device.type == "cpu" and int(idx.max()) >= self.label_ids[0]:  # no GPU sync
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
