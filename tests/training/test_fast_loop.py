"""What the training loop does for speed on a GPU (issue 27), checked on the CPU: the foreach weight
average gives AveragedModel's bits, evaluation sums as before, --val-every validates every k-th epoch
and the last while patience and the lr decay still count epochs, the fused optimizer on CUDA only,
--compile's mode reaches torch.compile (CUDA-graph modes mark every step), and the flags' errors."""
import pytest
import torch
import torch.nn.functional as F

from export_contract import Figures
from training import loop
from training.ema import WeightAverage
from training.loop import Recipe, evaluate, fit, make_optimizer, plateau_patience


def small_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.GELU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10),
                               torch.nn.LogSoftmax(dim=1))


def averaged_model(model: torch.nn.Module, decay: float, bias_correction: bool):
    """The EMA the loop used before issue 27: torch's AveragedModel, per tensor when bias-corrected."""
    swa = torch.optim.swa_utils
    if not bias_correction:
        return swa.AveragedModel(model, multi_avg_fn=swa.get_ema_multi_avg_fn(decay), use_buffers=True)

    def corrected(averaged, current, num_averaged):
        weight = (1 - decay) / (1 - decay ** (num_averaged + 1))
        return averaged + (current - averaged) * weight.to(averaged.dtype)
    return swa.AveragedModel(model, avg_fn=corrected, use_buffers=True)


@pytest.mark.parametrize("decay, bias_correction", [(0.995, False), (0.9, True)])
def test_weight_average_gives_averaged_models_bits(decay, bias_correction):
    torch.manual_seed(0)
    model = small_cnn()
    ours, reference = WeightAverage(model, decay, bias_correction), averaged_model(model, decay, bias_correction)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(6):  # the steps move the weights and BatchNorm's statistics and batch count
        loss = F.nll_loss(model(torch.randn(8, 3, 6, 6)), torch.randint(10, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ours.update(model)
        reference.update_parameters(model)
    mine, theirs = ours.module.state_dict(), reference.module.state_dict()
    assert mine.keys() == theirs.keys()
    assert [key for key in mine if not torch.equal(mine[key], theirs[key])] == []
    assert not torch.equal(mine["0.weight"], model.state_dict()["0.weight"])  # an average, not a copy


def test_evaluate_sums_as_the_per_batch_loop_did():
    torch.manual_seed(1)
    model, x, y = small_cnn().eval(), torch.randn(50, 3, 6, 6), torch.randint(10, (50,))
    nll_sum, errors = 0.0, 0
    with torch.no_grad():
        for start in range(0, 50, 7):
            log_probs = model(x[start:start + 7])
            nll_sum += F.nll_loss(log_probs, y[start:start + 7], reduction="sum").item()
            errors += (log_probs.argmax(1) != y[start:start + 7]).sum().item()
    assert evaluate(model, x, y, batch_size=7) == Figures(nll=nll_sum / 50, error=errors / 50, errors=errors, n=50)


def scripted_fit(monkeypatch, nlls: list[float], **kwargs):
    """fit() on a tiny set, each validation answering the next of `nlls` (error 0.1: past chance);
    returns the history and the lr after each validation."""
    answers, lrs = iter(nlls), []

    def scripted_evaluate(model, x, y):
        return Figures(nll=next(answers), error=0.1, errors=1, n=10)
    monkeypatch.setattr(loop, "evaluate", scripted_evaluate)
    real_step = torch.optim.lr_scheduler.ReduceLROnPlateau.step

    def recording_step(self, metric):
        real_step(self, metric)
        lrs.append(self.optimizer.param_groups[0]["lr"])
    monkeypatch.setattr(torch.optim.lr_scheduler.ReduceLROnPlateau, "step", recording_step)
    x, y = torch.randn(32, 3, 6, 6), torch.arange(32) % 10
    history = fit(small_cnn(), x, y, x, y, Recipe(optimizer="adamw", batch_size=16, lr=1.0, lr_decay_patience=2),
                  progress=False, **kwargs)
    return history, lrs


def test_val_every_validates_every_kth_epoch_and_the_last(monkeypatch):
    history, _ = scripted_fit(monkeypatch, [0.9, 0.8, 0.7], max_epochs=5, patience=20, val_every=2)
    assert history.val_nll == [None, 0.9, None, 0.8, 0.7]  # epochs 2 and 4, and 5, the last
    assert history.val_error == [None, 0.1, None, 0.1, 0.1]
    assert history.epochs_run == 5 and len(history.epoch_ends) == 5 and history.best_epoch == 4


@pytest.mark.parametrize("val_every, patience, epochs_run", [(1, 4, 5), (2, 4, 6), (2, 5, 8), (3, 4, 9)])
def test_patience_counts_epochs_between_validations(monkeypatch, val_every, patience, epochs_run):
    # best at the first validation, worse ever after: stop once `patience` epochs have gone by without improvement
    history, _ = scripted_fit(monkeypatch, [1.0 + i / 10 for i in range(20)], max_epochs=20, patience=patience,
                              val_every=val_every)
    assert history.epochs_run == epochs_run and history.best_epoch == val_every - 1


def test_lr_decay_waits_as_many_epochs_whatever_the_validation_interval(monkeypatch):
    assert [plateau_patience(2, k) for k in (1, 2, 3, 4)] == [2, 1, 0, 0]
    assert plateau_patience(6, 2) == 3
    # lr_decay_patience 2: the lr falls after 3 epochs without improvement; validating every 2nd
    # epoch, after 2 validations (4 epochs), not 3 (6)
    _, lrs = scripted_fit(monkeypatch, [1.0, 1.1, 1.2, 1.3], max_epochs=8, patience=20, val_every=2)
    assert lrs == pytest.approx([1.0, 1.0, 0.1, 0.1])


def test_the_optimizer_is_fused_on_cuda_only():
    params = list(small_cnn().parameters())
    for name in ("adamw", "sgd"):
        assert not make_optimizer(Recipe(optimizer=name), params, torch.device("cpu")).defaults.get("fused")
        assert make_optimizer(Recipe(optimizer=name), params, torch.device("cuda")).defaults["fused"] is True
    assert make_optimizer(Recipe(optimizer="adamax"), params, torch.device("cuda")).defaults.get("fused") is None


@pytest.mark.parametrize("mode, marks", [("default", 0), ("reduce-overhead", 4), ("max-autotune", 4), (None, 0)])
def test_compile_mode_reaches_torch_compile_and_graph_modes_mark_every_step(monkeypatch, mode, marks):
    compiled, marked = [], []
    monkeypatch.setattr(torch, "compile", lambda module, mode: compiled.append(mode) or module)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marked.append(1))
    x, y = torch.randn(64, 3, 6, 6), torch.arange(64) % 10
    fit(small_cnn(), x, y, x, y, Recipe(batch_size=16), max_epochs=1, patience=1, progress=False, compile=mode)
    assert compiled == ([mode] if mode else []) and len(marked) == marks  # 64 images, batch 16: 4 steps


@pytest.mark.parametrize("args, message", [
    (["--val-every", "0"], "argument --val-every: must be positive, got 0"),
    (["--val-every", "two"], "argument --val-every: 'two' is not an integer"),
    (["--compile", "fast"], "argument --compile: invalid choice: 'fast'"),
])
def test_svhn_speed_flags_are_checked_in_one_line(cli, tmp_path, args, message):
    result = cli("training", "svhn", *args, "--out", str(tmp_path / "runs"))
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
