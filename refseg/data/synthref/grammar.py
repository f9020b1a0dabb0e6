"""SynthRef's fixed grammar: render, parse and evaluate a referring expression.

A sentence is one noun phrase, optionally related to a second one:

    NP       := "the" [selector] [size] [colour] <class> [spatial phrase]
    sentence := NP [relation NP]

`parse` turns text into a `NounPhrase`; `evaluate` answers which objects of a
scene it names. The evaluator is the judge of every SynthRef sentence: the
generator keeps a sentence only if `resolve` finds exactly one object, and
the tests call `resolve` on the written data with facts recomputed from the
stored masks, independently of how sentences were chosen.

Truth is three-valued (True, False, None = undecided): a comparison of a
centroid coordinate with a threshold within `MARGIN` (8 px) of it, or of an
ordinal gap within 8 px of the 20 px relation margin, is undecided, and a
sentence whose answer depends on an undecided test is not unambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from refseg.data.synthref.vocab import (
    EXTREME_RATIO,
    EXTREMES,
    MARGIN,
    ORDINALS,
    RELATION_GAP,
    RELATIONS,
    SPATIAL_PHRASES,
    THIRD,
    TWO_THIRDS,
    DomainVocab,
)


class GrammarError(ValueError):
    """The text is not a sentence of the SynthRef grammar."""


@dataclass(frozen=True)
class ObjectFacts:
    """What the grammar can say about one object of a scene.

    x, y: centroid of the visible mask in pixel-index coordinates (mean
    column, mean row); area: visible mask pixels.
    """

    category_id: int
    colour: Optional[str]
    size: Optional[str]
    x: float
    y: float
    area: int


@dataclass(frozen=True)
class NounPhrase:
    """A parsed expression; `relation` and `anchor` are set together."""

    category_id: int
    colour: Optional[str] = None
    size: Optional[str] = None
    spatial: Optional[str] = None  # one of SPATIAL_PHRASES
    selector: Optional[str] = None  # one of ORDINALS or EXTREMES
    relation: Optional[str] = None  # one of RELATIONS
    anchor: Optional["NounPhrase"] = None

    @property
    def form(self) -> str:
        """The sentence form: relation | ordinal | extreme | location | attribute."""
        if self.relation is not None:
            return "relation"
        if self.selector in ORDINALS:
            return "ordinal"
        if self.selector in EXTREMES:
            return "extreme"
        if self.spatial is not None:
            return "location"
        return "attribute"


@dataclass(frozen=True)
class Match:
    """Objects (indices into the scene) a phrase names for sure, and those it may name."""

    definite: frozenset
    uncertain: frozenset

    @property
    def unique(self) -> Optional[int]:
        """The one object named, if exactly one is named for sure and none is undecided."""
        if len(self.definite) == 1 and not self.uncertain:
            return next(iter(self.definite))
        return None

    @property
    def empty(self) -> bool:
        """True when the phrase surely names nothing (what a no-target sentence needs)."""
        return not self.definite and not self.uncertain


def render(phrase: NounPhrase, vocab: DomainVocab) -> str:
    """Write a phrase as text, e.g. "the small red star left of the blue circle"."""
    words = ["the", phrase.selector, phrase.size, phrase.colour, vocab.categories[phrase.category_id], phrase.spatial]
    text = " ".join(w for w in words if w is not None)
    if phrase.relation is not None:
        text += f" {phrase.relation} {render(phrase.anchor, vocab)}"
    return text


def word_count(phrase: NounPhrase, vocab: DomainVocab) -> int:
    """Number of whitespace-separated words of the rendered phrase."""
    return len(render(phrase, vocab).split())


def _match_words(tokens: Sequence[str], i: int, options: Sequence[str]) -> Optional[str]:
    """The option (one or more words) that tokens[i:] starts with; the longest wins."""
    for option in sorted(options, key=lambda o: -len(o.split())):
        words = option.split()
        if list(tokens[i : i + len(words)]) == words:
            return option
    return None


def _parse_np(tokens: Sequence[str], i: int, vocab: DomainVocab, allow_relation: bool) -> tuple[NounPhrase, int]:
    if i >= len(tokens) or tokens[i] != "the":
        raise GrammarError(f"expected 'the' at word {i}")
    i += 1
    fields = {}
    all_colours = {c for table in vocab.colours.values() for c in table}
    for key, options in (("selector", vocab.selectors), ("size", vocab.sizes), ("colour", sorted(all_colours))):
        word = _match_words(tokens, i, options)
        if word is not None:
            fields[key] = word
            i += 1
    name = _match_words(tokens, i, list(vocab.categories.values()))
    if name is None:
        raise GrammarError(f"expected a {vocab.name} class name at word {i}")
    cid = vocab.category_id(name)
    i += len(name.split())
    if "colour" in fields and fields["colour"] not in vocab.colours.get(cid, {}):
        raise GrammarError(f"'{name}' takes no colour word '{fields['colour']}'")
    spatial = _match_words(tokens, i, SPATIAL_PHRASES)
    if spatial is not None:
        fields["spatial"] = spatial
        i += len(spatial.split())
    relation = _match_words(tokens, i, RELATIONS) if allow_relation else None
    if relation is not None:
        anchor, i = _parse_np(tokens, i + len(relation.split()), vocab, allow_relation=False)
        fields.update(relation=relation, anchor=anchor)
    return NounPhrase(category_id=cid, **fields), i


def parse(text: str, vocab: DomainVocab) -> NounPhrase:
    """Parse a sentence of `vocab`'s domain (case-insensitive); raise GrammarError otherwise."""
    tokens = text.lower().split()
    phrase, end = _parse_np(tokens, 0, vocab, allow_relation=True)
    if end != len(tokens):
        raise GrammarError(f"unexpected words after word {end}: {' '.join(tokens[end:])!r}")
    return phrase


