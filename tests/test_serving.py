"""SavedModel export (Orbax Export) and batch prediction: the quickstart classifier and a tiny instance run
(tests/presets.py).

Both runs carry random weights (tests/test_export.py's ``_trained_run``: a checkpoint as training leaves it),
are exported once per module and loaded in one subprocess that keeps JAX out (``client.block_jax``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from clusterformer_jax import export, predict
from clusterformer_jax.data import dense_pipeline, pipeline
from clusterformer_jax.evaluation import coco
from clusterformer_jax.trainers import trainer
from tests import REPO, presets
from tests.test_export import _trained_run

LOADER = r"""
import json, sys
import numpy as np
from clusterformer_jax.serving import client
client.block_jax()
import tensorflow as tf
out = {}
numpy = lambda v: v.numpy().astype(bytes) if v.dtype == tf.string else v.numpy()
for name, directory in json.loads(sys.argv[1]).items():
    data = np.load(directory + "/../requests.npz")
    model = tf.saved_model.load(directory)
    encoded = [bytes(b) for b in data["encoded"]]
    for b in (1, 3):
        for k, v in model.signatures["serving_default"](image_bytes=tf.constant(encoded[:b])).items():
            out[f"{name}/bytes{b}/{k}"] = numpy(v)
    feed = {k[len("pre_"):]: tf.constant(data[k]) for k in data.files if k.startswith("pre_")}
    for k, v in model.signatures["serving_preprocessed"](**feed).items():
        out[f"{name}/pre/{k}"] = numpy(v)
    try:
        model.signatures["serving_default"](image_bytes=tf.constant([b"not an image"]))
        out[f"{name}/bad"] = np.asarray("no error")
    except tf.errors.InvalidArgumentError as e:
        out[f"{name}/bad"] = np.asarray(type(e).__name__)
