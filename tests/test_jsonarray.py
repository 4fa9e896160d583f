"""Arrays of JSON objects decoded in batches (readers/jsonarray.py), and the readers that rely on it falling back
to their general readers whenever the bytes are not shaped as expected."""

import json
from typing import Any

import msgspec
import pytest
from conftest import MAX, ME, T0, dialogue, full_export, msg, personal

from doppel.errors import ExportError
from doppel.readers import discord
from doppel.readers.jsonarray import ArrayItems, Unusual
from doppel.readers.telegram import Chat, Message, UnusualLayout, iter_export


class Item(msgspec.Struct):
    id: Any = None
    text: Any = None


ITEMS = [{"id": 1, "text": "a }, { \"id\": 2 ]"}, {"id": 2, "text": "line\nbreak", "nested": [{"id": 9}]},
         {"text": "no id first", "id": 3}, {"id": 4, "text": None}]
EXPECTED = [Item(1, 'a }, { "id": 2 ]'), Item(2, "line\nbreak"), Item(3, "no id first"), Item(4, None)]


def feed_all(data: bytes, size: int) -> tuple[list[Item], bytes]:
    array: ArrayItems[Item] = ArrayItems(Item)
    got: list[Item] = []
    for at in range(0, len(data), size):
        got += array.feed(data[at:at + size])
    last, rest = array.finish()
    return got + last, rest


@pytest.mark.parametrize("indent", [1, 2, 4])
@pytest.mark.parametrize("size", [1, 3, 7, 64, 1 << 20])
def test_indented_arrays_in_pieces_of_any_size(indent, size):
    text = json.dumps({"messages": ITEMS, "after": [1]}, indent=indent)
    data = text.encode()[text.index("[") + 1:]
    got, rest = feed_all(data, size)
    assert got == EXPECTED
    assert rest == text.encode()[text.rindex("],") + 1:]


def test_a_batch_is_decoded_as_soon_as_the_next_item_s_first_key_is_read():
    array: ArrayItems[Item] = ArrayItems(Item)
    text = json.dumps([{"id": n} for n in range(4)], indent=1)
    head = text.index('"id": 2') + len('"id":')  # the separator is whole once the next item's first key is
    assert array.feed(text.encode()[1:head]) == [Item(0), Item(1)]
    assert array.feed(text.encode()[head:]) == [Item(2)]
    assert array.finish() == ([Item(3)], b"")


@pytest.mark.parametrize("text", ["[]", "[ ]", "[\n  ]  , 5"])
def test_empty_arrays(text):
    assert feed_all(text.encode()[1:], 1) == ([], text.encode()[text.index("]") + 1:])


def test_a_compact_array_whose_items_hold_objects_with_the_same_first_key_is_unusual():
    # `},{"id":` occurs inside the last item: the batch up to it is not a list of whole items
    data = json.dumps([{"id": 4}, {"id": 1, "nested": [{"id": 2}, {"id": 3}]}], separators=(",", ":")).encode()[1:]
    with pytest.raises(Unusual):
        feed_all(data, 1 << 20)
    # met before the last separator, it is inside a batch that decodes whole, rightly
    assert feed_all(data[:-1] + b',{"id":5}]', 1 << 20) == ([Item(4), Item(1), Item(5)], b"")


@pytest.mark.parametrize("data", [b'{"id": 1}, {"id": 2}', b'{"id": 1} {"id": 2}]', b'5, 6]', b'{"id": 1}, {"id":'])
def test_bytes_that_are_not_a_whole_array_of_objects_are_unusual(data):
    with pytest.raises(Unusual):
        feed_all(data, 4)


def test_a_separator_never_met_within_the_limit_is_unusual():
    array: ArrayItems[Item] = ArrayItems(Item, limit=100)
    array.feed(b'\n {"id": 1, "text": "')
    with pytest.raises(Unusual, match="no separator between items in 100 bytes"):
        array.feed(b"x" * 200)


