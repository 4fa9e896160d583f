"""What WhatsApp writes as a message's text where nobody wrote one, in the languages of the phones that export it:
media placeholders, deleted messages, missed calls, shared locations and the chat's own notices.

`classify` tells a message's body: media (a placeholder, with its caption when one follows on the next lines),
deleted, a call, a location or a system notice, or None for what someone wrote. The wordings are those seen in real
exports (English, German, French, Spanish, Portuguese, Italian, Dutch, Russian, Czech, Japanese); an iOS placeholder
starts with U+200E, which the reader has removed, and may follow a file's name ("Some file.txt document omitted").

The check runs once per message, so the common case (a typed text) is told by a few cheap tests before any
pattern: a body's last word is looked up in a set, and only the few bodies that end like a placeholder are matched.
"""

from __future__ import annotations

import re
from typing import Literal

from doppel.readers.notices import is_location

Kind = Literal["media", "service", "empty", "text"]

# iOS: "image omitted", "Some file.txt document omitted", in each language: the noun, then the verb
_NOUNS = ("image|video|audio|sticker|GIF|document|Contact card|"
          "Bild|Video|Audio|Sticker|Dokument|Kontaktkarte|"
          "vidéo|autocollant|carte de contact|"
          "imagen|vídeo|documento|tarjeta de contacto|"
          "imagem|áudio|figurinha|cartão de contato|"
          "immagine|scheda contatto|"
          "afbeelding|contactkaart|"
          "изображение|видео|аудио|стикер|документ|карточка контакта|"
          "obrázek|zvuk|nálepka|dokument")
_VERBS = ("omitted|weggelassen|absente?|manquante?|omise?|omitid[oa]|ocultad[oa]|omess[oa]|weggelaten|"
          "отсутствует|vynechán[oa]?")
_LAST_WORDS = tuple({"omitted", "weggelassen", "absent", "absente", "manquant", "manquante", "omis", "omise",
                         "omitido", "omitida", "ocultado", "ocultada", "omesso", "omessa", "weggelaten", "отсутствует",
                         "vynechán", "vynechána", "vynecháno"})
_OMITTED = re.compile(rf"(?:.{{1,255}} )?(?:{_NOUNS}) (?:{_VERBS})", re.I)
# Android "IMG-20240101-WA0001.jpg (file attached)", in each language
_ATTACHED = re.compile(r".{1,255} \((?:file attached|Datei angehängt|fichier joint|archivo adjunto|arquivo anexado|"
                       r"file allegato|bestand bijgevoegd|файл прикреплён|файл прикреплен|soubor připojen|"
                       r"ファイル添付)\)", re.I)
# "<Media omitted>" and its translations; "<attached: 00000046-PHOTO.jpg>", "<adjunto: …opus>", after a file's name
# or not; old iOS "file.jpg <attached>" and "< attached: … >"
_MARKER = re.compile(r"<[^<>]{1,40}>|(?:.{1,255} )?< ?[^<>:]{1,24} ?: [^<>]{1,255}>|.{1,255} <attached>", re.I)
_ENDS = frozenset({">", ")"})  # how a placeholder of a marker or an attached file ends
_VIEW_ONCE = "null"  # Android: a photo or video that could be viewed once
_CALL = (
    r"(?:Missed (?:group )?(?:voice|video) call|Zmeškaný (?:videohovor|hovor)|Пропущенный (?:аудиозвонок|видеозвонок)|"
    r"Verpasster (?:Sprachanruf|Videoanruf)|Appel (?:vocal|vidéo) manqué|(?:Videollamada|Llamada(?: de voz)?) perdida|"
    r"Chamada (?:de voz|de vídeo) perdida|(?:Chiamata vocale|Videochiamata) persa|Gemiste (?:spraak|video-)oproep)"
    r"(?:, .{1,60})?")
_DELETED = (
    r"(?:this message was deleted|this message has been deleted|you deleted this message|это сообщение удалено|"
    r"данное сообщение удалено|вы удалили это сообщение|tato zpráva byla odstraněna|odstranili jste tuto zprávu|"
    r"diese nachricht wurde gelöscht|du hast diese nachricht gelöscht|ce message a été supprimé|"
    r"vous avez supprimé ce message|se eliminó este mensaje|eliminaste este mensaje|este mensaje fue eliminado|"
    r"esta mensagem foi apagada|você apagou esta mensagem|questo messaggio è stato eliminato|"
    r"hai eliminato questo messaggio|dit bericht is verwijderd|je hebt dit bericht verwijderd|"
    r"waiting for this message(?:\. this may take a while)?|esperando este mensaje(?:\. esto puede tomar tiempo)?|"
    r"warte auf diese nachricht(?:\. dies kann etwas dauern)?)\.?")
