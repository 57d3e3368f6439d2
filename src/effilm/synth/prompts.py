"""Prompt jobs for teacher backends: seed topic x audience x style x kind, plus injected words.

Job ``i`` is a pure function of the recipe and ``i``, so any shard can be rebuilt at any time and
a resumed run asks exactly the same questions (and hits the request cache).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from effilm.synth.recipe import Recipe


@dataclass(frozen=True)
class Job:
    index: int
    id: str
    prompt: str
    topic: str
    topic_id: int
    audience: str
    style: str
    kind: str
    words: tuple[str, ...]
    seed: int


def make_job(recipe: Recipe, index: int) -> Job:
    rng = random.Random(f"job:{recipe.seed}:{index}")
    topic_id = index % len(recipe.topics)
    topic = recipe.topics[topic_id]
    aud, sty, kind = rng.choice(recipe.audiences), rng.choice(recipe.styles), rng.choice(recipe.kinds)
    words = tuple(rng.sample(recipe.vocabulary, recipe.inject_words)) if recipe.inject_words else ()
    parts = [kind.instruction.format(topic=topic), aud.instruction, sty.instruction]
    if words:
        parts.append("Use each of these words naturally somewhere in the text: " + ", ".join(words) + ".")
    return Job(index=index, id=f"{recipe.name}-{recipe.seed}-{index:09d}", prompt="\n".join(parts),
               topic=topic, topic_id=topic_id, audience=aud.id, style=sty.id, kind=kind.id, words=words,
               seed=rng.randrange(2**31))
