"""Audience and style templates for procedural prose, plus random word choice.

Each audience and each style has its own sentences (not a single swapped word), so that two
records on the same facts for different readers differ in more than one token. ``Voice`` picks
among them with the record's own ``random.Random``, so output is deterministic given the seed.
"""

from __future__ import annotations

import random

AUDIENCES: dict[str, dict[str, list[str]]] = {
    "children": {
        "intro": [
            "Hello, young explorer! Today we are going to {learn} about {topic}.",
            "Let's have some fun with {topic}. Grab a pencil and {learn} along with me.",
            "Have you ever wondered about {topic}? Let's find out together, step by step.",
        ],
        "outro": [
            "Great job! You now know a little more about {topic}.",
            "Well done! Tell a friend one thing you learned about {topic} today.",
        ],
    },
    "high_school": {
        "intro": [
            "In this section we {learn} {topic}, a topic that often comes up in class tests.",
            "This unit covers {topic}. Read each point carefully and check the worked answers.",
            "Students meeting {topic} for the first time should focus on the key facts below.",
        ],
        "outro": [
            "Review these points before moving on to the next unit on {topic}.",
            "Make a flash card for each fact about {topic} and test yourself tomorrow.",
        ],
    },
    "college": {
        "intro": [
            "We now {learn} {topic} in a more systematic way, stating each result precisely.",
            "This chapter treats {topic}. The emphasis is on exact statements that can be checked.",
            "The following notes summarise {topic}; every claim below can be verified directly.",
        ],
        "outro": [
            "These results about {topic} will be used without comment in later chapters.",
            "The reader should now be able to reproduce each result on {topic} unaided.",
        ],
    },
    "general": {
        "intro": [
            "Here is a short, plain guide to {topic} for the curious reader.",
            "Whether you are travelling, studying or just curious, {topic} is worth knowing.",
            "A quick tour of {topic}, with the essential facts and a few exercises.",
        ],
        "outro": [
            "That covers the essentials of {topic}.",
            "Keep this page handy whenever {topic} comes up.",
        ],
    },
}

STYLES: dict[str, dict[str, list[str]]] = {
    "textbook": {
        "heading": ["Lesson: {Topic}", "Chapter section: {Topic}", "Unit on {topic}"],
        "bridge": ["Next,", "In addition,", "Furthermore,", "Similarly,", "Also,"],
    },
    "conversational": {
        "heading": ["Let's talk about {topic}", "A chat about {topic}", "{Topic}, explained simply"],
        "bridge": ["And here's another one:", "Now,", "Okay, next:", "Here's a good one:", "So,"],
    },
    "notes": {
        "heading": ["Notes: {topic}", "Study notes on {topic}", "Key points: {topic}"],
        "bridge": ["-", "-", "*", "-", "*"],
    },
}

SYNONYMS: dict[str, list[str]] = {
    "learn": ["learn about", "study", "look at", "explore", "review"],
    "remember": ["Remember that", "Keep in mind that", "Note that", "It is worth knowing that"],
    "check": ["Check:", "Verification:", "Let us verify:", "Double-check:"],
    "so": ["So", "Therefore", "Hence", "This means"],
    "answer_is": ["the answer is", "the result is", "we get", "the solution is"],
}

EXERCISE_HEADINGS = ["Exercises", "Practice problems", "Try these yourself", "Review questions"]


def syn(rng: random.Random, key: str) -> str:
    """A random synonym for a concept key."""
    return rng.choice(SYNONYMS[key])


class Voice:
    """Prose helpers for one (audience, style) pair."""

    def __init__(self, rng: random.Random, audience: str, style: str):
        self.rng = rng
        self.audience = audience
        self.style = style
        self._a = AUDIENCES[audience]
        self._s = STYLES[style]

    def heading(self, topic: str) -> str:
        return self.rng.choice(self._s["heading"]).format(topic=topic, Topic=topic[:1].upper() + topic[1:])

    def intro(self, topic: str) -> str:
        return self.rng.choice(self._a["intro"]).format(topic=topic, learn=syn(self.rng, "learn"))

    def outro(self, topic: str) -> str:
        return self.rng.choice(self._a["outro"]).format(topic=topic)

    def bridge(self) -> str:
        return self.rng.choice(self._s["bridge"])

    def join(self, sentences: list[str]) -> str:
        """Join sentences in this style: bullet lines for notes, linked prose otherwise."""
        if self.style == "notes":
            return "\n".join(f"{self.bridge()} {s}" for s in sentences)
        out = []
        for i, s in enumerate(sentences):
            if i and self.rng.random() < 0.4:
                b = self.bridge()
                s = f"{b} {s[:1].lower() + s[1:] if not _keeps_case(s) else s}"
            out.append(s)
        return " ".join(out)

    def wrap(self, topic: str, body: str) -> str:
        return f"{self.heading(topic)}\n\n{self.intro(topic)}\n\n{body}\n\n{self.outro(topic)}"


def _keeps_case(s: str) -> bool:
    """Sentences starting with a proper noun keep their capital after a bridge word."""
    first = s.split(" ", 1)[0]
    return len(first) > 1 and (first[1:].lower() != first[1:] or first[0].isupper() and first.isalpha()
                               and first not in _COMMON_STARTS)


_COMMON_STARTS = {"The", "An", "A", "In", "If", "Its", "It", "This", "There", "One", "We", "You", "Every"}
