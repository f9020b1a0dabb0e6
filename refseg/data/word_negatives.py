"""Text-side hard negatives: an expression with one word replaced by a contrasting one.

    word_swaps("the purple hexagon")           # ["the red hexagon", "the green hexagon", ...]
    word_negatives("the leftmost star", 2)     # ["the rightmost star"]: at most 2, here the only one

"the purple hexagon" and "the orange hexagon" differ in one word, and in a
scene that holds both hexagons an image-level contrast cannot tell them
apart: both are found in the image. Against the embedding that a sentence
gathers from its *own* image, the changed sentence is a negative that only
the right selection separates (refseg.losses.sag_text_loss, term ``word``;
SaGHead ``word_negatives``), as NegCLIP-style swapped captions do for
image-text models. Only the expression is read, never a location.

Words replaced (whole words, any case; the first letter's case is kept):
- colours: each of COLOURS by every other one ("gray" counts as "grey");
- opposites (OPPOSITES, both ways): left/right, leftmost/rightmost,
  top/bottom, topmost/bottommost, above/below, upper/lower, small/large,
  smaller/larger, smallest/largest, big/small, bigger/smaller, biggest/smallest,
  east/west, north/south, eastern/western, northern/southern.
Such a change can leave a true expression now and then (a shirt and trousers
of one colour); the loss takes the negatives as noisy, one per anchor at a time.
"""

import re
from typing import List, Optional, Tuple

import torch

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "grey", "brown", "pink")
SYNONYMS = {"gray": "grey"}
_PAIRS = (("left", "right"), ("leftmost", "rightmost"), ("top", "bottom"), ("topmost", "bottommost"),
          ("above", "below"), ("upper", "lower"), ("small", "large"), ("smaller", "larger"),
          ("smallest", "largest"), ("east", "west"), ("north", "south"), ("eastern", "western"),
          ("northern", "southern"))
OPPOSITES = {**{a: b for a, b in _PAIRS}, **{b: a for a, b in _PAIRS},
             "big": "small", "bigger": "smaller", "biggest": "smallest"}
_WORD = re.compile(r"[A-Za-z]+")


def alternatives(word: str) -> Tuple[str, ...]:
    """The contrasting words for ``word`` (lower case), () when it has none."""
    w = word.lower()
    w = SYNONYMS.get(w, w)
    if w in COLOURS:
        return tuple(c for c in COLOURS if c != w)
    if w in OPPOSITES:
        return (OPPOSITES[w],)
    return ()


def _cased(new: str, old: str) -> str:
    return new[:1].upper() + new[1:] if old[:1].isupper() else new


def word_swaps(text: str) -> List[str]:
    """Every expression that differs from ``text`` in one replaced word, in word order, then in the
    order of ``alternatives``; [] when no word of it can be replaced."""
    out = []
    for m in _WORD.finditer(text):
        for alt in alternatives(m.group()):
            out.append(text[: m.start()] + _cased(alt, m.group()) + text[m.end():])
    return out


def word_negatives(text: str, n: int, generator: Optional[torch.Generator] = None) -> List[str]:
    """Up to ``n`` distinct one-word swaps of ``text`` drawn uniformly without replacement (torch's
    global RNG unless ``generator`` is given, so a resumed training run draws the same ones)."""
    swaps = word_swaps(text)
    if n <= 0 or not swaps:
        return []
    order = torch.randperm(len(swaps), generator=generator)[:n].tolist()
    return [swaps[i] for i in order]
