"""Parquet inputs against Hugging Face `datasets` itself: datasets written by its own writer
(`Dataset.to_parquet`, an Image feature and a ClassLabel label), laid out by the hub's conventions
(split file names, `data/<split>-NNNNN-of-NNNNN`, `data/<split>-NNNNN` without `-of-`, split folders,
split keywords, a repository with a LICENSE, `.gitattributes` and a README with or without
`configs`): the splits, labels and row counts `shard` gives equal `datasets.load_dataset`'s.
Also the recorded image column read back (`show`, the eval gallery, `audit --reread`) and ClassLabel
values named by integer. Everything offline (the caches under the test's tmp folder)."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
from collections import Counter
from pathlib import Path, PurePosixPath

import pytest
from conftest import _write_parquet, image_bytes
from PIL import Image

from stages.domain.parquet_layouts import ColumnOptions
from stages.shard import run_shard
from storage.parquet_images import read_index
from storage.run import Run

PROJECT_SPLIT = {"validation": "val"}  # the project's name of datasets' validation split
_seeds = itertools.count(1)  # every image of the module distinct: no duplicates between files


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """The `datasets` module, offline, its caches (and modules folder) in a tmp folder."""
    home = tmp_path_factory.mktemp("hf-home")
    keep = {k: os.environ.get(k) for k in ("HF_HOME", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_HOME=str(home), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    import datasets
    import huggingface_hub.constants

    saved = (datasets.config.HF_DATASETS_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE,
             datasets.config.HF_MODULES_CACHE, datasets.config.HF_DATASETS_CACHE)
    datasets.config.HF_DATASETS_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_MODULES_CACHE = home / "modules"
    datasets.config.HF_DATASETS_CACHE = home / "datasets"
    datasets.disable_progress_bars()
    yield datasets
    (datasets.config.HF_DATASETS_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE,
     datasets.config.HF_MODULES_CACHE, datasets.config.HF_DATASETS_CACHE) = saved
    for k, v in keep.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def write_hf(hf, path: Path, labels: list[int], names: tuple[str, ...] = ("real", "fake")) -> None:
    """A parquet file written by `datasets` itself: an Image feature and a ClassLabel label."""
    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=list(names))})
    images = [{"bytes": image_bytes(next(_seeds), size=(8, 8)), "path": None} for _ in labels]
    path.parent.mkdir(parents=True, exist_ok=True)
    hf.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(path))


def theirs(hf, folder: Path, cache: Path, packaged: bool = True, name: str | None = None) -> Counter:
    """(split, label) counts of `load_dataset("parquet", data_dir=folder)` (or `load_dataset(folder)`,
    of config `name`), splits named as the project names them, labels 0 real / 1 fake by their
    ClassLabel names."""
    dd = (hf.load_dataset("parquet", data_dir=str(folder), cache_dir=str(cache)) if packaged
          else hf.load_dataset(str(folder), name, cache_dir=str(cache)))
    out: Counter = Counter()
    for split, ds in dd.items():
        names = ds.features["label"].names
        for y in ds["label"]:
            out[(PROJECT_SPLIT.get(split, split), {"real": 0, "fake": 1}[names[y]])] += 1
    return out


def ours(folder: Path, run: Path, **kw) -> tuple[Counter, dict]:
    """(split, label) counts of the manifest `shard` writes (run in-process), and its summary."""
    summary = run_shard([folder], run, shard_size=64, workers=1, **kw)
    return Counter((e.split, e.label) for e in Run(run).entries()), summary


LAYOUTS = {  # what Dataset.to_parquet users and hub repositories name their files
    "split file names": ["train.parquet", "validation.parquet", "test.parquet"],
    "sharded": ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
                "data/validation-00000-of-00001.parquet", "data/test-00000-of-00001.parquet"],
    "sharded without -of-": ["data/train-00000.parquet", "data/train-00001.parquet",
                             "data/test-00000.parquet"],
    "split folders": ["train/0000.parquet", "valid/0000.parquet", "test/part-0.parquet"],
    "nested split folders": ["data/training/a.parquet", "data/dev/b.parquet", "data/testing/c.parquet"],
    "keywords in file names": ["my-training.parquet", "dev_set.parquet", "x.eval.parquet"],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_splits_labels_and_rows_equal_load_datasets(hf, tmp_path, layout):
    folder = tmp_path / "ds"
    for k, name in enumerate(LAYOUTS[layout]):
        write_hf(hf, folder / name, [0, 1, 1, 0, 1][: 3 + k % 3])
    got, summary = ours(folder, tmp_path / "run")
    assert got == theirs(hf, folder, tmp_path / "cache")
    assert len({s for s, _ in got}) >= 2  # not all in train
    assert "note" not in summary  # nothing defaulted


@pytest.mark.parametrize("readme", ["# A dataset card without YAML\n", "---\nlicense: mit\n---\n# Card\n"])
def test_repository_with_extra_files_and_no_configs(hf, tmp_path, readme):
    repo = tmp_path / "repo"
    write_hf(hf, repo / "data/train-00000-of-00001.parquet", [0, 1, 0, 1])
    write_hf(hf, repo / "data/test-00000-of-00001.parquet", [1, 0, 1])
    (repo / "LICENSE").write_text("MIT License\n")
    (repo / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    (repo / "README.md").write_text(readme)
    got, summary = ours(repo, tmp_path / "run")
    assert got == theirs(hf, repo, tmp_path / "cache", packaged=False) == Counter(
        {("train", 0): 2, ("train", 1): 2, ("test", 1): 2, ("test", 0): 1})
    assert summary["rejects"] == 0


def test_repository_with_readme_configs_and_extra_files(hf, tmp_path):
    repo = tmp_path / "repo"
    write_hf(hf, repo / "shards/a-0.parquet", [0, 1, 1])
    write_hf(hf, repo / "shards/a-1.parquet", [0])
    write_hf(hf, repo / "shards/b-0.parquet", [1, 0])
    (repo / "LICENSE").write_text("MIT License\n")
    (repo / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                    "  - split: train\n    path: shards/a-*.parquet\n"
                                    "  - split: validation\n    path: shards/b-*.parquet\n---\n# Card\n")
    got, _ = ours(repo, tmp_path / "run")
    assert got == theirs(hf, repo, tmp_path / "cache", packaged=False)
    assert {s for s, _ in got} == {"train", "val"}


def test_a_file_load_dataset_leaves_out_is_a_reject_with_the_reason(hf, tmp_path):
    """Beside `data/<split>-NNNNN-of-NNNNN` files, datasets reads no other file: neither does
    `shard`, but it says so (nothing is lost without a word)."""
    folder = tmp_path / "ds"
    write_hf(hf, folder / "data/train-00000-of-00001.parquet", [0, 1])
    write_hf(hf, folder / "data/test-00000-of-00001.parquet", [1])
    write_hf(hf, folder / "data/extra.parquet", [0, 0, 1])
    got, summary = ours(folder, tmp_path / "run")
    assert got == theirs(hf, folder, tmp_path / "cache")
    rejects = Run(tmp_path / "run").rejects()
    assert [Path(r["path"]).name for r in rejects] == ["extra.parquet"]
    assert "load_dataset" in rejects[0]["reason"]


def test_no_split_in_any_name_is_train_by_an_explicit_printed_choice(hf, tmp_path):
    folder = tmp_path / "ds"
    write_hf(hf, folder / "images.parquet", [0, 1, 1])
    got, summary = ours(folder, tmp_path / "run")
    assert got == theirs(hf, folder, tmp_path / "cache") == Counter({("train", 0): 1, ("train", 1): 2})
    assert "train" in summary["note"] and "--split" in summary["note"]
    dry = run_shard([folder], tmp_path / "dry", dry_run=True)
    assert "train" in dry["parquet"][0]["split"] and "default" in dry["parquet"][0]["splits_from"]
    assert "note" in dry
    _, forced = ours(folder, tmp_path / "run2", split="test")  # a split given: nothing to say
    assert "note" not in forced
    _, mapped = ours(folder, tmp_path / "run3", split_map=["train=test"])
    assert "note" not in mapped


def test_split_rules_equal_datasets_own_resolution(hf, tmp_path):
    """`hub_splits` against datasets' own pattern resolution (`get_data_patterns`) on many trees."""
    from datasets.data_files import DEFAULT_PATTERNS_ALL, DataFilesDict, get_data_patterns

    from stages.domain.parquet_layouts import hub_splits

    trees = [
        ["Train/a.parquet", "x/test/b.parquet"], ["data/train-00000-of-00001.parquet", "test.parquet"],
        ["a/my-train2/x.parquet", "b/dev/y.parquet", "c/z.parquet"], ["x/data/train-00000-of-00001.parquet"],
        ["TEST.parquet", "pretrain.parquet", "val_x.parquet"], ["eval.parquet", "evaluation.parquet"],
        ["data/holdout-00000-of-00003.parquet", "data/train-00002-of-00003.parquet"],
        ["trainset.parquet", "train.0.parquet", "validation/test.parquet"], ["a b train c.parquet"],
    ]
    for k, files in enumerate(trees):
        root = tmp_path / f"t{k}"
        for f in files:
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            (root / f).write_bytes(b"")
        patterns = get_data_patterns(str(root))
        resolved = DataFilesDict.from_patterns(patterns, str(root))
        want: dict = {}
        for split, found in resolved.items():
            for f in found:
                want.setdefault(PurePosixPath(os.path.relpath(f, root)), str(split))  # first split wins
        splits, _ = hub_splits([PurePosixPath(f) for f in files])
        assert splits == ({} if patterns == DEFAULT_PATTERNS_ALL else want), files  # {}: none named


