"""The one train/evaluate loop, shared by the digits and SVHN pipelines.

Data lives on the training device as whole tensors; an epoch is a seeded permutation cut into
batches. Early stopping watches validation NLL and restores the best epoch's weights.
"""
import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from export_contract import Figures
from training import augment
from training.ema import WeightAverage
from training.progress import EpochProgress
from training.recipes import Recipe

AT_CHANCE = 0.85  # validation error at or above this, with 10 classes (chance: 0.9), is "not started"


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> Figures:
    """Mean NLL and classification error of a log-probability model on (x, y).

    The sums stay on the device until the end (one synchronisation, not two per batch); each batch's
    float32 sum is added in float64, as Python floats added them before."""
    model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    errors = torch.zeros((), dtype=torch.int64, device=x.device)
    for start in range(0, len(y), batch_size):
        log_probs = model(x[start:start + batch_size]).float()
        target = y[start:start + batch_size]
        nll_sum += F.nll_loss(log_probs, target, reduction="sum").double()
        errors += (log_probs.argmax(1) != target).sum()
    nll, wrong = nll_sum.item(), int(errors.item())
    return Figures(nll=nll / len(y), error=wrong / len(y), errors=wrong, n=len(y))


class EarlyStopping:
    """Tracks the lowest validation NLL; says stop after `patience` epochs without improvement."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best_nll = math.inf
        self.best_epoch = -1
        self.best_state: dict | None = None
        self.epochs_without_improvement = 0

    def update(self, epoch: int, val_nll: float, model: torch.nn.Module, counts: bool = True, epochs: int = 1) -> bool:
        """Record a validation NLL, `epochs` epochs after the last one; True when training should stop.
        A validation that does not `count` (still at chance) is kept if it is the best so far but never
        uses up patience."""
        if val_nll < self.best_nll:
            self.best_nll, self.best_epoch = val_nll, epoch
            self.best_state = copy.deepcopy(model.state_dict())
            self.epochs_without_improvement = 0
        elif counts:
            self.epochs_without_improvement += epochs
        return self.epochs_without_improvement >= self.patience

    @property
    def patience_left(self) -> int:
        return self.patience - self.epochs_without_improvement

    def restore_best(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.best_state)


def augment_batch(x: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    x = x.float()  # uint8 photos: padding and interpolation need floats (the model's Scale accepts both)
    if recipe.rotate_degrees or recipe.zoom:
        x = augment.random_affine(x, recipe.rotate_degrees, recipe.zoom, recipe.shift)
    elif recipe.shift:
        x = augment.random_translate(x, int(recipe.shift), recipe.pad_mode)
    if recipe.cutout:
        x = augment.cutout(x, recipe.cutout)
    return x


@dataclass
class History:
    val_nll: list[float | None] = field(default_factory=list)  # per epoch; None: not validated (val_every)
    val_error: list[float | None] = field(default_factory=list)
    best_epoch: int = -1
    epochs_run: int = 0
    train_seconds: float = 0.0
    epoch_ends: list[float] = field(default_factory=list)  # seconds since the start, validation included


def make_optimizer(recipe: Recipe, params, device: torch.device) -> torch.optim.Optimizer:
    """The recipe's optimizer. On CUDA AdamW and SGD take their fused kernels (one launch a step for all
    parameters, not one per parameter group and operation); on the CPU the default foreach path stays,
    so that reproducible runs keep their bits."""
    fused = {"fused": True} if device.type == "cuda" else {}
    if recipe.optimizer == "adamax":
        return torch.optim.Adamax(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, **fused)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, weight_decay=recipe.weight_decay, momentum=0.9, nesterov=True,
                               **fused)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) under torchrun's process group, (0, 1) otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# torch.compile modes that replay CUDA graphs: each training step must say that it begins.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def plateau_patience(epochs: int, val_every: int) -> int:
    """ReduceLROnPlateau's patience in validations for a patience of `epochs` epochs: it decays the lr
    after patience + 1 validations without improvement, so after at least `epochs` + 1 such epochs."""
    return math.ceil((epochs + 1) / val_every) - 1


def validate(model: torch.nn.Module, val_x: torch.Tensor, val_y: torch.Tensor, rank: int, world: int
             ) -> tuple[float, float]:
    """Rank 0's validation NLL and error, broadcast to every rank."""
    figures = torch.zeros(2, dtype=torch.float64, device=val_x.device)
    if rank == 0:
        val = evaluate(model, val_x, val_y)
        figures += torch.tensor([val.nll, val.error], dtype=torch.float64, device=val_x.device)
    if world > 1:
        dist.broadcast(figures, 0)
    val_nll, val_error = figures.tolist()
    return val_nll, val_error


