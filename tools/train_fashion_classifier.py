"""Train the Fashion-MNIST classifier behind ``fid_fashion``: ``python tools/train_fashion_classifier.py``.

``metrics.FashionClassifier`` (two conv stages and a 128-unit hidden layer) is trained with Adam on the
60,000 training images (Debian's dataset-fashion-mnist, or torchvision's download with ``--download``),
seeded, and scored on the 10,000 test images. The weights go to ``ddpm_lib/weights/fashion_classifier.safetensors``
and a record (test accuracy, settings, time, machine) to ``fashion_classifier.json`` beside them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from ddpm_lib.checkpoint import write_safetensors_atomic, write_text_atomic
from ddpm_lib.data import load_fashion_mnist
from ddpm_lib.metrics import FASHION_WEIGHTS, FashionClassifier
from ddpm_lib.rng import global_seed
from ddpm_lib.studies import machine_note


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    net.eval()
    hits = sum(int((net(images[s:s + batch].float() / 255).argmax(1) == labels[s:s + batch]).sum())
               for s in range(0, len(images), batch))
    return hits / len(images)


def train(epochs: int, batch_size: int, lr: float, seed: int, download: bool) -> tuple[FashionClassifier, dict]:
    train_ds, test_ds = (load_fashion_mnist(split, download=download) for split in ("train", "test"))
    with global_seed(seed):
        net = FashionClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(train_ds), generator=gen)
        for s in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[s:s + batch_size]
            loss = nn.functional.cross_entropy(net(train_ds.images[idx].float() / 255), train_ds.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}/{epochs}: test accuracy {accuracy(net, test_ds.images, test_ds.labels):.4f}",
              flush=True)
    record = {"test_accuracy": accuracy(net, test_ds.images, test_ds.labels),
              "train_accuracy": accuracy(net, train_ds.images, train_ds.labels),
              "parameters": sum(p.numel() for p in net.parameters()), "epochs": epochs, "batch_size": batch_size,
              "lr": lr, "seed": seed, "seconds": round(time.perf_counter() - t0, 1), "machine": machine_note(),
              "torch": torch.__version__}
    return net.eval(), record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=FASHION_WEIGHTS)
    p.add_argument("--download", action="store_true", help="let torchvision fetch Fashion-MNIST if it is missing")
    args = p.parse_args(argv)
    net, record = train(args.epochs, args.batch_size, args.lr, args.seed, args.download)
    record["command"] = "python tools/train_fashion_classifier.py" + "".join(
        f" {a}" for a in (argv if argv is not None else __import__("sys").argv[1:]))
    write_safetensors_atomic(args.out, net.state_dict(), {"format": "ddpm_lib-fashion-classifier"})
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}: test accuracy {record['test_accuracy']:.4f} in {record['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
