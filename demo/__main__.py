"""`python -m demo [all|data|model]`: the demo's steps; `all` runs data, model, shard, extract,
train and eval, each skipped when its result is already there, and prints the per-generator table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import typer

from demo.data import UPSCALERS, DataConfig, DemoError, make_data, train_photos
from demo.ddpm import DDPMConfig, train_ddpm
from stages.evaluate import cell

ROOT = Path(__file__).resolve().parent.parent
app = typer.Typer(add_completion=False, no_args_is_help=False,
                  help="The DNF pipeline on real photos and four real generators, offline, on a CPU.")

WORK_OPT = typer.Option(ROOT / "runs" / "demo", "--work", help="Folder for data, model and run.")
QUICK_OPT = typer.Option(False, "--quick", help="Tiny sizes (about a minute): what the test runs.")


def _configs(quick: bool) -> tuple[DataConfig, DDPMConfig]:
    if quick:
        return (DataConfig(crops_per_photo=4, unseen_crops_per_photo=2, faces={"test": 8}),
                DDPMConfig(steps=24, batch_size=8, ema=0.9))
    return DataConfig(), DDPMConfig()


def _dnf(*args: str) -> None:
    print("$ dnf-pipeline " + " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args])
    if proc.returncode:
        raise typer.Exit(proc.returncode)


def _fail(e: DemoError) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


@app.command()
def data(work: Path = WORK_OPT, quick: bool = QUICK_OPT) -> None:
    """Make the demo images (real crops, Real-ESRGAN, waifu2x, SRMD, StyleGAN2) under WORK/data."""
    try:
        make_data(work / "data", _configs(quick)[0])
    except DemoError as e:
        _fail(e)


@app.command()
def model(work: Path = WORK_OPT, quick: bool = QUICK_OPT) -> None:
    """Train the demo DDPM on the train-split photos into WORK/model (after `data`)."""
    try:
        data_cfg, ddpm_cfg = _configs(quick)
        make_data(work / "data", data_cfg)
        train_ddpm(train_photos(work / "data"), work / "model", ddpm_cfg)
    except DemoError as e:
        _fail(e)


@app.command(name="all")
def run_all(
    work: Path = WORK_OPT, quick: bool = QUICK_OPT,
    train_generator: str = typer.Option("realesrgan", help="Generator to train on (one with train-split "
                                        "images); the others are held out."),
    epochs: int = typer.Option(8, help="Classifier epochs."),
) -> None:
    """Data, model, shard, extract, train on one generator, eval on all; print the table."""
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    data_cfg, ddpm_cfg = _configs(quick)
    try:
        summary = make_data(work / "data", data_cfg)
        times["data"] = time.perf_counter() - t0
        t = time.perf_counter()
        model_info = train_ddpm(train_photos(work / "data"), work / "model", ddpm_cfg)
        times["model"] = time.perf_counter() - t
    except DemoError as e:
        _fail(e)
    trainable = set(summary["counts"]["train"]) - {"real"}
    if train_generator not in trainable:
        _fail(DemoError(f"--train-generator {train_generator}: the demo data has no train-split images of "
                        f"it (trainable: {', '.join(sorted(trainable)) or 'none'}; skipped: "
                        f"{', '.join(summary['skipped']) or 'none'})"))
    run = work / "run"
    fresh_run(run, {"data": {k: summary[k] for k in ("config", "photos", "splits")},
                    "model": {k: model_info[k] for k in ("config", "photos")}})
    steps = [
        ("shard", ["shard", str(work / "data"), "--run", str(run), "--shard-size", "128"]),
        ("extract", extract_args(run, work / "model", data_cfg.size)),
        ("train", detector_args(run, "demo", train_generator, 2 if quick else epochs)),
        ("eval", eval_args(run, "demo")),
    ]
    for name, args in steps:
        t = time.perf_counter()
        _dnf(*args)
        times[name] = time.perf_counter() - t
    out = run / "eval" / "demo"
    rep = json.loads((out / "report.json").read_text())
    table = demo_table(rep, train_generator, summary)
    (out / "demo.md").write_text(f"# DNF demo\n\n{table}\n\n![ROC and PR curves](curves.png)\n")
    print("\nTime: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
          + f"; total {time.perf_counter() - t0:.0f} s\n")
    print(table)
    print(f"\nThe table with ROC and PR curves: {out / 'demo.md'}; the full report: {out / 'report.md'}")


@app.command()
def dire(
    work: Path = WORK_OPT,
    train_generator: str = typer.Option("realesrgan", help="Generator to train on (as `all`)."),
    epochs: int = typer.Option(8, help="Classifier epochs."),
    ddim_steps: int = typer.Option(20, help="DIRE's DDIM respacing (20: DIRE's ddim20, 40 UNet passes)."),
) -> None:
    """After `all`: the DIRE baseline on the same shards and model, trained and evaluated like the
    DNF detector, and both tables side by side (`make demo-dire`)."""
    run = work / "run"
    if not (run / "eval" / "demo" / "report.json").exists():
        _fail(DemoError(f"{run}: run `python -m demo all` (make demo) first"))
    size = _configs(False)[0].size
    summary, extract_s = extract_kind([*extract_args(run, work / "model", size), "--feature", "dire",
                                       "--ddim-steps", str(ddim_steps)])
    _dnf(*detector_args(run, "demo-dire", train_generator, epochs), "--feature-id", summary["feature_id"])
    _dnf(*eval_args(run, "demo-dire"))
    reports = {name: json.loads((run / "eval" / name / "report.json").read_text())
               for name in ("demo", "demo-dire")}
    try:
        data = make_data(work / "data", _configs(False)[0])  # cached by `all`: returns its summary
    except DemoError as e:
        _fail(e)
    lines = []
    titles = {"demo": "DNF (one UNet pass)", "demo-dire": f"DIRE ({2 * ddim_steps} UNet passes)"}
    for name, title in titles.items():
        lines += [f"## {title}", "", demo_table(reports[name], train_generator, data), ""]
    lines.append(f"DIRE extract: {summary['images']} images in {extract_s:.0f} s "
                 f"({summary['images_per_s']} images/s)")
    publish("\n".join(lines), run / "eval" / "demo-dire" / "demo-dire.md", "DNF vs DIRE on the demo")


@app.command()
def compare(
    work: Path = WORK_OPT,
    train_generator: str = typer.Option("realesrgan", help="Generator to train on (as `all`)."),
    epochs: int = typer.Option(8, help="Classifier epochs (as `all`)."),
) -> None:
    """After `all`: NPR (no weights) on the same shards, its detector trained with the same recipe,
    and DNF vs NPR (and DIRE, when `demo dire` ran) per generator with intervals and the paired
    bootstrap's verdicts (`make demo-compare`)."""
    from stages.compare import compare_markdown

    run = work / "run"
    if not (run / "eval" / "demo" / "report.json").exists():
        _fail(DemoError(f"{run}: run `python -m demo all` (make demo) first"))
    size = _configs(False)[0].size
    summary, extract_s = extract_kind(["extract", "--run", str(run), "--size", str(size), "--batch-size",
                                       "32", "--feature", "npr"])
    _dnf(*detector_args(run, "demo-npr", train_generator, epochs), "--feature-id", summary["feature_id"])
    _dnf(*eval_args(run, "demo-npr"), "--gallery", "0")
    try:
        data = make_data(work / "data", _configs(False)[0])  # cached by `all`: returns its summary
    except DemoError as e:
        _fail(e)
    names = {"demo": "DNF (one UNet pass)", "demo-npr": "NPR (no model)", "demo-dire": "DIRE"}
    lines = []
    for name, title in names.items():
        report = run / "eval" / name / "report.json"
        if report.exists():
            rep = json.loads(report.read_text())
            lines += [f"## {title}", "", demo_table(rep, train_generator, data), ""]
    lines += ["## NPR - DNF, paired over the same test images", "",
              compare_markdown(run / "eval" / "demo", run / "eval" / "demo-npr", 1000, 0), ""]
    if (run / "eval" / "demo-dire" / "report.json").exists():
        lines += ["## DIRE - DNF", "", compare_markdown(run / "eval" / "demo", run / "eval" / "demo-dire",
                                                         1000, 0), ""]
    lines.append(f"NPR extract: {summary['images']} images in {extract_s:.0f} s "
                 f"({summary['images_per_s']} images/s, command included)" if summary["images"] else
                 f"NPR extract: the cache {summary['cache']} was complete already")
    publish("\n".join(lines), run / "eval" / "demo-npr" / "demo-compare.md", "DNF vs NPR on the demo")


