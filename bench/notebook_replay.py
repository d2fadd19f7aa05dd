"""The original notebook's digits loop, replayed independently of `training/`, to judge the seed reproductions.

    .venv/bin/python -m bench.notebook_replay [--archs mlp cnn] [--seeds 0 1 2] [--max-epochs 1000]

What it keeps from the notebook (../shared/seed/assignment4.txt): `torch.manual_seed` then the
model, a shuffling `DataLoader` (batch 64), Adamax (lr 1e-3, wd 1e-5), val NLL per epoch, the best
weights kept, and its stopping rule `patience > 20`. It deliberately imports nothing from
`training/`: if `python -m training digits --arch seed-*` and this replay disagree in distribution,
one of them is wrong. Their per-seed numbers differ because the two draw the batch order from
the random stream differently. Prints a Markdown table.
"""
import argparse

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def notebook_net(arch: str) -> nn.Module:
    if arch == "mlp":
        return nn.Sequential(nn.Linear(64, 256), nn.Sigmoid(), nn.Linear(256, 10), nn.LogSoftmax(dim=1))
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 32, 3, padding=1), nn.Sigmoid(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.Sigmoid(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256, 256), nn.Sigmoid(), nn.Linear(256, 10), nn.LogSoftmax(dim=1))


@torch.no_grad()
def nll_and_errors(net: nn.Module, loader: DataLoader) -> tuple[float, int]:
    net.eval()
    nll, errors, n = 0.0, 0, 0
    for x, y in loader:
        log_probs = net(x)
        nll += nn.functional.nll_loss(log_probs, y, reduction="sum").item()
        errors += (log_probs.argmax(1) != y).sum().item()
        n += len(y)
    return nll / n, errors


def replay(arch: str, seed: int, max_epochs: int = 1000) -> tuple[float, int, int]:
    """(test NLL, test errors, epochs run) of one notebook run."""
    torch.manual_seed(seed)
    digits = load_digits()

    def loader(rows: slice, shuffle: bool) -> DataLoader:
        data = TensorDataset(torch.tensor(digits.data[rows].astype(np.float32)), torch.tensor(digits.target[rows]))
        return DataLoader(data, batch_size=64, shuffle=shuffle)
    train, val, test = loader(slice(0, 1000), True), loader(slice(1000, 1350), False), loader(slice(1350, None), False)
    net = notebook_net(arch)
    optimizer = torch.optim.Adamax(net.parameters(), lr=1e-3, weight_decay=1e-5)
    best_nll, best_state, patience = float("inf"), None, 0
    for epoch in range(max_epochs):
        net.train()
        for x, y in train:
            loss = nn.functional.nll_loss(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val_nll, _ = nll_and_errors(net, val)
        if val_nll < best_nll:
            best_nll, best_state, patience = val_nll, {k: v.clone() for k, v in net.state_dict().items()}, 0
        else:
            patience += 1
        if patience > 20:  # the notebook's rule: 21 epochs without improvement
            break
    net.load_state_dict(best_state)
    return *nll_and_errors(net, test), epoch + 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archs", nargs="+", choices=["mlp", "cnn"], default=["mlp", "cnn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=1000)
    args = parser.parse_args()
    print("| notebook arch | seed | test NLL | errors /447 | epochs |\n|---|---|---|---|---|")
    for arch in args.archs:
        for seed in args.seeds:
            nll, errors, epochs = replay(arch, seed, args.max_epochs)
            print(f"| {arch} | {seed} | {nll:.4f} | {errors} | {epochs} |", flush=True)


if __name__ == "__main__":
    main()
