import pytest

from doppel.preparing.privacy import aliases, name_replacer, redact


@pytest.mark.parametrize(("text", "expected"), [
    ("mail me at max.orlov+tg@example.co.uk!", "mail me at [email]!"),
    ("card 4111 1111 1111 1111 ok", "card [card] ok"),
    ("card 4111 1111 1111 1112 ok", "card 4111 1111 1111 1112 ok"),  # fails Luhn, too long for a phone
    ("call +44 7700 900123 now", "call [phone] now"),
    ("call +7 (912) 345-67-89", "call [phone]"),
    ("звони 89123456789", "звони [phone]"),
    ("at 18:30 on 2024-07-18, room 1234", "at 18:30 on 2024-07-18, room 1234"),
    ("no digits here", "no digits here"),
])
def test_redact_free_text(text, expected):
    assert redact(text) == expected


def test_redact_typed_entities_first():
    assert redact("ring 555-0199 or x@y.z", [("phone", "555-0199"), ("email", "x@y.z")]) == \
        "ring [phone] or [email]"


def test_pseudonyms_are_consistent():
    alias = aliases(["user1", "user2"])
    assert alias == {"user1": "Person 1", "user2": "Person 2"}
    replace = name_replacer({"Max Orlov": "Person 2", "Lena Volkova": "Person 1"})
    assert replace("Max Orlov said Max and Lena, not Maxim") == \
        "Person 2 said Person 2 and Person 1, not Maxim"
