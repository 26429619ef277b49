"""Folder layouts of the field's datasets: label, source (generator / test set) and split of a file
from the folders between an input root and the file.

`auto` reads CNNDetection, DiffusionForensics, GenImage, AIGCDetectBenchmark / NPR and Chameleon
trees; `ufd` (UniversalFakeDetect's diffusion set, which pairs each generator with its reals) and
`synthbuster` (fake-only generator folders) need to be named. The docs page docs/inputs/folders.md
has a table with the tree each expects and the command for each.
"""

from __future__ import annotations

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
REAL_NAMES = {"0_real", "real", "nature"}
FAKE_NAMES = {"1_fake", "fake", "ai"}
# UniversalFakeDetect's diffusion_datasets: which real set each generator's images are scored against
UFD_REALS = {"guided": "imagenet", "ldm_200": "laion", "ldm_200_cfg": "laion", "ldm_100": "laion",
             "glide_100_27": "laion", "glide_50_27": "laion", "glide_100_10": "laion", "dalle": "laion"}
Inferred = tuple[int | None, str | None, str | None]  # label, source, split


def parse_label(value: object) -> int | None:
    """`0`, `1`, `real`, `fake`, `0_real`, `1_fake`, `nature`, `ai` (any case) to 0 / 1, else None."""
    text = str(value).strip().lower()
    if text in {"0"} | REAL_NAMES:
        return 0
    if text in {"1"} | FAKE_NAMES:
        return 1
    return None


def infer_auto(rel_dirs: list[str], root_name: str) -> Inferred:
    """CNNDetection `{train,val,test}/<set>/.../{0_real,1_fake}/` gives source `<set>`;
    DiffusionForensics `{train,val,test}/<set>/{real,<generator>}/` gives `<set>/real` and
    `<set>/<generator>` (and `<set>/fake` for a folder named `fake`); GenImage
    `<generator>/<inner>/{train,val}/{nature,ai}/` and Chameleon
    `<name>/test/{0_real,1_fake}` give the folder above the split (or the root's name when the
    root is that folder); AIGCDetectBenchmark `<gen>/[<class>/]{0_real,1_fake}` gives `<gen>`;
    a `real`/`fake` folder right under the root takes the root's name."""
    lowered = [d.lower() for d in rel_dirs]
    split_idx = next((i for i, d in enumerate(lowered) if d in SPLIT_NAMES), None)
    split = SPLIT_NAMES[lowered[split_idx]] if split_idx is not None else None
    after = rel_dirs[split_idx + 1:] if split_idx is not None else rel_dirs
    low_after = [d.lower() for d in after]
    marker = next((j for j, d in enumerate(low_after) if d in REAL_NAMES | FAKE_NAMES), None)
    if marker is not None:
        label = 0 if low_after[marker] in REAL_NAMES else 1
        if marker == 0:  # the class folder right after the split (or the root)
            genimage_inner = split_idx == 1 and low_after[0] in {"ai", "nature"}  # root: a generator
            above = split_idx is not None and split_idx >= 1 and not genimage_inner
            source = rel_dirs[0] if above else root_name
        elif marker == 1 and split is not None and low_after[1] in {"real", "fake"}:
            # DiffusionForensics real folder, or a `<set>/{real,fake}` pair: each set's fakes are
            # then scored against that set's reals only (`<set>/fake` beside `<set>/real`)
            source = f"{after[0]}/{low_after[1]}"
        else:
            source = after[0]
        return label, source, split
    if split is not None and len(after) >= 2:  # DiffusionForensics generator folder
        return 1, f"{after[0]}/{after[1]}", split
    return None, None, split


def infer_ufd(rel_dirs: list[str], root_name: str) -> Inferred:
    """UniversalFakeDetect's diffusion set: `<generator>/1_fake` becomes `<reals>/<generator>` and
    `{imagenet,laion}/0_real` becomes `<reals>/real`, so each generator is scored against its own
    reals (guided against ImageNet, the others against LAION); split `test` unless the tree has one."""
    label, source, split = infer_auto(rel_dirs, root_name)
    if label is None or source is None:
        return label, source, split
    base = source.split("/")[0]
    if label == 1 and base in UFD_REALS:
        source = f"{UFD_REALS[base]}/{base}"
    elif label == 0 and base in set(UFD_REALS.values()):
        source = f"{base}/real"
    return label, source, split or "test"


def infer_synthbuster(rel_dirs: list[str], root_name: str) -> Inferred:
    """Synthbuster: every image is generated; the first folder names the generator; split `test`.
    Its real images (RAISE) come from a second input: `shard RAISE --append --label real`."""
    return 1, rel_dirs[0] if rel_dirs else root_name, "test"


LAYOUTS = {"auto": infer_auto, "ufd": infer_ufd, "synthbuster": infer_synthbuster}


def infer_from_layout(rel_dirs: list[str], root_name: str, layout: str = "auto") -> Inferred:
    """Label, source and split of a file from its folders, by the named layout."""
    return LAYOUTS[layout](rel_dirs, root_name)