def test_classlabel_values_named_by_integer_or_class_name(hf, tmp_path):
    folder = tmp_path / "ds"
    write_hf(hf, folder / "train.parquet", [0, 1, 1, 0, 1], names=("camera", "diffusion"))
    _, plain = ours(folder, tmp_path / "plain")
    for k, (real, fake) in enumerate([("0", "1"), ("camera", "diffusion"), ("CAMERA", "1")]):
        named = ColumnOptions(real_values=(real,), fake_values=(fake,))
        got, _ = ours(folder, tmp_path / f"run{k}", columns=named)
        assert got == Counter({("train", 0): 2, ("train", 1): 3}), (real, fake)
    reasons = [r["reason"] for r in Run(tmp_path / "plain").rejects()]  # the class name is shown
    assert len(reasons) == 5 and all("'camera'" in r or "'diffusion'" in r for r in reasons)


def test_recorded_image_column_is_read_back_by_show_gallery_and_audit(tmp_path):
    """With `--image-column edited`, every reader reads `edited` (the recorded column), not the
    `image` column an inference would pick: the bytes' sha256 is the manifest key."""
    from stages.audit import run_audit
    from stages.domain.gallery import original_view
    from stages.domain.parquet_layouts import image_bytes_at

    n = 6
    labels = ["real", "fake"] * (n // 2)
    png = [image_bytes(100 + i, size=(16, 16), fmt="PNG" if y == "real" else "JPEG")
           for i, y in enumerate(labels)]
    edited = [image_bytes(200 + i, size=(24, 20), fmt="JPEG") for i in range(n)]
    _write_parquet(tmp_path / "ds/train.parquet", {"image": png, "edited": edited, "label": labels}, 4)
    run = tmp_path / "run"
    run_shard([tmp_path / "ds"], run, workers=1, columns=ColumnOptions(image="edited"))
    entries = Run(run).entries()
    assert len(entries) == n
    # audit --reread reads the same headers as shard recorded: the same verdicts
    assert run_audit(run, reread=True)["sources"] == run_audit(run)["sources"]
    sources = read_index(run)
    for e in entries:
        data = image_bytes_at(e.path, sources, e.key)
        assert hashlib.sha256(data).hexdigest() == e.key
        with Image.open(io.BytesIO(data)) as want:
            assert original_view(e.path, sources, e.key).size == want.size == (24, 20)
    # a key that does not match the bytes read is an error, not another picture
    with pytest.raises(ValueError, match="sha256"):
        image_bytes_at(entries[0].path, sources, entries[1].key)


def test_image_cells_with_a_path_only_are_rejects_that_say_so(hf, tmp_path):
    """`Dataset.to_parquet` of images loaded from paths stores the path and no bytes: each such row
    is refused with that reason (not 'empty image bytes'); embedded rows beside them are taken."""
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i in range(2):
        (pictures / f"{i}.png").write_bytes(image_bytes(900 + i, size=(8, 8)))
    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=["real", "fake"])})
    cells = [{"bytes": None, "path": str(pictures / "0.png")}, {"bytes": image_bytes(950, size=(8, 8)),
                                                                "path": None},
             {"bytes": None, "path": str(pictures / "1.png")}]
    folder = tmp_path / "ds"
    hf.Dataset.from_dict({"image": cells, "label": [0, 1, 1]}, features=features).to_parquet(
        str(folder / "train.parquet"))
    got, _ = ours(folder, tmp_path / "run")
    assert got == Counter({("train", 1): 1})
    rejects = Run(tmp_path / "run").rejects()
    assert sorted(r["path"].rsplit("#", 1)[1] for r in rejects) == ["0", "2"]
    for r, name in zip(rejects, ("0.png", "1.png"), strict=True):
        assert "no bytes" in r["reason"] and name in r["reason"]


