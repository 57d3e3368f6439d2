"""Scoring rubrics for ``effilm annotate``: the prompt, the scale and how a score is read back.

A rubric is a TOML file mapping onto :class:`Rubric` (read by the one config reader). The bundled
``rubrics/educational.toml`` is an additive 0-5 educational-value rubric in the manner of
FineWeb-Edu (keep at 3). The ``procedural`` backend needs no prompt: it scores effilm's own
procedural records from what the generator knows (:func:`procedural_score`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from effilm.config.reader import build, option, read_file, tomllib
from effilm.errors import ConfigError, EffilmError

BUNDLED = "educational"


@dataclass
class Rubric:
    """A scoring prompt and its scale."""

    name: str = option("rubric", "Short name stored with every annotation.")
    scale_min: float = option(0, "Lowest score of the scale.")
    scale_max: float = option(5, "Highest score of the scale.")
    threshold: float = option(3, "Suggested keep/drop threshold on the scale.")
    integer: bool = option(True, "Scores must be whole numbers.")
    prompt: str = option("", "The prompt sent to the teacher; {text} stands for the document.")
    score_pattern: str = option(r"(?i)score\s*[:=]\s*(-?\d+(?:\.\d+)?)",
                                "Regular expression whose first group is the score; the last match in the reply counts.")
    max_chars: int = option(3000, "The document is cut to this many characters in the prompt.")

    def __post_init__(self):
        if self.scale_min >= self.scale_max:
            raise ConfigError(f"scale_min ({self.scale_min:g}) must be below scale_max ({self.scale_max:g})")
        if not self.scale_min <= self.threshold <= self.scale_max:
            raise ConfigError(f"threshold={self.threshold:g} is outside the scale {self.scale_min:g}-{self.scale_max:g}")
        if self.max_chars < 1:
            raise ConfigError(f"max_chars={self.max_chars} must be >= 1")
        try:
            pattern = re.compile(self.score_pattern)
        except re.error as exc:
            raise ConfigError(f"score_pattern is not a valid regular expression ({exc})") from None
        if pattern.groups < 1:
            raise ConfigError("score_pattern needs a group capturing the score, e.g. 'Score: (\\d+)'")
        self._re = pattern

    @property
    def scale(self) -> tuple[float, float]:
        return (self.scale_min, self.scale_max)

    def content_hash(self) -> str:
        d = {k: v for k, v in asdict(self).items()}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def render(self, text: str) -> str:
        return self.prompt.replace("{text}", text[: self.max_chars])

    def parse(self, reply: str) -> tuple[float | None, str | None]:
        """``(score, None)`` from a teacher's reply, or ``(None, reason)`` when it holds no valid score."""
        found = self._re.findall(reply or "")
        if not found:
            return None, "no score in the reply"
        raw = found[-1] if isinstance(found[-1], str) else found[-1][0]
        try:
            value = float(raw)
        except ValueError:
            return None, f"score {raw!r} is not a number"
        if not self.scale_min <= value <= self.scale_max:
            return None, f"score {raw} is outside the scale {self.scale_min:g}-{self.scale_max:g}"
        if self.integer and not value.is_integer():
            return None, f"score {raw} is not a whole number"
        return (int(value) if self.integer else value), None


def load_rubric(path: str | Path | None = None, need_prompt: bool = True) -> Rubric:
    """The rubric in ``path`` (TOML), or the bundled educational one when ``path`` is empty."""
    if not path:
        text = resources.files("effilm.synth").joinpath("rubrics", f"{BUNDLED}.toml").read_text(encoding="utf-8")
        where, data = f"{BUNDLED}.toml", tomllib.loads(text)
    else:
        where, data = str(path), read_file(path, "rubric")
    try:
        rubric = build(Rubric, data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if need_prompt and "{text}" not in rubric.prompt:
        raise ConfigError(f"{where}: field 'prompt' must contain {{text}}, where the document goes")
    return rubric


# ----- the procedural backend ----------------------------------------------------------------------
TEXTBOOK_KINDS = ("lesson", "exercises")


def procedural_points(facts: int, noise: int) -> int:
    """The additive 0-5 score of a procedural web record stating ``facts`` facts among ``noise``
    distractor lines: a point for one fact, one for two, one when facts are at least half the
    lines, one for three facts, one when at most a fifth of the lines are noise."""
    share = noise / (noise + facts) if noise + facts else 1.0
    return int(facts >= 1) + int(facts >= 2) + int(facts >= 1 and share <= 0.5) + int(facts >= 3) \
        + int(facts >= 1 and share <= 0.2)


def procedural_score(rec: dict, rubric: Rubric, where: str) -> tuple[float, dict]:
    """The score of an effilm procedural record, on the rubric's scale, and what it rests on.
    Web records: :func:`procedural_points`; textbook records (written to teach): the top score."""
    prov = rec.get("provenance") if isinstance(rec, dict) else None
    if not isinstance(prov, dict) or prov.get("backend") != "procedural":
        raise EffilmError(f"{where}: the procedural backend scores effilm's procedural web and textbook records "
                          "(`effilm synth`); this record has no procedural provenance")  # fmt: skip
    kind = prov.get("kind")
    facts = prov.get("facts") or []
    if kind in TEXTBOOK_KINDS:
        return rubric.scale_max, {"kind": kind, "facts": len(facts)}
    if kind != "web":
        raise EffilmError(f"{where}: the procedural backend scores web and textbook records, not kind {kind!r}")
    if "noise_lines" not in prov:
        raise EffilmError(f"{where}: provenance.noise_lines is missing (a web record from an older effilm); "
                          "regenerate the corpus with `effilm synth`")  # fmt: skip
    pts = procedural_points(len(facts), int(prov["noise_lines"]))
    lo, hi = rubric.scale
    value = lo + pts * (hi - lo) / 5
    value = int(math.floor(value + 0.5)) if rubric.integer else value
    return value, {"kind": kind, "facts": len(facts), "noise_lines": int(prov["noise_lines"]), "points": pts}
