"""Preference tuning: the twin taught by its own wrong turns and the owner's corrections (docs/preference.md)."""