def test_large_binary_images_and_a_data_dir_config(hf, tmp_path):
    """A `large_binary` image column, and a README config that names only a `data_dir` (its files'
    splits by the name rules below it): as load_dataset reads them."""
    repo = tmp_path / "repo"
    features = hf.Features({"image": hf.Value("large_binary"),
                            "label": hf.ClassLabel(names=["real", "fake"])})
    for name, labels in (("train.parquet", [0, 1, 1]), ("test.parquet", [1, 0])):
        images = [image_bytes(next(_seeds), size=(8, 8)) for _ in labels]
        (repo / "part").mkdir(parents=True, exist_ok=True)
        hf.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
            str(repo / "part" / name))
    write_hf(hf, repo / "other/train.parquet", [0])  # outside the data_dir: not read
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_dir: part\n---\n")
    got, _ = ours(repo, tmp_path / "run")
    assert got == theirs(hf, repo, tmp_path / "cache", packaged=False) == Counter(
        {("train", 0): 1, ("train", 1): 2, ("test", 1): 1, ("test", 0): 1})
    assert [Path(r["path"]).parent.name for r in Run(tmp_path / "run").rejects()] == ["other"]


def test_the_image_feature_is_the_image_column(hf, tmp_path):
    """datasets records which column is an Image feature: that one is read, not the first binary
    column; two Image features with no usual name are refused until --image-column names one."""
    thumbs = [image_bytes(next(_seeds), size=(4, 4)) for _ in range(3)]
    pictures = [{"bytes": image_bytes(next(_seeds), size=(8, 8)), "path": None} for _ in range(3)]
    features = hf.Features({"thumb": hf.Value("binary"), "picture": hf.Image(),
                            "label": hf.ClassLabel(names=["real", "fake"])})
    hf.Dataset.from_dict({"thumb": thumbs, "picture": pictures, "label": [0, 1, 0]},
                         features=features).to_parquet(str(tmp_path / "ds/train.parquet"))
    ours(tmp_path / "ds", tmp_path / "run")
    assert sorted(e.key for e in Run(tmp_path / "run").entries()) == sorted(
        hashlib.sha256(p["bytes"]).hexdigest() for p in pictures)
    two = hf.Features({"a": hf.Image(), "b": hf.Image(), "label": hf.ClassLabel(names=["real", "fake"])})
    hf.Dataset.from_dict({"a": pictures, "b": pictures, "label": [0, 1, 0]}, features=two).to_parquet(
        str(tmp_path / "two/train.parquet"))
    ours(tmp_path / "two", tmp_path / "run2")
    assert "--image-column" in Run(tmp_path / "run2").rejects()[0]["reason"]
    got, _ = ours(tmp_path / "two", tmp_path / "run3", columns=ColumnOptions(image="b"))
    assert sum(got.values()) == 3


