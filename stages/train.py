"""`train`: a ResNet50 detector from the feature cache, with the reference recipe by default.

Adam (lr 1e-4, betas 0.9/0.999), BCE-with-logits, random horizontal flip, and CNNDetection's
schedule: when validation accuracy has not improved by 0.001 for `patience` epochs, lr /= 10;
stop once lr < 1e-6 or after `epochs`. Each epoch's randomness (order, flips) derives from
(seed, epoch), so `--resume` from `last.pt` continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.config import describe_differences
from pipeline.device import resolve_device
from pipeline.distributed import init_training_group, local_device, rank_positions
from pipeline.progress import Progress
from stages.classifier import build_resnet50, classifier_input
from storage.atomic import write_bytes_atomic
from storage.cache_folder import FeatureCache, find_cache, perturbed_siblings
from storage.feature_dataset import CacheDataset, CacheIndex, WdsStream, cache_index
from storage.run import Run, RunError

MIN_LR = 1e-6
IMPROVE_DELTA = 1e-3


@dataclass
class TrainOptions:
    """Options of a training run; those in `RECIPE` must match when resuming."""

    name: str = "default"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-4
    patience: int = 5
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision (bf16) on CUDA only
    balance: bool = False  # sample real and fake equally often
    init_weights: str | None = None  # local ImageNet ResNet50 weights; default: random init
    feature_id: str | None = None
    sources: list[str] = field(default_factory=list)  # train on these sources only
    partial: bool = False  # allow a cache whose extraction has not finished
    max_batches: int = 0  # stop each epoch after this many batches (0: all); for smoke tests
    variants: bool = False  # draw each sample from the clean or a perturbed cache, uniformly
    freeze_bn: bool = False  # BatchNorm uses (and keeps) its running statistics while training
    shuffle_buffer: int = 1000  # WebDataset caches: samples in each loader worker's shuffle buffer


RECIPE = ("batch_size", "lr", "patience", "seed", "balance", "init_weights", "feature_id", "sources",
          "variants", "freeze_bn", "shuffle_buffer")


class TrainError(RuntimeError):
    """A training run that cannot start or resume as asked."""


def epoch_order(labels: np.ndarray, seed: int, epoch: int, balance: bool) -> list[int]:
    """The sample order of one epoch: a permutation, or class-balanced draws with replacement."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    n = len(labels)
    if not balance:
        return torch.randperm(n, generator=g).tolist()
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    weights = torch.from_numpy(1.0 / counts[labels])
    return torch.multinomial(weights, n, replacement=True, generator=g).tolist()


