"""Chat selection, filtering, owner and speaker resolution, time-gap sessions, and the eval split.

Two passes keep memory independent of the export's size: `collect` streams the export once and
spools candidate sessions (ids only) to disk while counting people; then `resolve_owner`,
`unique_labels` and `trained_ids` settle who is who, `sessions` applies the minimum-context rule to the
spool, and `eval_counts` splits train/eval per chat (preparing/pipeline.py runs them in that order).
"""

from __future__ import annotations

import difflib
import hashlib
from array import array
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import msgspec

from doppel.config import PrepareConfig
from doppel.errors import ConfigError
from doppel.preparing import privacy
from doppel.readers import telegram_ids
from doppel.readers.records import Chat, Header, Message
from doppel.records import ChatRef, Session, Turn

SERVICE_CHAT = 777000  # "Telegram" notifications: login codes
# the most characters of text one session holds (about 25,000 tokens): a session is built, spooled and written whole,
# so a chat written without a pause for months, or a hostile file, would otherwise be one session of gigabytes
SESSION_CHARS = 100_000
GROUP_TYPES = frozenset({"private_group", "private_supergroup", "public_supergroup"})
_EXCLUSION = {
    "bot_chat": "bot", "saved_messages": "saved messages", "replies": "replies",
    "verification_codes": "verification codes", "private_channel": "channel",
    "public_channel": "channel",
}


@dataclass
class Census:
    """What the first pass learned about the export (small: per chat and per person)."""

    chats: list[Chat] = field(default_factory=list)
    senders: list[Counter[str]] = field(default_factory=list)  # per chat: kept messages per id
    names: dict[str, str | None] = field(default_factory=dict)
    dropped: Counter[str] = field(default_factory=Counter)
    excluded_chats: Counter[str] = field(default_factory=Counter)
    matched: set[str] = field(default_factory=set)  # --chat values that matched a chat
    spooled: Counter[int] = field(default_factory=Counter)  # sessions spooled per chat id
    split: Counter[int] = field(default_factory=Counter)  # per chat id: sessions split at SESSION_CHARS


_ID_LIMIT = 1 << 63  # ids from here on do not fit the array
_BELOW = -(1 << 64)  # below every id


class SeenIds:
    """The (chat id, message id) pairs met so far, in about 8 bytes a message.

    Telegram writes each chat's messages in increasing id order, so a chat's ids form a sorted array,
    searched by bisection when a chat comes back (an export holding it twice). Only a chat whose new
    ids go back (a hand-edited file) moves to a set, about 60 bytes an id.
    """

    def __init__(self) -> None:
        self._ordered: dict[int, array[int]] = {}
        self._unordered: dict[int, set[int]] = {}

    def add(self, chat: int, message: int) -> bool:
        """Record the pair; False when it was already there."""
        loose = self._unordered.get(chat)
        if loose is not None:
            new = message not in loose
            loose.add(message)
            return new
        ids = self._ordered.setdefault(chat, array("q"))
        if (not ids or message > ids[-1]) and message < _ID_LIMIT:
            ids.append(message)
            return True
        at = bisect_left(ids, message)
        if at < len(ids) and ids[at] == message:
            return False
        self._unordered[chat] = {*self._ordered.pop(chat), message}
        return True

    def ordered(self, chat: int) -> array[int] | None:
        """The chat's sorted ids, to which a caller may append an id above the last one itself (None: the chat's ids
        are no longer in order)."""
        return None if chat in self._unordered else self._ordered.setdefault(chat, array("q"))


def _matches(chat: Chat, wanted: Iterable[str], shifted: bool = False) -> str | None:
    for value in wanted:
        if chat.id in telegram_ids.chat_ids(value, shifted):  # an id as the file shows it
            return value
        name = chat.name or ("Saved Messages" if chat.type == "saved_messages" else None)
        if name is not None and value.casefold() == name.casefold():
            return value
    return None


