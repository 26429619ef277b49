"""Crash-point injection: every stage killed at every write step the harness can enumerate, rerun,
and compared with an uninterrupted run (identical bytes, counts that add up).

A write step is a commit point of the file system: each `os.replace` / `os.rename` (every atomic
write of the project, zarr-python's own file writes and pathlib's `replace` included). A process
killed between two of them leaves the same files whether it died before or after an fsync (that
matters for a power cut, which the fsync order before each done marker covers), so fsyncs are
not counted. The stage runs in
a forked child that counts those calls and dies with `os._exit` (no cleanup, no `finally`: as a
kill -9 or a power cut) at step k, just before or just after it; k runs from 1 until the child
finishes without reaching it, so every step of the stage is a crash point. The parent then reruns
the stage as a user would (`--resume` for train) and compares the result with the reference run.

`make test` kills at every step of shard, append, pack, extract (both backends) and convert-cache,
and at every fourth step of train; `make test-long` at every step of train and of shard and extract
of parquet inputs too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import image_bytes, make_dataset, write

from stages.convert_cache import run_convert_cache
from stages.extract import ExtractOptions, run_extract
from stages.shard import run_shard
from stages.train import TrainOptions, run_train
from storage.run import Run

SIZE = 16
KILLED = 137
STEPS = ("replace", "rename")
CHILD_TIMEOUT_S = 120


def run_killed_at(stage: Callable[[], object], step: int, after: bool) -> bool:
    """Run `stage` in a forked child that dies at its `step`-th write step (before or after it);
    True when it died there, False when the stage finished first."""
    pid = os.fork()
    if pid == 0:  # the child: count write steps, die at the chosen one
        try:
            torch.set_num_threads(1)
            count = [0]
            originals = {name: getattr(os, name) for name in STEPS}

            def counted(name):
                def call(*args, **kw):
                    count[0] += 1
                    if count[0] == step and not after:
                        os._exit(KILLED)
                    result = originals[name](*args, **kw)
                    if count[0] == step and after:
                        os._exit(KILLED)
                    return result
                return call
            for name in STEPS:
                setattr(os, name, counted(name))
            stage()
            os._exit(0)
        except BaseException:  # a stage error is a finding: the parent sees exit code 1
            import traceback

            traceback.print_exc()
            os._exit(1)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the stage hung while being killed at step {step} ({CHILD_TIMEOUT_S} s)")
        time.sleep(0.01)
    code = os.waitstatus_to_exitcode(done[1])
    assert code in (0, KILLED), f"the stage failed (exit {code}) while being killed at step {step}"
    return code == KILLED


def tree(root: Path, ignore: Callable[[str], bool] = lambda rel: False) -> dict[str, bytes]:
    """relative path -> bytes of every file under root, without claims, locks and the temporary
    files a killed atomic write leaves (`.NAME.*.tmp`, never read)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if (path.is_file() and not any(part.endswith((".claims", ".lock")) for part in path.parts)
                and not (path.name.startswith(".") and path.name.endswith(".tmp")) and not ignore(rel)):
            out[rel] = path.read_bytes()
    return out


def crash_everywhere(base: Path, work: Path, stage: Callable[[Path], object], rerun: Callable[[Path], object],
                     check: Callable[[Path], None], every: int = 1) -> int:
    """For each write step k (every `every`-th one) and each side of it: a fresh copy of `base`,
    the stage killed there, rerun, checked. Returns how many write steps the stage has."""
    step = 0
    while True:
        step += 1
        finished = False
        for after in (False, True):
            if (step - 1) % every and not finished:
                continue
            target = work / f"k{step}{'a' if after else 'b'}"
            shutil.copytree(base, target, symlinks=True)
            if not run_killed_at(lambda t=target: stage(t), step, after):
                shutil.rmtree(target)
                finished = True
                break
            rerun(target)
            check(target)
            shutil.rmtree(target)
        if finished:
            return step - 1