def random_flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flip the samples whose mask entry is True horizontally."""
    mask = mask.to(x.device)
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def flip_mask(seed: int, epoch: int, rows: torch.Tensor) -> torch.Tensor:
    """Per-sample flips of a streamed batch, drawn from (seed, epoch, row): order does not matter."""
    return torch.tensor([np.random.default_rng([seed, epoch, int(r), 11]).random() < 0.5 for r in rows])


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@torch.inference_mode()
def predict(model: nn.Module, cache: FeatureCache, index: CacheIndex, device: torch.device,
            batch_size: int, workers: int, amp: bool = False) -> np.ndarray:
    """Probabilities of being generated for every row of the index, in order."""
    model.eval()
    loader = DataLoader(CacheDataset(cache, index), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=device.type == "cuda")
    probs = []
    for x, _ in loader:
        x = classifier_input(x.to(device, non_blocking=True))
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(x).float().squeeze(1)
        probs.append(torch.sigmoid(logits).cpu().numpy())
    return np.concatenate(probs) if probs else np.zeros(0, dtype=np.float32)


def binary_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """Accuracy at 0.5, AP, ROC AUC, real and fake accuracy (scikit-learn), with counts."""
    from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

    labels = np.asarray(labels).astype(int)
    pred = (np.asarray(probs) > 0.5).astype(int)
    both = len(np.unique(labels)) == 2
    real, fake = labels == 0, labels == 1
    return {
        "n": int(len(labels)), "n_real": int(real.sum()), "n_fake": int(fake.sum()),
        "acc": float(accuracy_score(labels, pred)) if len(labels) else None,
        "ap": float(average_precision_score(labels, probs)) if both else None,
        "auc": float(roc_auc_score(labels, probs)) if both else None,
        "real_acc": float(accuracy_score(labels[real], pred[real])) if real.any() else None,
        "fake_acc": float(accuracy_score(labels[fake], pred[fake])) if fake.any() else None,
    }


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save_checkpoint(path: Path, model: nn.Module, extra: dict) -> None:
    """Atomically: a kill while saving leaves the previous checkpoint intact."""
    import io

    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), **extra}, buf)
    write_bytes_atomic(path, buf.getvalue())


def stream_steps(dataset: WdsStream, per_rank: int, world: int) -> int | None:
    """Batches per rank in a streamed epoch: all of them with one process; with several, as many
    as the rank with the fewest rows can fill (DDP needs every rank to step equally often)."""
    if world == 1:
        return None
    import torch.distributed as dist

    counts = [None] * world
    dist.all_gather_object(counts, dataset.rank_rows())
    steps = min(counts) // per_rank
    if steps == 0:
        raise TrainError(f"a rank got only {min(counts)} training rows this epoch, fewer than a batch of "
                         f"{per_rank}: use fewer ranks or a smaller --batch-size (tars are dealt to ranks)")
    return steps


def run_train(run_dir: Path, opts: TrainOptions, resume: bool = False) -> dict:
    """Train (or resume) `RUN/train/NAME/`; return the final epoch's metrics."""
    run = Run(run_dir)
    run.info()
    cache = find_cache(run.cache_root, opts.feature_id)
    cache_config = cache.config()
    pending = cache_config["manifest"]["num_shards"] - len(cache.done_shards())
    if pending and not opts.partial:
        raise TrainError(f"{cache.root}: extraction is not finished ({pending} shards pending); "
                         f"run `extract` again, or pass --partial to train on what is there")
    train_idx = cache_index(cache, "train", opts.sources or None)
    val_idx = cache_index(cache, "val", opts.sources or None)
    if len(train_idx) == 0 or len(np.unique(train_idx.labels)) < 2:
        raise TrainError(f"{cache.root}: the train split needs real and fake images "
                         f"(has {np.bincount(train_idx.labels, minlength=2).tolist()} real/fake)")
    variants = (perturbed_siblings(run.cache_root, cache_config["feature"], cache.backend)
                if opts.variants else [])
    if opts.variants and not variants:
        raise TrainError(f"--variants: {cache.root} has no perturbed siblings; extract with --perturb")
    out = run.root / "train" / opts.name
    last = out / "last.pt"
    device = resolve_device(local_device(opts.device))
    rank, world = init_training_group(device)
    if opts.batch_size % world:
        raise TrainError(f"--batch-size {opts.batch_size} must be a multiple of the {world} ranks")
    model = build_resnet50(Path(opts.init_weights) if opts.init_weights else None, seed=opts.seed,
                           in_channels=cache_config.get("channels", 3))
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr, betas=(0.9, 0.999))
    state = {"epoch": 0, "lr": opts.lr, "best_acc": -1.0, "stale": 0, "best_epoch": None}
    recipe = {k: getattr(opts, k) for k in RECIPE}
    if last.exists() and not resume:
        raise TrainError(f"{out} already holds a training run; pass --resume to continue it, "
                         f"or choose another --name")
    if resume:
        if not last.exists():
            raise TrainError(f"{last} not found: nothing to resume; drop --resume to start")
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        diff = describe_differences(ckpt["train"]["recipe"], recipe)
        if diff:
            raise TrainError(f"{last} was trained with other settings:\n  " + "\n  ".join(diff))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = ckpt["train"]["state"]
        torch.set_rng_state(ckpt["rng"]["torch"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = nn.BCEWithLogitsLoss()
    meta = {"feature": cache_config["feature"], "feature_id": cache_config["feature_id"],
            "variants": [v.config()["feature"]["perturb"] for v in variants]}
    init = f"imagenet:{opts.init_weights}" if opts.init_weights else "random (reference)"
    metrics_path = out / "metrics.jsonl"
    if not resume and rank == 0:
        metrics_path.write_text("")
    stream = cache.backend == "webdataset"
    if stream and (opts.balance or opts.variants):
        raise TrainError(f"{cache.root}: --balance and --variants need random access; a WebDataset cache "
                         f"streams (`convert-cache --to zarr` makes a Zarr copy)")
    if stream:
        dataset = WdsStream(cache, train_idx.rows, train_idx.labels, seed=opts.seed,
                            buffer=opts.shuffle_buffer, rank=rank, world=world)
    else:
        dataset = CacheDataset(cache, train_idx, variants, seed=opts.seed)
    record = {}
    while state["epoch"] < opts.epochs and state["lr"] >= MIN_LR:
        epoch = state["epoch"]
        for group in optimizer.param_groups:
            group["lr"] = state["lr"]
        dataset.set_epoch(epoch)
        per_rank = opts.batch_size // world
        if stream:  # each rank reads its own tars; all ranks take as many steps as the smallest has
            steps = stream_steps(dataset, per_rank, world)
            if opts.max_batches:
                steps = min(steps or opts.max_batches, opts.max_batches)
            total = len(train_idx) if steps is None else steps * per_rank * world
            loader = DataLoader(dataset, batch_size=per_rank, num_workers=opts.workers,
                                pin_memory=device.type == "cuda")
        else:  # the epoch's order, dealt out to the ranks batch by batch; flips per position
            order = epoch_order(train_idx.labels, opts.seed, epoch, opts.balance)
            if opts.max_batches:
                order = order[: opts.max_batches * opts.batch_size]
            flip_g = torch.Generator().manual_seed(opts.seed * 100_003 + 50_000 + epoch)
            flips = torch.rand(len(order), generator=flip_g) < 0.5
            mine = rank_positions(len(order), opts.batch_size, rank, world)
            steps, total = None, len(mine) * world
            loader = DataLoader(dataset, batch_size=per_rank, sampler=[order[p] for p in mine],
                                num_workers=opts.workers, pin_memory=device.type == "cuda", drop_last=False,
                                persistent_workers=False)
        model.train()
        if opts.freeze_bn:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        progress = Progress(total, f"train {opts.name} epoch {epoch + 1}", unit="sample",
                            stream=None if rank == 0 else io.StringIO())
        t0, data_wait, losses = time.perf_counter(), 0.0, []
        t_wait = time.perf_counter()
        seen = 0
        for step, batch in enumerate(loader):
            if steps is not None and step >= steps:
                break
            data_wait += time.perf_counter() - t_wait
            if stream:
                x, y, rows = batch
                mask = flip_mask(opts.seed, epoch, rows)
            else:
                x, y = batch
                mask = flips[mine[step * per_rank: step * per_rank + len(y)]]
            seen += len(y) * world
            x = random_flip(classifier_input(x.to(device, non_blocking=True)), mask)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True).float()
            with autocast(device, opts.amp):
                logits = net(x).float().squeeze(1)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients over the ranks here
            optimizer.step()
            losses.append(loss.item())
            progress.update(len(y) * world, f"loss {losses[-1]:.4f}")
            t_wait = time.perf_counter()
        progress.close()
        train_s = time.perf_counter() - t0
        mean_loss = float(np.mean(losses))
        val = {}
        if rank == 0 and len(val_idx):
            val = binary_metrics(val_idx.labels, predict(model, cache, val_idx, device, opts.batch_size,
                                                         opts.workers, opts.amp))
        if world > 1:  # every rank follows rank 0's schedule decisions; the loss is averaged
            import torch.distributed as dist

            box = [val]
            dist.broadcast_object_list(box, src=0)
            losses_all = [None] * world
            dist.all_gather_object(losses_all, mean_loss)
            val, mean_loss = box[0], float(np.mean(losses_all))
        val_acc = val.get("acc") or 0.0
        improved = val_acc > state["best_acc"] + IMPROVE_DELTA
        if improved:
            state.update(best_acc=val_acc, stale=0, best_epoch=epoch + 1)
        else:
            state["stale"] += 1
        record = {
            "epoch": epoch + 1, "lr": state["lr"], "train_loss": mean_loss,
            "train_samples": seen, "train_seconds": round(train_s, 3),
            "train_samples_per_s": round(seen / train_s, 2), "ranks": world,
            "data_wait_fraction": round(data_wait / train_s, 3),
            **{f"val_{k}": v for k, v in val.items()}, "init": init,
        }
        if state["stale"] >= opts.patience:
            state.update(lr=state["lr"] / 10, stale=0)
        state["epoch"] = epoch + 1
        extra = {**meta, "train": {"recipe": recipe, "state": state, "init": init,
                                   "options": asdict(opts)}}
        if rank == 0:  # checkpoints and metrics come from rank 0 only
            if improved:
                save_checkpoint(out / "best.pt", model, extra)
            save_checkpoint(last, model, {**extra, "optimizer": optimizer.state_dict(),
                                          "rng": _rng_state()})
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            progress.write(f"epoch {epoch + 1}: loss {record['train_loss']:.4f}, val acc {val_acc:.4f}, "
                           f"{record['train_samples_per_s']} samples/s, lr {state['lr']:g}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if not (out / "best.pt").exists():
        raise RunError(f"{out}: no epoch was trained (epochs={opts.epochs})")
    return {"out": str(out), "epochs_done": state["epoch"], "best_epoch": state["best_epoch"],
            "best_val_acc": state["best_acc"], **{k: v for k, v in record.items() if k != "init"}}