def exclusion(chat: Chat, cfg: PrepareConfig, census: Census, shifted: bool = False) -> str | None:
    """Why a chat is not used (None when it is)."""
    if cfg.chat:
        hit = _matches(chat, cfg.chat, shifted)
        if hit is None:
            return "not chosen"
        census.matched.add(hit)
    if _matches(chat, cfg.exclude_chat, shifted) is not None:
        return "excluded by --exclude-chat"
    if cfg.chat:
        return None
    if chat.type == "personal_chat":
        return "Telegram service" if chat.id == SERVICE_CHAT else None
    if chat.type in GROUP_TYPES:
        return None if cfg.include_groups else "group"
    return _EXCLUSION.get(chat.type or "", "other")


def message_text(m: Message, cfg: PrepareConfig) -> str | None:
    """The text a message contributes, or None with the reason counted by the caller."""
    if m.kind == "service":
        return f"[{m.media}]" if cfg.keep_service else None
    if m.forwarded and not cfg.keep_forwarded:
        return None
    if m.kind == "media":
        return f"[{m.media}]" if cfg.keep_media else None
    if m.kind in ("empty", "unsupported", "bot"):  # bots are never speakers (Discord)
        return None
    text = m.text.strip()
    if text and cfg.redact:
        text = privacy.redact(text, m.sensitive)
    return text or None


def content_id(m: Message) -> int:
    """The id of a message that has none (0: a converted Telegram file without ids): its time, sender and text, as
    a 63-bit hash, so that two such messages are one only when all three are alike (a chat exported twice)."""
    key = msgspec.json.encode((m.ts, m.sender_id, m.kind, m.media, m.text))
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


def _drop_reason(m: Message) -> str:
    if m.forwarded and m.kind != "service":
        return "forwarded"
    return m.kind if m.kind in ("service", "media", "unsupported", "bot") else "empty"


def collect(items: Iterable[Chat | Message], cfg: PrepareConfig, spool: IO[bytes], shifted: bool = False) -> Census:
    """First pass: stream the export, spool each session with at least two turns as a JSON line. `shifted`: the
    export writes v1.4.8-v2.7.1 shifted ids, which `--chat` may name as the file shows them.

    The loop runs once per message of the export, so what it needs is held in local names."""
    census = Census()
    seen = SeenIds()
    names = census.names
    dropped = census.dropped
    encode = msgspec.json.Encoder().encode
    gap = cfg.session_gap * 60
    plain = not cfg.redact  # a text message's text is its stripped text
    skipping = True
    senders: Counter[str] = Counter()
    chat = 0
    turns: list[list[Any]] = []  # [sender_id, [texts]]
    first_id = start = last = chars = 0
    speaker = None  # the sender of the last turn
    ids: array[int] | None = None  # the chat's message ids so far, in order
    top = _BELOW  # the last of them

    def flush() -> None:
        if len(turns) >= 2:
            census.spooled[chat] += 1
            spool.write(encode([len(census.chats) - 1, first_id, start, last, turns]) + b"\n")
        elif turns:  # counted in messages, as every reason is
            dropped["single-speaker session"] += len(turns[0][1])
        turns.clear()

    for item in items:
        if isinstance(item, Chat):
            flush()
            speaker = None
            census.chats.append(item)
            senders = Counter()
            census.senders.append(senders)
            chat = item.id
            ids = seen.ordered(chat)
            top = ids[-1] if ids else _BELOW
            reason = exclusion(item, cfg, census, shifted)
            skipping = reason is not None
            if skipping:
                census.excluded_chats[reason or ""] += 1
            continue
        if skipping:
            dropped["excluded chat"] += 1
            continue
        mid = item.id or content_id(item)
        if ids is not None and top < mid < _ID_LIMIT:  # the common case: the next message of the chat
            ids.append(mid)
            top = mid
        elif seen.add(chat, mid):
            ids = seen.ordered(chat)
            top = ids[-1] if ids else _BELOW
        else:
            dropped["duplicate"] += 1  # a chat exported twice, or a message written twice
            continue
        if plain and item.kind == "text" and not item.forwarded:
            text = item.text.strip() or None
        else:
            text = message_text(item, cfg)
        if text is None:
            dropped[_drop_reason(item)] += 1
            continue
        sid = item.sender_id
        senders[sid] += 1
        if item.sender_name is not None or sid not in names:
            names[sid] = item.sender_name
        # total seconds between messages: a gap of a day and two minutes is a day, not two minutes
        if turns and item.ts - last > gap:
            flush()
            speaker = None
        elif turns and chars + len(text) > SESSION_CHARS:
            census.split[chat] += 1
            flush()
            speaker = None
        if not turns:
            first_id, start, chars = mid, item.ts, 0
        chars += len(text)
        if sid == speaker:
            turns[-1][1].append(text)
        else:
            turns.append([sid, [text]])
            speaker = sid
        last = item.ts
    flush()
    return census