def test_missing_and_path_only_images_in_a_process_without_datasets(hf, tmp_path):
    """A None Image cell (a missing image, which datasets allows) and a path-only cell, sharded by a
    fresh process that has not imported `datasets` (which loads pyarrow.compute as a side effect): the
    embedded rows are taken, the others are rejects with their reasons, no traceback."""
    import json
    import subprocess
    import sys

    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=["real", "fake"])})
    elsewhere = tmp_path / "elsewhere/1.png"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(image_bytes(next(_seeds), size=(8, 8)))
    cells = [{"bytes": image_bytes(next(_seeds), size=(8, 8)), "path": None}, None,
             {"bytes": None, "path": str(elsewhere)},
             {"bytes": image_bytes(next(_seeds), size=(8, 8)), "path": None}]
    folder = tmp_path / "ds"
    hf.Dataset.from_dict({"image": cells, "label": [0, 1, 1, 1]}, features=features).to_parquet(
        str(folder / "train.parquet"))
    run = tmp_path / "run"
    code = ("import sys, json; from stages.shard import run_shard; "
            "s = run_shard([sys.argv[1]], sys.argv[2], workers=1); "
            "assert 'datasets' not in sys.modules; print(json.dumps(s['rejects']))")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code, str(folder), str(run)], capture_output=True, text=True,
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == 2
    assert sorted(e.path.rsplit("#", 1)[1] for e in Run(run).entries()) == ["0", "3"]
    reasons = {r["path"].rsplit("#", 1)[1]: r["reason"] for r in Run(run).rejects()}
    assert "no bytes" in reasons["2"] and "elsewhere/1.png" in reasons["2"]
    assert set(reasons) == {"1", "2"}


