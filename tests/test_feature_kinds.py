"""Feature kinds behind one interface: DNF and DIRE keep their cache ids, NPR equals its authors'
expression and runs shard -> extract -> train -> eval -> compare and detect without a model."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import cli, make_dataset

from stages.compare import compare_markdown
from stages.domain.feature_kinds import FEATURE_KINDS, feature_kind
from stages.domain.feature_kinds.clip import make_test_clip
from stages.domain.feature_kinds.latent_dnf import make_test_pipeline
from stages.evaluate import run_eval
from stages.extract import ExtractOptions, run_extract
from stages.shard import run_shard
from stages.train import TrainOptions, run_train
from storage.cache_config import PREPROCESS_VERSION, FeatureConfig
from storage.caches import find_cache
from storage.errors import OptionError
from storage.run import Run


def written_out_id(fields: dict) -> str:
    """The feature id as DESIGN.md sec. 4 defines it, computed here from the JSON written out."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def test_dnf_and_dire_ids_are_unchanged():
    base = {"model_fingerprint": "f" * 64, "timestep": 0, "size": 256, "encoding": "reference",
            "preprocess": PREPROCESS_VERSION, "inversion_steps": 1, "ddim_steps": 20, "keep": [0],
            "combine": "stack", "precision": "fp32", "perturb": ""}
    assert FeatureConfig("f" * 64).feature_id == written_out_id(base)
    assert FeatureConfig("f" * 64, kind="dire").feature_id == written_out_id({**base, "kind": "dire"})
    assert FeatureConfig("none", kind="npr").feature_id == written_out_id(
        {**base, "model_fingerprint": "none", "kind": "npr"})
    with pytest.raises(OptionError, match="one of dnf, dire, npr"):
        feature_kind("clip-typo")
    with pytest.raises(OptionError, match="--feature dire runs the whole DDIM"):
        ExtractOptions(model=None, feature_kind="dire", timestep=5).feature("f" * 64)


def test_npr_equals_its_authors_expression_and_its_encoding_loses_under_one_grey_level():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 48, generator=g) * 2 - 1
    model = FEATURE_KINDS["npr"].load(None, torch.device("cpu"))
    got = model.features(x, None)
    # NPR's networks/resnet.py: x - interpolate(interpolate(x, 0.5), 2), nearest both ways
    want = x - F.interpolate(F.interpolate(x, scale_factor=0.5, mode="nearest", recompute_scale_factor=True),
                             scale_factor=2.0, mode="nearest", recompute_scale_factor=True)
    assert torch.equal(got, want)
    # and by hand: each pixel minus the top-left pixel of its 2x2 block
    a = x.numpy()
    block = a[..., ::2, ::2].repeat(2, axis=-2).repeat(2, axis=-1)
    assert np.array_equal(got.numpy(), a - block)
    q = FEATURE_KINDS["npr"].encode(got, "reference").numpy()
    back = (q.astype(np.float64) - 127.5) / 63.75
    err = np.abs(back - got.double().numpy()).max()
    assert q.dtype == np.uint8 and err <= 1 / 127.5 + 1e-6  # half a step: one grey level of [-1, 1]
    assert FEATURE_KINDS["npr"].encode(got, "raw").dtype == torch.float16
    with pytest.raises(OptionError, match="must be even"):
        model.check_size(33)


def test_npr_end_to_end_beside_dnf(tmp_path, tiny_model):
    data = make_dataset(tmp_path / "data", per_class=6, splits=("train", "test"))
    run = tmp_path / "run"
    run_shard([data], run, shard_size=8)
    for kind, model in (("dnf", tiny_model), ("npr", None)):
        out = run_extract(run, ExtractOptions(model=model, size=32, batch_size=4, workers=0, device="cpu",
                                              feature_kind=kind))
        assert out["images"] == 24
        cache = find_cache(run / "cache", out["feature_id"])
        assert cache.config().feature.kind == kind and cache.config().channels == 3
        run_train(run, TrainOptions(name=kind, epochs=1, batch_size=8, workers=0, device="cpu",
                                    feature_id=out["feature_id"], val_from="train:0.3"))
        run_eval(run, run / f"train/{kind}/best.pt", name=kind, feature_id=out["feature_id"], workers=0,
                 device="cpu")
    npr_cache = find_cache(run / "cache", FeatureConfig("none", size=32, kind="npr").feature_id)
    labels, _, _, _ = npr_cache.index_arrays()
    stored = npr_cache.read_rows(0, len(labels))[0]
    assert stored.dtype == np.uint8 and stored.shape[1:] == (3, 32, 32)
    table = compare_markdown(run / "eval/dnf", run / "eval/npr", 200, 0)
    assert "progan" in table and "within noise" in table.lower()
    status = cli("status", "--run", run).stdout
    assert "npr" in status
    # detect recomputes NPR for new images with no --model
    out = cli("detect", data / "test/progan/1_fake", "--checkpoint", run / "train/npr/best.pt", "--device",
              "cpu", "--json")
    results = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert len(results) == 6 and all(0 <= r["probability"] <= 1 for r in results)