def extract_kind(args: list[str]) -> tuple[dict, float]:
    """Run `dnf-pipeline extract ... --json`; (its summary, seconds with the command's start-up)."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args, "--json"], capture_output=True,
                         text=True)
    if out.returncode:
        _fail(DemoError(f"{' '.join(args[:1] + args[-2:])} failed:\n{out.stderr[-2000:]}"))
    return json.loads(out.stdout), time.perf_counter() - t


def publish(text: str, path: Path, title: str) -> None:
    """Write the tables to `path` as markdown and print them."""
    path.write_text(f"# {title}\n\n{text}\n")
    print()
    print(text)
    print(f"\nThe tables: {path}")


def fresh_run(run: Path, inputs: dict) -> None:
    """Keep WORK/run only if it was made from these data and model: a run folder of older demo data
    holds another manifest (`shard` refuses it) and caches and checkpoints of another model."""
    stamp = run / "demo-inputs.json"
    text = json.dumps(inputs, sort_keys=True)
    if run.exists() and (not stamp.exists() or stamp.read_text() != text):
        print(f"demo: {run} was made from other demo data or another model; making it again", flush=True)
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    stamp.write_text(text)


def extract_args(run: Path, model: Path, size: int) -> list[str]:
    """`dnf-pipeline extract` arguments of the demo: every shard of the run through the model."""
    return ["extract", "--run", str(run), "--model", str(model), "--size", str(size), "--batch-size", "32"]


def eval_args(run: Path, name: str) -> list[str]:
    """`dnf-pipeline eval` arguments of the demo: detector NAME's best checkpoint on the test split."""
    return ["eval", "--run", str(run), "--checkpoint", str(run / "train" / name / "best.pt"), "--name", name,
            "--split", "test"]


