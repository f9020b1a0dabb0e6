"""Referring sentences for a SynthRef scene.

For a target object, every sentence form offers candidate phrases (each
combination of the optional words); a candidate is kept when the
evaluator (`grammar.evaluate`) names exactly the target, undecided margins
excluded. Per form the shortest kept candidate wins (ties: seeded
choice), so optional words appear only when uniqueness needs them. A ref
then gets 1-3 of its available forms, chosen at random, and each chosen
sentence is checked once more by parsing its text back (`grammar.resolve`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from refseg.data.synthref.grammar import (
    NounPhrase,
    ObjectFacts,
    evaluate,
    relation_truth,
    render,
    resolve,
    spatial_truth,
    word_count,
)
from refseg.data.synthref.vocab import EXTREMES, ORDINALS, RELATIONS, SPATIAL_PHRASES, DomainVocab

MAX_SENTENCES = 3  # sentences per ref, of different forms
NO_TARGET_TRIES = 100  # random absent descriptions tried per no-target sentence


@dataclass(frozen=True)
class Sentence:
    """One referring expression and its form (attribute, location, ordinal, relation, extreme)."""

    text: str
    form: str


def _colour_options(o: ObjectFacts, vocab: DomainVocab) -> tuple:
    """The colour words a phrase for `o` may use: none, or the object's own where its class has colours."""
    return (None, o.colour) if o.colour in vocab.colours.get(o.category_id, {}) else (None,)


def anchor_phrase(b: int, facts: Sequence[ObjectFacts], vocab: DomainVocab) -> Optional[NounPhrase]:
    """The shortest "the [colour] <class>" naming object b alone, or None (aerial anchors take no colour)."""
    options = _colour_options(facts[b], vocab) if vocab.colour_in_all_forms else (None,)
    for colour in options:
        phrase = NounPhrase(facts[b].category_id, colour=colour)
        if evaluate(phrase, facts).unique == b:
            return phrase
    return None


def candidates(t: int, facts: Sequence[ObjectFacts], vocab: DomainVocab, anchors: dict) -> dict:
    """Candidate phrases per form of `vocab.forms` for target t; phrases surely false for t are left out.

    anchors: object index -> its anchor phrase (objects that can anchor a relation).
    """
    o = facts[t]
    cid = o.category_id
    colours = _colour_options(o, vocab)
    other_colours = colours if vocab.colour_in_all_forms else (None,)  # forms other than location
    forms = {
        "attribute": [NounPhrase(cid, colour=c, size=z) for z in (None, o.size) for c in colours],
        "location": [
            NounPhrase(cid, colour=c, spatial=s)
            for c in colours
            for s in SPATIAL_PHRASES
            if spatial_truth(s, o.x, o.y) is True
        ],
        "ordinal": [NounPhrase(cid, colour=c, selector=s) for c in other_colours for s in ORDINALS],
        "extreme": [NounPhrase(cid, selector=s) for s in EXTREMES],
        "relation": [
            NounPhrase(cid, colour=c, relation=rel, anchor=anchor)
            for b, anchor in anchors.items()
            if b != t
            for rel in RELATIONS
            if relation_truth(rel, o, facts[b]) is True
            for c in other_colours
        ],
    }
    return {form: forms[form] for form in vocab.forms}


def describe(t: int, facts: Sequence[ObjectFacts], vocab: DomainVocab, anchors: dict,
             rng: np.random.Generator) -> list:
    """1-3 unambiguous sentences of different forms for target t; [] if no form names it alone."""
    best = {}
    for form, phrases in sorted(candidates(t, facts, vocab, anchors).items()):
        kept = [p for p in phrases if evaluate(p, facts).unique == t]
        if kept:
            shortest = min(word_count(p, vocab) for p in kept)
            ties = [p for p in kept if word_count(p, vocab) == shortest]
            best[form] = ties[int(rng.integers(len(ties)))]
    if not best:
        return []
    forms = sorted(best)
    count = int(rng.integers(1, min(MAX_SENTENCES, len(forms)) + 1))
    sentences = []
    for k in rng.choice(len(forms), size=count, replace=False):
        phrase = best[forms[int(k)]]
        text = render(phrase, vocab)
        if resolve(text, facts, vocab).unique != t:
            raise AssertionError(f"generated sentence {text!r} does not name object {t} alone")
        sentences.append(Sentence(text, phrase.form))
    return sentences


def describe_scene(facts: Sequence[ObjectFacts], referents: Sequence[int], vocab: DomainVocab,
                   rng: np.random.Generator) -> dict:
    """Sentences for each referent that has any: {object index: [Sentence, ...]}."""
    anchors = {b: p for b in range(len(facts)) if (p := anchor_phrase(b, facts, vocab)) is not None}
    out = {}
    for t in referents:
        sentences = describe(t, facts, vocab, anchors, rng)
        if sentences:
            out[t] = sentences
    return out


def absent_sentence(facts: Sequence[ObjectFacts], vocab: DomainVocab, rng: np.random.Generator,
                    taken: set) -> Optional[tuple]:
    """A sentence naming no object of the scene, not in `taken`: (Sentence, category_id) or None.

    natural: "the [size] <colour> <shape>" with a colour/shape (and maybe size)
    combination no object has; aerial: "the [colour] <class> <spatial phrase>"
    that no object satisfies, margins included.
    """
    ids = list(vocab.categories)
    for _ in range(NO_TARGET_TRIES):
        cid = ids[int(rng.integers(len(ids)))]
        words = list(vocab.colours.get(cid, {}))
        colour = words[int(rng.integers(len(words)))] if words else None
        if vocab.sizes:
            size = vocab.sizes[int(rng.integers(len(vocab.sizes)))] if rng.random() < 0.5 else None
            phrase = NounPhrase(cid, colour=colour, size=size)
        else:
            if rng.random() < 0.5:
                colour = None
            phrase = NounPhrase(cid, colour=colour, spatial=SPATIAL_PHRASES[int(rng.integers(len(SPATIAL_PHRASES)))])
        text = render(phrase, vocab)
        if text not in taken and resolve(text, facts, vocab).empty:
            return Sentence(text, phrase.form), cid
    return None
