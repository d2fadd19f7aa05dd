"""The training pipelines: one digits run, one SVHN run (DDP under torchrun), the k-NN baseline.

Each run trains, evaluates the best epoch on the test split, exports it and writes its run folder
atomically. `python -m training` is the command line over these.
"""
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from export_contract import sha256
from training import digits, digits_synth, feedback_data, reproducible, svhn
from training.errors import UsageError
from training.export import Splits, default_name, export_model
from training.loop import evaluate, fit
from training.recipes import DIGITS_ARCHS, SVHN_ARCHS
from export_contract.publish import atomic_folder
from training.runs import environment, plot_curves, utc_stamp, write_json


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None


def write_run(metrics: dict, model: torch.nn.Module, history, data: Splits, input_spec: dict, out: Path,
              splits: dict | None = None, name: str | None = None) -> Path:
    """The run folder, atomically: checkpoint, metrics.json, curves, export/NAME/ (servable; NAME
    from training.export.default_name unless given)."""
    task, arch, seed = metrics["task"], metrics["arch"], metrics["seed"]
    final = out / f"{task}-{arch}-seed{seed}-{utc_stamp()}"
    test = metrics["test"]
    with atomic_folder(final) as staging:
        torch.save(model.state_dict(), staging / "model.pt")
        # Lets anyone check a retrain bit for bit against this run (and its export's manifest).
        metrics["checkpoint_sha256"] = sha256(staging / "model.pt")
        write_json(staging / "metrics.json", metrics)
        if splits:  # the exact train/val indices, so the split can be audited and reproduced
            np.savez(staging / "splits.npz", **splits)
        plot_curves(staging / "curves", history.val_nll, history.val_error, test["nll"], test["error"],
                    f"{task} {arch} (seed {seed}): best epoch {history.best_epoch + 1} of {history.epochs_run}")
        export_model(model, metrics, final, input_spec, data, name or default_name(metrics), staging / "export")
    return final


def run_metrics(task: str, arch: str, summary: str, data: dict, seed: int, config: dict, device: torch.device,
                started: float, history, result, reproducibility: dict) -> dict:
    return {
        "task": task, "arch": arch, "summary": summary, "data": data, "seed": seed, "config": config,
        "environment": environment(str(device)), "reproducibility": reproducibility,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "epochs_run": history.epochs_run, "best_epoch": history.best_epoch,
        "val_nll": history.val_nll, "val_error": history.val_error,
        "test": {"nll": result.nll, "error": result.error, "errors": result.errors, "n": result.n},
    }


UCI_TRAIN_REPEATS = 8  # the UCI training split's weight beside the generated pictures (training/recipes.py)


def digits_data(photos: bool, device: torch.device | str, synth_dir: Path, jobs: int = 1,
                extra_train: Path | None = None) -> tuple[Splits, dict, dict, dict]:
    """The splits a digits arch is trained, chosen, tested and calibrated on, what to record of them in
    its manifest (data record, input spec, config): the UCI digits, and for an arch trained on photos
    too, the generated pictures in `synth_dir` (made there, in `jobs` processes, if missing).
    `extra_train`: labelled pictures (python -m training feedback-data) added to the training split."""
    data = Splits(*((split.x, split.y) for split in (digits.load_split(name, device) for name in ("train", "val", "test"))))
    if extra_train is not None:
        data, record, config = with_extra_train(data, extra_train, device)
        if not photos:
            return data, record, digits.INPUT_SPEC, config
    if not photos:
        return data, digits.DATA, digits.INPUT_SPEC, {}
    made = digits_synth.ensure(synth_dir, jobs)
    generated = {split: tuple(torch.from_numpy(a).to(device) for a in digits_synth.load(synth_dir, split))
                 for split in (*digits_synth.SPLITS, "outliers")}

    def joined(ours: tuple, theirs: tuple, repeats: int) -> tuple:  # ours repeated: how much it weighs
        return tuple(torch.cat([mine.repeat(repeats, *[1] * (mine.dim() - 1)), other]) for mine, other in zip(ours, theirs))
    val_repeats = max(1, round(len(generated["val"][1]) / len(data.val[1])))
    data = Splits(joined(data.train, generated["train"], UCI_TRAIN_REPEATS), joined(data.val, generated["val"], val_repeats),
                  data.test, extra=("generated photos and drawings", *generated["test"]), outliers=generated["outliers"][0])
    record = digits_synth.data_record(made)
    if extra_train is not None:
        record = {**record, "description": record["description"] + "; " + config["extra_train"]["description"]}
    return (data, record, {**digits.INPUT_SPEC, "resized": True},
            {"synth_dir": str(synth_dir.resolve()), "uci_train_repeats": UCI_TRAIN_REPEATS, "uci_val_repeats": val_repeats,
             **({"extra_train": config["extra_train"]} if extra_train is not None else {})})