def test_a_compact_telegram_export_reads_as_the_indented_one(tmp_path):
    export = full_export([personal(MAX, dialogue()), personal(ME + 7, [msg(9, 40, ME + 7, ["a ", {"type": "bold",
                                                                                                  "text": "b"}])])])
    compact, indented = tmp_path / "compact.json", tmp_path / "indented.json"
    compact.write_text(json.dumps(export, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    indented.write_text(json.dumps(export, ensure_ascii=False, indent=1), encoding="utf-8")
    got = list(iter_export(compact))
    assert got == list(iter_export(indented)) == list(iter_export(compact, general=True))
    assert got[:2] == [Chat(MAX, "personal_chat", "Max"), Message(1, T0, f"user{MAX}", "Max Orlov", "yo", "text")]
    assert got[-1] == Message(9, T0 + 40, f"user{ME + 7}", "User 107", "a b", "text")


def test_a_telegram_export_missing_only_its_last_brace_is_unusual_for_the_fast_reader(write):
    path = write(full_export([personal(MAX, dialogue())]))
    path.write_bytes(path.read_bytes().rstrip()[:-1])  # every message is whole; the document is not
    with pytest.raises(UnusualLayout):
        list(iter_export(path))
    with pytest.raises(ExportError, match="ends early"):
        list(iter_export(path, general=True))


def test_discord_falls_back_to_ijson_where_the_batches_stop_without_losing_or_repeating_a_message(tmp_path):
    # compact, as DiscordChatExporter never writes it: the last message's mentions hold `}, {"id":` (the separator),
    # met after more than a read's worth of batches has been decoded
    def message(n: int, **extra: Any) -> dict:
        return {"id": str(n), "type": "Default", "timestamp": f"2024-01-01T00:{n // 60 % 60:02d}:{n % 60:02d}+00:00",
                "content": f"{n} " + "x" * 400, "author": {"id": str(100 + n % 2), "name": f"p{n % 2}"}, **extra}

    items = [message(n) for n in range(1, 3001)]
    items.append(message(3001, mentions=[{"id": "101", "name": "p1"}, {"id": "100", "name": "p0"}]))
    path = tmp_path / "dm.json"
    path.write_text(json.dumps({"guild": {"id": "0"}, "channel": {"id": "5", "type": "DirectTextChat",
                                                                  "name": "p0"}, "messages": items}),
                    encoding="utf-8")
    assert path.stat().st_size > 1 << 20
    with pytest.raises(Unusual):
        list(discord._batched(path, None))
    got = list(discord.read(path)[1])
    assert got[0] == Chat(5, "personal_chat", "p0")
    assert [(m.id, m.text.split()[0]) for m in got[1:]] == [(n, str(n)) for n in range(1, 3002)]


def test_nesting_deeper_than_the_decoders_recursion_limit_is_read_by_the_general_reader(write, tmp_path):
    deep = b"[" * 3000 + b'"end"' + b"]" * 3000  # written by hand: json.dumps cannot nest that deep either
    path = write(personal(MAX, [msg(1, 0, MAX, "yo"), msg(2, 5, ME, "го", x="DEEP"), msg(3, 9, MAX, "ok")]))
    path.write_bytes(path.read_bytes().replace(b'"DEEP"', deep))
    with pytest.raises(UnusualLayout):
        list(iter_export(path))
    assert [m.text for m in list(iter_export(path, general=True))[1:]] == ["yo", "го", "ok"]
    items = [{"id": "1", "type": "Default", "timestamp": "2024-01-01T00:00:00+00:00", "content": "hi", "x": "DEEP",
              "author": {"id": "1", "name": "a"}}]
    dm = tmp_path / "dm.json"
    dm.write_bytes(json.dumps({"channel": {"id": "5", "type": "DirectTextChat", "name": "a"},
                               "messages": items}).encode().replace(b'"DEEP"', deep))
    assert [m.text for m in list(discord.read(dm)[1])[1:]] == ["hi"]


def test_discord_reads_the_top_level_messages_not_a_nested_messages_key(tmp_path):
    def item(n: int, text: str) -> dict:
        return {"id": str(n), "type": "Default", "timestamp": f"2024-01-01T00:00:0{n}+00:00", "content": text,
                "author": {"id": "1", "name": "a"}}

    channel = {"id": "5", "type": "DirectTextChat", "name": "a", "topic": '"messages": [',
               "extra": {"messages": [item(1, "fake"), item(2, "fake2")]}}
    path = tmp_path / "dm.json"
    path.write_text(json.dumps({"guild": {"id": "0"}, "channel": channel,
                                "messages": [item(1, "one"), item(2, "two"), item(3, "three")]}, indent=2))
    assert [m.text for m in list(discord.read(path)[1])[1:]] == ["one", "two", "three"]
    assert [i.content for i in discord._batched(path, None)] == ["one", "two", "three"]