def make_tiny_clip(folder):
    """A random CLIP vision tower (image size 32, projection 16) and the network itself."""
    from transformers import CLIPVisionModelWithProjection

    make_test_clip(folder)
    return CLIPVisionModelWithProjection.from_pretrained(folder).eval()


def test_clip_embeddings_and_linear_probe_equal_transformers_and_the_probe_written_out(tmp_path):
    import csv

    from stages.domain.images import apply_geometry, decode_rgb

    net = make_tiny_clip(tmp_path / "clip")
    data = make_dataset(tmp_path / "data", per_class=8, splits=("train", "test"))
    run = tmp_path / "run"
    run_shard([data], run, shard_size=8)
    out = run_extract(run, ExtractOptions(model=tmp_path / "clip", size=32, batch_size=4, workers=0,
                                          device="cpu", feature_kind="clip", geometry="crop"))
    cache = find_cache(run / "cache", out["feature_id"])
    assert cache.config().row_shape() == (16, 1, 1) and cache.config().feature.encoding == "raw"
    labels, _, _, keys = cache.index_arrays()
    stored = cache.read_rows(0, len(keys))[0]
    assert stored.dtype == np.float16
    by_key = {e.key: e for e in Run(run).entries()}
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    for r, key in enumerate(keys):
        pixels = apply_geometry(decode_rgb(open(by_key[str(key)].path, "rb").read()), "crop", 32)
        x01 = pixels[None].float() / 255.0  # the preprocessed pixels, CLIP's normalisation written out
        with torch.no_grad():
            want = net(pixel_values=(x01 - mean) / std).image_embeds[0]
        np.testing.assert_allclose(stored[r, :, 0, 0].astype(np.float32), want.half().float().numpy(),
                                   rtol=2e-3, atol=2e-3)
    # the linear probe (the kind's default head), and probabilities as sigmoid(fc(embedding))
    run_train(run, TrainOptions(name="probe", epochs=2, batch_size=8, workers=0, device="cpu", lr=1e-2,
                                feature_id=out["feature_id"], val_from="train:0.3"))
    state = torch.load(run / "train/probe/best.pt", weights_only=True)["model"]
    assert set(state) == {"fc.weight", "fc.bias"}
    # UnivFD's released format: {"weight", "bias"} of nn.Linear(D, 1)
    fc = {"weight": state["fc.weight"].clone(), "bias": state["fc.bias"].clone()}
    torch.save(fc, tmp_path / "fc_weights.pth")
    for name, ckpt in (("ours", run / "train/probe/best.pt"), ("univfd", tmp_path / "fc_weights.pth")):
        run_eval(run, ckpt, name=name, feature_id=out["feature_id"], workers=0, device="cpu", gallery=0)
        with open(run / f"eval/{name}/predictions.csv") as f:
            rows = list(csv.DictReader(f))
        row_of = {str(k): r for r, k in enumerate(keys)}
        for row in rows:
            e = stored[row_of[row["key"]], :, 0, 0].astype(np.float64)
            p = 1 / (1 + np.exp(-(fc["weight"].double().numpy()[0] @ e + fc["bias"].double().item())))
            assert abs(float(row["probability"]) - p) < 1e-5
    # compare works on any kind's reports: the released-format probe is our probe, so no difference
    table = compare_markdown(run / "eval/ours", run / "eval/univfd", 200, 0)
    overall = next(line for line in table.splitlines() if line.startswith("| **overall** | +"))
    assert overall.count("+0.0 [+0.0, +0.0] | within noise") == 2  # AUC and AP


