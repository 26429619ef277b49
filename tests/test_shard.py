"""`shard`: layouts, list files, rejects, duplicates, determinism."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, cli, image_bytes, make_dataset, write

from stages.domain.layouts import infer_from_layout
from stages.shard import run_shard
from storage.run import Run, RunError


@pytest.mark.parametrize("dirs, expected", [
    (["train", "progan", "car", "0_real"], (0, "progan", "train")),
    (["test", "stylegan", "1_fake"], (1, "stylegan", "test")),
    (["test", "lsun_bedroom", "real"], (0, "lsun_bedroom/real", "test")),
    (["test", "lsun_bedroom", "adm"], (1, "lsun_bedroom/adm", "test")),
    (["val", "imagenet", "sdv1", "sub"], (1, "imagenet/sdv1", "val")),
    (["fake"], (1, "root", None)),
    (["photos"], (None, None, None)),
])
def test_layouts(dirs, expected):
    assert infer_from_layout(dirs, "root") == expected


def test_shard_counts_rejects_and_duplicates(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=4)
    write(data / "train/progan/0_real/notes.txt", b"not an image")
    write(data / "train/progan/0_real/empty.png", b"")
    good = (data / "train/progan/1_fake/img_001.png").read_bytes()
    write(data / "train/progan/1_fake/truncated.png", good[: len(good) // 2])
    write(data / "train/progan/1_fake/copy.png", good)  # same bytes, same label: a duplicate
    (data / "train/progan/1_fake/folder.jpg").mkdir()
    summary = run_shard([data], tmp_path / "run", shard_size=5)
    run = Run(tmp_path / "run")
    entries, rejects, dups = run.entries(), run.rejects(), run.duplicates()
    reasons = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in rejects}
    assert reasons["notes.txt"].startswith("not an image")
    assert reasons["empty.png"].startswith("empty file")
    assert reasons["truncated.png"].startswith("truncated or corrupt")
    assert len(dups) == 1 and dups[0]["path"].endswith(("copy.png", "img_001.png"))
    assert summary["images"] == len(entries) == 24
    assert [e.key for e in entries] == sorted(e.key for e in entries)
    assert all(len(run.shard_entries(i)) == 5 for i in range(summary["num_shards"] - 1))
    # every file is accounted for exactly once (the folder named x.jpg is not a file)
    assert summary["files"] == len(entries) + len(rejects) + len(dups)


def test_conflicting_labels_are_rejects_not_a_stop(tmp_path):
    data = tmp_path / "data"
    img = image_bytes(1)
    write(data / "train/a/0_real/x.png", img)
    write(data / "train/a/1_fake/y.png", img)
    write(data / "train/a/0_real/z.png", image_bytes(2))
    summary = run_shard([data], tmp_path / "run")
    run = Run(tmp_path / "run")
    assert summary["conflicts"] == 1 and summary["images"] == 1  # the stage goes on
    reasons = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in run.rejects()}
    assert set(reasons) == {"x.png", "y.png"}
    assert reasons["x.png"].startswith("conflict") and "y.png (fake)" in reasons["x.png"]
    assert "x.png (real)" in reasons["y.png"]
    assert summary["files"] == summary["images"] + summary["rejects"] + summary["duplicates"]


def test_deterministic_and_rerun(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=3)
    run_shard([data], tmp_path / "a", shard_size=4, workers=2)
    run_shard([data], tmp_path / "b", shard_size=4, workers=1)
    for f in sorted((tmp_path / "a" / "shards").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / "shards" / f.name).read_bytes()
    run_shard([data], tmp_path / "a", shard_size=4)  # same inputs again: fine
    write(data / "test/progan/0_real/new.png", image_bytes(999))
    with pytest.raises(RunError, match="already holds a manifest"):
        run_shard([data], tmp_path / "a", shard_size=4)


def test_list_files_and_overrides(tmp_path):
    imgs = [write(tmp_path / "imgs" / f"{i}.png", image_bytes(i)) for i in range(4)]
    (tmp_path / "list.csv").write_text(
        "path,label,source,split\n"
        f"imgs/0.png,real,coco,train\nimgs/1.png,1,sd15,test\n{imgs[2]},fake,,\n")
    (tmp_path / "list.jsonl").write_text(json.dumps({"path": "imgs/3.png", "label": "0_real"}) + "\n")
    run_shard([tmp_path / "list.csv", tmp_path / "list.jsonl"], tmp_path / "run", split="val")
    by_name = {e.path.rsplit("/", 1)[-1]: e for e in Run(tmp_path / "run").entries()}
    assert (by_name["0.png"].label, by_name["0.png"].source, by_name["0.png"].split) == (0, "coco", "val")
    assert (by_name["1.png"].label, by_name["1.png"].source) == (1, "sd15")
    assert by_name["2.png"].source == "list"
    assert by_name["3.png"].label == 0
    # a flat folder needs --label; without it every file is rejected with the reason
    flat = tmp_path / "flat"
    write(flat / "a.png", image_bytes(50))
    run_shard([flat], tmp_path / "run2")
    assert "no label" in Run(tmp_path / "run2").rejects()[0]["reason"]
    run_shard([flat], tmp_path / "run3", label="fake", source="mygan", split="test")
    e = Run(tmp_path / "run3").entries()[0]
    assert (e.label, e.source, e.split) == (1, "mygan", "test")


def test_cli_shard_errors_are_one_line(tmp_path):
    proc = cli("shard", tmp_path / "missing", "--run", tmp_path / "run", check=False)
    assert proc.returncode == 2
    assert "missing: no such file or folder" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("bug", ["ValueError('operands could not be broadcast together')",
                                 "KeyError('num_shardz')", "FileNotFoundError('/tmp/x')"])
def test_a_bug_inside_a_stage_keeps_its_traceback(tmp_path, bug):
    """Only UserError subclasses become one-line `error:` messages: a programming error inside a
    stage (here planted in `status`) exits non-zero with its traceback, whatever its type."""
    run_shard([make_dataset(tmp_path / "data", per_class=1, splits=("train",))], tmp_path / "run")
    code = ("import sys, cli, stages.status as st\n"
            f"def broken(run):\n    raise {bug}\n"
            "st.run_status = broken\n"
            f"sys.argv = ['dnf-pipeline', 'status', '--run', {str(tmp_path / 'run')!r}]\n"
            "cli.main()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode not in (0, 2), proc.stderr
    assert "Traceback" in proc.stderr and "in broken" in proc.stderr
    assert "error: " not in proc.stderr.splitlines()[0]
    # the same stage's user error stays one line
    proc = cli("status", "--run", tmp_path / "nothing-here", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
