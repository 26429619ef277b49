"""`train`: a ResNet50 detector from the feature cache, with the reference recipe by default.

Adam (lr 1e-4, betas 0.9/0.999), BCE-with-logits, random horizontal flip, and CNNDetection's
schedule: when validation accuracy has not improved by 0.001 for `patience` epochs, lr /= 10;
stop once lr < 1e-6 or after `epochs`. Each epoch's randomness (order, flips) derives from
(seed, epoch), so `--resume` from `last.pt` continues exactly as an uninterrupted run would.

In the shape of torchvision's reference scripts: `prepare_run` checks the cache and the run folder,
a `TrainData` deals out each epoch's batches (random access or streamed shards), `train_one_epoch`,
`validate`, a `Schedule` and `save_epoch`; `run_train` is the short loop over them. Under torchrun
every rank trains on its part of each global batch (DDP), rank 0 validates and writes.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit
from torch import nn
from torch.utils.data import DataLoader

from pipeline.device import resolve_device
from pipeline.distributed import init_training_group, local_device, rank_positions
from pipeline.progress import Progress
from stages.domain.calibration import balanced_logit_threshold
from stages.domain.detector import Detector, build_detector, predict_logits
from stages.domain.feature_kinds import feature_kind
from stages.domain.metrics import binary_metrics
from stages.domain.seed_spread import SEEDS_FILE
from storage.atomic import json_safe, write_bytes_atomic
from storage.cache_config import CacheConfig, describe_differences
from storage.cache_folder import FeatureCache
from storage.caches import find_cache, perturbed_siblings
from storage.errors import UserError
from storage.feature_dataset import CacheDataset, CacheIndex, ShardStream, cache_index
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
    shuffle_buffer: int = 1000  # streamed caches: samples in each loader worker's shuffle buffer
    val_from: str | None = None  # "SPLIT:FRACTION": validate on a share of SPLIT held out by key hash
    head: str = ""  # resnet50 or linear (UnivFD's probe); "": the feature kind's default

    def recipe(self) -> dict:
        return {k: getattr(self, k) for k in RECIPE}


RECIPE = ("batch_size", "lr", "patience", "seed", "balance", "init_weights", "feature_id", "sources",
          "variants", "freeze_bn", "shuffle_buffer", "val_from")


class TrainError(UserError, RuntimeError):
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


def flip_mask(seed: int, epoch: int, rows: torch.Tensor) -> torch.Tensor:
    """Per-sample flips of a streamed batch, drawn from (seed, epoch, row): order does not matter."""
    return torch.tensor([np.random.default_rng([seed, epoch, int(r), 11]).random() < 0.5 for r in rows])


def parse_val_from(spec: str) -> tuple[str, float]:
    """`SPLIT:FRACTION` (e.g. `train:0.1`) to (split, fraction in (0, 1))."""
    split, _, frac = spec.partition(":")
    try:
        fraction = float(frac)
    except ValueError:
        fraction = -1.0
    if not split or not 0 < fraction < 1:
        raise TrainError(f"--val-from {spec!r}: expected SPLIT:FRACTION with 0 < FRACTION < 1, "
                         f"e.g. train:0.1")
    return split, fraction


def held_out(keys: list[str], fraction: float) -> np.ndarray:
    """Mask of the keys in a deterministic share `fraction`: the first 8 bytes of the key (a sha256,
    so uniform) read as a number in [0, 1). The same image is held out in every run and rerun."""
    return np.array([int(k[:16], 16) / 2.0 ** 64 < fraction for k in keys], dtype=bool)


def split_rows(cache: FeatureCache, opts: TrainOptions) -> tuple[CacheIndex, CacheIndex]:
    """The train and validation rows. Without a `val` split validation needs `--val-from`: a best
    checkpoint is never picked on a missing metric."""
    sources = opts.sources or None
    train_idx = cache_index(cache, "train", sources)
    if opts.val_from is None:
        val_idx = cache_index(cache, "val", sources)
        if len(val_idx) == 0:
            raise TrainError(f"{cache.root}: no cached images in the val split, so no epoch could be "
                             f"judged best; pass --val-from train:0.1 to validate on a share of train held "
                             f"out by key hash, or shard with a val split")
        return train_idx, val_idx
    split, fraction = parse_val_from(opts.val_from)
    pool = train_idx if split == "train" else cache_index(cache, split, sources)
    mask = held_out(pool.keys, fraction)
    if not mask.any():
        raise TrainError(f"--val-from {opts.val_from}: no image of the {split!r} split fell into the "
                         f"held-out share ({len(pool)} cached); use a larger fraction")
    if split == "train":
        train_idx = train_idx.select(~mask)
    return train_idx, pool.select(mask)


# -- the run -----------------------------------------------------------------------------------
@dataclass
class TrainSetup:
    """What `prepare_run` found: the cache, the rows of each split, the variants, the output folder."""

    run: Run
    cache: FeatureCache
    config: CacheConfig
    train_idx: CacheIndex
    val_idx: CacheIndex
    variants: list[FeatureCache]
    out: Path

    @property
    def last(self) -> Path:
        return self.out / "last.pt"


def prepare_run(run_dir: Path, opts: TrainOptions, resume: bool) -> TrainSetup:
    """Find the cache and the split rows, and check that training can start (or resume) as asked."""
    run = Run(run_dir)
    run.info()
    cache = find_cache(run.cache_root, opts.feature_id)
    config = cache.config()
    pending = run.info().num_shards - len(cache.done_shards())  # shards appended since count too
    if pending and not opts.partial:
        raise TrainError(f"{cache.root}: extraction is not finished ({pending} shards pending); "
                         f"run `extract` again, or pass --partial to train on what is there")
    train_idx, val_idx = split_rows(cache, opts)
    if len(train_idx) == 0 or len(np.unique(train_idx.labels)) < 2:
        raise TrainError(f"{cache.root}: the train split needs real and fake images "
                         f"(has {np.bincount(train_idx.labels, minlength=2).tolist()} real/fake)")
    variants = perturbed_siblings(run.cache_root, config.feature, cache.backend) if opts.variants else []
    if opts.variants and not variants:
        raise TrainError(f"--variants: {cache.root} has no perturbed siblings; extract with --perturb")
    if not cache.random_access and (opts.balance or opts.variants):
        raise TrainError(f"{cache.root}: --balance and --variants need random access; a {cache.backend} "
                         f"cache streams (`convert-cache --to zarr` makes a Zarr copy)")
    setup = TrainSetup(run, cache, config, train_idx, val_idx, variants, run.root / "train" / opts.name)
    if setup.last.exists() and not resume:
        raise TrainError(f"{setup.out} already holds a training run; pass --resume to continue it, "
                         f"or choose another --name")
    if resume and not setup.last.exists():
        raise TrainError(f"{setup.last} not found: nothing to resume; drop --resume to start")
    return setup


# -- data ---------------------------------------------------------------------------------------
class RandomAccessData:
    """Rows read at random: each epoch's order (a permutation, or balanced draws) dealt out to the
    ranks batch by batch, with a flip drawn per position of the order."""

    def __init__(self, setup: TrainSetup, opts: TrainOptions, rank: int, world: int, device: torch.device):
        self.dataset = CacheDataset(setup.cache, setup.train_idx, setup.variants, seed=opts.seed)
        self.labels = setup.train_idx.labels
        self.opts, self.rank, self.world, self.device = opts, rank, world, device

    def batches(self, epoch: int) -> tuple[object, int]:
        """(an iterable of (inputs, labels, flip mask) for this rank, samples over all ranks)."""
        opts = self.opts
        self.dataset.set_epoch(epoch)
        order = epoch_order(self.labels, opts.seed, epoch, opts.balance)
        if opts.max_batches:
            order = order[: opts.max_batches * opts.batch_size]
        flip_g = torch.Generator().manual_seed(opts.seed * 100_003 + 50_000 + epoch)
        flips = torch.rand(len(order), generator=flip_g) < 0.5
        mine = rank_positions(len(order), opts.batch_size, self.rank, self.world)
        per_rank = opts.batch_size // self.world
        loader = DataLoader(self.dataset, batch_size=per_rank, sampler=[order[p] for p in mine],
                            num_workers=opts.workers, pin_memory=self.device.type == "cuda",
                            drop_last=False, persistent_workers=False)

        def batches():
            for step, (x, y) in enumerate(loader):
                yield x, y, flips[mine[step * per_rank: step * per_rank + len(y)]]
        return batches(), len(mine) * self.world


class StreamedData:
    """Whole shards streamed (backends without random access): shards dealt to ranks and loader
    workers, a shuffle buffer, flips drawn per row; with several ranks, all take as many steps as
    the rank with the fewest rows can fill."""

    def __init__(self, setup: TrainSetup, opts: TrainOptions, rank: int, world: int, device: torch.device):
        self.stream = ShardStream(setup.cache, setup.train_idx.rows, setup.train_idx.labels, seed=opts.seed,
                                  buffer=opts.shuffle_buffer, rank=rank, world=world)
        self.n = len(setup.train_idx)
        self.opts, self.world, self.device = opts, world, device

    def steps(self, per_rank: int) -> int | None:
        """Batches per rank this epoch: all of them with one process, else what every rank can fill."""
        if self.world == 1:
            return None
        import torch.distributed as dist

        counts = [None] * self.world
        dist.all_gather_object(counts, self.stream.rank_rows())
        steps = min(counts) // per_rank
        if steps == 0:
            raise TrainError(f"a rank got only {min(counts)} training rows this epoch, fewer than a batch "
                             f"of {per_rank}: use fewer ranks or a smaller --batch-size (shards are dealt "
                             f"to ranks)")
        return steps

    def batches(self, epoch: int) -> tuple[object, int]:
        """(an iterable of (inputs, labels, flip mask) for this rank, samples over all ranks)."""
        opts = self.opts
        self.stream.set_epoch(epoch)
        per_rank = opts.batch_size // self.world
        steps = self.steps(per_rank)
        if opts.max_batches:
            steps = min(steps or opts.max_batches, opts.max_batches)
        total = self.n if steps is None else steps * per_rank * self.world
        loader = DataLoader(self.stream, batch_size=per_rank, num_workers=opts.workers,
                            pin_memory=self.device.type == "cuda")

        def batches():
            for step, (x, y, rows) in enumerate(loader):
                if steps is not None and step >= steps:
                    break
                yield x, y, flip_mask(opts.seed, epoch, rows)
        return batches(), total


TrainData = RandomAccessData | StreamedData


def train_data(setup: TrainSetup, opts: TrainOptions, rank: int, world: int,
               device: torch.device) -> TrainData:
    """Random access where the backend offers it, else streamed shards."""
    kind = RandomAccessData if setup.cache.random_access else StreamedData
    return kind(setup, opts, rank, world, device)


# -- one epoch ----------------------------------------------------------------------------------
def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """Training mode; with `freeze_bn`, BatchNorm layers keep using their running statistics."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def train_one_epoch(detector: Detector, net: nn.Module, batches, optimizer: torch.optim.Optimizer,
                    progress: Progress, world: int = 1) -> dict:
    """One pass over this rank's batches; returns the mean loss, samples (all ranks), seconds and
    the share of the time spent waiting for data."""
    loss_fn = nn.BCEWithLogitsLoss()
    t0, data_wait, losses, seen = time.perf_counter(), 0.0, [], 0
    t_wait = time.perf_counter()
    for x, y, mask in batches:
        data_wait += time.perf_counter() - t_wait
        seen += len(y) * world
        y = y.to(detector.device, non_blocking=True).float()
        loss = loss_fn(detector.logits(detector.inputs(x, flip=mask), net), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over the ranks here
        optimizer.step()
        losses.append(loss.item())
        progress.update(len(y) * world, f"loss {losses[-1]:.4f}")
        t_wait = time.perf_counter()
    seconds = time.perf_counter() - t0
    return {"loss": float(np.mean(losses)), "samples": seen, "seconds": seconds,
            "data_wait": data_wait / seconds}


def val_metrics(detector: Detector, setup: TrainSetup, opts: TrainOptions, epoch: int) -> dict:
    """Accuracy at logit 0, AP, AUC and the balanced-accuracy threshold (a logit, kept with best.pt)
    from the detector's fp32 logits on the val rows, as eval computes them; NaN scores (a diverged
    epoch) give {"error": why} instead, never a best checkpoint."""
    labels = setup.val_idx.labels
    logits = predict_logits(detector, setup.cache, setup.val_idx, opts.batch_size, opts.workers)
    bad = np.flatnonzero(np.isnan(logits))
    if len(bad):
        return {"error": f"{setup.out}: epoch {epoch + 1}: {len(bad)} of {len(logits)} validation scores "
                         f"are NaN (not a number; first key {setup.val_idx.keys[bad[0]]}): training "
                         f"diverged or the detector's weights are broken; this epoch was not saved "
                         f"(last.pt holds the epoch before; try a lower --lr)"}
    val = binary_metrics(labels, logits, threshold=0.0)
    val["threshold_logit"] = balanced_logit_threshold(labels, logits)
    return val


def validate(detector: Detector, setup: TrainSetup, opts: TrainOptions, rank: int, world: int,
             loss: float, epoch: int = 0) -> tuple[dict, float]:
    """Validation metrics (computed on rank 0, shared with every rank) and the training loss
    averaged over the ranks; NaN validation scores are an error on every rank."""
    val = {}
    if rank == 0 and len(setup.val_idx):
        val = val_metrics(detector, setup, opts, epoch)
    if world > 1:  # every rank follows rank 0's schedule decisions
        import torch.distributed as dist

        box = [val]
        dist.broadcast_object_list(box, src=0)
        losses = [None] * world
        dist.all_gather_object(losses, loss)
        val, loss = box[0], float(np.mean(losses))
    if "error" in val:
        raise TrainError(val["error"])
    return val, loss


@dataclass
class Schedule:
    """CNNDetection's plateau schedule, as saved in checkpoints (`train.state`)."""

    epoch: int = 0
    lr: float = 1e-4
    best_acc: float = -1.0
    stale: int = 0
    best_epoch: int | None = None

    def running(self, epochs: int) -> bool:
        return self.epoch < epochs and self.lr >= MIN_LR

    def end_epoch(self, val_acc: float, patience: int) -> bool:
        """Record an epoch's validation accuracy; True when it is the best so far. After `patience`
        epochs without improvement lr /= 10."""
        improved = val_acc > self.best_acc + IMPROVE_DELTA
        if improved:
            self.best_acc, self.stale, self.best_epoch = val_acc, 0, self.epoch + 1
        else:
            self.stale += 1
        if self.stale >= patience:
            self.lr, self.stale = self.lr / 10, 0
        self.epoch += 1
        return improved


# -- checkpoints --------------------------------------------------------------------------------
def save_checkpoint(path: Path, model: nn.Module, extra: dict) -> None:
    """Atomically: a kill while saving leaves the previous checkpoint intact."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), **extra}, buf)
    write_bytes_atomic(path, buf.getvalue())


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def load_resume(last: Path, opts: TrainOptions, model: nn.Module,
                optimizer: torch.optim.Optimizer) -> Schedule:
    """Model, optimizer and RNG state from `last.pt`; refuses other recipe settings."""
    ckpt = torch.load(io.BytesIO(last.read_bytes()), map_location="cpu", weights_only=True)
    diff = describe_differences(ckpt["train"]["recipe"], opts.recipe())
    if diff:
        raise TrainError(f"{last} was trained with other settings:\n  " + "\n  ".join(diff))
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    return Schedule(**ckpt["train"]["state"])


def save_epoch(setup: TrainSetup, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict,
               record: dict, improved: bool) -> None:
    """Rank 0's end of an epoch: best.pt when validation improved, the epoch's line of metrics.jsonl,
    then last.pt (with the optimizer and RNG state for --resume), each written atomically. Killed
    between them, a resumed run redoes the epoch: `metrics_until` drops the line it had written."""
    if improved:
        save_checkpoint(setup.out / "best.pt", model, extra)
    lines = metrics_until(setup.out / "metrics.jsonl", record["epoch"] - 1)
    line = json.dumps(json_safe(record)) + "\n"  # an infinite threshold as "inf": standard JSON
    write_bytes_atomic(setup.out / "metrics.jsonl", "".join(lines + [line]).encode())
    save_checkpoint(setup.last, model, {**extra, "optimizer": optimizer.state_dict(), "rng": _rng_state()})


def metrics_until(path: Path, epochs: int) -> list[str]:
    """The lines of metrics.jsonl of epochs 1..`epochs` (those that last.pt holds)."""
    if not path.exists():
        return []
    return [line + "\n" for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["epoch"] <= epochs]


def epoch_record(epoch: int, lr: float, stats: dict, loss: float, world: int, val: dict, init: str) -> dict:
    """The metrics.jsonl line of an epoch."""
    return {"epoch": epoch + 1, "lr": lr, "train_loss": loss, "train_samples": stats["samples"],
            "train_seconds": round(stats["seconds"], 3),
            "train_samples_per_s": round(stats["samples"] / stats["seconds"], 2), "ranks": world,
            "data_wait_fraction": round(stats["data_wait"], 3), **{f"val_{k}": v for k, v in val.items()},
            "init": init}


# -- the loop -----------------------------------------------------------------------------------
def run_train(run_dir: Path, opts: TrainOptions, resume: bool = False) -> dict:
    """Train (or resume) `RUN/train/NAME/`; return the final epoch's metrics."""
    setup = prepare_run(run_dir, opts, resume)
    device = resolve_device(local_device(opts.device))
    rank, world = init_training_group(device)
    if opts.batch_size % world:
        raise TrainError(f"--batch-size {opts.batch_size} must be a multiple of the {world} ranks")
    head = opts.head or feature_kind(setup.config.feature.kind).heads[0]
    model = build_detector(head, setup.config.row_shape(),
                           Path(opts.init_weights) if opts.init_weights else None, seed=opts.seed)
    detector = Detector(model, device, amp=opts.amp)
    optimizer = torch.optim.Adam(detector.model.parameters(), lr=opts.lr, betas=(0.9, 0.999))
    schedule = load_resume(setup.last, opts, detector.model, optimizer) if resume else Schedule(lr=opts.lr)
    if rank == 0:
        setup.out.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_bytes_atomic(setup.out / "metrics.jsonl", b"")
    net = detector.model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    data = train_data(setup, opts, rank, world, device)
    init = f"imagenet:{opts.init_weights}" if opts.init_weights else "random (reference)"
    meta = {"feature": setup.config.feature.to_json(), "feature_id": setup.config.feature_id,
            "variants": [v.config().feature.perturb for v in setup.variants]}
    record = {}
    while schedule.running(opts.epochs):
        epoch, lr = schedule.epoch, schedule.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches, total = data.batches(epoch)
        set_train_mode(detector.model, opts.freeze_bn)
        progress = Progress(total, f"train {opts.name} epoch {epoch + 1}", unit="sample",
                            stream=None if rank == 0 else io.StringIO())
        stats = train_one_epoch(detector, net, batches, optimizer, progress, world)
        progress.close()
        val, loss = validate(detector, setup, opts, rank, world, stats["loss"], epoch)
        record = epoch_record(epoch, lr, stats, loss, world, val, init)
        improved = schedule.end_epoch(val["acc"], opts.patience)
        if rank == 0:  # checkpoints and metrics come from rank 0 only
            # the threshold as the logit it was chosen on (what eval applies) and, for readers of
            # checkpoints of before, as its probability (lossy: 1.0 beyond logit ~36.7)
            t = val.get("threshold_logit")
            extra = {**meta, "val_threshold_logit": t,
                     "val_threshold": None if t is None else float(expit(t)),
                     "train": {"recipe": opts.recipe(), "state": asdict(schedule), "init": init,
                               "options": asdict(opts)}}
            save_epoch(setup, detector.model, optimizer, extra, record, improved)
            progress.write(f"epoch {epoch + 1}: loss {loss:.4f}, val acc {val['acc']:.4f}, "
                           f"{record['train_samples_per_s']} samples/s, lr {schedule.lr:g}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if not (setup.out / "best.pt").exists():
        raise RunError(f"{setup.out}: no epoch was trained (epochs={opts.epochs})")
    return {"out": str(setup.out), "epochs_done": schedule.epoch, "best_epoch": schedule.best_epoch,
            "best_val_acc": schedule.best_acc, **{k: v for k, v in record.items() if k != "init"}}


def run_train_seeds(run_dir: Path, opts: TrainOptions, seeds: list[int], resume: bool = False) -> dict:
    """One detector per seed, `RUN/train/NAME/seed-K/`, one after the other, each a full training
    run with `seed` K; with `resume`, each seed continues from its last.pt (a seed not started yet
    starts). Returns each seed's summary."""
    if len(set(seeds)) != len(seeds) or not seeds:
        raise TrainError(f"--seeds {','.join(map(str, seeds))}: give distinct seeds, e.g. 0,1,2")
    out = {}
    root = Run(run_dir).root
    # the seeds this folder is made of, read back by eval (a folder listing would take stale seed-K)
    write_bytes_atomic(root / "train" / opts.name / SEEDS_FILE, json.dumps({"seeds": seeds}).encode())
    for seed in seeds:
        one = replace(opts, name=f"{opts.name}/seed-{seed}", seed=seed)
        started = (root / "train" / one.name / "last.pt").exists()
        out[f"seed-{seed}"] = run_train(run_dir, one, resume=resume and started)
    return {"out": str(root / "train" / opts.name), "seeds": out}