# -- inputs -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(module_tmp, tiny_model) -> Iterator[dict]:
    """A dataset with rejects and duplicates, a second one to append, and reference runs of every
    stage, uninterrupted."""
    tmp = module_tmp("crash")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed children run: sums in the same order, the same bytes
    data = make_dataset(tmp / "data", per_class=3, splits=("train", "val"), size=(24, 20))
    write(data / "train/progan/0_real/bad.png", b"not an image")
    write(data / "train/progan/1_fake/copy.png", (data / "train/progan/1_fake/img_001.png").read_bytes())
    more = tmp / "more"
    for i in range(3):
        write(more / f"val/progan/{i % 2}_{'fake' if i % 2 else 'real'}/m{i}.png", image_bytes(700 + i))
    write(more / "val/progan/0_real/empty.png", b"")
    ref = tmp / "ref"
    run_shard([data], ref / "sharded/run", shard_size=4)
    shutil.copytree(ref / "sharded", ref / "appended")
    run_shard([more], ref / "appended/run", shard_size=4, append=True)
    shutil.copytree(ref / "sharded", ref / "packed")
    run_shard([data], ref / "packed/run", shard_size=4, pack=True)
    shutil.copytree(ref / "sharded", ref / "zarr")
    run_extract(ref / "zarr/run", extract_opts(tiny_model, "zarr"))
    shutil.copytree(ref / "sharded", ref / "wds")
    run_extract(ref / "wds/run", extract_opts(tiny_model, "webdataset"))
    shutil.copytree(ref / "zarr", ref / "converted")
    run_convert_cache(ref / "converted/run", "webdataset")
    shutil.copytree(ref / "zarr", ref / "trained")
    run_train(ref / "trained/run", train_opts())
    yield {"data": data, "more": more, "ref": ref, "work": tmp / "work", "model": tiny_model}
    torch.set_num_threads(threads)


def extract_opts(model: Path, backend: str) -> ExtractOptions:
    return ExtractOptions(model=model, size=SIZE, batch_size=2, workers=0, device="cpu", backend=backend)


def train_opts() -> TrainOptions:
    return TrainOptions(name="t", epochs=2, batch_size=4, workers=0, device="cpu", lr=1e-3)


def same_tree(reference: Path, ignore: Callable[[str], bool] = lambda rel: False) -> Callable[[Path], None]:
    """A check: the rerun's run folder holds the reference's files with the same bytes, and the
    counts of run.json add up (files = images + rejects + duplicates)."""
    want = tree(reference / "run", ignore)

    def check(target: Path) -> None:
        got = tree(target / "run", ignore)
        assert sorted(got) == sorted(want)
        assert [k for k in want if got[k] != want[k]] == []
        info = Run(target / "run").info()
        assert info.files == info.images + info.rejects + info.duplicates
        assert len(Run(target / "run").rejects()) == info.rejects
    return check


# -- the stages ---------------------------------------------------------------------------------
def test_shard_killed_at_every_write_step(inputs):
    def stage(t):
        return run_shard([inputs["data"]], t / "run", shard_size=4)
    base = inputs["work"] / "empty"
    base.mkdir(parents=True, exist_ok=True)
    steps = crash_everywhere(base, inputs["work"], stage, stage, same_tree(inputs["ref"] / "sharded"))
    assert steps >= 5  # 3 shards, rejects, duplicates, run.json


def test_append_killed_at_every_write_step(inputs):
    def stage(t):
        return run_shard([inputs["more"]], t / "run", shard_size=4, append=True)
    steps = crash_everywhere(inputs["ref"] / "sharded", inputs["work"], stage, stage,
                             same_tree(inputs["ref"] / "appended"))
    assert steps >= 4


def test_pack_killed_at_every_write_step(inputs):
    def stage(t):
        return run_shard([inputs["data"]], t / "run", shard_size=4, pack=True)
    steps = crash_everywhere(inputs["ref"] / "sharded", inputs["work"], stage, stage,
                             same_tree(inputs["ref"] / "packed"))
    assert steps >= 3