def fit(model: torch.nn.Module, train_x: torch.Tensor, train_y: torch.Tensor,
        val_x: torch.Tensor, val_y: torch.Tensor, recipe: Recipe, *,
        max_epochs: int, patience: int, progress: bool = True, desc: str = "train",
        bf16: bool = False, channels_last: bool = False, compile: str | None = None, val_every: int = 1,
        outliers: torch.Tensor | None = None) -> History:
    """Train until validation NLL stops improving, then restore the best epoch's weights.
    `compile`: a torch.compile mode for the training forward pass (None: eager). `val_every`:
    validate every that many epochs and after the last; patience and lr decay still count epochs.
    `outliers`: non-digit pictures for the recipe's outlier exposure.

    Under torchrun every rank trains on its shard of each batch (DistributedDataParallel averages
    the gradients); rank 0 alone evaluates and broadcasts the validation figures, so every rank
    takes the same scheduler and early-stopping decisions.
    """
    rank, world = rank_and_world()
    device = train_x.device
    if channels_last:  # NHWC convolutions run on the tensor cores without layout transposes
        model = model.to(memory_format=torch.channels_last)
    trained = DistributedDataParallel(model) if world > 1 else model
    forward = torch.compile(trained, mode=compile) if compile else trained
    optimizer = make_optimizer(recipe, model.parameters(), device)
    scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=0.1, patience=plateau_patience(recipe.lr_decay_patience, val_every))
        if recipe.lr_decay_patience > 0 else None)
    # The EMA of the weights is what gets validated, early-stopped and kept: it smooths the epoch-to-
    # epoch noise that augmentation adds to val NLL, so early stopping does not fire on a bad epoch.
    averaged = WeightAverage(model, recipe.ema_decay, recipe.ema_bias_correction) if recipe.ema_decay > 0 else None
    evaluated = averaged.module if averaged is not None else model
    stopper = EarlyStopping(patience)
    history = History()
    started = time.perf_counter()
    last_validated = -1
    bar = EpochProgress(desc, max_epochs, enabled=progress and rank == 0)
    for epoch in range(max_epochs):
        model.train()
        order = torch.randperm(len(train_y), device=device)
        if world > 1:
            dist.broadcast(order, 0)  # one permutation for all ranks: their shards never overlap
        for start in range(0, len(order), recipe.batch_size):
            batch = order[start:start + recipe.batch_size][rank::world]
            x, y = train_x[batch], train_y[batch]
            exposed = recipe.outlier_weight > 0 and outliers is not None
            if exposed:
                x = torch.cat([x, outliers[torch.randint(len(outliers), (max(1, len(batch) // 4),), device=device)]])
            if recipe.augments():
                x = augment_batch(x, recipe)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if compile in CUDA_GRAPH_MODES:
                torch.compiler.cudagraph_mark_step_begin()
            # bf16 autocast: tensor-core matmuls at full fp32 range, so no loss scaling is needed
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                log_probs = forward(x).float()
            loss = smoothed_nll(log_probs[:len(y)], y, recipe.label_smoothing)
            if exposed:  # cross-entropy to uniform probabilities
                loss = loss - recipe.outlier_weight * log_probs[len(y):].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if averaged is not None:
                averaged.update(model)
        if (epoch + 1) % val_every and epoch + 1 < max_epochs:
            history.val_nll.append(None)
            history.val_error.append(None)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the epoch ends when the device has run it, not when it was queued
            history.epoch_ends.append(time.perf_counter() - started)
            continue
        val_nll, val_error = validate(evaluated, val_x, val_y, rank, world)
        history.val_nll.append(val_nll)
        history.val_error.append(val_error)
        history.epoch_ends.append(time.perf_counter() - started)  # .tolist() in validate waited for the device
        # At chance the model has not found the digit yet: a flat NLL there says "not started", not
        # "converged", so neither the lr decay nor the patience counts such epochs.
        started_learning = val_error < AT_CHANCE
        if scheduler is not None and started_learning:
            scheduler.step(val_nll)
        stop = stopper.update(epoch, val_nll, evaluated, counts=started_learning, epochs=epoch - last_validated)
        last_validated = epoch
        bar.update(epoch, val_nll, val_error, stopper.best_epoch, stopper.best_nll, stopper.patience_left)
        if stop:
            break
    bar.close()
    stopper.restore_best(model)
    if channels_last:
        model.to(memory_format=torch.contiguous_format)  # export and evaluation expect the default layout
    history.best_epoch = stopper.best_epoch
    history.epochs_run = len(history.val_nll)
    history.train_seconds = time.perf_counter() - started
    return history


def smoothed_nll(log_probs: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """NLL against targets mixed with the uniform distribution (label smoothing on log-probs)."""
    return (1 - smoothing) * F.nll_loss(log_probs, target) - smoothing * log_probs.mean(1).mean()
