"""`audit`: file properties besides the generator that separate real from fake, per source; JPEG
quality estimation; the facts `shard` records in the manifest."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import cli, write
from PIL import Image

from stages.audit import run_audit
from stages.domain.confounds import categorical_separability, numeric_separability
from stages.domain.image_facts import read_facts
from stages.shard import run_shard
from storage.atomic import read_jsonl, write_jsonl_atomic


def encoded(seed: int, fmt: str, size=(48, 48), **kw) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("quality", [20, 35, 50, 65, 75, 85, 90, 95, 100])
def test_jpeg_quality_estimate_from_the_quantisation_tables(quality):
    facts = read_facts(encoded(quality, "JPEG", quality=quality))
    assert facts["format"] == "JPEG" and abs(facts["quality"] - quality) <= 5
    assert facts["subsampling"] == "4:2:0"
    assert read_facts(encoded(1, "JPEG", quality=90, subsampling=0))["subsampling"] == "4:4:4"
    assert read_facts(encoded(1, "PNG"))["quality"] is None


def test_separability_scores():
    assert categorical_separability(["JPEG"] * 10, ["PNG"] * 10) == 1.0
    assert categorical_separability(["PNG"] * 10, ["PNG"] * 30) == 0.5  # class ratio does not matter
    assert numeric_separability(np.arange(10.0), np.arange(10.0) + 100)[0] == 1.0
    assert numeric_separability(np.arange(10.0) + 100, np.arange(10.0))[0] == 1.0  # either direction
    assert numeric_separability(np.ones(5), np.ones(50))[0] == 0.5


def biased(root, n=16):
    for i in range(n):  # reals: JPEGs at varied quality and sizes; fakes: PNGs of one size
        write(root / "test" / "gan" / "0_real" / f"{i}.jpg",
              encoded(i, "JPEG", size=(48 + 8 * (i % 3), 40 + 4 * (i % 5)), quality=60 + 2 * i))
        write(root / "test" / "gan" / "1_fake" / f"{i}.png", encoded(100 + i, "PNG", size=(64, 64)))
    return root


def matched(root, n=16):
    for i in range(n):  # both sides: PNGs of the same sizes and content statistics
        size = (48 + 8 * (i % 3), 48 + 8 * (i % 3))
        write(root / "test" / "gan" / "0_real" / f"{i}.png", encoded(i, "PNG", size=size))
        write(root / "test" / "gan" / "1_fake" / f"{i}.png", encoded(100 + i, "PNG", size=size))
    return root


def test_a_biased_set_is_flagged_and_a_matched_set_is_not(tmp_path):
    run_shard([biased(tmp_path / "biased")], tmp_path / "b")
    out = json.loads(cli("audit", "--run", tmp_path / "b", "--json").stdout)
    flagged = {c["property"]: c for c in out["sources"]["gan"]["confounds"]}
    assert flagged["format"]["separability"] >= 0.95 and flagged["format"]["split"] == "test"
    assert flagged["format"]["real"] == {"JPEG": 16} and flagged["format"]["fake"] == {"PNG": 16}
    assert out["headers_read"] == 0  # the facts came from the manifest
    text = cli("audit", "--run", tmp_path / "b").stdout
    assert "gan (test): format 1.00" in text and "--perturb jpeg" in text
    run_shard([matched(tmp_path / "matched")], tmp_path / "m")
    out = json.loads(cli("audit", "--run", tmp_path / "m", "--json").stdout)
    assert out["sources"]["gan"]["confounds"] == []
    scores = {s["property"]: s["separability"] for s in out["sources"]["gan"]["splits"]["test"]["properties"]}
    assert scores["format"] == 0.5 and scores["width"] == 0.5
    # shard prints the audit in short at its end
    proc = cli("shard", tmp_path / "biased", "--run", tmp_path / "b2")
    assert "properties besides the generator separate real from fake" in proc.stdout
    assert "gan (test): format 1.00 (real JPEG 16; fake PNG 16)" in proc.stdout


def test_old_manifests_are_audited_from_the_headers(tmp_path):
    run_shard([biased(tmp_path / "biased")], tmp_path / "run")
    path = tmp_path / "run" / "shards" / "00000.jsonl"
    rows = read_jsonl(path)
    keep = ("key", "path", "label", "source", "split", "size")
    write_jsonl_atomic(path, [{k: r[k] for k in keep} for r in rows])  # as shard wrote it before
    old = run_audit(tmp_path / "run")
    assert old["headers_read"] == 32
    assert {c["property"] for c in old["sources"]["gan"]["confounds"]} >= {"format"}
