"""Fine-tuning: loaders for both file formats, the classifier, loss masking, training."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F

from minigpt import GPT, GPTConfig
from minigpt.classify import (
    IGNORE_INDEX,
    BagOfWords,
    DataFormatError,
    GenerativeClassifier,
    GPTClassifier,
    balanced_split,
    confusion_matrix,
    encode_texts,
    evaluate_classifier,
    load_sms_spam,
    load_sst2,
)
from minigpt.finetune import FinetuneConfig, train_classifier, train_instructions
from minigpt.instruct import (
    InstructionCollator,
    InstructionExample,
    format_prompt,
    instruction_loss,
    load_instructions,
    read_json_records,
    tokenize_instruction,
)

VOCAB = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?:#'\"\n-£"))
STOI = {c: i for i, c in enumerate(VOCAB)}


def encode(text: str) -> list[int]:
    return [STOI[c] for c in text]


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(VOCAB), block_size=48)
    return GPT(GPTConfig.preset("tiny", **{**cfg, **overrides}))


# --------------------------------------------------------------------------- loaders


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return p


def test_sms_spam_reads_uci_lines_with_either_line_ending(tmp_path):
    lf = write(
        tmp_path, "a", "ham\tOk lar... Joking wif u oni...\nspam\tFREE entry! Text 87121 £\n"
    )
    crlf = write(
        tmp_path,
        "b",
        "ham\tOk lar... Joking wif u oni...\r\nspam\tFREE entry! Text 87121 £\r\n\r\n",
    )
    expected = [("Ok lar... Joking wif u oni...", 0), ("FREE entry! Text 87121 £", 1)]
    assert load_sms_spam(lf) == expected
    assert load_sms_spam(crlf) == expected


@pytest.mark.parametrize("bad", ["hamOk no tab", "maybe\tunknown label", "spam\t   "])
def test_sms_spam_malformed_row_names_file_and_line(tmp_path, bad):
    p = write(tmp_path, "sms.txt", f"ham\tfine\nspam\talso fine\n{bad}\n")
    with pytest.raises(DataFormatError, match=r"sms\.txt, line 3"):
        load_sms_spam(p)


def test_sst2_reads_glue_and_the_course_copy(tmp_path):
    # GLUE's download: LF, a trailing space after each sentence
    glue = write(
        tmp_path, "glue.tsv", "sentence\tlabel\nit 's a charming journey . \t1\ndull , dull . \t0\n"
    )
    # the course copy: CRLF (or a stray CR before the tab), no trailing space
    shared = write(
        tmp_path,
        "shared.tsv",
        "sentence\tlabel\r\nit 's a charming journey .\r\t1\r\ndull , dull .\t0\r\n",
    )
    expected = [("it 's a charming journey .", 1), ("dull , dull .", 0)]
    assert load_sst2(path=glue) == expected
    assert load_sst2(path=shared) == expected


@pytest.mark.parametrize("bad", ["no label here", "a sentence\t2", "\t1"])
def test_sst2_malformed_row_names_file_and_line(tmp_path, bad):
    p = write(tmp_path, "dev.tsv", f"sentence\tlabel\ngood .\t1\n{bad}\n")
    with pytest.raises(DataFormatError, match=r"dev\.tsv, line 3"):
        load_sst2(path=p)


def test_sst2_rejects_the_unlabelled_test_split(tmp_path):
    p = write(tmp_path, "test.tsv", "index\tsentence\n0\tuneasy mishmash of styles and genres .\n")
    with pytest.raises(DataFormatError, match="line 1"):
        load_sst2(path=p)
    with pytest.raises(ValueError, match="split"):
        load_sst2("test")


def test_instructions_read_a_json_list_and_json_lines(tmp_path):
    records = [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Reverse", "input": "abc", "output": "cba", "chosen": "x", "rejected": "y"},
        {"instruction": "Say hi.", "output": "hi"},
    ]
    expected = [
        InstructionExample("Add 2 and 3.", "", "5"),
        InstructionExample("Reverse", "abc", "cba"),
        InstructionExample("Say hi.", "", "hi"),
    ]
    listed = write(tmp_path, "data.json", json.dumps(records, indent=4))
    lines = write(tmp_path, "data.jsonl", "\n".join(json.dumps(r) for r in records) + "\n")
    assert load_instructions(listed) == expected
    assert load_instructions(lines) == expected


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ('{"input": "", "output": "x"}', "'instruction' is missing"),
        ('{"instruction": "a", "input": "", "output": 3}', "'output' is a int"),
        ('["not", "an object"]', "expected an object"),
        ('{"instruction": "a", "output": "b",}', "not valid JSON"),
    ],
)
def test_instructions_malformed_record_names_file_and_line(tmp_path, record, match):
    good = '{"instruction": "a", "input": "", "output": "b"}'
    p = write(tmp_path, "inst.json", f"[\n  {good},\n  {good},\n  {record}\n]\n")
    with pytest.raises(DataFormatError, match=rf"inst\.json, line 4: .*{match}"):
        load_instructions(p)


def test_json_records_give_each_value_and_the_line_it_starts_on(tmp_path):
    listed = write(tmp_path, "a.json", '\ufeff[\n  {"x": 1},\n\n  [2,\n 3], "s"\n]\n')
    lines = write(tmp_path, "b.jsonl", '{"x": 1}\n\n[2, 3]\n"s"\n')
    assert list(read_json_records(listed)) == [(2, {"x": 1}), (4, [2, 3]), (5, "s")]
    assert list(read_json_records(lines)) == [(1, {"x": 1}), (3, [2, 3]), (4, "s")]
    assert list(read_json_records(write(tmp_path, "c.json", " [ ] "))) == []
    with pytest.raises(DataFormatError, match=r"d\.jsonl, line 2: not valid JSON"):
        list(read_json_records(write(tmp_path, "d.jsonl", '{"x": 1}\n{"x": }\n')))
    with pytest.raises(DataFormatError, match=r"e\.json is not UTF-8"):
        list(read_json_records(write(tmp_path, "e.json", b"[\xff]")))


def test_course_files_load(data_dir):
    spam = load_sms_spam()
    assert len(spam) == 5574 and sum(y for _, y in spam) == 747
    assert len(load_sst2("train")) == 67349 and len(load_sst2("dev")) == 872
    assert all("\r" not in s and s == s.strip() for s, _ in load_sst2("train")[:2000])
    assert len(load_instructions()) == 1100


def test_balanced_split_balances_and_partitions():
    examples = [(f"h{i}", 0) for i in range(90)] + [(f"s{i}", 1) for i in range(10)]
    train, val, test = balanced_split(examples, (0.7, 0.1, 0.2), seed=3)
    assert (len(train), len(val), len(test)) == (14, 2, 4)
    everything = train + val + test
    assert len(set(everything)) == 20 and sum(y for _, y in everything) == 10
    assert balanced_split(examples, seed=3) == [train, val, test]  # deterministic
    with pytest.raises(ValueError, match="fractions"):
        balanced_split(examples, (0.8, 0.8))


# --------------------------------------------------------------------------- classification


def test_encode_texts_truncates_and_pads():
    idx, lengths = encode_texts(["abc", "a", "abcdefgh"], encode, max_length=5, pad_id=0)
    assert idx.shape == (3, 5) and lengths.tolist() == [3, 1, 5]
    assert idx[1, 1:].tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="no tokens"):
        encode_texts([""], encode, max_length=5)


def test_classifier_head_shapes_and_reads_the_last_real_token():
    clf = GPTClassifier(tiny_gpt(), num_classes=3).eval()
    assert clf.head.weight.shape == (3, 64)
    idx, lengths = encode_texts(["hello there", "hi", "a longer message!"], encode, max_length=48)
    logits = clf(idx, lengths)
    assert logits.shape == (3, 3)
    # each row equals the prediction for the unpadded text alone: padding is invisible
    for i in range(3):
        alone = clf(idx[i : i + 1, : lengths[i]])
        torch.testing.assert_close(logits[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="lengths"):
        clf(idx, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="num_classes"):
        GPTClassifier(tiny_gpt(), num_classes=1)


def test_train_only_chooses_the_trainable_layers():
    clf = GPTClassifier(tiny_gpt(), num_classes=2)
    head = sum(p.numel() for p in clf.head.parameters())
    trainable, total = clf.train_only(0)
    assert trainable == head
    trainable, _ = clf.train_only(1)
    block = sum(p.numel() for p in clf.gpt.h[1].parameters())
    assert trainable == head + block + sum(p.numel() for p in clf.gpt.ln_f.parameters())
    assert clf.train_only("all") == (total, total)
    with pytest.raises(ValueError, match="blocks"):
        clf.train_only(5)


def test_training_the_head_only_leaves_frozen_parameters_unchanged():
    clf = GPTClassifier(tiny_gpt(), num_classes=2)
    clf.train_only(1)
    frozen = {n: p.detach().clone() for n, p in clf.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in clf.named_parameters() if p.requires_grad}
    data = [("FREE 5000 cash!", 1), ("see you at home", 0)] * 8
    train_classifier(
        clf, data, encode, FinetuneConfig(max_steps=3, batch_size=4, lr=1e-2, weight_decay=0.1)
    )
    now = dict(clf.named_parameters())
    for name, before in frozen.items():
        torch.testing.assert_close(now[name], before, rtol=0, atol=0)
    assert any(not torch.equal(now[n], p) for n, p in trained.items())


def test_classifier_learns_an_easy_task():
    # spam shouts in capitals and digits; ham is lower case
    spam = [(f"WIN {i}00 NOW! CALL 0{i}", 1) for i in range(10)]
    ham = [(f"see you at {w} tonight", 0) for w in ("home", "work", "class", "lunch", "the", "pub")]
    data = spam + ham * 2
    clf = GPTClassifier(tiny_gpt(), num_classes=2)
    acc_before, _ = evaluate_classifier(clf, data, encode)
    history = train_classifier(
        clf,
        data,
        encode,
        FinetuneConfig(max_steps=40, batch_size=8, lr=3e-3, eval_interval=20),
        val=data,
    )
    acc, preds = evaluate_classifier(clf, data, encode, batch_size=7)
    assert acc == 1.0 and acc_before < 1.0
    assert history["loss"][-1] < history["loss"][0] and history["eval"][-1] == 1.0
    cm = confusion_matrix(preds, torch.tensor([y for _, y in data]))
    assert cm.tolist() == [[12, 0], [0, 10]]


def test_keep_best_ends_with_the_best_evaluated_weights():
    data = [(f"WIN {i}00 NOW!", 1) for i in range(6)] + [(f"see you at {i}", 0) for i in range(6)]
    clf = GPTClassifier(tiny_gpt(), num_classes=2)
    snapshots, scores = [], iter([0.5, 0.9, 0.7, 0.6])  # the second evaluation is the best

    def fake_accuracy(model, *args, **kwargs):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores), None

    cfg = FinetuneConfig(max_steps=15, batch_size=4, lr=3e-3, eval_interval=4, keep_best=True)
    with patch("minigpt.finetune.evaluate_classifier", fake_accuracy):
        history = train_classifier(clf, data, encode, cfg, val=data)
    assert history["eval_step"] == [4, 8, 12, 15]  # the last step is evaluated too
    assert history["eval"] == [0.5, 0.9, 0.7, 0.6]
    for k, v in clf.state_dict().items():
        assert torch.equal(v, snapshots[1][k]), k
    assert not torch.equal(clf.head.weight, snapshots[-1]["head.weight"])

    clf = GPTClassifier(tiny_gpt(), num_classes=2)  # without keep_best: the last weights
    snapshots.clear()
    scores = iter([0.5, 0.9, 0.7])
    with patch("minigpt.finetune.evaluate_classifier", fake_accuracy):
        train_classifier(clf, data, encode, replace(cfg, keep_best=False), val=data)
    assert len(snapshots) == 3  # steps 4, 8, 12: no extra evaluation at the end


def test_generative_classifier_scores_are_log_likelihoods_of_the_text():
    gpt = tiny_gpt()
    V = gpt.config.vocab_size
    clf = GenerativeClassifier(gpt, num_classes=3).eval()
    assert clf.label_ids == [V, V + 1, V + 2] and gpt.config.vocab_size == V + 3
    texts = ["hello there", "hi", "a longer message!"]
    idx, lengths = encode_texts(texts, encode, max_length=48)
    scores = clf(idx, lengths)
    assert scores.shape == (3, 3)
    for b, text in enumerate(texts):
        for k in range(3):
            # by hand: read <label k> + text, add up log p of each text token
            ids = torch.tensor([[V + k, *encode(text)]])
            logp = F.log_softmax(gpt(ids[:, :-1])[0], dim=-1)[0]  # (T, V)
            want = logp[torch.arange(len(text)), ids[0, 1:]].sum()
            torch.testing.assert_close(scores[b, k], want, atol=1e-4, rtol=1e-5)
    # padding changes nothing; a text of one token is scored too
    torch.testing.assert_close(clf(idx[1:2, :2]), scores[1:2], atol=1e-4, rtol=1e-5)
    assert clf(idx[:1, :1]).shape == (1, 3)


def test_generative_classifier_loss_is_the_language_model_loss_after_the_label():
    gpt = tiny_gpt()
    V = gpt.config.vocab_size
    clf = GenerativeClassifier(gpt, num_classes=2, discriminative=0.0).eval()
    idx, lengths = encode_texts(["FREE cash", "see you at home"], encode, max_length=48)
    labels = torch.tensor([1, 0])
    loss = clf.loss(idx, lengths, labels)
    # the mean over the 9 + 15 real text tokens of -log p(token | label, text so far)
    scores = clf(idx, lengths)
    torch.testing.assert_close(loss, -(scores[0, 1] + scores[1, 0]) / 24, atol=1e-5, rtol=1e-5)
    # with a discriminative term: plus its weight times the cross-entropy of the scores
    clf.discriminative = 0.5
    want = loss + 0.5 * F.cross_entropy(scores, labels)
    torch.testing.assert_close(clf.loss(idx, lengths, labels), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="discriminative"):
        GenerativeClassifier(tiny_gpt(), 2, discriminative=-1.0)
    with pytest.raises(ValueError, match="labels must be in"):
        clf.loss(idx, lengths, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="labels must have shape"):
        clf.loss(idx, lengths, torch.tensor([0]))
    with pytest.raises(ValueError, match="label token"):
        clf(torch.tensor([[V, 1, 2]]))
    with pytest.raises(ValueError, match="lengths"):
        clf(idx, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="num_classes"):
        GenerativeClassifier(tiny_gpt(), num_classes=1)


def test_a_classifier_leaves_its_backbone_a_whole_gpt(tmp_path):
    """The classifier reads GPT.hidden_states: the backbone keeps its head, saves,
    loads and generates as any GPT."""
    clf = GPTClassifier(tiny_gpt(), 2)
    assert isinstance(clf.gpt.lm_head, torch.nn.Linear)
    clf.gpt.save(tmp_path / "backbone")
    again = GPT.load(tmp_path / "backbone")
    for a, b in zip(clf.gpt.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert len(clf.gpt.new_kv_cache(1)) == clf.gpt.config.n_layer
    idx = torch.tensor([encode("see you")])
    torch.testing.assert_close(
        clf(idx), clf.head(clf.gpt.hidden_states(idx)[:, -1]), atol=1e-6, rtol=1e-6
    )
    GenerativeClassifier(clf.gpt, 2)  # the backbone is still a language model


def test_generative_classifier_learns_an_easy_task():
    spam = [(f"WIN {i}00 NOW! CALL 0{i}", 1) for i in range(10)]
    ham = [(f"see you at {w} tonight", 0) for w in ("home", "work", "class", "lunch", "the", "pub")]
    data = spam + ham * 2
    clf = GenerativeClassifier(tiny_gpt(), num_classes=2)
    cfg = FinetuneConfig(max_steps=40, batch_size=8, lr=3e-3, dropout=0.1)
    history = train_classifier(clf, data, encode, cfg)
    assert clf.gpt.config.dropout == 0.1 and clf.gpt.h[0].attn.dropout == 0.1
    acc, _ = evaluate_classifier(clf, data, encode, batch_size=5)
    assert acc == 1.0
    assert history["loss"][-1] < history["loss"][0]


def test_set_dropout_reaches_every_layer():
    gpt = tiny_gpt()
    gpt.set_dropout(0.25)
    rates = [m.p for m in gpt.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates and all(r == 0.25 for r in rates)
    assert all(b.attn.dropout == 0.25 for b in gpt.h) and gpt.config.dropout == 0.25
    gpt.eval()
    idx = torch.randint(0, gpt.config.vocab_size, (2, 9))
    assert torch.equal(gpt(idx)[0], gpt(idx)[0])  # no dropout at evaluation
    gpt.train()
    assert not torch.equal(gpt(idx)[0], gpt(idx)[0])
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="dropout"):
            gpt.set_dropout(bad)
    with pytest.raises(ValueError, match="dropout"):
        FinetuneConfig(dropout=1.5)


def test_ema_returns_the_moving_average_of_the_weights():
    from minigpt import finetune

    data = [("FREE 5000 cash!", 1), ("see you at home", 0)] * 8
    cfg = FinetuneConfig(max_steps=4, batch_size=4, lr=1e-2)

    def run(ema):
        clf = GPTClassifier(tiny_gpt(), num_classes=2)
        seen = [clf.head.weight.detach().clone()]  # the weights after each step
        real = finetune.configure_optimizer

        def recording(model, **kwargs):
            opt = real(model, **kwargs)
            step = opt.step

            def stepped(*args, **kw):
                out = step(*args, **kw)
                seen.append(clf.head.weight.detach().clone())
                return out

            opt.step = stepped
            return opt

        with patch("minigpt.finetune.configure_optimizer", recording):
            train_classifier(clf, data, encode, replace(cfg, ema=ema))
        return clf, seen

    plain, path = run(None)
    averaged, same_path = run(0.5)
    assert len(path) == 5 and all(torch.equal(a, b) for a, b in zip(path, same_path))
    assert torch.equal(plain.head.weight, path[-1])  # without ema: the last weights
    expected = path[0]
    for w in path[1:]:
        expected = expected + 0.5 * (w - expected)
    torch.testing.assert_close(averaged.head.weight, expected)
    assert not torch.allclose(averaged.head.weight, path[-1])
    with pytest.raises(ValueError, match="ema"):
        FinetuneConfig(ema=1.0)


def test_confusion_matrix_rows_are_true_labels():
    cm = confusion_matrix(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1, 1]))
    assert cm.tolist() == [[1, 1], [0, 2]]


def test_resize_token_embeddings_keeps_old_rows_and_the_tie():
    model = tiny_gpt(vocab_size=30)
    old = model.wte.weight.detach().clone()
    idx = torch.randint(0, 30, (2, 10))
    before, _ = model(idx)
    model.resize_vocab(34)
    assert model.config.vocab_size == 34 and model.wte.weight.shape == (34, 64)
    assert model.lm_head.weight is model.wte.weight
    torch.testing.assert_close(model.wte.weight[:30], old)
    torch.testing.assert_close(model.wte.weight[33], old.mean(0))
    after, _ = model(idx)
    torch.testing.assert_close(after[..., :30], before)
    model(torch.tensor([[33, 1]]))  # the new ids are accepted
    with pytest.raises(ValueError, match="grow"):
        model.resize_vocab(10)


# --------------------------------------------------------------------------- instructions


def test_prompt_template_includes_input_only_when_present():
    with_input = format_prompt(InstructionExample("Reverse the word.", "abc", "cba"))
    without = format_prompt(InstructionExample("Say hi.", "", "hi"))
    assert with_input.endswith(
        "### Instruction:\nReverse the word.\n\n### Input:\nabc\n\n### Response:\n"
    )
    assert "### Input:" not in without and without.endswith("Say hi.\n\n### Response:\n")
    assert with_input.startswith("Below is an instruction that describes a task.")
    bare = format_prompt(InstructionExample("Say hi.", "", "hi"), intro="")
    assert bare == "### Instruction:\nSay hi.\n\n### Response:\n"


def test_collator_shifts_pads_and_masks():
    collate = InstructionCollator(pad_id=0, eos_id=9)
    inputs, targets = collate([([1, 2, 3], [4, 5]), ([1, 2], [6])])
    X = IGNORE_INDEX
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [1, 2, 6, 0, 0]]
    assert targets.tolist() == [[X, X, 4, 5, 9], [X, 6, 9, X, X]]
    unmasked = InstructionCollator(pad_id=0, mask_prompt=False)([([1, 2, 3], [4])])[1]
    assert unmasked.tolist() == [[2, 3, 4]]
    cut = InstructionCollator(pad_id=0, max_length=3)([([1, 2, 3], [4, 5])])
    assert cut[0].tolist() == [[1, 2, 3]] and cut[1].tolist() == [[X, X, 4]]


def test_masked_positions_contribute_zero_loss():
    model = tiny_gpt()
    collate = InstructionCollator(pad_id=0, eos_id=1)
    pairs = [
        (encode("Q: add 2 and 3\nA:"), encode(" 5")),
        (encode("Q: hi\nA:"), encode(" hello there")),
    ]
    inputs, targets = collate(pairs)
    loss = instruction_loss(model, inputs, targets)
    # the same loss by hand, over the unmasked positions only
    logits, _ = model(inputs)
    keep = targets != IGNORE_INDEX
    by_hand = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, by_hand)
    # padding can hold anything: causal attention never lets it reach a scored position
    lengths = [len(p) + len(r) for p, r in pairs]  # inputs per row (+1 eos, -1 shift)
    short = min(range(2), key=lambda b: lengths[b])
    other = inputs.clone()
    other[short, lengths[short] :] = 7  # the padding of the shorter row
    loss_other = instruction_loss(model, other, targets)
    torch.testing.assert_close(loss_other, loss)
    # and masked positions get exactly zero gradient
    logits = model(inputs)[0].detach().requires_grad_(True)
    torch.nn.functional.cross_entropy(
        logits.view(-1, logits.shape[-1]), targets.view(-1), ignore_index=IGNORE_INDEX
    ).backward()
    assert logits.grad[~keep].abs().max() == 0 and logits.grad[keep].abs().max() > 0


def test_all_masked_batch_has_zero_loss_not_nan():
    model = tiny_gpt()
    inputs = torch.tensor([[1, 2, 3]])
    targets = torch.full((1, 3), IGNORE_INDEX)
    loss = instruction_loss(model, inputs, targets)
    assert loss.item() == 0.0


def test_instruction_tuning_lowers_the_response_loss():
    examples = [InstructionExample(f"Say {w}.", "", w) for w in ("yes", "no", "hi", "ok")]
    model = tiny_gpt(block_size=160)
    collate = InstructionCollator(pad_id=0, eos_id=STOI["\n"], max_length=160)
    batch = collate([tokenize_instruction(ex, encode) for ex in examples])
    before = instruction_loss(model, *batch).item()
    history = train_instructions(
        model,
        examples,
        encode,
        FinetuneConfig(max_steps=30, batch_size=4, lr=3e-3),
        collator=collate,
    )
    after = instruction_loss(model, *batch).item()
    assert len(history["loss"]) == 30 and after < 0.5 * before


def test_instruction_tuning_trains_on_the_prompts_a_prompt_function_writes():
    examples = [InstructionExample(f"Say {w}.", "", w) for w in ("yes", "no", "hi", "ok")]
    collate = InstructionCollator(pad_id=0, eos_id=STOI["\n"], max_length=64)
    seen = []

    def spy(batch):
        seen.extend(batch)
        return collate(batch)

    def short(ex):
        return f"Q: {ex.instruction}\nA: "

    train_instructions(
        tiny_gpt(), examples, encode, FinetuneConfig(max_steps=3, batch_size=4), spy, prompt=short
    )
    expected = {(tuple(encode(short(ex))), tuple(encode(ex.output))) for ex in examples}
    assert len(seen) == 12 and {(tuple(p), tuple(r)) for p, r in seen} == expected


def test_bag_of_words_baseline_learns_word_polarity():
    good = [
        "a charming , funny film",
        "funny and charming",
        "a wonderful story",
        "wonderful acting",
    ]
    bad = ["a dull , boring film", "boring and dull", "an awful story", "awful acting"]
    train = [(t, 1) for t in good] * 5 + [(t, 0) for t in bad] * 5
    model = BagOfWords.fit(train, epochs=20, batch_size=8, lr=0.1, min_count=1)
    assert model.predict(["charming and wonderful", "dull and awful", "never seen"]).tolist()[
        :2
    ] == [1, 0]
    assert model(["x"]).shape == (1, 2)
    assert "and charming" in model.vocab and "zebra" not in model.vocab


def test_training_needs_something_trainable_and_a_valid_config():
    clf = GPTClassifier(tiny_gpt(), num_classes=2)
    for p in clf.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_classifier(clf, [("a", 0), ("b", 1)], encode, FinetuneConfig(max_steps=1))
    with pytest.raises(ValueError, match="lr"):
        FinetuneConfig(lr=0)


def test_epoch_batches_cover_every_example_once_and_group_lengths():
    from minigpt.finetune import _epoch_batches

    lengths = [(i * 37) % 100 for i in range(200)]
    gen = torch.Generator().manual_seed(0)
    batches = _epoch_batches(200, 8, gen, lengths)
    assert sorted(i for b in batches for i in b) == list(range(200))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    plain = _epoch_batches(200, 8, torch.Generator().manual_seed(0), None)
    plain_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain)
    assert spread < plain_spread / 3