def test_latent_dnf_equals_the_steps_written_with_diffusers(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from stages.domain.images import apply_geometry, decode_rgb

    sd = make_test_pipeline(tmp_path / "sd")
    data = make_dataset(tmp_path / "data", per_class=4, splits=("train", "test"))
    run = tmp_path / "run"
    run_shard([data], run, shard_size=8)
    out = run_extract(run, ExtractOptions(model=sd, size=32, batch_size=4, workers=0, device="cpu",
                                          feature_kind="latent-dnf"))
    cache = find_cache(run / "cache", out["feature_id"])
    assert cache.config().row_shape() == (4, 4, 4)
    labels, _, _, keys = cache.index_arrays()
    stored = cache.read_rows(0, len(keys))[0]
    # the same steps with diffusers' and transformers' public classes
    vae = AutoencoderKL.from_pretrained(sd / "vae").eval()
    unet = UNet2DConditionModel.from_pretrained(sd / "unet").eval()
    tok = CLIPTokenizer.from_pretrained(sd / "tokenizer")
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    by_key = {e.key: e for e in Run(run).entries()}
    with torch.no_grad():
        cond = CLIPTextModel.from_pretrained(sd / "text_encoder").eval()(ids).last_hidden_state
        for r, key in enumerate(keys):
            pixels = apply_geometry(decode_rgb(open(by_key[str(key)].path, "rb").read()), "resize", 32)
            x = pixels[None].float() / 255.0 * 2 - 1
            z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
            eps = unet(z, torch.tensor([0]), encoder_hidden_states=cond).sample[0]
            np.testing.assert_allclose(stored[r].astype(np.float32), eps.half().float().numpy(),
                                       rtol=2e-3, atol=2e-3)
    run_train(run, TrainOptions(name="latent", epochs=1, batch_size=4, workers=0, device="cpu",
                                feature_id=out["feature_id"], val_from="train:0.3"))
    state = torch.load(run / "train/latent/best.pt", weights_only=True)["model"]
    assert state["conv1.weight"].shape[1] == 4  # the ResNet head takes the 4 latent channels
    rep = run_eval(run, run / "train/latent/best.pt", name="latent", feature_id=out["feature_id"],
                   workers=0, device="cpu", gallery=0)
    assert rep is not None


def test_new_kinds_work_with_webdataset_verify_perturbations_and_detect(tmp_path):
    from stages.verify import run_verify

    make_tiny_clip(tmp_path / "clip")
    data = make_dataset(tmp_path / "data", per_class=4, splits=("train", "test"))
    run = tmp_path / "run"
    run_shard([data], run, shard_size=8)
    for kind, model, geometry in (("npr", None, "resize"), ("clip", tmp_path / "clip", "crop")):
        ids = {}
        for backend in ("zarr", "webdataset"):
            for perturb in ("", "jpeg:75"):
                opts = ExtractOptions(model=model, size=32, batch_size=4, workers=0, device="cpu",
                                      feature_kind=kind, geometry=geometry, backend=backend, perturb=perturb)
                out = run_extract(run, opts)
                assert out["images"] == 16
                ids[backend, perturb] = out["feature_id"]
        a = find_cache(run / "cache", ids["zarr", ""])
        b = find_cache(run / "cache", ids["webdataset", ""])
        assert np.array_equal(a.read_rows(0, 16)[0], b.read_rows(0, 16)[0])  # either backend, the same rows
        assert ids["zarr", ""] == ids["webdataset", ""] != ids["zarr", "jpeg:75"]
    assert run_verify(run)["ok"]
    assert "clip" in cli("status", "--run", run).stdout
    run_train(run, TrainOptions(name="c", epochs=1, batch_size=8, workers=0, device="cpu",
                                feature_id=ids["zarr", ""], val_from="train:0.3", variants=True))
    out = cli("detect", data / "test/progan/0_real", "--model", tmp_path / "clip", "--checkpoint",
              run / "train/c/best.pt", "--device", "cpu", "--json")
    results = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    # detect's probability of an image equals eval's from the cache (the same crop, the same embedding)
    run_eval(run, run / "train/c/best.pt", name="c", feature_id=ids["zarr", ""], workers=0, device="cpu",
             gallery=0)
    import csv

    with open(run / "eval/c/predictions.csv") as f:
        by_path = {r["path"]: float(r["probability"]) for r in csv.DictReader(f)}
    for r in results:
        assert abs(r["probability"] - by_path[r["path"]]) < 2e-3