def configs_readme(*configs: str) -> str:
    """A dataset card whose YAML header lists these configs (each a YAML block of one list item)."""
    return "---\nconfigs:\n" + "".join(configs) + "---\n# Card\n"


def test_the_default_config_of_several_is_read(hf, tmp_path):
    """Several README configs: load_dataset reads the default one (`default: true`, here the second),
    not a merge of all where the first decides a file's split."""
    repo = tmp_path / "repo"
    write_hf(hf, repo / "data/a.parquet", [0, 1, 1])
    write_hf(hf, repo / "data/b.parquet", [1, 0])
    (repo / "README.md").write_text(configs_readme(
        "- config_name: all_train\n  data_files:\n  - split: train\n    path: data/*.parquet\n",
        "- config_name: main\n  default: true\n  data_files:\n  - split: train\n    path: data/a.parquet\n"
        "  - split: test\n    path: data/b.parquet\n"))
    got, _ = ours(repo, tmp_path / "run")
    assert got == theirs(hf, repo, tmp_path / "cache", packaged=False) == Counter(
        {("train", 0): 1, ("train", 1): 2, ("test", 1): 1, ("test", 0): 1})
    named, _ = ours(repo, tmp_path / "run2", columns=ColumnOptions(config="all_train"))
    assert named == theirs(hf, repo, tmp_path / "cache2", packaged=False, name="all_train")


def test_several_configs_and_no_default_is_refused_until_config_names_one(hf, tmp_path):
    from storage.errors import UserError

    repo = tmp_path / "repo"
    write_hf(hf, repo / "sd/train.parquet", [0, 1])
    write_hf(hf, repo / "mj/train.parquet", [1, 1, 1])
    (repo / "README.md").write_text(configs_readme("- config_name: sd\n  data_files: sd/*.parquet\n",
                                                   "- config_name: mj\n  data_files: mj/*.parquet\n"))
    with pytest.raises(ValueError, match="Config name is missing"):
        theirs(hf, repo, tmp_path / "cache", packaged=False)
    with pytest.raises(UserError, match=r"README\.md.*sd, mj.*--config"):
        ours(repo, tmp_path / "run")
    got, _ = ours(repo, tmp_path / "run2", columns=ColumnOptions(config="mj"))
    assert got == theirs(hf, repo, tmp_path / "cache2", packaged=False, name="mj")
    assert got == Counter({("train", 1): 3})
    assert Run(tmp_path / "run2").info().options["config"] == "mj"  # recorded in run.json
    assert [Path(r["path"]).parent.name for r in Run(tmp_path / "run2").rejects()] == ["sd"]
    with pytest.raises(UserError, match="--config 'xl'.*sd, mj"):
        ours(repo, tmp_path / "run3", columns=ColumnOptions(config="xl"))
    from conftest import cli  # the command line: a refusal is an error message, `--config` chooses

    refused = cli("shard", repo, "--run", tmp_path / "run4", "--workers", "1", check=False)
    assert refused.returncode == 2 and "--config" in refused.stderr and "Traceback" not in refused.stderr
    cli("shard", repo, "--run", tmp_path / "run5", "--workers", "1", "--config", "sd")
    assert Counter((e.split, e.label) for e in Run(tmp_path / "run5").entries()) == Counter(
        {("train", 0): 1, ("train", 1): 1})