def _candidates(census: Census) -> str:
    counts = sum(census.senders, Counter())
    return "; ".join(f"{sid} {census.names.get(sid) or 'Deleted Account'} ({n} messages)"
                     for sid, n in counts.most_common(10)) or "no senders found"


def sender_id(value: str, census: Census, shifted: bool) -> str | None:
    """The id of the sender that `value` names: an id ("user123", or 123, or an old export's shifted number) or a
    name; None when nobody in the export is that."""
    found = next((f for f in telegram_ids.sender_ids(value, shifted) if f in census.names), None)
    if found is None:
        named = [sid for sid, name in census.names.items() if name and name.casefold() == value.casefold()]
        found = named[0] if len(named) == 1 else None
    return found


def resolve_owner(header: Header, census: Census, cfg: PrepareConfig) -> str | None:
    """The owner's id by the rules of the export format; `--me` overrides (and must name someone in the export)."""
    if cfg.me:
        me = sender_id(cfg.me, census, header.shifted)
        if me is None and header.owner_id and header.owner_id in telegram_ids.sender_ids(cfg.me, False):
            return header.owner_id  # the account owner, whose messages may all have been left out
        if me is None:
            raise ConfigError(f"me {cfg.me!r} is not a speaker in this export; one of: {_candidates(census)}")
        return me
    if header.owner_id:
        return header.owner_id
    saved = next((c for c in census.chats if c.type == "saved_messages"), None)
    if saved is not None:  # Saved Messages: its id is the owner's
        return telegram_ids.speaker(saved.id)
    personal = [(c, s) for c, s in zip(census.chats, census.senders, strict=True)
                if c.type in ("personal_chat", "bot_chat") and s]
    if header.one_chat and personal:
        chat, senders = personal[0]
        peer = telegram_ids.speaker(chat.id)  # a personal chat's id is the other person's
        if peer not in senders:  # the chat's name is the peer's (first) name
            named = [sid for sid in senders if _is_named(census.names.get(sid), chat.name)]
            peer = named[0] if len(named) == 1 else ""
        others = [sid for sid in senders if sid != peer]
        if len(senders) >= 2 and (not peer or len(others) != 1):
            raise ConfigError(f"cannot tell which of the people of this personal chat is you; set me to your id or "
                              f"name, one of: {_candidates(census)}")
        return others[0] if others else None
    if not header.one_chat and personal:
        common = set.intersection(*(set(s) for _, s in personal))
        if len(common) == 1:
            return common.pop()
    if header.one_chat:
        raise ConfigError(f"cannot tell which member is you in a group export; set me to your id or name, one of: "
                          f"{_candidates(census)}")
    return None


def _is_named(name: str | None, chat_name: str | None) -> bool:
    if not name or not chat_name:
        return False
    return name.casefold() == chat_name.casefold() or name.split()[0].casefold() == chat_name.casefold()


def unique_labels(names: dict[str, str | None], activity: Counter[str]) -> dict[str, str]:
    """Display name per id; when ids share a name, the less active ones get "Name (2)", "(3)"…"""
    by_name: dict[str, list[str]] = defaultdict(list)
    for sid in sorted(names, key=lambda s: (-activity[s], s)):
        by_name[names[sid] or "Deleted Account"].append(sid)
    labels: dict[str, str] = {}
    taken = set(by_name)
    for name, ids in by_name.items():
        labels[ids[0]] = name
        for n, sid in enumerate(ids[1:], 2):
            label = f"{name} ({n})"
            while label in taken:
                n += 1
                label = f"{name} ({n})"
            taken.add(label)
            labels[sid] = label
    return labels


