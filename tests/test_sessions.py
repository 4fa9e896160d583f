import io
import json

import pytest
from conftest import ANN, MAX, ME, T0, dialogue, full_export, msg, personal

from doppel.config import PrepareConfig
from doppel.errors import ConfigError
from doppel.preparing.sessions import SeenIds, collect, eval_counts, exclusion, resolve_owner, unique_labels
from doppel.readers.records import Chat, Header
from doppel.readers.telegram import iter_export


def spooled(path, **cfg):
    spool = io.BytesIO()
    census = collect(iter_export(path), PrepareConfig(**cfg), spool)
    return census, [json.loads(line) for line in spool.getvalue().splitlines()]


def test_gap_of_one_day_and_two_minutes_splits(write):
    day_later = 86400 + 120
    path = write(full_export([personal(MAX, dialogue(start=0) + dialogue(start=day_later, first_id=10))]))
    _, rows = spooled(path)
    assert [(r[1], r[2] - T0, r[3] - T0) for r in rows] == [(1, 0, 30), (10, day_later, day_later + 30)]


def test_gap_is_compared_to_the_previous_kept_message(write):
    photo = msg(9, 1500, ME, "", photo="p.jpg")  # dropped: does not bridge the gap
    messages = [msg(1, 0, MAX, "a"), msg(2, 590, ME, "b"), msg(3, 1180, MAX, "c"), photo,
                msg(4, 1180 + 600, ME, "d")]
    _, rows = spooled(write(full_export([personal(MAX, messages)])))
    assert [[t[0] for t in r[4]] for r in rows] == [["user201", "user100", "user201", "user100"]]
    _, rows = spooled(write(full_export([personal(MAX, [*messages[:4], msg(4, 1180 + 601, ME, "d")])])))
    assert len(rows) == 1 and rows[0][4][-1][0] == "user201"  # the last message alone is dropped


def test_bursts_merge_into_turns_and_stickers_become_emoji(write):
    messages = [msg(1, 0, MAX, "yo"), msg(2, 5, MAX, "", media_type="sticker", sticker_emoji="😂",
                                                   file="x"),
                msg(3, 6, MAX, "", photo="p.jpg"), msg(4, 7, MAX, "hey", forwarded_from="News"),
                msg(5, 9, ME, "go"), msg(6, 10, ME, "now")]
    census, rows = spooled(write(full_export([personal(MAX, messages)])))
    assert rows[0][4] == [["user201", ["yo", "😂"]], ["user100", ["go", "now"]]]
    assert census.dropped == {"media": 1, "forwarded": 1}
    _, rows = spooled(write(full_export([personal(MAX, messages)])), keep_media=True,
                      keep_forwarded=True)
    assert rows[0][4][0] == ["user201", ["yo", "😂", "[photo]", "hey"]]


@pytest.mark.parametrize(("chat", "reason"), [
    (Chat(5, "personal_chat", "A"), None),
    (Chat(777000, "personal_chat", "Telegram"), "Telegram service"),
    (Chat(5, "bot_chat", "B"), "bot"),
    (Chat(5, "saved_messages", None), "saved messages"),
    (Chat(5, "replies", None), "replies"),
    (Chat(489000, "verification_codes", None), "verification codes"),
    (Chat(5, "public_channel", "C"), "channel"),
    (Chat(5, "private_channel", "C"), "channel"),
    (Chat(5, "private_group", "G"), "group"),
    (Chat(5, "private_supergroup", "G"), "group"),
    (Chat(5, "public_supergroup", "G"), "group"),
    (Chat(5, None, None), "other"),
])
def test_default_exclusions(chat, reason):
    from doppel.preparing.sessions import Census

    assert exclusion(chat, PrepareConfig(), Census()) == reason


def test_chat_selection_flags():
    from doppel.preparing.sessions import Census

    group, channel = Chat(7, "private_group", "Crew"), Chat(8, "public_channel", "News")
    assert exclusion(group, PrepareConfig(include_groups=True), Census()) is None
    census = Census()
    assert exclusion(channel, PrepareConfig(chat=("news",)), census) is None
    assert census.matched == {"news"}
    assert exclusion(Chat(5, "personal_chat", "A"), PrepareConfig(chat=("8",)), Census()) == "not chosen"
    assert exclusion(Chat(5, "personal_chat", "A"), PrepareConfig(exclude_chat=("5",)),
                     Census()) == "excluded by --exclude-chat"