def test_a_config_pattern_that_matches_nothing_is_an_error(hf, tmp_path):
    """A typo in data_files: load_dataset raises; so does shard, naming the README and the pattern
    (no silent fall-back to the file-name rules)."""
    from storage.errors import UserError

    repo = tmp_path / "repo"
    write_hf(hf, repo / "data/a.parquet", [0, 1])
    write_hf(hf, repo / "data/test.parquet", [1, 1])
    (repo / "README.md").write_text(configs_readme(
        "- config_name: default\n  data_files:\n  - split: train\n    path: dat/*.parquet\n"))
    with pytest.raises(FileNotFoundError):  # datasets' DataFilesNotFoundError
        theirs(hf, repo, tmp_path / "cache", packaged=False)
    with pytest.raises(UserError, match=r"README\.md.*'dat/\*\.parquet'"):
        ours(repo, tmp_path / "run")


def test_preview_images_beside_parquet_files_do_not_make_an_image_folder(hf, tmp_path):
    """A card's pictures (assets/example0.png, sample_*.jpg) are not data: datasets counts only the
    files its split patterns select when it picks the reader."""
    repo = tmp_path / "repo"
    write_hf(hf, repo / "train.parquet", [0, 1, 1])
    write_hf(hf, repo / "test.parquet", [1, 0])
    for i in range(3):
        (repo / "assets").mkdir(exist_ok=True)
        (repo / "assets" / f"example{i}.png").write_bytes(image_bytes(next(_seeds), size=(8, 8)))
    (repo / "README.md").write_text("# card\n![](assets/example0.png)\n")
    got, summary = ours(repo, tmp_path / "run")
    assert got == theirs(hf, repo, tmp_path / "cache", packaged=False)
    assert summary["rejects"] == 0
    sharded = tmp_path / "sharded"
    write_hf(hf, sharded / "data/train-00000-of-00001.parquet", [0, 1, 1])
    write_hf(hf, sharded / "data/test-00000-of-00001.parquet", [1])
    for i in range(3):
        (sharded / f"sample_{i}.jpg").write_bytes(image_bytes(next(_seeds), size=(8, 8), fmt="JPEG"))
    got, summary = ours(sharded, tmp_path / "run2")
    assert got == theirs(hf, sharded, tmp_path / "cache2", packaged=False)
    assert summary["rejects"] == 0


def test_an_image_folder_with_readme_configs_stays_an_image_folder(hf, tmp_path):
    repo = tmp_path / "repo"
    for split in ("train", "test"):
        for cls in ("real", "fake"):
            (repo / split / cls).mkdir(parents=True)
            for i in range(2 if split == "train" else 1):
                (repo / split / cls / f"{i}.png").write_bytes(image_bytes(next(_seeds), size=(8, 8)))
    (repo / "README.md").write_text(configs_readme(
        "- config_name: default\n  data_files:\n  - split: train\n    path: train/**\n"
        "  - split: test\n    path: test/**\n"))
    got, _ = ours(repo, tmp_path / "run")
    assert got == theirs(hf, repo, tmp_path / "cache", packaged=False) == Counter(
        {("train", 0): 2, ("train", 1): 2, ("test", 0): 1, ("test", 1): 1})


def test_config_patterns_absolute_recursive_hidden_and_outside(hf, tmp_path):
    """data_files as datasets resolves them: an absolute path, `**`, hidden files only when the
    pattern names them; a pattern reaching outside the input folder is a clear error (a run reads
    only below its inputs), where load_dataset would read it."""
    from storage.errors import UserError

    repo = tmp_path / "repo"
    write_hf(hf, repo / "data/a/train.parquet", [0, 1])
    write_hf(hf, repo / "data/b/c/x.parquet", [1])
    write_hf(hf, repo / "data/.old.parquet", [1, 1, 1])
    write_hf(hf, repo / "data/.keep/y.parquet", [0, 0])
    cases = {"absolute": f"  - split: train\n    path: {repo}/data/a/*.parquet\n",
             "recursive": "  - split: train\n    path: data/**/train.parquet\n"
                          "  - split: test\n    path: data/b/**\n",
             "hidden unnamed": "  - split: train\n    path: '**/*.parquet'\n",
             "hidden named": "  - split: train\n    path: data/.*.parquet\n"
                             "  - split: test\n    path: data/.keep/*\n"}
    for k, (what, files) in enumerate(cases.items()):
        (repo / "README.md").write_text(configs_readme(f"- config_name: default\n  data_files:\n{files}"))
        got, _ = ours(repo, tmp_path / f"run{k}")
        assert got == theirs(hf, repo, tmp_path / f"cache{k}", packaged=False), what
    (repo / "README.md").write_text(configs_readme(
        "- config_name: default\n  data_files:\n  - split: train\n    path: ../elsewhere/*.parquet\n"))
    with pytest.raises(UserError, match=r"'\.\./elsewhere/\*\.parquet'.*outside"):
        ours(repo, tmp_path / "run-out")


