"""dnf-pipeline command line: parses options, calls one stage, prints a summary."""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Diffusion Noise Feature pipeline: shard, extract, train, eval, detect.")

# `--run-dir` too: torchrun's own parser takes a bare `--run` for its `--run-path`.
RUN_OPT = typer.Option(..., "--run", "--run-dir", help="Run directory (created by `shard`).")
DEVICE_OPT = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps.")


@contextmanager
def user_errors() -> Iterator[None]:
    """Errors the user can fix (`storage.errors.UserError`) print one clear line and exit 2; any
    other exception is a bug and keeps its traceback."""
    from storage.errors import UserError

    try:
        yield
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def _stop_on_sigterm() -> None:
    """SIGTERM stops like Ctrl-C (training keeps its finished epochs in last.pt)."""
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        typer.echo(f"error: {option} {text!r}: expected integers separated by commas", err=True)
        raise typer.Exit(2) from None


def _print(summary: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        for k, v in summary.items():
            if not isinstance(v, (list, dict)):
                typer.echo(f"{k}: {v}")


def _print_dry_run(summary: dict) -> None:
    """`shard --dry-run`'s table: parquet splits and columns, files refused, split x label x source."""
    what = "images (files and parquet rows)" if summary["parquet"] else "files"
    typer.echo(f"{summary['files']} {what} (dry run: nothing written)")
    groups: dict = {}
    for f in summary["parquet"]:  # one line per split and columns, not per file
        g = groups.setdefault((f["split"] or "-", f["splits_from"], f["columns"]), [0, 0, f["file"]])
        g[0], g[1] = g[0] + 1, g[1] + f["rows"]
    for (split_name, how, cols), (files, rows, example) in groups.items():
        typer.echo(f"  parquet split {split_name} (from {how}): {files} files, {rows} rows; "
                   f"columns {cols} (e.g. {example})")
    for r in summary["refused"]:
        typer.echo(f"  refused {r['path']}: {r['reason']}")
    for row in summary["table"]:
        typer.echo(f"  {row['split']:>5} {row['label']:>4} {row['source']}: {row['files']} "
                   f"(e.g. {row['example']})")


@app.command()
def shard(
    inputs: List[str] = typer.Argument(..., help="Image folders, .csv/.jsonl lists, image files, or "
                                        "parquet files / Hugging Face parquet dataset folders."),
    run: str = RUN_OPT,
    shard_size: int = typer.Option(1024, help="Images per shard (the unit of work and resume)."),
    label: Optional[str] = typer.Option(None, help="Force the label of all inputs: real or fake."),
    source: Optional[str] = typer.Option(None, help="Force the source (generator / set) name."),
    split: Optional[str] = typer.Option(None, help="Force the split (train, val, test)."),
    layout: str = typer.Option("auto", help="Folder layout: auto (CNNDetection, DiffusionForensics, "
                                            "GenImage, AIGCDetectBenchmark, Chameleon), ufd "
                                            "(UniversalFakeDetect diffusion set) or synthbuster."),
    split_map: Optional[List[str]] = typer.Option(None, "--split-map", help="Rename a split, e.g. "
                                                  "val=test (GenImage is evaluated on val); repeatable."),
    append: bool = typer.Option(False, help="Add these inputs as new shards after the run's existing "
                                            "ones (nothing extracted is touched)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only walk and infer: print the split x "
                                                          "source x label table, write nothing."),
    workers: int = typer.Option(2, help="Processes hashing and checking images."),
    max_pixels: int = typer.Option(8192 * 8192, help="Reject images with more pixels."),
    max_bytes: int = typer.Option(256 * 2**20, help="Reject files larger than this."),
    pack: bool = typer.Option(False, help="Also copy each shard's original bytes into RUN/packed/NNNNN.tar."),
    image_column: Optional[str] = typer.Option(None, help="Parquet: the image bytes column (default: "
                                               "the Image struct or binary column)."),
    label_column: Optional[str] = typer.Option(None, help="Parquet: the label column (default: label)."),
    source_column: Optional[str] = typer.Option(None, help="Parquet: the generator column (default: "
                                                "model, model_name, generator or source)."),
    split_column: Optional[str] = typer.Option(None, help="Parquet: a split column (default: split)."),
    real_values: Optional[List[str]] = typer.Option(None, "--real-values", help="Parquet: label values "
                                                    "that mean real (besides 0, real, nature); a ClassLabel "
                                                    "value by its integer or class name; repeatable."),
    fake_values: Optional[List[str]] = typer.Option(None, "--fake-values", help="Parquet: label values "
                                                    "that mean fake (besides 1, fake, ai); a ClassLabel "
                                                    "value by its integer or class name; repeatable."),
    config: Optional[str] = typer.Option(None, help="Parquet: the dataset README's config to read "
                                         "(default: load_dataset's, the only one or the one marked "
                                         "default; several without one are refused)."),
    download: bool = typer.Option(False, help="Fetch a Hugging Face dataset id missing from the local "
                                  "cache (network needed); without it ids are read offline."),
    label_field: Optional[str] = typer.Option(None, help="Archives (WebDataset tars, zips): the field of "
                                              "each image's JSON sidecar or metadata naming its label "
                                              "(real/fake, 0/1); inputs without sidecars ignore it."),
    source_field: Optional[str] = typer.Option(None, help="Archives: the sidecar or metadata field "
                                               "naming the image's source (generator); default: the "
                                               "archive's folder, by the layout rules."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Index images into deterministic manifest shards (key = sha256 of the bytes); rerun to resume."""
    from stages.domain.parquet_layouts import ColumnOptions
    from stages.shard import run_shard

    columns = ColumnOptions(image_column, label_column, source_column, split_column,
                            tuple(real_values or ()), tuple(fake_values or ()), config)
    with user_errors():
        summary = run_shard(inputs, run, shard_size, label, source, split, workers, max_pixels,
                            max_bytes, pack=pack, layout=layout, split_map=split_map, append=append,
                            dry_run=dry_run, columns=columns, download=download,
                            label_field=label_field, source_field=source_field)
    if as_json:
        _print(summary, True)
    elif dry_run:
        _print_dry_run(summary)
    else:
        _print(summary, False)
        for row in summary["counts"]:
            typer.echo(f"  {row['split']:>5} {row['label']:>4} {row['source']}: {row['images']}")
        if summary["rejects"]:
            typer.echo(f"rejected files (and conflicts) are listed with their reason in "
                       f"{run.rstrip('/')}/rejects.jsonl")
        if summary["images"]:
            from stages.audit import format_audit, run_audit

            with user_errors():
                typer.echo(format_audit(run_audit(run), short=True))


@app.command()
def audit(run: str = RUN_OPT,
          threshold: float = typer.Option(0.8, help="Flag properties whose separability is at least this."),
          reread: bool = typer.Option(False, help="Read the headers again instead of the manifest's facts."),
          as_json: bool = typer.Option(False, "--json", help="Print the audit as JSON.")) -> None:
    """What besides the generator (format, JPEG quality, size, ...) separates real from fake, per source."""
    from stages.audit import format_audit, run_audit

    with user_errors():
        result = run_audit(run, threshold, reread)
    typer.echo(json.dumps(result, indent=2) if as_json else format_audit(result))


# extract's longer options, here so its signature stays readable
EXTRACT_MODEL_OPT = typer.Option(None, help="The feature kind's model: a local folder, or a hub id "
                                            "(org/name) in the local Hugging Face cache. dnf, dire: "
                                            "a diffusers UNet2DModel or DDPM pipeline folder; "
                                            "latent-dnf: a Stable Diffusion pipeline folder; clip: "
                                            "a CLIPVisionModelWithProjection folder (default "
                                            "openai/clip-vit-large-patch14); npr needs none.")
EXTRACT_ENCODING_OPT = typer.Option("", help="reference (uint8, as the kind's authors save it: dnf, dire, "
                                             "npr) or raw (float16); default: the kind's (reference for "
                                             "dnf, dire and npr; raw for clip and latent-dnf, which "
                                             "store only raw).")
EXTRACT_FEATURE_OPT = typer.Option("dnf", help="The feature kind: dnf (one UNet pass, the paper's feature), "
                                               "dire (DIRE's |x - DDIM reconstruction| over --ddim-steps, "
                                               "~2x that many passes), npr (NPR's up-sampling residual; no "
                                               "model), clip (UnivFD's CLIP image embedding) or latent-dnf "
                                               "(DNF in a Stable Diffusion latent: VAE, then one UNet "
                                               "pass).")
EXTRACT_GEOMETRY_OPT = typer.Option("resize", help="resize (the whole image to size x size: the "
                                                   "reference), crop-resize (the largest centred square, "
                                                   "resized: DIRE's) or crop (the central size x size window "
                                                   "at native resolution; smaller images upscaled).")


@app.command()
def extract(
    run: str = RUN_OPT,
    model: Optional[Path] = EXTRACT_MODEL_OPT,
    download: bool = typer.Option(False, help="Fetch a hub id missing from the local cache (network)."),
    size: int = typer.Option(256, help="Images are resized to size x size."),
    timestep: int = typer.Option(0, help="Diffusion timestep t of the noise prediction."),
    encoding: str = EXTRACT_ENCODING_OPT,
    batch_size: int = typer.Option(0, help="Images per UNet forward pass (0: from free GPU memory; "
                                           "16 on the CPU)."),
    workers: int = typer.Option(-1, help="Decoding processes (-1: on a GPU cores - 1, at most 8; "
                                         "on the CPU none)."),
    precision: str = typer.Option("auto", help="auto (= fp32, the reference's numbers), bf16 or fp16."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the UNet."),
    gpu_decode: bool = typer.Option(False, "--gpu-decode", help="Decode JPEGs on the GPU (nvJPEG)."),
    resize_on: str = typer.Option("auto", help="Where images are resized: device (loader workers hand uint8 "
                                  "pixels over), workers, or auto (device on CUDA)."),
    fast_decode: bool = typer.Option(False, "--fast-decode", help="Decode JPEGs at a reduced DCT scale "
                                     "(1/2, 1/4, 1/8, keeping >= --size) before the resize: faster, other "
                                     "values (recorded in the feature id)."),
    worker_index: Optional[int] = typer.Option(None, help="This worker's index (default: torchrun "
                                                         "RANK or SLURM_ARRAY_TASK_ID)."),
    num_workers: Optional[int] = typer.Option(None, help="How many workers share the run."),
    backend: str = typer.Option("zarr", help="Cache backend: zarr (Zarr v3, sharded) or webdataset "
                                             "(one tar per manifest shard)."),
    claims: str = typer.Option("auto", help="Shard claims: flock (kernel locks), heartbeat (claim files "
                                            "for filesystems without flock), auto (flock if it works)."),
    perturb: str = typer.Option("", help="Also extract perturbed variants into sibling caches, "
                                         "e.g. jpeg:75,blur:1.0,resize:0.5."),
    device: str = DEVICE_OPT,
    cache_dir: Optional[str] = typer.Option(None, help="Cache folder or URL (default RUN/cache/<id>)."),
    redo: Optional[List[int]] = typer.Option(None, "--redo", help="Compute this shard again (repeatable)."),
    feature: str = EXTRACT_FEATURE_OPT,
    geometry: str = EXTRACT_GEOMETRY_OPT,
    crop: bool = typer.Option(False, help="The same as --geometry crop-resize."),
    inversion_steps: int = typer.Option(1, help="DDIM inversion steps (1: the reference, eps at t)."),
    ddim_steps: int = typer.Option(20, help="Steps of the DDIM schedule linspace(0, T, steps + 1)."),
    keep: str = typer.Option("0", help="Inversion steps whose noise estimate is kept, e.g. 0,1,2."),
    combine: str = typer.Option("stack", help="stack (3 channels per kept step) or mean."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Compute the DNF of every image once into the feature cache; rerun to resume.

    Ctrl-C or SIGTERM stops after the current batch; a second Ctrl-C stops at once."""
    from pipeline.signals import Stopped
    from stages.domain.perturb import parse_perturbations
    from stages.extract import ExtractOptions, run_extract

    with user_errors():
        opts = ExtractOptions(model=model, size=size, timestep=timestep, encoding=encoding,
                              batch_size=batch_size, workers=workers, device=device, cache_dir=cache_dir,
                              redo=tuple(redo or ()), inversion_steps=inversion_steps,
                              ddim_steps=ddim_steps, keep=_int_list(keep, "--keep"), combine=combine,
                              precision=precision, compile=compile, gpu_decode=gpu_decode,
                              fast_decode=fast_decode, resize_on=resize_on,
                              worker_index=worker_index, num_workers_total=num_workers, claims=claims,
                              backend=backend, download=download, feature_kind=feature, crop=crop,
                              geometry=geometry)
        try:
            variants = parse_perturbations(perturb)
            summaries = [run_extract(run, dataclasses.replace(opts, perturb=p)) for p in ["", *variants]]
        except (Stopped, KeyboardInterrupt) as e:
            how = e.signame if isinstance(e, Stopped) else "a second Ctrl-C"
            typer.echo(f"extract stopped by {how}: finished shards are kept, the shard in progress "
                       f"is not marked done; run the same command to resume", err=True)
            raise typer.Exit(130) from None
    for summary, variant in zip(summaries, ["clean", *variants], strict=True):
        if len(summaries) > 1 and not as_json:
            typer.echo(f"-- {variant}")
        _print(summary, as_json)


@app.command()
def train(
    run: str = RUN_OPT,
    name: str = typer.Option("default", help="Results go to RUN/train/NAME/."),
    epochs: int = typer.Option(20, help="At most this many epochs."),
    batch_size: int = typer.Option(64, help="Samples per step."),
    lr: float = typer.Option(1e-4, help="Adam learning rate."),
    patience: int = typer.Option(5, help="Epochs without val-accuracy gain before lr /= 10."),
    workers: int = typer.Option(2, help="DataLoader workers reading the cache."),
    seed: int = typer.Option(0, help="Seed of the init, sample order and flips."),
    device: str = DEVICE_OPT,
    amp: bool = typer.Option(True, help="bf16 mixed precision on CUDA (ignored on CPU)."),
    balance: bool = typer.Option(False, help="Sample real and fake equally often."),
    init_weights: Optional[Path] = typer.Option(None, help="Local ImageNet ResNet50 weights."),
    feature_id: Optional[str] = typer.Option(None, help="Which cache, when the run has several."),
    sources: Optional[List[str]] = typer.Option(None, "--source", help="Train on these sources only."),
    partial: bool = typer.Option(False, help="Allow a cache whose extraction is unfinished."),
    max_batches: int = typer.Option(0, help="Batches per epoch at most (0: all)."),
    variants: bool = typer.Option(False, help="Sample each example from the clean or a perturbed "
                                              "cache (extract --perturb)."),
    freeze_bn: bool = typer.Option(False, help="BatchNorm keeps its running statistics while training "
                                               "(with --init-weights or small per-GPU batches)."),
    shuffle_buffer: int = typer.Option(1000, help="WebDataset caches: shuffle buffer per loader worker."),
    val_from: Optional[str] = typer.Option(None, help="SPLIT:FRACTION, e.g. train:0.1: validate on this "
                                                      "share of SPLIT, held out by key hash (needed "
                                                      "when the run has no val split)."),
    head: str = typer.Option("", help="resnet50 (maps) or linear (UnivFD's probe, for clip embeddings); "
                                      "default: the feature kind's."),
    seeds: Optional[str] = typer.Option(None, help="e.g. 0,1,2: one detector per seed in "
                                                   "RUN/train/NAME/seed-K/ (--seed is then ignored); "
                                                   "seeds.json in that folder records the seeds of the "
                                                   "last call, and eval of the folder takes those only."),
    resume: bool = typer.Option(False, help="Continue RUN/train/NAME from last.pt."),
) -> None:
    """Train a ResNet50 detector on the cached DNF of the train split (reference recipe)."""
    from stages.train import TrainOptions, run_train, run_train_seeds

    opts = TrainOptions(name=name, epochs=epochs, batch_size=batch_size, lr=lr, patience=patience,
                        workers=workers, seed=seed, device=device, amp=amp, balance=balance,
                        init_weights=str(init_weights) if init_weights else None,
                        feature_id=feature_id, sources=list(sources or []), partial=partial,
                        max_batches=max_batches, variants=variants, freeze_bn=freeze_bn,
                        shuffle_buffer=shuffle_buffer, val_from=val_from, head=head)
    _stop_on_sigterm()
    with user_errors():
        try:
            summary = run_train_seeds(run, opts, list(_int_list(seeds, "--seeds")), resume) if seeds else \
                run_train(run, opts, resume=resume)
        except KeyboardInterrupt:
            typer.echo("interrupted: finished epochs are in last.pt; rerun with --resume", err=True)
            raise typer.Exit(130) from None
    _print(summary, False)


@app.command("eval")
def evaluate(
    run: str = RUN_OPT,
    checkpoint: str = typer.Option(..., help="best.pt / last.pt, a reference .pth checkpoint, or a "
                                             "folder made by `train --seeds` (every seed; mean ± std)."),
    split: str = typer.Option("test", help="Which split to evaluate."),
    name: Optional[str] = typer.Option(None, help="Results go to RUN/eval/NAME/."),
    feature_id: Optional[str] = typer.Option(None, help="Which cache, when the run has several."),
    batch_size: int = typer.Option(64, help="Samples per forward pass."),
    workers: int = typer.Option(2, help="DataLoader workers reading the cache."),
    device: str = DEVICE_OPT,
    gallery: int = typer.Option(4, help="gallery.png: this many most confident false positives and "
                                        "false negatives per source (0: none)."),
    bootstrap: int = typer.Option(1000, help="Resamples of the 95 % bootstrap intervals (stratified by "
                                             "class; 0: no intervals)."),
    bootstrap_seed: int = typer.Option(0, help="Seed of the bootstrap resamples."),
    calibrate_on: Optional[str] = typer.Option(None, help="Choose the decision threshold (maximal balanced "
                                                          "accuracy) on this split, e.g. val; default: the "
                                                          "one recorded at training time."),
    temperature: bool = typer.Option(False, help="Also fit temperature scaling on --calibrate-on and "
                                                 "report the calibration it gives."),
    pick: str = typer.Option("best", help="With a folder of seeds: each seed's best.pt (best val "
                                          "accuracy) or last.pt."),
    checkpoint_kind: Optional[str] = typer.Option(None, help="The feature kind a checkpoint that does not "
                                                  "record one was trained on (dnf, dire, npr, clip, "
                                                  "latent-dnf); default: DNF for a ResNet50, clip for a "
                                                  "linear probe."),
) -> None:
    """Predict a split from the cache; write predictions.csv, report.json and report.md."""
    from stages.evaluate import EvalOptions, run_eval, run_eval_seeds
    from storage.locations import as_path

    opts = EvalOptions(bootstrap=bootstrap, seed=bootstrap_seed, calibrate_on=calibrate_on,
                       temperature=temperature, gallery=gallery, pick=pick, checkpoint_kind=checkpoint_kind)
    with user_errors():
        if as_path(checkpoint).is_dir():
            summary = run_eval_seeds(run, checkpoint, split, name, feature_id, batch_size, workers, device,
                                     opts)
        else:
            summary = run_eval(run, checkpoint, split, name, feature_id, batch_size, workers, device,
                               opts=opts)
    typer.echo((as_path(summary["out"]) / "report.md").read_text())
    _print(summary, False)


@app.command()
def compare(a: Path = typer.Argument(..., help="An eval folder (RUN/eval/NAME)."),
            b: Path = typer.Argument(..., help="Another eval folder."),
            bootstrap: int = typer.Option(1000, help="Paired bootstrap resamples of the differences "
                                                     "(0: the side-by-side table only)."),
            bootstrap_seed: int = typer.Option(0, help="Seed of the resamples.")) -> None:
    """Two eval reports side by side (B - A), and the paired differences of AUC and AP with 95 %
    intervals over the same images (and seeds): which changes are within noise."""
    from stages.compare import compare_markdown

    with user_errors():
        typer.echo(compare_markdown(a, b, bootstrap, bootstrap_seed))


@app.command()
def show(images: List[str] = typer.Argument(..., help="Manifest keys (a unique prefix will do) or "
                                                     "image paths."),
         run: str = RUN_OPT,
         out: Path = typer.Option(Path("show.png"), help="The PNG to write."),
         feature_id: Optional[str] = typer.Option(None, help="Which cache, when several.")) -> None:
    """Write the image / DNF pairs of chosen images (the DNF as the classifier sees it)."""
    from stages.show import run_show

    with user_errors():
        summary = run_show(run, images, out, feature_id)
    _print(summary, False)


@app.command()
def detect(
    images: List[Path] = typer.Argument(..., help="Image files or folders."),
    model: Optional[Path] = typer.Option(None, help="The diffusion model folder (or cached hub id) the "
                                                    "detector was trained with (none for npr)."),
    download: bool = typer.Option(False, help="Fetch a hub id missing from the local cache (network)."),
    checkpoint: Path = typer.Option(..., help="Detector checkpoint (ours or reference format)."),
    device: str = DEVICE_OPT,
    batch_size: int = typer.Option(16, help="Images per forward pass."),
    threshold: float = typer.Option(0.5, help="Probability above which an image is called generated."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line (an infinite logit "
                                                       "as the text \"inf\" or \"-inf\")."),
    checkpoint_kind: Optional[str] = typer.Option(None, help="The feature kind a checkpoint that does not "
                                                  "record one was trained on (dnf, dire, npr, clip, "
                                                  "latent-dnf), computed at its defaults (256 x 256, its "
                                                  "default encoding); default: DNF's reference detector "
                                                  "(a note says so)."),
) -> None:
    """Probability that each image is generated, computed directly (no cache)."""
    from stages.detect import run_detect
    from storage.atomic import json_safe

    with user_errors():
        results = run_detect(images, model, checkpoint, device, batch_size, threshold, download,
                             checkpoint_kind, note=lambda m: typer.echo(f"note: {m}", err=True))
    for r in results:
        if as_json:
            typer.echo(json.dumps(json_safe(r), allow_nan=False))
        elif r["verdict"] == "error":
            typer.echo(f"{r['path']}\t-\terror: {r['error']}")
        else:
            typer.echo(f"{r['path']}\t{r['probability']:.4f}\t{r['verdict']}")


@app.command()
def status(run: str = RUN_OPT,
           as_json: bool = typer.Option(False, "--json", help="Print the status as JSON.")) -> None:
    """Shards done and pending, images, rejects and cache size of a run."""
    from stages.status import format_status, run_status

    with user_errors():
        s = run_status(run)
    typer.echo(json.dumps(s, indent=2) if as_json else format_status(s))


@app.command()
def verify(run: str = RUN_OPT,
           feature_id: Optional[str] = typer.Option(None, help="Check only this cache."),
           as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
    """Re-read every done shard and check it against its checksum and the manifest."""
    from stages.verify import run_verify

    with user_errors():
        result = run_verify(run, feature_id)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        for c in result["caches"]:
            typer.echo(f"{c['cache']}: {c['shards_checked']} done shards checked, "
                       f"{len(c['problems'])} bad, {c['shards_pending']} pending")
            for p in c["problems"]:
                shard = f"shard {p['shard']:05d}" if p["shard"] is not None else "cache"
                typer.echo(f"  {shard}: {p['problem']}\n    fix: {p['hint']}")
        if not result["caches"]:
            typer.echo(f"{run}: no feature cache to verify")
    if not result["ok"]:
        raise typer.Exit(1)


@app.command("convert-cache")
def convert_cache(run: str = RUN_OPT,
                  to: str = typer.Option(..., "--to", help="Target backend: zarr or webdataset."),
                  feature_id: Optional[str] = typer.Option(None, help="Which cache (default: the only one)."),
                  out: Optional[Path] = typer.Option(None, help="Target folder (default in RUN/cache)."),
                  as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON.")) -> None:
    """Copy a feature cache into the other backend, losslessly (checksums checked); resumable."""
    from stages.convert_cache import run_convert_cache

    with user_errors():
        summary = run_convert_cache(run, to, feature_id, out)
    typer.echo(json.dumps(summary, indent=2) if as_json else
               f"{summary['source']} -> {summary['target']}: {summary['shards_converted']} shards converted, "
               f"{summary['shards_already_there']} already there, {summary['size_mib']} MiB")


@app.command("convert-model")
def convert_model(
    src: Path = typer.Argument(..., help="Original checkpoint (.ckpt / .pt)."),
    out: Path = typer.Option(..., help="Folder to write the diffusers pipeline to."),
    fmt: str = typer.Option("auto", "--format", help="auto, ddim or adm."),
    config: Optional[Path] = typer.Option(None, help="Reference-style YAML of the architecture."),
) -> None:
    """Convert a DDIM 'simple' or OpenAI ADM checkpoint into a diffusers folder, once."""
    from stages.convert_model import convert_model as convert

    with user_errors():
        summary = convert(src, out, fmt, config)
    _print(summary, False)


@app.command("export-png")
def export_png(run: str = RUN_OPT,
               out: Path = typer.Option(..., help="Folder for the PNG tree."),
               feature_id: Optional[str] = typer.Option(None, help="Which cache, when several.")) -> None:
    """Write the cache as the reference code's DNF PNG folder tree."""
    from stages.export_png import run_export_png

    with user_errors():
        summary = run_export_png(run, out, feature_id)
    _print(summary, False)


@app.command("make-test-model")
def make_test_model(out: Path = typer.Option(..., help="Folder to write the model to."),
                    size: int = typer.Option(64, help="The UNet's sample size."),
                    seed: int = typer.Option(0, help="Seed of the random weights.")) -> None:
    """Write a tiny randomly initialised DDPM UNet folder, to try the pipeline without weights."""
    from stages.domain.noise_model import make_test_model as make

    typer.echo(f"wrote {make(out, size, seed)}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
