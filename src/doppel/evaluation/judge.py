"""The authorship judge, and bootstrap intervals over held-out sessions.

The judge is stylometry's standard test: a linear classifier over character n-grams (1–4, case kept, within
word boundaries: smileys, bracket runs, punctuation habits) and word n-grams (1–2), TF-IDF weighted, trained on
the *training* split's real turns of every trained speaker with enough of them. It answers, for a turn, which of
those people wrote it. Its accuracy on the real held-out turns is the ceiling (how distinguishable the people are
at all); the share of a model's generated turns it gives to the intended speaker says whether the model writes as
that person rather than as someone else. It reads surface features only, so it can be fooled by them: the
held-out loss stays the primary measure.

Every per-speaker figure gets a 95% bootstrap interval: held-out sessions are drawn with replacement
(`RESAMPLES` times, seeded) and the figure is computed again on each draw.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from doppel.records import Session

MIN_TURNS = 20  # a speaker the judge knows has at least this many training turns
MAX_TURNS = 3000  # per speaker, the judge trains on at most this many (a deterministic sample)
RESAMPLES = 1000


def turn_text(messages: Sequence[str]) -> str:
    return "\n".join(messages)


class Judge:
    """Who wrote a turn, among the speakers it was trained on (`speakers`)."""

    def __init__(self, pipeline: Any, speakers: list[str]) -> None:
        self.pipeline, self.speakers = pipeline, speakers

    @classmethod
    def train(cls, sessions: Iterable[Session], min_turns: int = MIN_TURNS, seed: int = 0) -> Judge | None:
        """A judge of the trained speakers with at least `min_turns` turns in `sessions`; None when fewer than two
        speakers have that many (there is nobody to tell apart)."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline, make_union

        turns: dict[str, list[str]] = {}
        for session in sessions:
            for turn in session.turns:
                if turn.train:
                    turns.setdefault(turn.speaker, []).append(turn_text(turn.messages))
        known = sorted(s for s, texts in turns.items() if len(texts) >= min_turns)
        if len(known) < 2:
            return None
        rng = random.Random(seed)
        texts, labels = [], []
        for speaker in known:
            chosen = turns[speaker] if len(turns[speaker]) <= MAX_TURNS else rng.sample(turns[speaker], MAX_TURNS)
            texts += chosen
            labels += [speaker] * len(chosen)
        features = make_union(
            TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), lowercase=False, sublinear_tf=True, min_df=2),
            TfidfVectorizer(analyzer="word", ngram_range=(1, 2), lowercase=False, sublinear_tf=True,
                            token_pattern=r"\w+|[^\w\s]+"))
        pipeline = make_pipeline(features, LogisticRegression(C=10.0, max_iter=2000, class_weight="balanced"))
        pipeline.fit(texts, labels)
        return cls(pipeline, known)

    def attribute(self, turns: Sequence[Sequence[str]]) -> list[str]:
        """The speaker the judge gives each turn to."""
        if not turns:
            return []
        return [str(s) for s in self.pipeline.predict([turn_text(t) for t in turns])]


def accuracy(judge: Judge, speaker: str, turns: Sequence[Sequence[str]]) -> tuple[int, int]:
    """(turns attributed to `speaker`, turns)."""
    return sum(1 for who in judge.attribute(turns) if who == speaker), len(turns)


def confusion(judge: Judge, by_speaker: dict[str, list[Sequence[str]]]) -> dict[str, dict[str, int]]:
    """{intended speaker: {attributed speaker: turns}} for the speakers the judge knows."""
    return {speaker: dict(Counter(judge.attribute(turns)).most_common())
            for speaker, turns in by_speaker.items() if speaker in judge.speakers and turns}


def interval(groups: Sequence[Any], statistic: Callable[[list[Any]], float | None], seed: int = 0,
             resamples: int = RESAMPLES) -> list[float] | None:
    """The 95% bootstrap interval [low, high] of `statistic` over `groups` (one per held-out session) drawn with
    replacement; None when there is nothing to draw or the statistic is undefined on every draw."""
    if not groups:
        return None
    rng = random.Random(seed)
    values = sorted(v for v in (statistic(rng.choices(list(groups), k=len(groups))) for _ in range(resamples))
                    if v is not None)
    if not values:
        return None
    low, high = values[int(0.025 * (len(values) - 1))], values[round(0.975 * (len(values) - 1))]
    return [round(low, 4), round(high, 4)]


def within_noise(difference: list[float] | None) -> bool:
    """True when the interval of a difference (tuned minus base, on the same draws) holds 0, or there is none."""
    return difference is None or difference[0] <= 0 <= difference[1]
