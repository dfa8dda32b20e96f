"""Captioned Fashion-MNIST: a caption for every image, from its class and
two attributes measured on its pixels, and the word-level tokenizer that
turns captions into the integers a text encoder reads. Taught in chapter
12, "Captions measured on the pixels".

**Attributes.** A pixel belongs to the garment when its intensity, in
[0, 1], exceeds :data:`GARMENT_LEVEL` = 0.1 (the background is 0). Then

* ``size``: the fraction of the 784 pixels that are garment;
* ``brightness``: the mean intensity over the garment's pixels.

:func:`measure_attributes` computes both, on training images and on
generated ones alike. Words come from thresholds at the per-class medians
of the 60000 training images (:data:`CLASS_MEDIANS`): "large" when the
size exceeds its class's median, else "small"; "light" when the
brightness exceeds it, else "dark". A global threshold would call nearly
every sandal "small" and every coat "large"; per-class medians split
every class about in half for each attribute (48.9-51.5 % "large",
50.0 % "light"), and each of the four (size, brightness) combinations
holds 21-29 % of every class. So "a small coat" means small *for a coat*.

**Captions.** Each image gets one caption (:func:`caption_images`): each
attribute is mentioned with probability 2/3, independently, and one of
three phrasings (:data:`PHRASINGS`) is used: "a small dark coat",
"coats, small, dark", "dark coat, small" ("a coat", "coats", "coat"
without attributes). The choices come from ``numpy.random.default_rng
(seed)``, one row per image, so the same seed gives the same captions,
and the first n images of a set get the captions they get in the whole.

**Held out.** The training set never shows the (class, attribute) pairs
of :data:`HELD_OUT` (:func:`held_out_pairs`): :func:`captioned_dataset`
drops their images (about half of each of those four classes: 12000 of
the 60000 training images), so a model has seen neither the words nor
the pixels of a dark trouser, and what it makes for "a dark trouser" can
only be composed from what it learned elsewhere.

**Tokens.** :data:`VOCABULARY` is every word the grammar can write (and
the comma), in a fixed order, with ``"<pad>"`` at id 0. :func:`tokenize`
pads every caption with 0 to ``max_len``. The empty caption "" is all
padding: the null condition of classifier-free guidance.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .checks import check_values, integer, integer_dtype
from .data import FASHION_MNIST_CLASSES
from .data import load as load_images

Tensor = torch.Tensor

GARMENT_LEVEL = 0.1     # intensity in [0, 1] above which a pixel is garment
ATTRIBUTES = {"size": ("small", "large"), "brightness": ("dark", "light")}
# per class: the median (size, brightness) of the 60000 training images,
# rounded to 4 digits (recompute with class_medians(*data.load()))
CLASS_MEDIANS = torch.tensor([
    [0.5434, 0.6389], [0.3176, 0.6953], [0.6110, 0.6558], [0.3903, 0.6878],
    [0.5740, 0.7244], [0.2449, 0.5168], [0.5906, 0.5807], [0.2832, 0.5849],
    [0.5370, 0.6869], [0.4298, 0.7024]], dtype=torch.float64)
# the word(s) for each class, singular and plural
NOUNS = (("t-shirt", "t-shirts"), ("trouser", "trousers"),
         ("pullover", "pullovers"), ("dress", "dresses"), ("coat", "coats"),
         ("sandal", "sandals"), ("shirt", "shirts"),
         ("sneaker", "sneakers"), ("bag", "bags"),
         ("ankle boot", "ankle boots"))
HELD_OUT = (("Trouser", "dark"), ("Bag", "small"), ("Pullover", "light"),
            ("Sandal", "large"))
PHRASINGS = ("a {adjectives} {noun}", "{nouns}, {adjectives}",
             "{last} {noun}, {first}")
MENTION_PROBABILITY = 2 / 3

PAD, PAD_ID, MAX_LEN = "<pad>", 0, 8
VOCABULARY = (PAD, ",", "a", "an",
              *(w for words in ATTRIBUTES.values() for w in words),
              *dict.fromkeys(" ".join(w for pair in NOUNS for w in pair).split()))


def measure_attributes(images: Tensor) -> dict[str, Tensor]:
    """``{"size": (N,), "brightness": (N,)}`` of images (N, 1, H, W) in
    [-1, 1]: the garment's area fraction and its mean intensity in [0, 1]
    (0 for an image without garment pixels). Taught in chapter 12,
    "Captions measured on the pixels"."""
    if not (isinstance(images, Tensor) and images.ndim == 4
            and images.shape[1] == 1 and images.is_floating_point()):
        got = tuple(images.shape) if isinstance(images, Tensor) else images
        raise ValueError("images must be a float tensor (N, 1, H, W) in "
                         f"[-1, 1], got {got}")
    intensity = ((images.double() + 1) / 2).clamp(0, 1).flatten(1)
    garment = intensity > GARMENT_LEVEL
    area = garment.sum(1)
    return {"size": area / garment.shape[1],
            "brightness": (intensity * garment).sum(1) / area.clamp(min=1)}


def attribute_words(images: Tensor, labels) -> dict[str, list[str]]:
    """The attribute words of each image, ``{"size": ["small", ...],
    "brightness": ["dark", ...]}``, from :func:`measure_attributes` and
    the per-class medians; ``labels`` (N,) the class of each image (for a
    generated image, the class its caption asked for). Taught in chapter
    12, "Captions measured on the pixels"."""
    labels = _labels(labels, images.shape[0])
    measured = measure_attributes(images)
    words = {}
    for a, (name, (low, high)) in enumerate(ATTRIBUTES.items()):
        above = measured[name].cpu() > CLASS_MEDIANS[labels, a]
        words[name] = [high if x else low for x in above.tolist()]
    return words


def class_medians(images: Tensor, labels: Tensor) -> Tensor:
    """(10, 2): per class, the median size and brightness of ``images``;
    :data:`CLASS_MEDIANS` is this on the whole training set. Taught in
    chapter 12, "Captions measured on the pixels"."""
    labels = _labels(labels, images.shape[0])
    m = measure_attributes(images)
    both = torch.stack([m["size"], m["brightness"]], 1).cpu()
    return torch.stack([both[labels == c].median(0).values
                        for c in range(len(NOUNS))])


def held_out_pairs() -> list[tuple[str, str]]:
    """The (class name, attribute word) pairs no training caption holds,
    e.g. ("Trouser", "dark"). Taught in chapter 12, "Captions measured on
    the pixels"."""
    return list(HELD_OUT)


