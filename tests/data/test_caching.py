"""``jdit cache`` end to end: sources to a feature cache to ``jdit train``; resume, multi-host,
bad input, and a latent-space cache checked against diffusers' VAE and transformers' T5."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image")

from jdit.cli import main as jdit  # noqa: E402 (after the importorskip)
from jdit.data.cache import FeatureCache  # noqa: E402
from jdit.data.caching import Geometry, build_cache  # noqa: E402
from jdit.pipelines.encoders import image_encoder, text_encoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle in the center", "a blue square in the top left",
           "a green triangle in the bottom right and a red square in the top left"]


def _folder(path: Path, n: int, size=(32, 32), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = size if i % 2 == 0 else (size[1], size[0])
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path / f"{i:03d}.png")
        (path / f"{i:03d}.txt").write_text(PROMPTS[i % len(PROMPTS)])
    return path


def _cache_args(src, out, *extra):
    return ["cache", str(src), str(out), "--vae", "identity", "--text-encoder", "words:shapes",
            "--no-progress", *extra]


def _content(cache: FeatureCache) -> dict[str, tuple]:
    return {ex["id"]: (ex["latent"].tobytes(), ex["text"].tobytes(), ex["caption"])
            for ex in cache}


@pytest.mark.slow  # end to end (a training run)
def test_a_folder_becomes_a_cache_that_jdit_train_reads(tmp_path):
    src = _folder(tmp_path / "photos", 10, size=(32, 48))
    (src / "bad.png").write_bytes(b"not an image")
    (src / "bad.txt").write_text("a red circle in the center")
    (src / "empty.png").write_bytes((src / "000.png").read_bytes())
    (src / "empty.txt").write_text("   ")
    out = tmp_path / "cache"
    assert jdit(_cache_args(src, out, "--buckets", "256", "--max-upscale", "16",
                            "--batch-size", "4")) == 0
    cache = FeatureCache(out)
    assert len(cache) == 10 and cache.metadata["kind"] == "text"
    assert {tuple(s) for s in cache.sizes()} == {(208, 304), (304, 208)}  # two buckets
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["reason"]) for r in skipped) == [
        ("bad.png", "unreadable_image"), ("empty.png", "empty_caption")]
    assert json.loads((out / "summary.json").read_text())["skipped"] == 2
    ex = cache.get("001.png")
    assert ex["caption"] == PROMPTS[1] and list(ex["original_size"]) == [48, 32]
    assert ex["aspect_ratio"] == "1.46"
    # a second run finds the cache complete and refuses to redo it; --overwrite rebuilds it
    assert jdit(_cache_args(src, out, "--buckets", "256", "--max-upscale", "16")) == 1
    # train from it: buckets, condition dropout to the cached null caption, a sample grid
    from jdit.config import load_config
    from jdit.train.loop import train

    config = load_config(str(ROOT / "configs" / "shapes_tiny.py") + ":cache", [
        f"data.path={out}", "model.input_size=32",
        "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.batch_size=2",
        "train.steps=2", "train.sample_every=2", "train.checkpoint_every=0", "sample.steps=2",
        "train.log_every=1"])
    metrics = train(config, tmp_path / "run", quiet=True)
    assert np.isfinite(metrics["loss"])
    assert (tmp_path / "run" / "samples").is_dir() and any((tmp_path / "run" / "samples").glob("*.png"))
    prompts = (tmp_path / "run" / "samples" / "prompts.txt").read_text().splitlines()
    assert prompts == PROMPTS  # the cache's preview captions
    # a LoRA over that run reads the same cache (adapters only in its checkpoints)
    lora_config = load_config(str(ROOT / "configs" / "shapes_tiny.py") + ":cache", [
        f"data.path={out}", "model.input_size=32", "model.hidden_size=32", "model.depth=1",
        "model.num_heads=2", "train.batch_size=2", "train.steps=2", "train.sample_every=2",
        "train.checkpoint_every=0", "sample.steps=2", f"train.init_from={tmp_path / 'run'}",
        "lora.rank=2"])
    assert np.isfinite(train(lora_config, tmp_path / "lora", quiet=True)["loss"])
    assert any((tmp_path / "lora" / "samples").glob("*.png"))


def test_training_refuses_a_cache_made_for_another_model(tmp_path):
    src = _folder(tmp_path / "photos", 4)
    out = tmp_path / "cache"
    assert jdit(_cache_args(src, out, "--size", "32")) == 0
    from jdit.config import load_config
    from jdit.train.loop import Run

    base = [f"data.path={out}", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
            "train.batch_size=2"]
    cfg = str(ROOT / "configs" / "shapes_tiny.py") + ":cache"
    with pytest.raises(ValueError, match="latent scale is 1.0, but data.latent_scale is 0.13025"):
        Run(load_config(cfg, base + ["data.latent_scale=0.13025"]))
    with pytest.raises(ValueError, match="4 channels .* a cache made for another model"):
        Run(load_config(cfg, base + ["model.in_channels=4"]))
    with pytest.raises(ValueError, match="text features are 64 wide, the model expects 32"):
        Run(load_config(cfg, base + ["model.caption_channels=32"]))


class _Killed(Exception):
    pass


class _DiesAfter:
    """The identity encoder, killed (an exception) after ``n`` batches."""

    def __init__(self, n):
        self.inner, self.n = image_encoder("identity"), n
        self.identity, self.factor = self.inner.identity, 1

    def encode(self, images):
        if self.n == 0:
            raise _Killed
        self.n -= 1
        return self.inner.encode(images)


def test_a_killed_cache_resumes_with_every_example_exactly_once(tmp_path):
    from jdit.data.sources import open_source

    src = _folder(tmp_path / "photos", 23, size=(32, 40))
    source = open_source(str(src))
    text = text_encoder("words:shapes")
    geometry = Geometry(table=256, max_upscale=16)
    kwargs = dict(geometry=geometry, batch_size=3, progress=False, examples_per_shard=2)
    build_cache(source, tmp_path / "clean", image_encoder("identity"), text, **kwargs)
    for dies_after in (2, 1, 0):  # three kills at different points, then a full run
        with pytest.raises(_Killed):
            build_cache(source, tmp_path / "resumed", _DiesAfter(dies_after), text, **kwargs)
    build_cache(source, tmp_path / "resumed", image_encoder("identity"), text, **kwargs)
    clean, resumed = FeatureCache(tmp_path / "clean"), FeatureCache(tmp_path / "resumed")
    assert len(resumed.ids) == len(set(resumed.ids)) == 23
    assert resumed.ids == clean.ids  # merged in source order
    assert _content(resumed) == _content(clean)


@pytest.mark.slow
def test_a_cache_killed_by_sigkill_resumes_exactly(tmp_path):
    src = _folder(tmp_path / "photos", 300, size=(32, 32))
    out = tmp_path / "cache"
    args = [sys.executable, "-m", "jdit.cli", *_cache_args(src, out, "--size", "32",
                                                           "--batch-size", "2",
                                                           "--examples-per-shard", "4")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    part = out / "part-00000-of-00001"
    import time

    deadline = time.time() + 300
    while time.time() < deadline and len(list(part.glob("shard-*.json"))) < 1:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (out / "index.json").exists()
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    cache = FeatureCache(out)
    assert cache.ids == [f"{i:03d}.png" for i in range(300)]
    cache.verify()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_write_parts_that_merge_into_the_one_process_cache(tmp_path):
    src = _folder(tmp_path / "photos", 13, size=(32, 48))
    one = tmp_path / "one"
    assert jdit(_cache_args(src, one, "--buckets", "256", "--max-upscale", "16")) == 0
    two = tmp_path / "two"
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jdit.cli", *_cache_args(src, two, "--buckets", "256",
                                                        "--max-upscale", "16"),
         "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    merged = FeatureCache(two)
    parts = [FeatureCache(two / f"part-0000{i}-of-00002") for i in range(2)]
    assert sorted(parts[0].ids + parts[1].ids) == sorted(merged.ids)
    assert not set(parts[0].ids) & set(parts[1].ids) and len(parts[0]) and len(parts[1])
    assert merged.ids == FeatureCache(one).ids
    assert _content(merged) == _content(FeatureCache(one))


def test_jsonl_and_tar_sources_cache_like_a_folder(tmp_path):
    src = _folder(tmp_path / "photos", 5)
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"photos/{i:03d}.png",
                                            "caption": PROMPTS[i % 3]}) + "\n" for i in range(5)))
    assert jdit(_cache_args(manifest, tmp_path / "a", "--size", "32")) == 0
    assert jdit(_cache_args(src, tmp_path / "b", "--size", "32")) == 0
    import tarfile

    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:  # WebDataset: key.png + key.txt
        for f in sorted(src.iterdir()):
            tar.add(f, arcname=f.name)
    assert jdit(_cache_args(tmp_path / "shard-000.tar", tmp_path / "c", "--size", "32")) == 0
    a, b, c = (FeatureCache(tmp_path / k) for k in "abc")
    assert c.ids == [f"shard-000.tar/{i:03d}" for i in range(5)]
    for other in (b, c):
        assert [ex["latent"].tobytes() for ex in a] == [ex["latent"].tobytes() for ex in other]
        assert [ex["caption"] for ex in a] == [ex["caption"] for ex in other]


@pytest.fixture(scope="module")
def tiny_sigma(tmp_path_factory):
    """A tiny PixArt-Σ pipeline folder (8x VAE, T5 of width 32) and its diffusers pipeline."""
    pytest.importorskip("diffusers")
    from jdit.testing import tiny_pipelines

    folder = tmp_path_factory.mktemp("tiny_sigma")
    return folder, tiny_pipelines.text_to_image(folder, "sigma")


@pytest.mark.slow
def test_a_latent_cache_equals_diffusers_vae_and_transformers_t5_and_trains(tmp_path,
                                                                             tiny_sigma):
    import torch

    from jdit.data.loader import resize_center_crop, to_unit_range

    folder, pipe = tiny_sigma
    rng = np.random.default_rng(1)
    src = tmp_path / "photos"
    src.mkdir()
    images = {"wide.png": rng.integers(0, 256, (48, 96, 3), dtype=np.uint8),
              "square.png": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
              "tall.png": rng.integers(0, 256, (96, 48, 3), dtype=np.uint8)}
    for i, (name, image) in enumerate(images.items()):
        Image.fromarray(image).save(src / name)
        (src / name).with_suffix(".txt").write_text(f"  A Photo of thing {i}  ")
    out = tmp_path / "cache"
    assert jdit(["cache", str(src), str(out), "--pretrained", str(folder), "--buckets", "256",
                 "--max-upscale", "8", "--dtype", "float32", "--batch-size", "2",
                 "--no-progress"]) == 0
    cache = FeatureCache(out)
    assert cache.metadata["autoencoder"]["kind"] == "AutoencoderKL"
    assert cache.metadata["text_encoder"]["max_length"] == 300  # PixArt-Σ's
    with torch.no_grad():
        for i, (name, image) in enumerate(images.items()):
            ex = cache.get(name)
            bucket = {"wide.png": (176, 352), "square.png": (256, 256),
                      "tall.png": (352, 176)}[name]
            pixels = to_unit_range(resize_center_crop(image, *bucket))
            mean = pipe.vae.encode(torch.from_numpy(pixels).permute(2, 0, 1)[None]
                                   ).latent_dist.mean[0].permute(1, 2, 0).numpy()
            np.testing.assert_allclose(ex["latent"], mean, atol=2e-4, rtol=1e-4)
            tokens = pipe.tokenizer([f"a photo of thing {i}"], padding="max_length",
                                    max_length=300, truncation=True, return_tensors="pt")
            features = pipe.text_encoder(tokens.input_ids,
                                         attention_mask=tokens.attention_mask)[0][0].numpy()
            np.testing.assert_array_equal(ex["text_mask"], tokens.attention_mask[0].numpy())
            np.testing.assert_allclose(ex["text"], features, atol=2e-4, rtol=1e-4)
    # the null caption for condition dropout is the encoded empty prompt
    from jdit.weights.safetensors_io import read_safetensors

    null = read_safetensors(out / "null_caption.safetensors")
    with torch.no_grad():
        tokens = pipe.tokenizer([""], padding="max_length", max_length=300, return_tensors="pt")
        empty = pipe.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    np.testing.assert_allclose(null["text"], empty.numpy(), atol=2e-4, rtol=1e-4)

    # fine-tune config on it (a tiny model), with a sample grid decoded by the cache's VAE
    from jdit.config import load_config
    from jdit.train.loop import train

    config = load_config(str(ROOT / "configs" / "finetune_folder.py") + ":pixart_sigma_xl2_256", [
        f"data.path={out}", "data.latent_scale=0.18215", "model.hidden_size=32",
        "model.depth=1", "model.num_heads=2", "model.caption_channels=32",
        "model.dtype=float32", "model.scan_layers=False", "model.remat_policy=none",
        "train.batch_size=1", "train.steps=2", "train.sample_every=2",
        "train.checkpoint_every=0", "sample.steps=2", "train.log_every=1",
        "parallel.mesh.fsdp=1", "parallel.mesh.data=-1"])
    metrics = train(config, tmp_path / "run", quiet=True)
    assert np.isfinite(metrics["loss"])
    grids = list((tmp_path / "run" / "samples").glob("*.png"))
    assert grids, "no sample grid"
    assert (np.asarray(Image.open(grids[0])).std() > 0)


@pytest.mark.slow
def test_exact_tiles_cache_the_same_latents(tmp_path, tiny_sigma):
    folder, _ = tiny_sigma
    src = _folder(tmp_path / "photos", 3, size=(64, 64))
    for name, extra in (("whole", []), ("tiled", ["--tile", "64"])):
        assert jdit(["cache", str(src), str(tmp_path / name), "--pretrained", str(folder),
                     "--size", "128", "--dtype", "float32", "--no-progress", *extra]) == 0
    whole, tiled = FeatureCache(tmp_path / "whole"), FeatureCache(tmp_path / "tiled")
    assert tiled.metadata["autoencoder"] == whole.metadata["autoencoder"]
    for a, b in zip(whole, tiled, strict=True):
        np.testing.assert_allclose(b["latent"], a["latent"], atol=2e-5, rtol=1e-5)


def test_tfds_text_and_class_datasets_cache(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from tests.data.test_sources import JditToyCaptions

    JditToyCaptions(data_dir=str(tmp_path / "tfds"), file_format="array_record"
                    ).download_and_prepare()
    (version,) = (tmp_path / "tfds").glob("jdit_toy_captions/*/dataset_info.json")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("caption number 0 1 2 3 4\n")  # 5 and 6 are not words of it
    out = tmp_path / "captions"
    assert jdit(["cache", f"tfds:{version.parent}/train", str(out), "--caption-feature",
                 "caption", "--vae", "identity", "--text-encoder", f"words:{vocab}",
                 "--size", "8", "--max-upscale", "2", "--batch-size", "3", "--no-progress"]) == 0
    cache = FeatureCache(out)
    assert sorted(ex["caption"] for ex in cache) == [f"caption number {i}" for i in range(5)]
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in skipped) == ["caption_not_encodable"] * 2
    assert all("'5'" in r["message"] or "'6'" in r["message"] for r in skipped)
    ex = cache[0]
    k = int(ex["caption"].rsplit(" ", 1)[1])
    np.testing.assert_allclose(ex["latent"], np.full((8, 8, 3), 10 * k / 127.5 - 1), atol=1e-6)

    with tfds.testing.mock_data(num_examples=6):
        assert jdit(["cache", "tfds:mnist/train", str(tmp_path / "labels"), "--labels",
                     "--vae", "identity", "--size", "32", "--no-progress"]) == 0
    labels = FeatureCache(tmp_path / "labels")
    assert len(labels) == 6 and labels.metadata["kind"] == "class"
    assert labels[0]["latent"].shape == (32, 32, 3) and labels[0]["label"].dtype == np.int32
    from jdit.train.tasks import FeatureCacheTask

    task = FeatureCacheTask({"name": "feature_cache", "path": str(tmp_path / "labels")}, 2, 0)
    assert task.kind == "class" and task.batch(0)["labels"].shape == (2,)


def test_every_kind_of_bad_input_is_converted_or_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / "mixed"
    src.mkdir()

    def save(name, image, caption="a red circle in the center", **kw):
        image.save(src / name, **kw)
        if caption is not None:
            (src / name).with_suffix(".txt").write_bytes(
                caption if isinstance(caption, bytes) else caption.encode())

    rgb = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    save("grey.png", Image.fromarray(rgb[..., 0]))
    save("rgba.png", Image.fromarray(np.dstack([rgb, rgb[..., :1]])))
    save("palette.png", Image.fromarray(rgb).convert("P"))
    save("sixteen.png", Image.fromarray(rgb[..., 0].astype(np.uint16) * 257))
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: stored 40 x 56, shown 56 x 40
    save("rotated.jpg", Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)),
         exif=exif)
    save("no_caption.png", Image.fromarray(rgb), caption=None)
    save("latin1.png", Image.fromarray(rgb), caption="caf\xe9".encode("latin-1"))
    save("tiny.png", Image.fromarray(rgb[:8, :8]))
    save("strip.png", Image.fromarray(rng.integers(0, 256, (8, 200, 3), dtype=np.uint8)))
    data = Image.fromarray(rgb)
    data.save(src / "cut.png")
    (src / "cut.png").write_bytes((src / "cut.png").read_bytes()[:300])  # truncated
    (src / "cut.txt").write_text("a red circle in the center")
    out = tmp_path / "cache"
    assert jdit(_cache_args(src, out, "--size", "32", "--max-upscale", "2")) == 0
    cache = FeatureCache(out)
    written = set(cache.ids)
    assert written == {"grey.png", "rgba.png", "palette.png", "sixteen.png", "cmyk.jpg",
                       "rotated.jpg"}
    assert list(cache.get("rotated.jpg")["original_size"]) == [56, 40]  # EXIF applied
    reasons = {json.loads(line)["id"]: json.loads(line)["reason"]
               for line in (out / "skipped.jsonl").read_text().splitlines()}
    assert reasons == {"no_caption.png": "missing_caption", "latin1.png": "caption_not_utf8",
                       "tiny.png": "too_small", "strip.png": "extreme_aspect_ratio",
                       "cut.png": "unreadable_image"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["examples"] == 6 and summary["skipped"] == 5

    manifest = tmp_path / "dups.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"mixed/{n}", "caption": "a red circle",
                                            "id": "same" if n != "grey.png" else "other"}) + "\n"
                                for n in ("grey.png", "rgba.png", "palette.png")))
    assert jdit(_cache_args(manifest, tmp_path / "dups", "--size", "32")) == 0
    dups = FeatureCache(tmp_path / "dups")
    assert sorted(dups.ids) == ["other", "same"]
    assert [json.loads(line)["reason"] for line in
            (tmp_path / "dups" / "skipped.jsonl").read_text().splitlines()] == ["duplicate_id"]


@pytest.mark.slow
def test_a_sana_cache_equals_diffusers_dcae_and_encode_prompt(tmp_path):
    """SANA's text side: Gemma-2 with the complex human instruction, as SanaPipeline encodes a
    prompt; its DC-AE latents."""
    pytest.importorskip("diffusers")
    import inspect

    import torch

    from jdit.data.loader import resize_center_crop, to_unit_range
    from jdit.testing import tiny_pipelines

    pipe = tiny_pipelines.sana(tmp_path / "sana")
    src = _folder(tmp_path / "photos", 2, size=(64, 64))
    out = tmp_path / "cache"
    assert jdit(["cache", str(src), str(out), "--pretrained", str(tmp_path / "sana"),
                 "--size", "64", "--dtype", "float32", "--no-progress"]) == 0
    cache = FeatureCache(out)
    assert cache.metadata["text_encoder"]["kind"] == "gemma2"
    assert cache.metadata["text_encoder"]["instruction_sha256"] is not None
    instruction = inspect.signature(pipe.__call__).parameters["complex_human_instruction"].default
    with torch.no_grad():
        for name in ("000.png", "001.png"):
            ex = cache.get(name)
            embeds, mask = pipe.encode_prompt(ex["caption"], do_classifier_free_guidance=False,
                                              max_sequence_length=300,
                                              complex_human_instruction=instruction)[:2]
            np.testing.assert_array_equal(ex["text_mask"], mask[0].numpy())
            np.testing.assert_allclose(ex["text"], embeds[0].numpy(), atol=2e-4, rtol=1e-4)
            image = np.asarray(Image.open(src / name).convert("RGB"))
            pixels = to_unit_range(resize_center_crop(image, 64, 64))
            latent = pipe.vae.encode(torch.from_numpy(pixels).permute(2, 0, 1)[None]).latent
            np.testing.assert_allclose(ex["latent"], latent[0].permute(1, 2, 0).numpy(),
                                       atol=2e-4, rtol=1e-4)


@pytest.mark.slow  # end to end (a training run)
def test_an_exported_cache_read_in_order_trains_exactly_as_in_memory(tmp_path):
    """The shapes proof's premise, at a tiny scale: the first N examples of a run, exported to
    PNG files and cached, then read in order (``data.shuffle=False``), are the run's own
    batches, so both runs log the same losses step for step."""
    from jdit.config import load_config
    from jdit.data.export import export_dataset
    from jdit.train.loop import train

    batch, steps = 8, 4
    png = export_dataset("shapes", tmp_path / "png", batch * steps, seed=3, batch_size=batch,
                         pair_fraction=0.6)
    out = tmp_path / "cache"
    assert jdit(_cache_args(png, out, "--size", "32", "--dtype", "float32")) == 0
    small = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2",
             f"train.batch_size={batch}", f"train.steps={steps}", "train.seed=3",
             "train.sample_every=0", "train.checkpoint_every=0", "train.log_every=1"]
    cfg = str(ROOT / "configs" / "shapes_tiny.py")
    runs = {"memory": load_config(cfg, small),
            "cache": load_config(cfg + ":cache", [*small, f"data.path={out}",
                                                  "data.shuffle=False"])}
    losses = {}
    for name, config in runs.items():
        train(config, tmp_path / f"run_{name}", quiet=True)
        lines = (tmp_path / f"run_{name}" / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
    assert len(losses["memory"]) == steps
    np.testing.assert_allclose(losses["cache"], losses["memory"], rtol=1e-6)
    # shuffled (the default), the same examples come in another order: other losses
    shuffled = load_config(cfg + ":cache", [*small, f"data.path={out}"])
    train(shuffled, tmp_path / "shuffled", quiet=True)
    lines = (tmp_path / "shuffled" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in lines if '"loss"' in line] != losses["memory"]


@pytest.mark.slow  # two LLMs encode a folder, then a refiner model trains from the cache
def test_several_llm_encoders_cache_packed_features_a_text_refiner_trains_on(tmp_path):
    """``--text-encoder A --text-encoder B --hidden-layer -2 --instruction ...``: each caption's
    features from both LLMs (instruction dropped), packed; a PixArt with a text_refiner
    describing the two trains from the cache."""
    from jdit.pipelines.encoders import MultiTextEncoder, PretrainedTextEncoder
    from tests.pipelines.test_prompt_encoders import _llm

    llms = [_llm(tmp_path / "llm_a", 32, 0), _llm(tmp_path / "llm_b", 24, 2)]
    src = _folder(tmp_path / "photos", 4)
    out = tmp_path / "cache"
    instruction = "Describe the image:"
    args = ["cache", str(src), str(out), "--vae", "identity", "--no-progress",
            "--text-encoder", str(llms[0]), "--text-encoder", str(llms[1]), "--max-length", "12",
            "--hidden-layer", "-2", "--instruction", instruction, "--size", "32"]
    assert jdit(args) == 0
    cache = FeatureCache(out)
    identity = cache.metadata["text_encoder"]
    assert identity["kind"] == "multi" and [e["kind"] for e in identity["encoders"]] == ["llama"] * 2
    assert all(e["hidden_layer"] == -2 and e["instruction_style"] == "drop"
               for e in identity["encoders"])
    want = MultiTextEncoder([PretrainedTextEncoder.from_pretrained(
        f, max_length=12, hidden_layer=-2, instruction=instruction) for f in llms])
    ex = cache.get("002.png")
    features, mask = want.encode([ex["caption"]])
    from tests.helpers import rel_err

    assert rel_err(ex["text"], features[0]) <= 1e-5  # a batch of 4 against one: float32 sums
    np.testing.assert_array_equal(ex["text_mask"], mask[0])
    from jdit.config import load_config
    from jdit.train.loop import train

    config = load_config(str(ROOT / "configs" / "shapes_tiny.py") + ":cache", [
        f"data.path={out}", "model.input_size=32", "model.hidden_size=32", "model.depth=1",
        "model.num_heads=2", "model.caption_channels=32", "train.batch_size=2",
        "train.steps=2", "train.sample_every=0", "train.checkpoint_every=0", "sample.steps=2"])
    config.model.text_refiner = dict(encoders=[[32, 12], [24, 12]], width=16, depth=1,
                                     num_heads=2)
    assert np.isfinite(train(config, tmp_path / "run", quiet=True)["loss"])
    import argparse

    from jdit.cache_command import _encoders

    with pytest.raises(ValueError, match="contradict"):
        _encoders(argparse.Namespace(vae="identity", pretrained=None, tile=None, labels=False,
                                     text_encoder=[str(llms[0])], instruction=instruction,
                                     no_instruction=True, max_length=12, text_dim=64,
                                     hidden_layer=-2))