def test_append_of_a_file_already_read_with_another_image_column_is_refused(hf, tmp_path):
    """parquet.json records one image column per file: an append reading the same file through
    another column (or the file rewritten since) would make the earlier rows read other bytes, so it
    is refused naming the file and both columns; the earlier rows still read their own bytes."""
    from stages.domain.parquet_layouts import image_bytes_at
    from storage.errors import UserError

    features = hf.Features({"image": hf.Image(), "edited": hf.Image(),
                            "label": hf.ClassLabel(names=["real", "fake"])})
    cells = [[{"bytes": image_bytes(next(_seeds), size=(8, 8)), "path": None} for _ in range(4)]
             for _ in range(2)]
    folder = tmp_path / "ds"
    hf.Dataset.from_dict({"image": cells[0], "edited": cells[1], "label": [0, 1, 0, 1]},
                         features=features).to_parquet(str(folder / "train.parquet"))
    run = tmp_path / "run"
    run_shard([folder], run, workers=1, columns=ColumnOptions(image="edited"))
    with pytest.raises(UserError, match=r"train\.parquet.*'edited\.bytes'.*'image\.bytes'"):
        run_shard([folder], run, workers=1, append=True)
    assert [s.column for s in read_index(run).values()] == ["edited.bytes"]
    sources = read_index(run)
    for e in Run(run).entries():
        image_bytes_at(e.path, sources, e.key)  # the key checked: still the edited images
    hf.Dataset.from_dict({"image": cells[1], "edited": cells[0], "label": [1, 0, 1, 0]},
                         features=features).to_parquet(str(folder / "train.parquet"))  # rewritten
    with pytest.raises(UserError, match=r"train\.parquet: changed since"):
        run_shard([folder], run, workers=1, append=True, columns=ColumnOptions(image="edited"))


def test_a_split_folder_is_not_the_source_the_folder_above_it_is(hf, tmp_path):
    """`sd/train/0000.parquet` and `mj/train/0000.parquet` (no source column): the generators are sd
    and mj, not one source `train`; the splits come from the split folders as load_dataset's."""
    folder = tmp_path / "ds"
    for gen, labels in (("sd", [1, 1]), ("mj", [1, 1, 1]), ("real", [0, 0])):
        for split in ("train", "test"):
            write_hf(hf, folder / gen / split / "0000.parquet", labels)
    write_hf(hf, folder / "xl" / "validation" / "part.parquet", [1])
    got, _ = ours(folder, tmp_path / "run")
    assert got == theirs(hf, folder, tmp_path / "cache")
    assert Counter((e.source, e.split) for e in Run(tmp_path / "run").entries()) == Counter(
        {("sd", "train"): 2, ("sd", "test"): 2, ("mj", "train"): 3, ("mj", "test"): 3,
         ("real", "train"): 2, ("real", "test"): 2, ("xl", "val"): 1})


def test_audit_reread_says_which_rows_it_could_not_read_again(hf, tmp_path):
    """A parquet file rewritten since `shard`: `audit --reread` cannot read its rows again; it says
    how many and why (the first reason) in the report and its text, instead of silently showing the
    manifest's facts as if reread."""
    from stages.audit import format_audit, run_audit

    folder = tmp_path / "ds"
    write_hf(hf, folder / "train.parquet", [0, 1, 0, 1])
    write_hf(hf, folder / "test.parquet", [0, 1])
    run = tmp_path / "run"
    run_shard([folder], run, workers=1)
    write_hf(hf, folder / "train.parquet", [1, 0, 1, 0])  # rewritten upstream
    report = run_audit(run, reread=True)
    assert report["headers_read"] == 2
    unread = report["headers_unread"]
    assert unread["count"] == 4 and "train.parquet" in unread["first"]["path"]
    assert "changed since" in unread["first"]["reason"]
    text = format_audit(report)
    assert "4 headers could not be read again" in text and "changed since" in text
    assert "4 headers could not be read again" in format_audit(report, short=True)
    assert "headers_unread" not in run_audit(run)  # nothing was reread