def _less(a: float, threshold: float) -> Optional[bool]:
    """a < threshold, or None when a lies within MARGIN of the threshold."""
    return None if abs(a - threshold) <= MARGIN else a < threshold


def _all(*values: Optional[bool]) -> Optional[bool]:
    """Three-valued AND: False wins over undecided, undecided over True."""
    if any(v is False for v in values):
        return False
    return None if any(v is None for v in values) else True


def spatial_truth(phrase: str, x: float, y: float) -> Optional[bool]:
    """Whether a centroid (x, y) in pixels satisfies a spatial phrase (None: within the margin)."""
    left, right = _less(x, THIRD), _less(TWO_THIRDS, x)
    top, bottom = _less(y, THIRD), _less(TWO_THIRDS, y)
    if phrase == "in the middle":
        return _all(_less(THIRD, x), _less(x, TWO_THIRDS), _less(THIRD, y), _less(y, TWO_THIRDS))
    one_sided = {"on the left": left, "on the right": right, "at the top": top, "at the bottom": bottom}
    if phrase in one_sided:
        return one_sided[phrase]
    vertical, horizontal = phrase.split()[-2:]  # "in the top left" -> ("top", "left")
    return _all({"top": top, "bottom": bottom}[vertical], {"left": left, "right": right}[horizontal])


def relation_truth(relation: str, a: ObjectFacts, b: ObjectFacts) -> Optional[bool]:
    """Whether object a stands in `relation` to object b (centroids more than 20 px apart on the axis)."""
    if relation == "left of":
        return _less(a.x, b.x - RELATION_GAP)
    if relation == "right of":
        return _less(b.x + RELATION_GAP, a.x)
    if relation == "above":
        return _less(a.y, b.y - RELATION_GAP)
    if relation == "below":
        return _less(b.y + RELATION_GAP, a.y)
    raise GrammarError(f"unknown relation {relation!r}")


def _select(selector: str, candidates: list, objects: Sequence[ObjectFacts]) -> Match:
    """Apply an ordinal or extreme to surely-named candidates (at least two are needed)."""
    none = Match(frozenset(), frozenset())
    if len(candidates) < 2:
        return none
    if selector in EXTREMES:
        sign = -1 if selector == "largest" else 1
        first, second = sorted(candidates, key=lambda k: (sign * objects[k].area, k))[:2]
        a_first, a_second = objects[first].area, objects[second].area  # pixels
        ratio = a_first / a_second if selector == "largest" else a_second / a_first
        return Match(frozenset([first]), frozenset()) if ratio > EXTREME_RATIO else none
    axis = "x" if selector in ("leftmost", "rightmost") else "y"
    sign = 1 if selector in ("leftmost", "topmost") else -1
    first, second = sorted(candidates, key=lambda k: (sign * getattr(objects[k], axis), k))[:2]
    gap = sign * (getattr(objects[second], axis) - getattr(objects[first], axis))  # >= 0, pixels
    verdict = _less(RELATION_GAP, gap)
    if verdict is None:
        return Match(frozenset(), frozenset([first, second]))
    return Match(frozenset([first]), frozenset()) if verdict else none


def evaluate(phrase: NounPhrase, objects: Sequence[ObjectFacts]) -> Match:
    """The objects (indices into `objects`) that `phrase` names.

    A relation's anchor must itself name exactly one object for sure;
    otherwise the phrase names nothing (or is undecided if the anchor is).
    """
    anchor = None
    anchor_undecided = False
    if phrase.relation is not None:
        anchor_match = evaluate(phrase.anchor, objects)
        anchor_undecided = bool(anchor_match.uncertain)
        if not anchor_undecided and len(anchor_match.definite) != 1:
            return Match(frozenset(), frozenset())
        anchor = None if anchor_undecided else objects[anchor_match.unique]
    definite, uncertain = [], []
    for k, o in enumerate(objects):
        if o.category_id != phrase.category_id or phrase.colour not in (None, o.colour):
            continue
        if phrase.size not in (None, o.size):
            continue
        tests = []
        if phrase.spatial is not None:
            tests.append(spatial_truth(phrase.spatial, o.x, o.y))
        if anchor_undecided:
            tests.append(None)
        elif anchor is not None:
            tests.append(relation_truth(phrase.relation, o, anchor))
        truth = _all(*tests)
        if truth is True:
            definite.append(k)
        elif truth is None:
            uncertain.append(k)
    if phrase.selector is not None:
        if uncertain:
            return Match(frozenset(), frozenset(definite + uncertain))
        return _select(phrase.selector, definite, objects)
    return Match(frozenset(definite), frozenset(uncertain))


def resolve(text: str, objects: Sequence[ObjectFacts], vocab: DomainVocab) -> Match:
    """Parse `text` and evaluate it against a scene's objects."""
    return evaluate(parse(text, vocab), objects)
