"""What an app writes as a message's text where nobody wrote one: Messenger's and Instagram's notices, and a shared
location's maps link.

Meta's export writes a photo, a reaction, a poll or a call as a message whose `content` is a sentence about it
("Max Orlov sent an attachment.", "Reacted ❤ to your message", "Max Orlov voted for "Friday" in the poll."), in the
account's language. Such a sentence is never what someone typed: `meta_notice` tells which it is (media or a
service message), after the mojibake is repaired. A sentence about a person is one only when it begins with the name
of someone in the conversation, or "You" in the export's language, so that "i sent an attachment to your email" is
kept as the message it is. The wordings are English; the attachment notices also German, French and Spanish
(German as seen in a real export, the others as other projects filter them). A notice in another language is kept
as text: add its wording here.

A location shared in Messenger, or pasted into Discord, is a maps link and nothing else: `is_location` tells such a
link, and both readers drop it as media "location", as Telegram's reader drops its `location_information`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Literal
from urllib.parse import unquote

_YOU = frozenset({"You", "Du", "Vous", "Tú", "Tu"})  # as a sentence starts: "you sent …" is typed
_QUOTED = r"[\"“„«'‘].{0,300}?[\"”“»'’]"

# (kind, what, sentence after the subject): each a whole message, the subject a person's name or "You"
_ABOUT_SOMEONE: list[tuple[Literal["media", "service"], str, str]] = [
    ("media", "attachment", r"sent an attachment\.?"),
    ("media", "attachment", r"sent (?:a|an) (?:photo|video|voice message|audio clip|audio|GIF|sticker|file|link)\.?"),
    ("media", "attachment", r"sent \d+ (?:photos|videos|files|GIFs|attachments)\.?"),
    ("media", "share", r"shared (?:a|an) (?:link|post|story|reel|video|photo|profile)\.?"),
    ("media", "location", r"(?:sent|shared) (?:a |an |their |his |her |your )?(?:live )?location\.?"),
    ("media", "attachment", r"(?:hat|hast) einen Anhang gesendet\.?"),  # German
    ("media", "attachment", r"(?:a|avez) envoyé (?:une pièce jointe|une photo|une vidéo|un message vocal"
                            r"|un autocollant|un GIF)\.?"),  # French
    ("media", "attachment", r"(?:envió|enviaste) un archivo adjunto\.?"),  # Spanish
    ("service", "reaction", r"reacted .{1,16}? to (?:your|a|their|his|her) message ?\.?"),
    ("service", "reaction", r"liked (?:a|your) message ?\.?"),
    ("service", "poll", r"created a poll: .+"),
    ("service", "poll", rf"voted for {_QUOTED}(?: and \d+ other options?)? in the poll\.?"),
    ("service", "poll", rf"changed (?:their|his|her|your) vote to {_QUOTED} in the poll\.?"),
    ("service", "poll", rf"removed (?:their|his|her|your) vote for {_QUOTED} in the poll\.?"),
    ("service", "poll", rf"(?:added|removed) (?:the option )?{_QUOTED} (?:to|from) the poll\.?"),
    ("service", "call", r"started (?:a|an) (?:video chat|call|video call|audio call|voice call)\.?"),
    ("service", "call", r"joined the (?:video chat|call|video call|audio call)\.?"),
    ("service", "call", r"missed (?:your|a) (?:video |audio |voice )?(?:call|chat)(?: (?:from|with) .{1,80})?\.?"
                        r"|called you\."),
    ("service", "group", r"changed the group photo\.?|removed the group photo\.?|named the group .{1,200}"
                         r"|removed the group name\.?|changed the group name to .{1,200}"),
    ("service", "group", r"set the nickname for .{1,80} to .{1,200}|set (?:your|their|his|her) (?:own )?nickname to "
                         r".{1,200}|cleared (?:the|your|their|his|her) (?:own )?nickname(?: for .{1,80})?\.?"),
    ("service", "group", r"added .{1,200} to the group\.?|removed .{1,200} from the group\.?|left the group\.?"
                         r"|joined the group(?: by link)?\.?"),
    ("service", "group", r"changed the (?:chat )?theme(?: to .{1,80})?\.?|set the (?:quick reaction|emoji) to "
                         r".{1,16}|pinned a message\.?|waved (?:at you|hello to the group)!?"),
    ("service", "group", r"turned (?:on|off) member approval.{0,120}"),
    ("service", "plan", r"started a plan\.|named the plan .{1,200}|updated the plan to .{1,200}"
                        r"|deleted the plan .{1,300}"),
    ("service", "unsent", r"unsent a message\.?"),
]
# sentences without a subject (Instagram's, and the end of a call)
_ABOUT_NOBODY: list[tuple[Literal["media", "service"], str, str]] = [
    ("media", "attachment", r"(?:Sent an attachment|Enviaste un archivo adjunto)\.?"),
    ("service", "reaction", r"Reacted .{1,16}? to (?:your|a) message ?\.?|Liked a message ?\.?"),
    ("service", "call", r"The (?:video chat|call|video call|audio call) (?:has )?ended\.?"),
    ("service", "group", r"You are now connected on Messenger\.?|You can now message and call each other.{0,200}"),
]


def _compile(table: list[tuple[Literal["media", "service"], str, str]]) -> re.Pattern[str]:
    """One pattern of all the sentences, each its own group `n<index>` (the sentences capture nothing)."""
    return re.compile("|".join(f"(?P<n{i}>{sentence})" for i, (_, _, sentence) in enumerate(table)), re.DOTALL)


_SOMEONE = _compile(_ABOUT_SOMEONE)
_WORDS = 6  # the most words of a name a notice is looked up by
_NOBODY = _compile(_ABOUT_NOBODY)
_FIRST = frozenset({"Sent", "Enviaste", "Reacted", "Liked", "The", "You"})  # the first words of `_ABOUT_NOBODY`


def subjects(people: Iterable[str]) -> frozenset[str]:
    """Who a notice can be about: each of `people` by their name and their first name, and "You"."""
    names = [p for p in people if p]
    return frozenset(names) | {p.split(" ", 1)[0] for p in names} | _YOU


def meta_notice(text: str, about: Collection[str], sender: str | None = None
                ) -> tuple[Literal["media", "service"], str] | None:
    """The kind and what of a Messenger or Instagram notice (None: `text` is a message someone wrote). The
    subject of a sentence about someone is the sender or one of `about` (`subjects`), of at most six words. It is
    looked up at each space of the text's start rather than matched by the pattern: a pattern would try every
    length of name against every sentence, several times slower on a conversation's ordinary messages."""
    space = text.find(" ")
    first = text[:space]  # every notice starts with a word that its subject or its sentence starts with
    if space < 0 or len(text) > 600 or (first not in _FIRST and first not in about
                                        and not (sender and sender.startswith(first))):
        return None
    found = _NOBODY.fullmatch(text)
    table = _ABOUT_NOBODY
    words = 1
    while found is None and 0 < space <= 80 and words <= _WORDS:
        who = text[:space]
        if who in about or who == sender:
            found = _SOMEONE.fullmatch(text, space + 1)
            table = _ABOUT_SOMEONE
        space, words = text.find(" ", space + 1), words + 1
    if found is None:
        return None
    kind, what, _ = table[int(str(found.lastgroup)[1:])]
    return kind, what


_MAPS = re.compile(
    r"\s*<?(?:https?://)?(?:l\.facebook\.com/l\.php\?u=https?://)?(?:www\.)?"
    r"(?:maps\.google\.[a-z.]{2,6}/|google\.[a-z.]{2,6}/maps|goo\.gl/maps/|maps\.app\.goo\.gl/|maps\.apple\.com/"
    r"|bing\.com/maps|openstreetmap\.org/|yandex\.[a-z]{2,4}/maps|waze\.com/(?:ul|live-map))\S*?>?\s*",
    re.IGNORECASE)


def is_location(text: str) -> bool:
    """Whether `text` is only a maps link (Google, Apple, Bing, OpenStreetMap, Yandex, Waze; also as Facebook's
    redirect to one): a shared location. A link in capitals is not looked at: apps write them in small letters."""
    return len(text) < 4096 and ("map" in text or "waze" in text) and _MAPS.fullmatch(unquote(text)) is not None
