"""with_repeats: passages of a token stream written twice (copying practice for pretraining)."""

from __future__ import annotations

import numpy as np
import pytest

from minigpt.tokens import with_repeats


def _undo(out: np.ndarray, sep: int) -> tuple[np.ndarray, list[int]]:
    """Remove every "separator + copy of the passage before it"; the stream and the copy lengths.

    The stream's ids are distinct, so a copy is the longest run after the separator that
    equals the end of what came before it."""
    kept: list[int] = []
    copies = []
    i = 0
    while i < len(out):
        if out[i] != sep:
            kept.append(int(out[i]))
            i += 1
            continue
        # the copy starts at the passage's first id: find it in what was kept
        first = int(out[i + 1])
        start = kept.index(first)
        n = len(kept) - start
        assert list(out[i + 1 : i + 1 + n]) == kept[start:], "the copy is not the passage before it"
        copies.append(n)
        i += 1 + n
    return np.array(kept), copies


def test_with_repeats_writes_a_share_of_passages_twice():
    ids = np.arange(30_000, dtype=np.uint32)  # distinct ids, so each copy can be found
    out = with_repeats(ids, 0.5, separator=[10**6], seed=3, lengths=(10, 20))
    assert out.dtype == ids.dtype
    stream, copies = _undo(out, 10**6)
    np.testing.assert_array_equal(stream, ids)  # nothing lost, nothing reordered
    assert all(10 <= n <= 20 for n in copies[:-1])  # (the last passage may be cut short)
    passages = len(ids) / 15  # the mean passage length
    assert 0.45 < len(copies) / passages < 0.55


def test_with_repeats_is_deterministic_and_share_zero_is_the_stream():
    ids = np.arange(5_000) % 77
    np.testing.assert_array_equal(with_repeats(ids, 0.3, seed=1), with_repeats(ids, 0.3, seed=1))
    assert not np.array_equal(with_repeats(ids, 0.3, seed=1), with_repeats(ids, 0.3, seed=2))
    np.testing.assert_array_equal(with_repeats(ids, 0.0), ids)
    assert len(with_repeats(ids, 1.0)) == 2 * len(ids)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"share": 1.5}, "share"),
        ({"share": 0.2, "lengths": (0, 5)}, "lengths"),
        ({"share": 0.2, "lengths": (9, 5)}, "lengths"),
    ],
)
def test_with_repeats_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        with_repeats(np.arange(100), **kwargs)