def detector_args(run: Path, name: str, train_generator: str, epochs: int) -> list[str]:
    """`dnf-pipeline train` arguments of the demo's detector: real photos vs one generator; with
    `--resume` when a training of that name was interrupted (a finished one is then kept). The
    learning rate is ten times the reference's: from scratch on about 1,500 images of 64x64, 1e-4
    reached 64 % validation accuracy in 8 epochs, 1e-3 90 %."""
    args = ["train", "--run", str(run), "--name", name, "--source", "demo/real", "--source",
            f"demo/{train_generator}", "--epochs", str(epochs), "--batch-size", "32", "--patience", "3",
            "--lr", "1e-3"]
    return args + (["--resume"] if (run / "train" / name / "last.pt").exists() else [])


def demo_table(rep: dict, train_generator: str, summary: dict) -> str:
    """Per-generator table of the test split (photo groups never seen in training): the seen generator,
    the related unseen ones and the unrelated one, each with the test split's real images."""
    head = "| generator | seen in training | real | fake | acc | AP | AUC | real acc | fake acc |"
    lines = ["Detector trained on real photos vs " + train_generator + "; test split:", "", head,
             "|" + "---|" * 9]
    for src, r in rep["sources"].items():
        if not r["n_fake"]:
            continue
        gen = src.split("/")[-1]
        seen = ("yes" if gen == train_generator else "no, related (another upscaler)"
                if {gen, train_generator} <= set(UPSCALERS) else "no, unrelated")
        cells = [gen, seen, str(r["n_real"]), str(r["n_fake"])]
        cells += [cell(r, k) for k in ("acc", "ap", "auc", "real_acc", "fake_acc")]
        lines.append("| " + " | ".join(cells) + " |")
    for gen, why in summary.get("skipped", {}).items():
        lines.append(f"| {gen} | skipped: {why} | | | | | | | |")
    return "\n".join(lines + ["", "[brackets]: 95 % bootstrap interval over the test images (1,000 "
                               "resamples stratified by class)."])


@app.command()
def seeds(
    work: Path = WORK_OPT,
    train_generator: str = typer.Option("realesrgan", help="The generator `demo all` trained on."),
    epochs: int = typer.Option(8, help="Classifier epochs (as `demo all`)."),
    seed_list: str = typer.Option("0,1,2", "--seeds", help="Detector seeds; seed 0 is the demo's own."),
) -> None:
    """After `demo all`: more detector seeds on the same cached features (seed 0 is the demo's
    detector, linked, not retrained), each evaluated, and the AUC per seed with mean +- std per
    generator (`make demo-seeds`)."""
    run = work / "run"
    if not (run / "train" / "demo" / "best.pt").exists():
        _fail(DemoError(f"{run}: no demo detector yet; run `make demo` (python -m demo all) first"))
    folder = run / "train" / "demo-seeds"
    if not (folder / "seed-0").exists():  # the demo's detector is seed 0 of the same recipe
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copytree(run / "train" / "demo", folder / "seed-0", copy_function=os.link)
    args = detector_args(run, "demo-seeds", train_generator, epochs)
    args = [a for a in args if a != "--resume"] + ["--seeds", seed_list, "--resume"]
    _dnf(*args)
    _dnf("eval", "--run", str(run), "--checkpoint", str(folder), "--name", "demo-seeds", "--split", "test",
         "--gallery", "0")
    rep = json.loads((run / "eval" / "demo-seeds" / "report.json").read_text())
    print(seed_table(rep, train_generator))


def seed_table(rep: dict, train_generator: str) -> str:
    """AUC per seed and mean +- std per generator (percent)."""
    names = rep["seeds"]
    lines = [f"Detector trained on real photos vs {train_generator}, {len(names)} seeds; test split, AUC:",
             "",
             "| generator | " + " | ".join(names) + " | mean ± std |", "|" + "---|" * (len(names) + 2)]
    rows = [s for s in rep["spread"] if not s.startswith("**")] + ["**mean over sources**"]
    for src in rows:
        auc = rep["spread"].get(src, {}).get("auc")
        if auc is None:
            continue
        lines.append("| " + " | ".join([src.split("/")[-1], *[f"{100 * v:.1f}" for v in auc["values"]],
                                          f"{100 * auc['mean']:.1f} ± {100 * auc['std']:.1f}"]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    app()
