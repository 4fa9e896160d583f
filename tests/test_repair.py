import io

import pytest

from doppel.readers.repair import RepairingReader, repair

RAW = (b'{"text": "line one\\u2028\x80\xa8line two", '
       b'"b": "tab\\tok, vertical-tab\\x0Bbad, nul\\x00bad", "c": "C:\\\\x41", '
       b'"d": "p\\u2029\x80\xa9q"}')


def test_repair_fixes_telegram_bytes_and_keeps_literal_backslashes():
    import json

    with pytest.raises(UnicodeDecodeError):
        json.loads(RAW.decode("utf-8"))
    fixed = json.loads(repair(RAW))
    assert fixed == {"text": "line one\u2028line two", "b": "tab\tok, vertical-tab\x0bbad, nul\x00bad",
                     "c": "C:\\x41", "d": "p\u2029q"}


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 8, 13, 64])
def test_streaming_repair_is_independent_of_chunk_boundaries(chunk):
    reader = RepairingReader(io.BytesIO(RAW * 3), chunk_size=chunk)
    out = b""
    while piece := reader.read(4):
        assert len(piece) <= 4
        out += piece
    assert out == repair(RAW * 3)
    assert reader.consumed == len(RAW) * 3