def trained_ids(cfg: PrepareConfig, owner: str | None, labels: dict[str, str], shifted: bool = False
                ) -> set[str] | None:
    """Ids whose turns are targets (None: everyone). Unknown names are an error with suggestions."""
    if "all" in cfg.train_on:
        return None
    chosen: set[str] = set()
    by_label = {label.casefold(): sid for sid, label in labels.items()}
    for value in cfg.train_on:
        if value == "me":
            if owner is None:
                raise ConfigError("train_on me needs to know who you are; set me to your id")
            chosen.add(owner)
        elif (found := next((f for f in telegram_ids.sender_ids(value, shifted) if f in labels), None)) is not None:
            chosen.add(found)
        elif value.casefold() in by_label:
            chosen.add(by_label[value.casefold()])
        else:
            close = difflib.get_close_matches(value, labels.values(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"train_on {value!r} is not a speaker in this export{hint}")
    return chosen


def same_people(census: Census, pairs: Iterable[str]) -> dict[str, str]:
    """{id: the id of the person it is}, and `census` told so: a person whose only id is their name (WhatsApp,
    Messenger, JSONL) is the one person of another export who has that exact name; `pairs` ("NAME=OTHER NAME", ids
    or names) join people whose names differ. Pairs chain, in any order: "A=B" and "C=B" make A, B and C one person.
    The person keeps the id of an export that has ids (Telegram's), else of the name with the most messages.

    `ConfigError` for a name that is nobody, or several people, and for a pair that would join two people of one
    conversation: you and the other person of a personal chat, or two people who write in one chat."""
    by_name: dict[str, list[str]] = defaultdict(list)
    for sid, name in census.names.items():
        if name:
            by_name[name.casefold()].append(sid)
    groups: dict[str, set[str]] = {}  # id -> the set of ids of one person, shared by all of them

    def join(a: str, b: str) -> None:
        first, second = groups.setdefault(a, {a}), groups.setdefault(b, {b})
        if first is not second:
            big, small = (first, second) if len(first) >= len(second) else (second, first)
            big |= small
            for sid in small:
                groups[sid] = big

    for sid in list(census.names):
        if sid.startswith("name:"):
            others = [o for o in by_name[sid[5:].casefold()] if not o.startswith("name:")]
            if len(others) == 1:
                join(others[0], sid)
    roles = _roles(census)
    for pair in pairs:
        first, _, second = pair.partition("=")
        a, b = (groups.setdefault(sid, {sid}) for sid in (_person(v.strip(), census, groups) for v in (first, second)))
        if a is not b:
            _check_join(pair, a, b, census, roles)
            join(next(iter(a)), next(iter(b)))
    activity: Counter[str] = Counter()
    for senders in census.senders:
        activity.update(senders)
    same: dict[str, str] = {}
    for group in {id(g): g for g in groups.values() if len(g) > 1}.values():
        ranked = sorted(group, key=lambda s: (s.startswith("name:"), -activity[s], s))
        keep = ranked[0]
        census.names[keep] = next((n for n in (census.names.get(s) for s in ranked) if n), None)
        for sid in ranked[1:]:
            same[sid] = keep
            census.names.pop(sid, None)
            for senders in census.senders:
                if sid in senders:
                    senders[keep] += senders.pop(sid)
    return same


def _person(value: str, census: Census, groups: dict[str, set[str]]) -> str:
    """An id of the person `value` names (an id or a name, of any of their ids); `ConfigError` unless one person."""
    found = sender_id(value, census, False)
    if found is not None:
        return found
    named = [sid for sid, name in census.names.items() if name and name.casefold() == value.casefold()]
    people = {min(groups.get(sid, {sid})): sid for sid in named}  # one id per person
    if not people:
        raise ConfigError(f"same_person {value!r} is not a speaker in any export; one of: {_candidates(census)}")
    if len(people) > 1:
        raise ConfigError(f"same_person {value!r} is the name of {len(people)} people ({', '.join(sorted(named))}); "
                          "give an id instead")
    return next(iter(people.values()))


def _roles(census: Census) -> tuple[dict[str, str], dict[str, str]]:
    """({id: a personal chat where they are the export's owner}, {id: a personal chat where they are its other
    person}); someone found in both roles is in neither."""
    yours: dict[str, str] = {}
    peers: dict[str, str] = {}
    for chat, senders in zip(census.chats, census.senders, strict=True):
        if chat.type != "personal_chat" or not senders:
            continue
        peer = telegram_ids.speaker(chat.id)
        if peer not in senders:  # the chat's name is the peer's (first) name
            named = [sid for sid in senders if _is_named(census.names.get(sid), chat.name)]
            peer = named[0] if len(named) == 1 else ""
        if peer:
            peers.setdefault(peer, chat.name or str(chat.id))
            for sid in senders:
                if sid != peer:
                    yours.setdefault(sid, chat.name or str(chat.id))
    both = yours.keys() & peers.keys()
    return ({s: c for s, c in yours.items() if s not in both}, {s: c for s, c in peers.items() if s not in both})


def _check_join(pair: str, a: set[str], b: set[str], census: Census, roles: tuple[dict[str, str], dict[str, str]]
                ) -> None:
    """Refuse to make one person of two who talk to each other (issue 31: the owner took a contact's id)."""
    yours, peers = roles

    def name(sid: str) -> str:
        return census.names.get(sid) or sid

    for mine, theirs in ((a, b), (b, a)):
        you = next((s for s in sorted(mine) if s in yours), None)
        peer = next((s for s in sorted(theirs) if s in peers), None)
        if you is not None and peer is not None:
            raise ConfigError(f"same_person {pair!r} joins you ({name(you)}) with {name(peer)}, the other person of "
                              f"the personal chat {peers[peer]!r}; it joins one person's names in different exports")
    for chat, senders in zip(census.chats, census.senders, strict=True):
        one = min((s for s in senders if s in a), default=None)
        other = min((s for s in senders if s in b), default=None)
        if one is not None and other is not None:
            raise ConfigError(f"same_person {pair!r} joins {name(one)} and {name(other)}, two people who write in the "
                              f"chat {chat.name or str(chat.id)!r}")


def sessions(spool: Iterable[bytes], census: Census, labels: dict[str, str],
             trained: set[str] | None, rename: Callable[[str], str],
             same: dict[str, str] | None = None) -> Iterator[Session]:
    """Sessions from the spool that satisfy the minimum-context rule, in file order; ids of `same` people joined."""
    same = same or {}
    decode = msgspec.json.Decoder().decode
    plain = not same and rename is same_text
    for line in spool:
        chat_index, first_id, start, end, raw_turns = decode(line)
        if plain:
            turns = tuple(Turn(labels[sid], sid, tuple(texts), trained is None or sid in trained)
                          for sid, texts in raw_turns)
        else:
            turns = tuple(Turn(labels[same.get(sid, sid)], same.get(sid, sid), tuple(rename(t) for t in texts),
                               trained is None or same.get(sid, sid) in trained) for sid, texts in raw_turns)
        if trained is not None and not any(t.train for t in turns[1:]):
            continue  # a reply needs context: some trained turn must follow another turn
        chat = census.chats[chat_index]
        name = chat.name if chat.type != "personal_chat" else labels.get(telegram_ids.speaker(chat.id), chat.name)
        if chat.type == "saved_messages":
            name = name or "Saved Messages"
        yield Session(f"{chat.id}:{first_id}", ChatRef(chat.id, rename(name or ""), chat.type), start, end, turns)


def same_text(text: str) -> str:
    """The `rename` of a dataset without pseudonyms."""
    return text


def eval_counts(per_chat: Counter[int], fraction: float) -> dict[int, int]:
    """How many of each chat's newest sessions go to eval (rounded half up)."""
    return {chat: int(n * fraction + 0.5) for chat, n in per_chat.items()}