def caption(label: int, size: str | None = None,
            brightness: str | None = None, phrasing: int = 0) -> str:
    """The caption of class ``label`` with the attribute words given
    (None: not mentioned) in phrasing ``phrasing`` of :data:`PHRASINGS`:
    ``caption(8, "small", "light")`` is "a small light bag". Taught in
    chapter 12, "Captions measured on the pixels"."""
    label = integer("label", label, minimum=0)
    phrasing = integer("phrasing", phrasing, minimum=0)
    if label >= len(NOUNS) or phrasing >= len(PHRASINGS):
        raise ValueError(f"label must be in 0..{len(NOUNS) - 1} and "
                         f"phrasing in 0..{len(PHRASINGS) - 1}, got "
                         f"{label} and {phrasing!r}")
    for name, word in (("size", size), ("brightness", brightness)):
        if word is not None and word not in ATTRIBUTES[name]:
            raise ValueError(f"{name} must be one of {ATTRIBUTES[name]} "
                             f"or None, got {word!r}")
    noun, nouns = NOUNS[label]
    adjectives = [w for w in (size, brightness) if w]     # size first
    if phrasing == 0:                   # "a small dark coat", "an ankle boot"
        words = " ".join([*adjectives, noun])
        return ("an " if words[0] in "aeiou" else "a ") + words
    if phrasing == 1:                   # "coats, small, dark"
        return ", ".join([nouns, *adjectives])
    last = [adjectives[-1]] if adjectives else []   # "dark coat, small"
    return ", ".join([" ".join([*last, noun]), *adjectives[:-1]])


def phrasings(label: int, size: str | None = None,
              brightness: str | None = None) -> list[str]:
    """Every phrasing of one caption (prompts for the chapter). Taught in
    chapter 12, "Captions measured on the pixels"."""
    return [caption(label, size, brightness, p)
            for p in range(len(PHRASINGS))]


def caption_images(images: Tensor, labels, seed: int = 0) -> list[str]:
    """One caption per image (N, 1, 28, 28) of class ``labels`` (N,): the
    class, each attribute word with probability 2/3, a phrasing; all
    drawn from ``seed``. Taught in chapter 12, "Captions measured on the
    pixels"."""
    labels = _labels(labels, images.shape[0])
    seed = integer("seed", seed, minimum=0)
    words = attribute_words(images, labels)
    draws = np.random.default_rng(seed).random((len(labels), 3))
    said = draws[:, :2] < MENTION_PROBABILITY
    choice = (draws[:, 2] * len(PHRASINGS)).astype(int)
    return [caption(y, words["size"][i] if said[i, 0] else None,
                    words["brightness"][i] if said[i, 1] else None,
                    int(choice[i]))
            for i, y in enumerate(labels.tolist())]


@dataclass
class CaptionedImages:
    """Images (N, 1, 28, 28) in [-1, 1], their class ``labels`` (N,),
    ``captions`` (N strings), ``tokens`` (N, MAX_LEN) and ``index`` (N,):
    each image's position in the set it came from. Taught in chapter 12,
    "Captions measured on the pixels"."""
    images: Tensor
    labels: Tensor
    captions: list[str]
    tokens: Tensor
    index: Tensor


