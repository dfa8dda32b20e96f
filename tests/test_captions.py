"""Captioned Fashion-MNIST (ddpm_lib.captions, chapter 12): attributes measured on the pixels,
a deterministic caption grammar, held-out (class, attribute) pairs, and the tokenizer."""
import itertools

import pytest
import torch

from ddpm_lib import captions as C
from ddpm_lib.data import FASHION_MNIST_CLASSES

WORDS = {w: name for name, pair in C.ATTRIBUTES.items() for w in pair}


def blank(n=1):
    return torch.full((n, 1, 28, 28), -1.0)


def test_attributes_of_hand_made_images():
    x = blank(3)
    x[0, 0, 10:16, 10:16] = 1.0            # a small, bright square: 36 pixels at intensity 1
    x[1, 0, 2:26, 2:26] = -0.4             # a big, dim one: 576 pixels at intensity 0.3
    x[1, 0, 0, 0] = -0.9                   # intensity 0.05 < GARMENT_LEVEL: background
    m = C.measure_attributes(x)
    assert m["size"].tolist() == pytest.approx([36 / 784, 576 / 784, 0.0])
    assert m["brightness"].tolist() == pytest.approx([1.0, 0.3, 0.0])   # over the garment only
    words = C.attribute_words(x, torch.tensor([8, 8, 8]))                 # as bags
    assert words == {"size": ["small", "large", "small"], "brightness": ["light", "dark", "dark"]}
    # the same image is "large" or not depending on its class's median size (0.318 for trousers)
    x2 = blank()
    x2[0, 0, :, 4:18] = 1.0                # 392 pixels: 0.5 of the image
    assert C.attribute_words(torch.cat([x2, x2]), [1, 2])["size"] == ["large", "small"]


def test_measuring_checks_its_input():
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        C.measure_attributes(torch.zeros(2, 28, 28))
    with pytest.raises(ValueError, match="labels must be 2 class indices"):
        C.attribute_words(blank(2), torch.tensor([0, 10]))


def test_the_grammar():
    assert C.caption(8, "small", "light", 0) == "a small light bag"
    assert C.caption(8, "small", "light", 1) == "bags, small, light"
    assert C.caption(8, "small", "light", 2) == "light bag, small"
    assert C.caption(1, None, "dark", 0) == "a dark trouser"
    assert C.caption(1, None, "dark", 1) == "trousers, dark"
    assert C.phrasings(9) == ["an ankle boot", "ankle boots", "ankle boot"]
    assert C.caption(9, "large", None, 0) == "a large ankle boot"
    with pytest.raises(ValueError, match="size must be one of"):
        C.caption(0, "dark")
    with pytest.raises(ValueError, match="label must be in 0..9"):
        C.caption(10)


def parse(caption):
    """(class index, {attribute: word}) read back from a caption of the grammar."""
    words = caption.replace(",", " ").split()
    said = {WORDS[w]: w for w in words if w in WORDS}
    nouns = " ".join(w for w in words if w not in WORDS and w not in ("a", "an"))
    label = next(i for i, pair in enumerate(C.NOUNS) if nouns in pair)
    return label, said


def test_captions_are_deterministic_and_true(fashion):
    images, labels = fashion.train[:600], fashion.train_labels[:600]
    first = C.caption_images(images, labels, seed=3)
    assert first == C.caption_images(images, labels, seed=3)
    assert first != C.caption_images(images, labels, seed=4)
    assert C.caption_images(images[:50], labels[:50], seed=3) == first[:50]   # prefix-stable
    truth = C.attribute_words(images, labels)
    for i, text in enumerate(first):
        label, said = parse(text)
        assert label == labels[i]
        assert all(truth[name][i] == word for name, word in said.items()), text
    assert len(set(first)) > 100 and any(len(parse(c)[1]) == 2 for c in first)


def test_attributes_are_balanced_in_every_class(fashion):
    """Per-class medians split every class about in half, for each attribute."""
    words = C.attribute_words(fashion.train, fashion.train_labels)
    for c in range(10):
        rows = (fashion.train_labels == c).nonzero().flatten().tolist()
        for name, (_, high) in C.ATTRIBUTES.items():
            share = sum(words[name][i] == high for i in rows) / len(rows)
            assert 0.4 < share < 0.6, (FASHION_MNIST_CLASSES[c], name, share)


def test_stored_medians_are_the_training_sets():
    from ddpm_lib import data
    try:
        images, labels = data.load("fashion_mnist", "train", download=False)
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST is not on this machine: {e}")
    assert torch.allclose(C.class_medians(images, labels), C.CLASS_MEDIANS, atol=1e-4)


def test_every_pair_but_the_held_out_ones_is_in_the_training_captions(fashion):
    data = C.captioned_dataset(fashion.train, fashion.train_labels, seed=0)
    seen = {(FASHION_MNIST_CLASSES[label], word)
            for label, said in map(parse, data.captions) for word in said.values()}
    every = set(itertools.product(FASHION_MNIST_CLASSES, WORDS))
    held_out = set(C.held_out_pairs())
    assert 3 <= len(held_out) <= 5 and held_out <= every
    assert seen == every - held_out
    # their images are gone, not only their words: what is left has none of them
    words = C.attribute_words(data.images, data.labels)
    for name, word in held_out:
        attribute = WORDS[word]
        rows = (data.labels == FASHION_MNIST_CLASSES.index(name)).nonzero().flatten().tolist()
        assert rows and all(words[attribute][i] != word for i in rows)
    dropped = len(fashion.train_labels) - len(data.labels)
    assert 0.15 < dropped / len(fashion.train_labels) < 0.25      # half of 4 classes of 10
    assert torch.equal(data.images, fashion.train[data.index])
    assert torch.equal(data.tokens, C.tokenize(data.captions))
    full = C.caption_images(fashion.train, fashion.train_labels, seed=0)
    assert data.captions == [full[i] for i in data.index.tolist()]   # the others keep theirs


def test_tokenizer_round_trip_and_padding():
    every = [p for y in range(10) for s, b in itertools.product((None, "small", "large"),
                                                               (None, "dark", "light"))
             for p in C.phrasings(y, s, b)]
    tokens = C.tokenize(every)
    assert tokens.dtype == torch.long and tokens.shape == (len(every), C.MAX_LEN)
    assert C.decode(tokens) == every
    assert set(tokens.flatten().tolist()) == set(range(len(C.VOCABULARY)))   # all words used
    assert C.VOCABULARY[C.PAD_ID] == C.PAD == "<pad>" and C.PAD_ID == 0
    assert C.tokenize("").tolist() == [[0] * C.MAX_LEN]            # the null caption
    assert C.tokenize(["A Dark Bag"], max_len=4).tolist() == C.tokenize(["a dark bag"], 4).tolist()
    t = C.tokenize("trousers, dark")
    assert [C.VOCABULARY[i] for i in t[0, :3]] == ["trousers", ",", "dark"]


def test_tokenizer_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown word 'red' in caption 'a red bag'.*'dark'.*'bag'"):
        C.tokenize(["a red bag"])
    with pytest.raises(ValueError, match="unknown word '<pad>'"):
        C.tokenize(["<pad>"])
    with pytest.raises(ValueError, match="has 6 words, more than max_len=4"):
        C.tokenize("ankle boots, small, light", max_len=4)
    with pytest.raises(ValueError, match="a string or a list of strings"):
        C.tokenize([1, 2])
    with pytest.raises(ValueError, match=r"ids in 0\.\.28"):
        C.decode(torch.tensor([[29]]))