_LOCATION = (
    r"(?:location|Standort|ubicación|localização|localisation|posizione|locatie|местоположение|poloha): "
    r"https?://\S+|(?:live location shared|Live-Standort geteilt|position en direct partagée|"
    r"ubicación en tiempo real compartida|localização em tempo real compartilhada|posizione in tempo reale condivisa)")
# one pattern for the three, each its group; tried only on a body whose first two letters begin one of them
_FIXED = re.compile(f"(?P<empty>{_DELETED})|(?P<call>{_CALL})|(?P<location>{_LOCATION})", re.I)
# the first four letters of each of those, of the end-to-end notices and of a link, in lower case and capitalised: a
# body that begins otherwise is none of them, told by one look-up
_HEADS = frozenset(h for head in {
    "this", "you ", "это ", "данн", "вы у", "tato", "odst", "dies", "du h", "ce m", "vous", "se e", "elim", "este",
    "esta", "voc\u00ea", "ques", "hai ", "dit ", "je h", "wait", "espe", "wart", "miss", "zme\u0161", "проп",
    "verp", "appe", "vide", "llam", "cham", "chia", "gemi", "loca", "stan", "ubic", "posi", "мест", "polo", "live",
    "mess", "nach", "les ", "los ", "as m", "i me", "beri", "сооб", "zpr\u00e1", "http", "<htt"}
    for h in (head, head.capitalize()))
# the notices iOS writes under a person's name in a personal chat, and the end-to-end notice that some exports write
# under a group's name without U+200E
_NOTICE = re.compile(
    r"(?:Messages and calls are end-to-end encrypted|Messages to this (?:group|chat) are now secured with end-to-end|"
    r"Nachrichten und Anrufe sind Ende-zu-Ende-verschlüsselt|Les messages et les appels sont chiffrés de bout en bout|"
    r"Los mensajes y las llamadas están cifrados de extremo a extremo|"
    r"As mensagens e as chamadas são protegidas com a criptografia de ponta a ponta|"
    r"I messaggi e le chiamate sono crittografati end-to-end|Berichten en oproepen worden end-to-end versleuteld|"
    r"Сообщения и звонки защищены сквозным шифрованием|Zprávy a hovory jsou koncově šifrované|"
    r"Your security code with .{1,80} changed|.{1,80} changed their phone number|You (?:un)?blocked this contact|"
    r".{1,80} turned (?:on|off) disappearing messages|.{1,80} is a contact|.{1,80} created (?:the )?group)"
    r".{0,400}", re.S)
# the first characters of each end-to-end notice: the survey tells a group's name by them, one set look-up a line
E2E_HEADS = frozenset(("Messages", "Nachrich", "Les mess", "Los mens", "As mensa", "I messag", "Berichte", "Сообщени",
                       "Zprávy a"))
_EDITED = re.compile(r" ?<(?:This message was edited|Diese Nachricht wurde bearbeitet|Ce message a été modifié|"
                     r"Se editó este mensaje\.?|Essa mensagem foi editada|Questo messaggio è stato modificato|"
                     r"Dit bericht is bewerkt|Сообщение изменено)>$")


def is_notice(text: str) -> bool:
    """Whether `text` is one of the chat's notices (the end-to-end notice, a changed security code, …)."""
    return _NOTICE.fullmatch(text) is not None


def is_placeholder(line: str) -> bool:
    """Whether `line` is a media placeholder (told first by how it ends, which a typed text rarely does)."""
    end = line[-1:]
    if end == ">":
        return _MARKER.fullmatch(line) is not None
    if end == ")":
        return _ATTACHED.fullmatch(line) is not None
    return line.endswith(_LAST_WORDS) and _OMITTED.fullmatch(line) is not None


def classify(body: str) -> tuple[Kind, str, str | None]:
    """(kind, the text kept, what it is) of a message's body: media with its caption as text (kind "text" when a
    caption follows the placeholder), a deleted message, a call, a location, a notice, or the text someone wrote."""
    end = body[-1:]
    if "\n" in body:
        first, _, rest = body.partition("\n")
        if is_placeholder(first) or first == _VIEW_ONCE:
            caption = rest.strip()
            return ("text", caption, "media") if caption else ("media", "", "media")
    else:
        if (end in _ENDS or body.endswith(_LAST_WORDS) or body == _VIEW_ONCE) and (
                body == _VIEW_ONCE or is_placeholder(body)):
            return "media", "", "media"
        if body[:4] in _HEADS:
            found = _FIXED.fullmatch(body)
            if found is not None:
                return ("empty", "", None) if found.lastgroup == "empty" else (
                    ("service", "", "call") if found.lastgroup == "call" else ("media", "", "location"))
            if is_location(body):
                return "media", "", "location"
            if is_notice(body):
                return "service", "", "whatsapp_system"
    return "text", _EDITED.sub("", body) if end == ">" else body, None