np.savez(sys.argv[2], **out)
# the command line on the classifier's export, as a user runs it: python -m clusterformer_jax.predict --export
import runpy
sys.argv = ["predict"] + sys.argv[3:]
try:
    runpy.run_module("clusterformer_jax.predict", run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert not e.code, e.code
assert "jax" not in sys.modules and "flax" not in sys.modules, sorted(m for m in sys.modules if "jax" in m)
print("no jax")
"""


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def _variables(state):
    return {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}


@pytest.fixture(scope="module")
def served(tmp_path_factory, digits_dir, shapes_dir):
    """Both runs (the shared tiny presets: the quickstart's clusterformer_nano, and ClusterFormer-nano behind a
    cluster decoder), their SavedModels, the requests (3 PNGs each and their eval-pipeline inputs), the
    loader's outputs, and the 360 digits test images as PNG files (plus one corrupt file)."""
    root = tmp_path_factory.mktemp("serving")
    cls_config = presets.tiny_classification_config(digits_dir)
    inst_config = presets.tiny_dense_config(shapes_dir)
    runs = {
        "classifier": (cls_config, pipeline.get_dataset_info(cls_config.input), pipeline._open_split),
        "instance": (inst_config, dense_pipeline.get_dataset_info(inst_config.input), dense_pipeline._open_split),
    }
    out, exports = {}, {}
    images_dir = root / "digits_test"
    images_dir.mkdir()
    for name, (config, info, open_split) in runs.items():
        workdir = str(root / name / "run")
        setup, state = _trained_run(workdir, config.model.name, config, info)
        export.export(workdir, str(root / name / "saved_model"), format="saved_model")
        exports[name] = str(root / name / "saved_model")
        source = open_split(config.input, config.input.get("eval_split") or "test")
        raw = [source[i]["image"] for i in range(len(source) if name == "classifier" else 3)]
        serving = setup.task.serving(config, info)
        transform = serving.preprocess.host_transform(config.input)
        host = [serving.preprocess.host(image, transform) for image in raw[:3]]
        requests = {"encoded": np.asarray([_png(image) for image in raw[:3]], dtype=bytes)}  # PNGs end in a CRC
        requests |= {f"pre_{k}": np.stack([h[k] for h in host]) for k in host[0]}
        np.savez(root / name / "requests.npz", **requests)
        out[name] = dict(config=config, info=info, setup=setup, state=state, raw=raw, requests=requests,
                         serving=serving, workdir=workdir)  # fmt: skip
        if name == "classifier":
            for i, image in enumerate(raw):
                (images_dir / f"{i:03d}.png").write_bytes(_png(image))
    (images_dir / "999_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(exports), str(root / "outputs.npz"),
         f"--export={exports['classifier']}", f"--images={images_dir}", f"--out={root / 'predict_export'}",
         "--batch_size=3"],  # the shape the loader compiled
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0 and "no jax" in done.stdout, done.stderr[-3000:]
    loaded = dict(np.load(root / "outputs.npz"))
    return dict(root=root, runs=out, exports=exports, loaded=loaded, images_dir=images_dir, stdout=done.stdout,
                stderr=done.stderr)  # fmt: skip


def test_classifier_saved_model_matches_the_trainer_without_jax(served):
    from clusterformer_jax.serving import preprocess  # TensorFlow: imported when run, not collected

    run, loaded = served["runs"]["classifier"], served["loaded"]
    setup, state = run["setup"], run["state"]
    images = run["requests"]["pre_images"]
    # in-graph preprocessing = the trainer's eval pipeline (Pillow bicubic 8 -> 32, normalise): exactly
    graph = preprocess.batch_preprocess(run["serving"].preprocess)(list(run["requests"]["encoded"]))
    np.testing.assert_array_equal(graph["images"].numpy(), images)
    want = np.asarray(jax.jit(lambda v, x: setup.model.apply(v, images=x, train=False))(_variables(state), images))
    for key in ("bytes1/logits", "bytes3/logits", "pre/logits"):
        got = loaded[f"classifier/{key}"]
        np.testing.assert_allclose(got, want[: len(got)], rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=key)
    top = np.argsort(-want, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(loaded["classifier/bytes3/top_k_classes"], top)
    assert loaded["classifier/bytes3/top_k_names"][0].tolist() == [str(c).encode() for c in top[0]]
    np.testing.assert_allclose(loaded["classifier/bytes3/top_k_scores"].sum(axis=1) <= 1.0 + 1e-6, True)
    assert str(loaded["classifier/bad"]) == "InvalidArgumentError"  # a TF error; the loader carried on
    from tensorflow.python.tools import saved_model_cli

    listing = io.StringIO()
    with contextlib.redirect_stdout(listing):  # what `saved_model_cli show --all --dir DIR` prints
        saved_model_cli._show_all(served["exports"]["classifier"])
    for line in ("signature_def['serving_default']", "signature_def['serving_preprocessed']",
                 "inputs['image_bytes']", "outputs['top_k_names']"):  # fmt: skip
        assert line in listing.getvalue(), line
    with open(os.path.join(served["exports"]["classifier"], "assets", "serving.json")) as f:
        assert json.load(f)["serving"]["kwargs"]["class_names"] == [str(c) for c in range(10)]


def test_instance_saved_model_matches_the_evaluator_mapping(served):
    """Boxes / scores to 1e-4 and masks on >= 99.9% of pixels against predict_step + the COCO evaluator's
    mapping to source pixels, through both signatures and batch sizes 1 and 3."""
    from clusterformer_jax.serving import preprocess  # TensorFlow: imported when run, not collected

    run, loaded = served["runs"]["instance"], served["loaded"]
    req = run["requests"]
    task = run["setup"].task
    batch = {"image": req["pre_images"], "image_mask": req["pre_pixel_mask"]}
    predictions = jax.device_get(run["setup"].predict_step(run["state"], batch))
    for prefix, rows in (("bytes1", 1), ("bytes3", 3), ("pre", 3)):
        got = {k.split("/")[-1]: v for k, v in loaded.items() if k.startswith(f"instance/{prefix}/")}
        assert set(got) == {"boxes", "scores", "classes", "masks", "image_size"}
        for r in range(rows):
            orig, scale = req["pre_orig_size"][r], req["pre_scale"][r]
            boxes = np.clip(predictions["boxes"][r] / np.tile(scale, 2), 0, np.tile(orig, 2))
            np.testing.assert_allclose(got["boxes"][r], boxes, atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(got["scores"][r], predictions["scores"][r], atol=1e-4, rtol=1e-4)
            np.testing.assert_array_equal(got["classes"][r], predictions["labels"][r])
            masks = coco.masks_to_source(predictions["masks"][r], orig, scale) >= task.mask_threshold
            assert (got["masks"][r][:, : orig[0], : orig[1]] == masks).mean() >= 0.999
            assert masks.any()
    assert str(loaded["instance/bad"]) == "InvalidArgumentError"
    # preprocessing parity at another shape (50 x 70 -> 46 x 64 on the 64 canvas, Pillow's bilinear shrink):
    # PNG exactly; JPEG within one level (decoders may round the IDCT differently; libjpeg's accurate DCT here)
    smooth = Image.fromarray(np.random.default_rng(3).integers(0, 256, (13, 18, 3), dtype=np.uint8))
    steps = run["serving"].preprocess
    transform = steps.host_transform(run["config"].input)
    for fmt, tolerance in (("PNG", 0.0), ("JPEG", 1.0)):
        buffer = io.BytesIO()
        smooth.resize((70, 50), Image.Resampling.BICUBIC).save(buffer, fmt)
        graph = {k: v.numpy()[0] for k, v in preprocess.batch_preprocess(steps)([buffer.getvalue()]).items()}
        host = steps.host(predict.read_image_bytes(buffer.getvalue()), transform)
        for key in ("pixel_mask", "orig_size", "scale"):
            np.testing.assert_array_equal(graph[key], host[key], err_msg=key)
        assert graph["pixel_mask"].sum() == 46 * 64
        levels = np.abs(graph["images"] - host["images"]) * np.asarray(steps.std, np.float32)
        assert levels.max() <= tolerance + 1e-3, fmt


def test_predict_images_reproduces_the_evaluator_top1_and_skips_a_corrupt_file(served, tmp_path, capsys):
    run = served["runs"]["classifier"]
    setup, state, config = run["setup"], run["state"], run["config"]
    batches = pipeline.create_eval_iterator(config.input, global_batch_size=120)
    metrics = trainer.evaluate(setup, state, batches)
    predictor = predict.RunPredictor(run["workdir"])
    summary = predict.run_batches(predictor, predictor.serving, predict.image_files(str(served["images_dir"])),
                                  str(tmp_path), batch_size=64)  # fmt: skip
    assert summary["predicted"] == 360 and summary["skipped"] == 1
    assert "999_corrupt.png: not a readable image" in capsys.readouterr().err
    lines = [json.loads(line) for line in (tmp_path / predict.RESULTS_FILE).read_text().splitlines()]
    source = pipeline._open_split(config.input, "test")
    labels = np.asarray([int(source[i]["label"]) for i in range(len(source))])
    top1 = np.asarray([line["top_k"][0]["class"] for line in lines])
    assert len(lines) == 360 and len(lines[0]["top_k"]) == 5
    assert np.mean(top1 == labels) == pytest.approx(metrics["top1"], abs=1e-9)
    assert lines[0]["top_k"][0]["name"] == str(lines[0]["top_k"][0]["class"])
    # the same through the SavedModel, in the process without JAX (the fixture's `predict --export`)
    assert "wrote 360 predictions" in served["stdout"] and "skipped 1 unreadable images" in served["stdout"]
    assert "999_corrupt.png: not a readable image" in served["stderr"]
    exported = (served["root"] / "predict_export" / predict.RESULTS_FILE).read_text().splitlines()
    assert [json.loads(line)["top_k"][0]["class"] for line in exported] == top1.tolist()


def test_dense_postprocessing_matches_the_evaluators_at_other_image_sizes(tmp_path):
    """The TF mapping back to source pixels against the evaluators' numpy (evaluation/coco.py, semantic.py) for
    images that the eval transform shrank or grew (the shapes runs above keep their 64 px); no model needed."""
    from clusterformer_jax.serving import preprocess  # TensorFlow: imported when run, not collected
    import tensorflow as tf

    from clusterformer_jax.evaluation.semantic import map_prediction
    from clusterformer_jax.serving import instances, segmentation

    canvas, rng = 64, np.random.default_rng(4)
    steps = preprocess.DensePreprocess(canvas, 48, 64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    sizes = np.asarray([[50, 70], [90, 37]], np.int32)
    scale64 = [min(48 / min(h, w), 64 / max(h, w), canvas / h, canvas / w) for h, w in sizes]
    scale = np.asarray([np.floor(s * hw + 0.5) / hw for s, hw in zip(scale64, sizes)], np.float32)
    meta = {"orig_size": sizes, "scale": scale, "image_mask": np.zeros((2, canvas, canvas), bool)}
    grid = rng.integers(0, 256, (2, 5, 16, 16)).astype(np.uint8)
    outputs = {"boxes": rng.uniform(0, 64, (2, 5, 4)).astype(np.float32), "scores": rng.random((2, 5), np.float32),
               "labels": rng.integers(0, 3, (2, 5)).astype(np.int32), "masks": grid,
               "semantic_logits": rng.normal(size=(2, 16, 16, 4)).astype(np.float32),
               "panoptic": rng.integers(0, 4, (2, 32, 32)).astype(np.int32),
               "segment_classes": np.asarray([[0, 2, -1], [1, 1, 3]], np.int32),
               "segment_scores": rng.random((2, 3), np.float32)} | meta  # fmt: skip
    feed = {k: tf.constant(v) for k, v in outputs.items() if k != "image_mask"}
    names = ["a", "b", "c", "d"]
    inst = instances.InstanceServing(names[:3], [1, 2, 3], steps.constants(), True, 0.5, "head", 0.0)
    sem = segmentation.SemanticServing(names, steps.constants())
    pan = segmentation.PanopticServing(names, [1, 2, 3, 4], [True, True, False, False], steps.constants())
    got = {k: v.numpy() for s in (inst, sem, pan) for k, v in s.postprocess(feed).items()}
    for r, (h, w) in enumerate(sizes):
        assert got["masks"].shape[2:] == (90, 70) and not got["masks"][r, :, h:].any()
        want = coco.masks_to_source(grid[r], (h, w), scale[r]) >= 0.5
        assert (got["masks"][r][:, :h, :w] == want).mean() >= 0.999 and want.any()
        boxes = np.clip(outputs["boxes"][r] / np.tile(scale[r], 2), 0, np.tile([h, w], 2))
        np.testing.assert_allclose(got["boxes"][r], boxes, rtol=1e-6, atol=1e-4)
        logits = map_prediction(outputs["semantic_logits"][r], meta, r, (h, w), True, bilinear=True)
        assert (got["semantic"][r][:h, :w] == np.argmax(logits, -1)).mean() >= 0.999
        assert (got["semantic"][r][h:] == segmentation.IGNORE).all()
        ids = map_prediction(outputs["panoptic"][r], meta, r, (h, w), True)
        np.testing.assert_array_equal(got["panoptic"][r][:h, :w], ids)
    row = {k: got[k][1] for k in ("panoptic", "segment_classes", "segment_scores", "image_size")}
    record = pan.record(row, str(tmp_path), "000002")
    with Image.open(tmp_path / record["panoptic_png"]) as png:
        assert png.size == (37, 90)
    ids = got["panoptic"][1][:90, :37]
    assert [s["id"] for s in record["segments_info"]] == [k for k in (1, 2, 3) if (ids == k).any()]
    assert {s["name"] for s in record["segments_info"]} <= {"b", "d"}
