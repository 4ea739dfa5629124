"""The caption grammar of the captioned-shapes dataset: what a caption says (a :class:`CaptionSpec`), its wording
in varied templates, and the parser that reads a caption back into what it says.

A caption states some attributes of the scene and leaves others open ("a red circle" says nothing of size or
place); the adherence metric (:mod:`sdeflow.evaluation.adherence`) scores exactly the attributes stated. Because
the parser reads any prompt in the grammar, the metric scores users' prompts as well as the dataset's own.

Grammar (optional parts in brackets)::

    caption  := [prefix] (object | count | object RELATION object | object ", " object " and " object
                          | object " and " object)
    object   := ("a" | "an" | "one") [size] colour shape [where]
    count    := ("two" | "three") [size] colour shape "s"
    where    := "at the top left" | "in the top left corner" | "in the center" | "on the left" | ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "COLORS",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "CaptionError",
    "CaptionSpec",
    "ObjectSpec",
    "parse_caption",
    "word_caption",
]

# flat colours in [0, 1] RGB, far apart so that a pixel's nearest colour is unambiguous
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 0.8, 0.0),
    "blue": (0.1, 0.2, 1.0),
    "yellow": (1.0, 0.9, 0.0),
    "purple": (0.75, 0.0, 1.0),
    "cyan": (0.0, 0.9, 0.9),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
# cells of a 3×3 grid, row-major: POSITIONS[3·row + col]
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
# "A rel B": A's centre is left of / right of / above / below B's
RELATIONS = ("left of", "right of", "above", "below")
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
PREFIXES = ("", "", "", "a picture of ", "an image of ", "a drawing of ")


class CaptionError(ValueError):
    """A caption outside the grammar."""


@dataclass(frozen=True)
class ObjectSpec:
    """One object a caption names; ``size`` / ``position`` are None where the caption leaves them open."""

    color: str
    shape: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption states. ``kind``: ``single`` (one object), ``count`` (``count`` copies of ``objects[0]``),
    ``relation`` (``objects[0]`` ``relation`` ``objects[1]``) or ``list`` (these objects, nothing else)."""

    kind: str
    objects: tuple[ObjectSpec, ...]
    count: int = 1
    relation: str | None = None
    attributes: tuple[str, ...] = field(default=())  # the attributes the caption states, for scoring

    def __post_init__(self) -> None:
        if not self.attributes:
            stated = ["count", "color", "shape"]
            if any(o.size for o in self.objects):
                stated.append("size")
            if any(o.position for o in self.objects):
                stated.append("position")
            if self.relation:
                stated.append("relation")
            object.__setattr__(self, "attributes", tuple(stated))

    @property
    def num_objects(self) -> int:
        return self.count if self.kind == "count" else len(self.objects)


def _where(position: str, style: int) -> str:
    if position == "center":
        return "in the center"
    if style == 1 and " " in position:
        return f"in the {position} corner"
    if style == 1 and position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


def _object_words(o: ObjectSpec, style: int, article: str = "a") -> str:
    words = [article] + ([o.size] if o.size else []) + [o.color, o.shape]
    if o.position:
        words.append(_where(o.position, style))
    return " ".join(words)


def word_caption(spec: CaptionSpec, style: int = 0, prefix: str = "", swap: bool = False) -> str:
    """The caption of ``spec`` in template ``style`` (0 or 1); ``swap`` states a relation from its other side
    ("a blue square right of a red circle" for "a red circle left of a blue square")."""
    o = spec.objects
    if spec.kind == "single":
        body = _object_words(o[0], style)
    elif spec.kind == "count":
        number = {2: "two", 3: "three"}[spec.count]
        body = " ".join([number] + ([o[0].size] if o[0].size else []) + [o[0].color, _PLURAL[o[0].shape]])
    elif spec.kind == "relation":
        a, b, rel = (o[1], o[0], _INVERSE[spec.relation]) if swap else (o[0], o[1], spec.relation)  # type: ignore
        if style == 1 and rel in ("left of", "right of"):
            rel = f"to the {rel}"
        body = f"{_object_words(a, 0)} {rel} {_object_words(b, 0)}"
    elif spec.kind == "list":
        parts = [_object_words(x, 0) for x in o]
        body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    else:
        raise CaptionError(f"unknown caption kind {spec.kind!r}")
    return prefix + body


_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_SIZE = "|".join(SIZES)
_POS = "|".join(sorted(POSITIONS, key=len, reverse=True))
_OBJECT = (
    rf"(?:a|an|one) (?:(?P<size>{_SIZE}) )?(?P<color>{_COLOR}) (?P<shape>{_SHAPE})"
    rf"(?: (?:at the|in the|on the) (?P<pos>{_POS})(?: corner)?)?"
)
_COUNT = rf"(?P<num>two|three) (?:(?P<size>{_SIZE}) )?(?P<color>{_COLOR}) (?P<shapes>{'|'.join(_PLURAL.values())})"
_REL = r"(?:to the )?(?P<rel>left of|right of)|(?P<rel2>above|below)"


def _object(text: str) -> ObjectSpec:
    m = re.fullmatch(_OBJECT, text)
    if m is None:
        raise CaptionError(f"not an object phrase of the grammar: {text!r}")
    return ObjectSpec(m["color"], m["shape"], m["size"], m["pos"])


def parse_caption(text: str) -> CaptionSpec:
    """What a caption of the grammar states; :class:`CaptionError` names a caption outside it."""
    t = " ".join(text.strip().lower().rstrip(".").split())
    for p in PREFIXES:
        if p and t.startswith(p):
            t = t[len(p) :]
            break
    m = re.fullmatch(_COUNT, t)
    if m is not None:
        shape = {v: k for k, v in _PLURAL.items()}[m["shapes"]]
        return CaptionSpec("count", (ObjectSpec(m["color"], shape, m["size"]),), count=_NUMBERS[m["num"]])
    for rel in re.finditer(_REL, t):
        a, b = t[: rel.start()].strip(), t[rel.end() :].strip()
        try:
            oa, ob = _object(a), _object(b)
        except CaptionError:
            continue
        return CaptionSpec("relation", (oa, ob), relation=rel["rel"] or rel["rel2"])
    parts = [p.strip() for p in re.split(r",| and ", t) if p.strip()]
    try:
        objects = tuple(_object(p) for p in parts)
    except CaptionError:
        raise CaptionError(
            f"caption outside the captioned-shapes grammar: {text!r} (e.g. 'a small red circle at the top left', "
            "'two blue squares', 'a red circle left of a blue square')"
        ) from None
    if not objects:
        raise CaptionError("an empty caption states nothing to score")
    return CaptionSpec("single" if len(objects) == 1 else "list", objects)