def test_duplicate_display_names_get_distinct_labels():
    from collections import Counter

    names = {"user1": "Alex", "user2": "Alex", "user3": "Alex (2)", "user4": None}
    labels = unique_labels(names, Counter({"user2": 10, "user1": 3, "user3": 1}))
    assert labels == {"user2": "Alex", "user1": "Alex (3)", "user3": "Alex (2)",
                      "user4": "Deleted Account"}


def test_owner_detection_rules(write):
    cfg = PrepareConfig()
    chats = [personal(MAX, dialogue())]
    census, _ = spooled(write(full_export(chats)))
    assert resolve_owner(Header("user100"), census, cfg) == "user100"
    # no personal_information: Saved Messages' id is the owner
    saved = {"type": "saved_messages", "id": ME, "messages": []}
    census, _ = spooled(write(full_export([*chats, saved], owner=None)))
    assert resolve_owner(Header(), census, cfg) == "user100"
    # neither: the only id present in every personal chat
    two = [personal(MAX, dialogue()), personal(ANN, dialogue(peer=ANN, first_id=20), "Ann")]
    census, _ = spooled(write(full_export(two, owner=None)))
    assert resolve_owner(Header(), census, cfg) == "user100"
    # single personal chat: the sender who is not the peer
    census, _ = spooled(write(personal(MAX, dialogue())))
    assert resolve_owner(Header(one_chat=True), census, cfg) == "user100"
    # --me wins, with or without the "user" prefix, or by name; someone not in the export is refused
    assert resolve_owner(Header("user100"), census, PrepareConfig(me="201")) == "user201"
    assert resolve_owner(Header("user100"), census, PrepareConfig(me="user201")) == "user201"
    assert resolve_owner(Header("user100"), census, PrepareConfig(me="max orlov")) == "user201"
    with pytest.raises(ConfigError) as err:
        resolve_owner(Header("user100"), census, PrepareConfig(me="user999"))
    assert str(err.value) == ("me 'user999' is not a speaker in this export; one of: user201 Max Orlov (2 messages); "
                              "user100 Me Owner (1 messages)")


def test_single_group_export_asks_for_me_with_candidates(write):
    group = {"name": "Crew", "type": "private_supergroup", "id": 7,
             "messages": [msg(1, 0, MAX, "a"), msg(2, 5, ANN, "b"), msg(3, 9, MAX, "c")]}
    census, _ = spooled(write(group), include_groups=True)
    with pytest.raises(ConfigError) as err:
        resolve_owner(Header(one_chat=True), census, PrepareConfig())
    assert str(err.value) == ("cannot tell which member is you in a group export; set me to your id or name, one "
                              "of: user201 Max Orlov (2 messages); user202 Ann Lee (1 messages)")


def test_eval_counts_round_half_up():
    from collections import Counter

    assert eval_counts(Counter({1: 10, 2: 30, 3: 100, 4: 9}), 0.05) == {1: 1, 2: 2, 3: 5, 4: 0}


def test_seen_ids_find_repeats_in_order_out_of_order_and_beyond_64_bits():
    seen = SeenIds()
    added = [seen.add(chat, mid) for chat, mid in [
        (1, 5), (1, 7), (2, 5), (1, 9),  # increasing per chat: all new
        (1, 5), (1, 7), (1, 9), (2, 5),  # the chats again: all repeats
        (1, 6), (1, 6), (1, 4), (1, 10),  # out of order: new, repeat, new, new
        (3, 1 << 70), (3, 1 << 70), (3, -(1 << 70)), (3, 2),  # not 64-bit ids
    ]]
    assert added == [True, True, True, True, False, False, False, False,
                     True, False, True, True, True, False, True, True]


def test_duplicates_are_dropped_before_the_other_filters(write):
    photo = msg(4, 40, MAX, "", photo="p.jpg")
    chat = personal(MAX, [*dialogue(), photo])
    census, rows = spooled(write(full_export([chat, chat, {**chat, "id": ANN}])))
    assert census.dropped == {"media": 2, "duplicate": 4}
    assert [(r[0], r[1]) for r in rows] == [(0, 1), (2, 1)]  # chat 0, then the third chat