def with_extra_train(data: Splits, path: Path, device) -> tuple[Splits, dict, dict]:
    """`data` with the file's pictures added to its training split; the data record and run config that say so."""
    x, y = feedback_data.load(path, tuple(digits.INPUT_SPEC["shape"][1:]), tuple(digits.INPUT_SPEC["range"]))
    train = tuple(torch.cat([mine, torch.from_numpy(theirs).to(device)]) for mine, theirs in zip(data.train, (x, y)))
    described = f"{len(y):,} labelled pictures from {path.name} added to the training split"
    extra = {"file": str(path.resolve()), "sha256": sha256(path), "n": len(y),
             "description": described}
    return replace(data, train=train), {**digits.DATA, "description": digits.DATA["description"] + "; " + described}, {
        "extra_train": extra}


def train_digits(arch: str, seed: int, max_epochs: int, patience: int, device: torch.device, out: Path,
                 progress: bool = True, reproducible_mode: bool | None = None,
                 synth_dir: Path = Path("data/digits-synth"), jobs: int = 1,
                 extra_train: Path | None = None) -> tuple[Path, dict]:
    """Train one digits model, evaluate it on test, export it, and write its run folder atomically.

    `reproducible_mode`: True requires the pins (training.reproducible.pin_before_torch() before
    torch was imported, a CPU with AVX2), which make the weights the same on any x86_64 machine with
    AVX2; None (the default) pins where possible and notes why not; False does not pin. An arch
    trained on photos too takes them from `synth_dir` (made there, in `jobs` processes, if missing).
    """
    spec = DIGITS_ARCHS[arch]
    reproducibility = (reproducible.OFF if reproducible_mode is False
                       else reproducible.activate(device, required=bool(reproducible_mode)))
    data, record, input_spec, config = digits_data(spec.photos, device, synth_dir, jobs, extra_train)
    torch.manual_seed(seed)
    model = spec.build().to(device)
    started = time.perf_counter()
    history = fit(model, *data.train, *data.val, spec.recipe, max_epochs=max_epochs, patience=patience,
                  progress=progress, desc=f"digits {arch}", outliers=data.outliers)
    result = evaluate(model, *data.test)
    config = {"max_epochs": max_epochs, "patience": patience, "recipe": asdict(spec.recipe), **config}
    metrics = run_metrics("digits", arch, spec.summary, record, seed, config, device, started, history, result,
                          reproducibility)
    return write_run(metrics, model, history, data, input_spec, out), metrics


