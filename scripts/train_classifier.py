"""Train the small Fashion-MNIST classifier of ``ddpm_lib.features``, whose features the scores of
``ddpm_lib.metrics`` use by default (the shipped ``ddpm_lib/weights/fashion_mnist_classifier.pt``),
report its test accuracy, save it.

    python scripts/train_classifier.py                       # the shipped recipe, a few minutes on one CPU thread
    python scripts/train_classifier.py --out my_classifier.pt --epochs 2

Deterministic: the seed fixes the initial weights, the order of the batches and the
augmentation (random horizontal flips), and one CPU thread is used, so the same torch
version gives the same weights, bit for bit (the file's sha256 also depends on the date and
training time recorded in its meta). The file is a plain dict (``state_dict``, ``config``,
``meta``) that loads with ``torch.load(..., weights_only=True)``. After retraining the
shipped file, put the sha256 printed at the end into ``CLASSIFIER_SHA256`` in
``ddpm_lib/features.py``; a file of your own loads with
``features.load_classifier(path=..., expected_sha256=None)``.
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ddpm_lib.data import load
from ddpm_lib.features import CLASSIFIER_FILE, FashionClassifier
from ddpm_lib.metrics import classifier_accuracy
from ddpm_lib.pretrained import WEIGHTS_DIR, sha256
from ddpm_lib.io import save_checkpoint


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(WEIGHTS_DIR / CLASSIFIER_FILE))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x, y = load("fashion_mnist", "train")
    x_test, y_test = load("fashion_mnist", "test")
    model = FashionClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = -(-len(x) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)

    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        total, n = 0.0, 0
        for idx in torch.randperm(len(x), generator=gen).split(args.batch_size):
            xb = x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            total, n = total + loss.item() * len(idx), n + len(idx)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {total / n:.4f}, "
              f"test accuracy {classifier_accuracy(x_test, y_test, model.eval()):.4f}, {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    test_accuracy = classifier_accuracy(x_test, y_test, model.eval())

    recipe = "python scripts/train_classifier.py " + " ".join(
        f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in vars(args).items() if k != "out")
    blob = dict(
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
        config=dict(model.config, channels=list(model.config["channels"])),
        meta=dict(test_accuracy=round(test_accuracy, 4), train_seconds=round(seconds, 1), recipe=recipe,
                  date=datetime.date.today().isoformat(), torch=str(torch.__version__),
                  data="Fashion-MNIST training split (60,000 images), accuracy on the test split (10,000)"),
    )
    out = Path(args.out)
    save_checkpoint(blob, out)            # atomically
    print(f"test accuracy {test_accuracy:.4f}; trained in {seconds:.0f} s on {args.threads} thread(s)")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB), sha256 {sha256(out)}")


if __name__ == "__main__":
    main()
