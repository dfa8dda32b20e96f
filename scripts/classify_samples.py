"""A quick quality check of generated Fashion-MNIST samples: train a small CNN classifier
on the real training set (a few minutes on a CPU), report its test accuracy, then classify
the samples: the class histogram, and how confident the classifier is on them compared
with real test images.

    python scripts/classify_samples.py samples.npy [--epochs 1]

``samples.npy`` is what ``python -m ddpm_lib sample --npy`` writes: uint8 (N, 28, 28).
(The evaluation chapter's ``ddpm_lib.metrics`` will replace this with proper scores.)
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpm_lib.data import FASHION_MNIST_CLASSES, load


def classifier() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("samples")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    x, y = load("fashion_mnist", "train")
    xt, yt = load("fashion_mnist", "test")
    net = classifier()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(args.epochs):
        for idx in torch.randperm(len(x)).split(128):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        p_test = torch.cat([net(b).softmax(1) for b in xt.split(1000)])
        s = torch.from_numpy(np.load(args.samples)).float().div(127.5).sub(1).unsqueeze(1)
        p_samp = net(s).softmax(1)
    acc = (p_test.argmax(1) == yt).float().mean().item()
    print(f"classifier test accuracy: {acc:.3f}")
    print(f"mean max-probability: real test images {p_test.max(1).values.mean():.3f}, "
          f"samples {p_samp.max(1).values.mean():.3f}")
    print(f"samples classified with probability > 0.9: {(p_samp.max(1).values > 0.9).float().mean():.3f} "
          f"(real test images: {(p_test.max(1).values > 0.9).float().mean():.3f})")
    counts = torch.bincount(p_samp.argmax(1), minlength=10).tolist()
    print("predicted classes of the samples: " + ", ".join(f"{c}: {n}" for c, n in zip(FASHION_MNIST_CLASSES, counts)))
    h = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    entropy = -(h[h > 0] * h[h > 0].log()).sum().item()
    print(f"entropy of the class histogram: {entropy:.3f} nats (uniform over 10 classes: {np.log(10):.3f})")


if __name__ == "__main__":
    main()