def train_svhn(args) -> tuple[Path, dict] | None:
    """Train the SVHN CNN (under torchrun: data-parallel); rank 0 evaluates, exports and writes."""
    rank, world, device = init_distributed(args.device)
    try:
        reproducibility = reproducible.activate(device) if args.reproducible else reproducible.OFF  # opt-in
        if args.download and rank == 0:
            svhn.download(args.data_dir)
        if world > 1:
            dist.barrier()
        train_all = svhn.load_split(args.data_dir, "train", verify_md5=not args.skip_md5)
        test = svhn.load_split(args.data_dir, "test", verify_md5=not args.skip_md5)
        train_idx, val_idx = svhn.stratified_split(train_all.y, args.val_fraction, args.seed)
        spec = SVHN_ARCHS["cnn"]
        recipe = replace(spec.recipe, batch_size=args.batch_size or default_batch_size(spec.recipe, len(train_idx)),
                         lr=args.lr or spec.recipe.lr)
        torch.manual_seed(args.seed)

        def on_device(array):
            return torch.from_numpy(array).to(device)
        train_x, train_y = on_device(train_all.x[train_idx]), on_device(train_all.y[train_idx])
        val_x, val_y = on_device(train_all.x[val_idx]), on_device(train_all.y[val_idx])
        model_kwargs = {"widths": [args.width, 4 * args.width, 4 * args.width]}
        model = spec.build(**model_kwargs).to(device)
        cuda = device.type == "cuda"
        started = time.perf_counter()
        history = fit(model, train_x, train_y, val_x, val_y, recipe, max_epochs=args.max_epochs,
                      patience=args.patience, progress=rank == 0, desc="svhn cnn", bf16=cuda, channels_last=cuda,
                      compile=args.compile, val_every=args.val_every)
        if rank != 0:
            return None
        if world > 1:  # torchrun's OMP_NUM_THREADS=1 suits the training ranks; the export's CPU checks run here alone
            torch.set_num_threads(len(os.sched_getaffinity(0)))
        test_x, test_y = on_device(test.x), on_device(test.y)
        result = evaluate(model, test_x, test_y)
        config = {"max_epochs": args.max_epochs, "patience": args.patience, "recipe": asdict(recipe),
                  "data_dir": str(args.data_dir.resolve()), "verify_md5": not args.skip_md5,
                  "val_fraction": args.val_fraction, "world_size": world, "compile": args.compile,
                  "val_every": args.val_every, "model_kwargs": model_kwargs,
                  "train_images": len(train_idx), "val_images": len(val_idx), "bf16": cuda}
        metrics = run_metrics("svhn", "cnn", spec.summary, svhn.data_record(args.data_dir, train_all, test), args.seed,
                              config, device, started, history, result, reproducibility)
        metrics["images_per_second"] = round(history.epochs_run * len(train_idx) / history.train_seconds, 1)
        durations = np.diff([0.0, *history.epoch_ends])
        metrics["seconds_per_epoch"] = round(float(np.median(durations)), 3)  # median: not the first (compile, warm-up)
        metrics["seconds_to_best_epoch"] = round(history.epoch_ends[history.best_epoch], 2)
        data = Splits((train_x, train_y), (val_x, val_y), (test_x, test_y))
        run_dir = write_run(metrics, model, history, data, svhn.INPUT_SPEC, args.out,
                            splits={"train_indices": train_idx, "val_indices": val_idx}, name=args.name)
        return run_dir, metrics
    finally:
        if world > 1:
            dist.destroy_process_group()


MIN_STEPS_PER_EPOCH = 32


def default_batch_size(recipe, train_images: int) -> int:
    """The recipe's batch (512), smaller on small sets so that an epoch is at least
    MIN_STEPS_PER_EPOCH steps: 4,000 crops at 512 are 7 steps an epoch, and 6 epochs ended at chance."""
    return max(16, min(recipe.batch_size, train_images // MIN_STEPS_PER_EPOCH))


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """Join torchrun's process group when launched by it (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_name)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_name)
    shared = False
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        shared = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > gpus  # more processes than GPUs
        device = torch.device("cuda", local_rank % gpus)
        torch.cuda.set_device(device)
    # NCCL wants one GPU per process; processes sharing one (a test of the DDP path) use gloo
    dist.init_process_group("nccl" if device.type == "cuda" and not shared else "gloo")
    return dist.get_rank(), world, device


def knn_baseline() -> dict:
    """k-nearest neighbours on the same split, k chosen on validation error."""
    from sklearn.neighbors import KNeighborsClassifier
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
        (x.reshape(len(x), -1), y) for x, y in map(digits.split_arrays, ("train", "val", "test")))
    started = time.perf_counter()
    val_errors = {k: np.mean(KNeighborsClassifier(k).fit(train_x, train_y).predict(val_x) != val_y)
                  for k in range(1, 11)}
    k = min(val_errors, key=lambda k: (val_errors[k], k))
    errors = int(np.sum(KNeighborsClassifier(k).fit(train_x, train_y).predict(test_x) != test_y))
    return {"arch": f"k-NN (k={k}, chosen on val)", "test": {"nll": None, "error": errors / len(test_y),
            "errors": errors, "n": len(test_y)}, "epochs_run": None, "wall_seconds": round(time.perf_counter() - started, 2)}


def comparison_table(rows: list[dict]) -> str:
    lines = ["| model | test NLL | test error | errors | epochs (best) | wall s |", "|---|---|---|---|---|---|"]
    for row in rows:
        test = row["test"]
        nll = "n/a (hard votes)" if test["nll"] is None else f"{test['nll']:.4f}"
        epochs = "—" if row["epochs_run"] is None else f"{row['epochs_run']} ({row['best_epoch'] + 1})"
        lines.append(f"| {row['arch']} | {nll} | {test['error']:.4f} | {test['errors']}/{test['n']} | {epochs} "
                     f"| {row['wall_seconds']:.1f} |")
    return "\n".join(lines) + "\n"
