import numpy as np
import pytest

from charlm.tipa import BYTE_WORD, reverse_positions, window_positions, word_table


def rp(text: bytes, tipa_max: int = 16) -> list[int]:
    return reverse_positions(np.frombuffer(text, dtype=np.uint8), tipa_max).tolist()


@pytest.mark.parametrize("text, expected", [
    (b"the cat", [3, 2, 1, 0, 3, 2, 1]),
    (b"a, b.", [1, 0, 0, 1, 0]),
    (b"  x  ", [0, 0, 1, 0, 0]),
    (b"route 66!", [5, 4, 3, 2, 1, 0, 2, 1, 0]),              # digits are word bytes
    (b"x1y_z", [3, 2, 1, 0, 1]),                            # underscore is a delimiter
    ("caf\u00e9 ok".encode(), [5, 4, 3, 2, 1, 0, 2, 1]),      # both UTF-8 bytes of e-acute are word bytes
    (b"[[Tag]]\n<br/>", [0, 0, 3, 2, 1, 0, 0, 0, 0, 2, 1, 0, 0]),
    (b"tail", [4, 3, 2, 1]),                                # the end of the array ends a word
    (b"", []),
])
def test_reverse_positions_by_hand(text, expected):
    assert rp(text) == expected


def test_reverse_positions_clips_at_tipa_max():
    assert rp(b"abcdefg h", tipa_max=3) == [3, 3, 3, 3, 3, 2, 1, 0, 1]
    assert rp(b"ab", tipa_max=1) == [1, 1]


def test_reverse_positions_dtype_and_custom_table():
    out = reverse_positions(np.array([0, 1, 1, 2, 1], dtype=np.uint16), word=np.array([False, True, False]))
    assert out.dtype == np.uint8 and out.tolist() == [0, 2, 1, 0, 1]


def test_reverse_positions_rejects_bad_arguments():
    with pytest.raises(ValueError, match="tipa_max must be in 1..255"):
        reverse_positions(np.zeros(3, np.uint8), tipa_max=0)
    with pytest.raises(ValueError, match="1-D"):
        reverse_positions(np.zeros((2, 2), np.uint8))


def test_byte_word_table():
    words = {b for b in range(256) if BYTE_WORD[b]}
    expected = set(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") | set(range(0x80, 0x100))
    assert words == expected


def test_word_table_unicode():
    # 0663: Arabic-Indic three (Nd); 2014: em dash; 00bd, 00b2, 2163: one half, superscript two, Roman four
    chars = [ord(c) for c in " .\n_aZ7\u00e9\u4e2d\u0663-\u2014\u00bd\u00b2\u2163"]
    table = word_table({"tokenization": "unicode", "chars": chars})
    assert table.tolist() == [False, False, False, False, True, True, True, True, True, True, False, False,
                              False, False, False]
    assert word_table({"tokenization": "bytes", "chars": None}) is BYTE_WORD


def test_window_positions():
    assert window_positions(5, 3).tolist() == [3, 3, 3, 2, 1]
    assert window_positions(2, 16).tolist() == [2, 1]