def captioned_dataset(images: Tensor, labels, seed: int = 0,
                      drop_held_out: bool = True) -> CaptionedImages:
    """Caption ``images`` (:func:`caption_images`) and, with
    ``drop_held_out``, drop the images of a held-out pair (their captions
    drawn first, so the others keep theirs). Taught in chapter 12,
    "Captions measured on the pixels"."""
    labels = _labels(labels, images.shape[0])
    captions = caption_images(images, labels, seed)
    keep = torch.ones(len(labels), dtype=torch.bool)
    if drop_held_out:
        words = attribute_words(images, labels)
        for name, word in HELD_OUT:
            attribute = next(a for a, w in ATTRIBUTES.items() if word in w)
            is_word = torch.tensor([w == word for w in words[attribute]])
            c = FASHION_MNIST_CLASSES.index(name)
            keep &= ~(is_word & (labels == c))
    index = keep.nonzero().flatten()
    kept = [captions[i] for i in index.tolist()]
    return CaptionedImages(images[index], labels[index], kept,
                           tokenize(kept), index)


def load_captioned(split: str = "train", limit: int | None = None,
                   seed: int = 0,
                   drop_held_out: bool | None = None) -> CaptionedImages:
    """Captioned Fashion-MNIST (:func:`ddpm_lib.data.load`, then
    :func:`captioned_dataset`); the held-out pairs are dropped from the
    training split only, unless ``drop_held_out`` says otherwise. Taught
    in chapter 12, "Captions measured on the pixels"."""
    images, labels = load_images("fashion_mnist", split, limit=limit)
    if drop_held_out is None:
        drop_held_out = split == "train"
    return captioned_dataset(images, labels, seed, drop_held_out)


def tokenize(captions, max_len: int = MAX_LEN,
             vocabulary=VOCABULARY) -> Tensor:
    """Captions (a string or a list of B strings) -> token ids (B,
    max_len), long, padded with :data:`PAD_ID` = 0. Words are split at
    spaces, a comma is a word of its own, upper case is read as lower.
    "" is all padding: the null caption. Taught in chapter 12, "A tiny
    text encoder"."""
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, (list, tuple)) or not all(
            isinstance(c, str) for c in captions):
        raise ValueError("captions must be a string or a list of strings, "
                         f"got {type(captions).__name__}")
    max_len = integer("max_len", max_len, minimum=1)
    ids = {word: i for i, word in enumerate(vocabulary)}
    tokens = torch.full((len(captions), max_len), PAD_ID, dtype=torch.long)
    for row, text in enumerate(captions):
        words = text.lower().replace(",", " , ").split()
        if len(words) > max_len:
            raise ValueError(f"caption {text!r} has {len(words)} words, more "
                             f"than max_len={max_len}: shorten it or raise "
                             "max_len")
        for col, word in enumerate(words):
            if word not in ids or word == PAD:
                raise ValueError(
                    f"unknown word {word!r} in caption {text!r}; the "
                    "vocabulary (ddpm_lib.captions.VOCABULARY) is: "
                    + ", ".join(repr(w) for w in vocabulary[1:]))
            tokens[row, col] = ids[word]
    return tokens


def decode(tokens: Tensor, vocabulary=VOCABULARY) -> list[str]:
    """Token ids (B, L) -> B captions, padding dropped (the inverse of
    :func:`tokenize`). Taught in chapter 12, "A tiny text encoder"."""
    check_tokens(tokens, len(vocabulary))
    words = [[vocabulary[i] for i in row if i != PAD_ID]
             for row in tokens.tolist()]
    return [" ".join(w).replace(" ,", ",") for w in words]


def check_tokens(tokens: Tensor, vocab_size: int, batch: int | None = None,
                 what: str = "tokens") -> None:
    """A ValueError unless ``tokens`` is an integer tensor (B, L) (B =
    ``batch`` when given) of ids in 0..vocab_size-1. The value check runs
    where :func:`ddpm_lib.checks.check_values` allows. Taught in chapter
    12, "A tiny text encoder"."""
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or (
            batch is not None and tokens.shape[0] != batch):
        got = tuple(tokens.shape) if isinstance(tokens, Tensor) else tokens
        rows = "B" if batch is None else batch
        raise ValueError(f"{what} must be a tensor of shape ({rows}, L), one "
                         f"row of token ids per caption (use "
                         f"ddpm_lib.captions.tokenize), got {got}")
    integer_dtype(what, tokens, "; make them with ddpm_lib.captions.tokenize")
    if tokens.numel() and check_values() and (
            tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"{what} must be ids in 0..{vocab_size - 1} (the "
                         f"vocabulary), got {tokens.min().item()} to "
                         f"{tokens.max().item()}")


def _labels(labels, n: int) -> Tensor:
    """Class labels as a (n,) long CPU tensor, checked."""
    labels = torch.as_tensor(labels).cpu()
    integer_dtype("labels", labels)
    if labels.shape != (n,) or (n and (labels.min() < 0
                                       or labels.max() >= len(NOUNS))):
        raise ValueError(f"labels must be {n} class indices in "
                         f"0..{len(NOUNS) - 1}, one per image, got shape "
                         f"{tuple(labels.shape)}")
    return labels.long()