@pytest.mark.parametrize("backend", ["zarr", "webdataset"])
def test_extract_killed_at_every_write_step(inputs, backend):
    def stage(t):
        return run_extract(t / "run", extract_opts(inputs["model"], backend))
    ref = inputs["ref"] / ("zarr" if backend == "zarr" else "wds")
    steps = crash_everywhere(inputs["ref"] / "sharded", inputs["work"], stage, stage, same_tree(ref))
    assert steps >= 3 * 2  # each shard: its data, its done marker (and their fsyncs)


def test_convert_cache_killed_at_every_write_step(inputs):
    def stage(t):
        return run_convert_cache(t / "run", "webdataset")
    crash_everywhere(inputs["ref"] / "zarr", inputs["work"], stage, stage,
                     same_tree(inputs["ref"] / "converted"))


# both in make test-long (about 55 s at every 4th step): make test keeps test_reliability's training
# killed mid-epoch and test_train_eval's exact resume
@pytest.mark.slow
@pytest.mark.parametrize("every", [4, 1])
def test_train_killed_at_every_write_step(inputs, every):
    def stage(t):
        return run_train(t / "run", train_opts())

    def rerun(t):  # as a user would: --resume when there is a last.pt to resume from
        return run_train(t / "run", train_opts(), resume=(t / "run/train/t/last.pt").exists())

    def check(t):
        for name in ("best.pt", "last.pt"):
            want = torch.load(inputs["ref"] / f"trained/run/train/t/{name}", weights_only=True)
            got = torch.load(t / f"run/train/t/{name}", weights_only=True)
            assert got["train"]["state"] == want["train"]["state"]
            assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])
        lines = (t / "run/train/t/metrics.jsonl").read_text().splitlines()
        want_lines = (inputs["ref"] / "trained/run/train/t/metrics.jsonl").read_text().splitlines()
        assert len(lines) == len(want_lines) == 2
        timing = ("train_seconds", "train_samples_per_s", "data_wait_fraction")
        for line, want in zip(lines, want_lines, strict=True):  # the same epochs, losses, val metrics
            a, b = json.loads(line), json.loads(want)
            for k in timing:
                a.pop(k), b.pop(k)
            assert a == b
    steps = crash_everywhere(inputs["ref"] / "zarr", inputs["work"], stage, rerun, check, every=every)
    assert steps >= 4  # per epoch: best.pt, last.pt


# -- parquet inputs: shard reads row groups, extract reads them in place ----------------------------
@pytest.fixture(scope="module")
def pq_inputs(module_tmp, tiny_model) -> Iterator[dict]:
    from conftest import make_openfake

    tmp = module_tmp("crash-pq")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = make_openfake(tmp / "of", rows=16, files=1, row_group_size=3, size=(20, 18))
    ref = tmp / "ref"
    run_shard([data], ref / "sharded/run", shard_size=4)
    shutil.copytree(ref / "sharded", ref / "zarr")
    run_extract(ref / "zarr/run", extract_opts(tiny_model, "zarr"))
    yield {"data": data, "ref": ref, "work": tmp / "work", "model": tiny_model}
    torch.set_num_threads(threads)


@pytest.mark.slow  # `make test` kills the CLI during parquet shard and extract (test_parquet.py)
def test_parquet_shard_and_extract_killed_at_every_write_step(pq_inputs):
    def shard(t):
        return run_shard([pq_inputs["data"]], t / "run", shard_size=4)

    def extract(t):
        return run_extract(t / "run", extract_opts(pq_inputs["model"], "zarr"))
    base = pq_inputs["work"] / "empty"
    base.mkdir(parents=True, exist_ok=True)
    steps = crash_everywhere(base, pq_inputs["work"], shard, shard, same_tree(pq_inputs["ref"] / "sharded"))
    assert steps >= 5  # 3 shards, parquet.json, rejects, duplicates, run.json
    steps = crash_everywhere(pq_inputs["ref"] / "sharded", pq_inputs["work"], extract, extract,
                             same_tree(pq_inputs["ref"] / "zarr"))
    assert steps >= 3 * 2
