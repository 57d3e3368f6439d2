"""The ``local`` backend: generation through effilm's own engine, behind a small protocol.

:func:`load_generator` opens a model directory with the engine (``effilm.inference.engine``,
imported when the backend runs). Any object with a matching ``generate`` method (tests use a plain
Python class) drives the backend.
"""

from __future__ import annotations

from typing import Protocol

from effilm.errors import EffilmError
from effilm.synth.prompts import Job
from effilm.synth.recipe import Recipe
from effilm.synth.records import make_record


class Generator(Protocol):
    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int) -> list[str]: ...


def load_generator(checkpoint: str) -> Generator:
    """The engine's generator for the model directory ``checkpoint``."""
    if not checkpoint:
        raise EffilmError("the local backend needs [local] checkpoint = 'DIR' in the recipe")
    from effilm.inference.engine import load_generator as engine_generator

    return engine_generator(checkpoint)


class LocalBackend:
    def __init__(self, recipe: Recipe, generator: Generator):
        self.recipe, self.gen = recipe, generator

    def run(self, jobs: list[Job]) -> list[dict]:
        s, bs = self.recipe.sampling, self.recipe.local.batch_size
        records = []
        for start in range(0, len(jobs), bs):
            batch = jobs[start:start + bs]
            # one seed per batch, derived from its first job: the same batch always samples the same
            texts = self.gen.generate([j.prompt for j in batch], s.max_tokens, s.temperature, s.top_p, batch[0].seed)
            if len(texts) != len(batch) or not all(isinstance(t, str) for t in texts):
                raise EffilmError(f"local generator returned {len(texts)} items for {len(batch)} prompts")
            for j, text in zip(batch, texts, strict=True):
                records.append(make_record(
                    j.id, text, backend="local", model=self.recipe.local.checkpoint, prompt=j.prompt,
                    topic=j.topic, audience=j.audience, style=j.style, kind=j.kind,
                    injected_words=list(j.words), seed=batch[0].seed,
                    sampling={"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens},
                    extra={"topic_id": j.topic_id}))
        return records
