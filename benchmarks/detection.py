"""Detection / instance-segmentation benchmark: the train step and its set matching, and the eval path.

  python -m benchmarks.detection                 # ClusterFormer-T + cluster decoder, batch 2 at 512, 80 classes
  python -m benchmarks.detection --quick         # tiny sizes (nano backbone, 128 px): checks the script in < 2 min
  python -m benchmarks.detection --json out.json # also writes the numbers

Part 1, training (synthetic data): ``DenseModel(create_backbone(--backbone), DecoderConfig(dim=256,
num_queries=--queries, 6 layers), 80 classes)`` on --batch random images of --size px with instance masks on
and the COCO recipe's loss config (configs/dense.py ``coco_config``: focal class loss, L1 + GIoU, mask BCE +
dice at 12544 points). Targets are synthetic: --objects random boxes (with an ellipse mask inscribed in each,
at stride 4) and random classes in --slots padded slots per image. The backbone gets the execution fields
``runtime.with_execution_settings`` resolves for this machine (as benchmarks/model_throughput.py does) and,
for the Swin-like presets, window counts giving 8x8-token windows (512: (16, 8, 4, 2)). Three jitted
functions are timed, each the median of --repeats calls after a warm-up call, with block_until_ready:
  * step: value_and_grad of ``set_criterion`` through the model (train=True) + AdamW update, donated buffers;
  * matching: on fixed model outputs, the matching work of ``set_criterion`` and nothing else: the matching
    costs (``match_costs`` at uniform points) of all L layers under ``lax.map`` + one vmapped
    ``hungarian_match`` of the L * B problems (``set_losses.match_layers``, which set_criterion calls);
  * loss: value_and_grad of ``set_criterion`` w.r.t. those model outputs (matching included).
The shares are of the separately jitted step, so fusion inside the step can make them slightly off.

Part 2, evaluation (shapes validation split, the first --eval_images images, 128 px upsampled to an
--eval_size canvas by eval_short_side = eval_max_size = eval_pad_size): the same architecture with the
dataset's 3 thing classes (untrained), through the task's eval path: jitted ``DetectionTask.predict`` on the
model outputs (host-to-device of the batch included) + ``jax.device_get`` + ``COCOEvaluator.update`` (boxes
and masks back to the source image, RLE) for every batch, then ``COCOEvaluator.compute`` (pycocotools COCOeval,
bbox + segm). Batches are read before timing (pipeline time reported, not counted); predict is compiled on a
warm-up batch; the pass is timed once. An untrained model keeps top_k = 100 low-score detections per image
with large masks, so the COCOeval time is an upper-ish bound of a trained model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from clusterformer_jax import runtime  # noqa: E402
from clusterformer_jax.data import dense_pipeline  # noqa: E402
from clusterformer_jax.models import clusterformer  # noqa: E402
from clusterformer_jax.models.decoder import DecoderConfig  # noqa: E402
from clusterformer_jax.models.dense_model import DenseModel  # noqa: E402
from clusterformer_jax.models.registry import backbone_fields, create_backbone  # noqa: E402
from clusterformer_jax.tasks.detection import DetectionTask  # noqa: E402
from clusterformer_jax.tasks.set_losses import SetLossConfig, match_layers, set_criterion  # noqa: E402

FULL = dict(
    backbone="clusterformer_tiny",
    size=512,
    batch=2,
    queries=100,
    classes=80,
    objects=7,
    slots=100,
    eval_images=64,
    eval_size=512,
    repeats=5,
    decoder=dict(dim=256, num_layers=6),
    backbone_kwargs={},
    num_points=None,  # the COCO config's (12544)
)
QUICK = dict(
    backbone="clusterformer_nano",
    size=128,
    batch=1,
    queries=16,
    classes=3,  # the shapes thing classes: the eval part reuses the train part's model and parameters
    objects=3,
    slots=16,
    eval_images=4,
    eval_size=128,
    repeats=2,
    # one EM step and two decoder layers: XLA compile time dominates a quick run on a busy 2-core machine
    decoder=dict(dim=64, num_layers=2, layer_strides=(32, 8), num_iters=1, num_heads=4, ffn_dim=256),
    backbone_kwargs=dict(num_iters=1),
    num_points=1024,
)


def _dense_configs():
    """configs/dense.py (the repository root is on the path)."""
    from configs import dense

    return dense


def _shapes_configs():
    """configs/shapes.py."""
    from configs import shapes

    return shapes


def window_counts(backbone: str, size: int) -> tuple[int, ...] | None:
    """8x8-token windows at every stage (stage maps size/4 .. size/32) for the windowed ClusterFormer presets;
    None (the preset's) for whole-map presets such as clusterformer_nano and for other families."""
    preset = clusterformer.PRESETS.get(backbone)
    if preset is None or set(preset["window_counts"]) == {1}:
        return None
    return tuple(max(1, size // 4 // 2**i // 8) for i in range(4))


def backbone_overrides(name: str, size: int, extra: dict) -> dict:
    overrides = dict(extra)
    counts = window_counts(name, size)
    if counts is not None:
        overrides["window_counts"] = counts
    return runtime.with_execution_settings(backbone_fields(name), overrides)


def run_once(fn, *args):
    """``fn(*args)`` for what runs once and is not timed (init, the fixed outputs): on CPU compiled without XLA's
    backend optimisations, which takes a third of the time (a nano init: 15 s against 46 s on a busy machine)."""
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return jax.jit(fn).lower(*args).compile(options if jax.default_backend() == "cpu" else None)(*args)


def median_ms(fn, repeats: int) -> tuple[float, float]:
    """(median ms of ``repeats`` calls after one warm-up call, seconds of that first call incl. compiling)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), first


def synthetic_targets(rng: np.random.Generator, batch: int, slots: int, objects: int, side: int, classes: int):
    """``objects`` random boxes (normalised cxcywh) with inscribed ellipse masks on a side x side grid per image,
    random classes, the rest of ``slots`` padding (class -1, valid False)."""
    boxes = np.zeros((batch, slots, 4), np.float32)
    boxes[:, :objects, :2] = rng.uniform(0.2, 0.8, (batch, objects, 2))
    boxes[:, :objects, 2:] = rng.uniform(0.05, 0.4, (batch, objects, 2))
    cls = np.full((batch, slots), -1, np.int32)
    cls[:, :objects] = rng.integers(0, classes, (batch, objects))
    centres = (np.arange(side) + 0.5) / side
    dx = (centres[None, None, None, :] - boxes[..., 0, None, None]) / np.maximum(boxes[..., 2, None, None] / 2, 1e-6)
    dy = (centres[None, None, :, None] - boxes[..., 1, None, None]) / np.maximum(boxes[..., 3, None, None] / 2, 1e-6)
    masks = ((dx**2 + dy**2 <= 1.0) & (cls[..., None, None] >= 0)).astype(np.float32)
    valid = cls >= 0
    return {"classes": cls, "boxes": boxes, "masks": masks, "valid": valid}


def matching_only(outputs: dict, targets: dict, rng: jax.Array, cfg: SetLossConfig):
    """The matching inside ``set_losses.set_criterion``: its ``match_layers`` with the same key split."""
    k_match, _ = jax.random.split(rng)
    return match_layers(outputs, targets, k_match, cfg)


def bench_train(args, decoder: DecoderConfig, loss_cfg: SetLossConfig, overrides: dict) -> dict:
    model = DenseModel(backbone=create_backbone(args.backbone, **overrides), decoder=decoder, num_classes=args.classes)
    rs = np.random.default_rng(0)
    images = jnp.asarray(rs.standard_normal((args.batch, args.size, args.size, 3)), jnp.float32)
    pixel_mask = jnp.ones(images.shape[:3], bool)
    targets = jax.tree.map(
        jnp.asarray, synthetic_targets(rs, args.batch, args.slots, args.objects, args.size // 4, args.classes)
    )
    # Images and targets are arguments of every jitted function, not constants baked into the program.
    start = time.perf_counter()
    init = functools.partial(model.init, train=False)
    keys = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    variables = run_once(init, keys, images[:1], pixel_mask[:1])
    params, extra = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    init_s = time.perf_counter() - start
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)
    mutable = list(extra) or False  # BatchNorm statistics, if a backbone has them (updates dropped here)

    def apply(p, x, m, train, rng=None):
        rngs = {"dropout": rng} if train else {}
        out = model.apply({"params": p, **extra}, x, m, train=train, rngs=rngs, mutable=train and mutable)
        return out[0] if train and mutable else out

    def train_step(p, o, rng, x, m, t):
        k_drop, k_loss = jax.random.split(rng)
        loss_fn = lambda q: set_criterion(apply(q, x, m, True, k_drop), t, k_loss, loss_cfg)[0]  # noqa: E731
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    step = jax.jit(train_step, donate_argnums=(0, 1))
    state = [params, opt_state]
    key = jax.random.PRNGKey(2)

    def run_step():
        state[0], state[1], loss = step(state[0], state[1], key, images, pixel_mask, targets)
        jax.block_until_ready((state[0], loss))

    step_ms, step_first = median_ms(run_step, args.repeats)
    outputs = run_once(lambda p, x, m: apply(p, x, m, False), state[0], images, pixel_mask)
    match_fn = jax.jit(functools.partial(matching_only, cfg=loss_cfg))
    match_ms, match_first = median_ms(lambda: jax.block_until_ready(match_fn(outputs, targets, key)), args.repeats)
    loss_fn = jax.jit(jax.value_and_grad(lambda o, t, r: set_criterion(o, t, r, loss_cfg)[0]))
    loss_ms, loss_first = median_ms(lambda: jax.block_until_ready(loss_fn(outputs, targets, key)), args.repeats)
    return {"params": state[0], **extra}, dict(
        params_m=sum(x.size for x in jax.tree_util.tree_leaves(state[0])) / 1e6,
        init_s=init_s,
        step_ms=step_ms,
        step_first_s=step_first,
        matching_ms=match_ms,
        matching_first_s=match_first,
        matching_share=match_ms / step_ms,
        loss_ms=loss_ms,
        loss_first_s=loss_first,
        loss_share=loss_ms / step_ms,
        matcher_under_10pct=bool(match_ms < 0.1 * step_ms),
        mask_logits_shape=list(outputs["mask_logits"].shape),
    )


def bench_eval(args, decoder: DecoderConfig, overrides: dict, variables=None) -> dict:
    config = _shapes_configs().shapes_config("instance_segmentation", None)
    config.model.name = args.backbone
    config.model.decoder = ml_collections.ConfigDict(dataclasses.asdict(decoder))
    for field in ("eval_short_side", "eval_max_size", "eval_pad_size"):
        config.input[field] = args.eval_size
    config.input.eval_split = f"validation[:{args.eval_images}]"
    config.input.outputs = ("image", "image_mask", "image_id", "orig_size", "scale")
    info = dense_pipeline.get_dataset_info(config.input)
    task = DetectionTask(config, info, with_masks=True)
    model = task.build_model(args.backbone, overrides)
    start = time.perf_counter()
    batches = list(dense_pipeline.create_eval_iterator(config.input, global_batch_size=args.batch))
    read_s = time.perf_counter() - start
    num_images = int(sum(np.sum(b["mask"] > 0) for b in batches))
    key, dummy = {"params": jax.random.PRNGKey(0)}, task.dummy_inputs(1)
    init = functools.partial(model.init, train=False)
    shapes = functools.partial(jax.tree.map, lambda x: x.shape)
    if variables is None or shapes(variables) != shapes(jax.eval_shape(init, key, **dummy)):
        variables = run_once(
            init, key, dummy["images"], dummy["pixel_mask"]
        )  # a fresh model unless the train part's has this one's variables (3 classes)

    @jax.jit
    def predict(v, inputs):
        outputs = model.apply(v, **task.model_inputs(inputs), train=False)
        return task.predict(outputs, inputs)

    def device_batch(b):
        return {k: jnp.asarray(b[k]) for k in ("image", "image_mask")}

    start = time.perf_counter()
    jax.block_until_ready(predict(variables, device_batch(batches[0])))
    compile_s = time.perf_counter() - start
    evaluator = task.create_evaluator()
    predict_s = update_s = 0.0
    for b in batches:
        t0 = time.perf_counter()
        predictions = jax.device_get(predict(variables, device_batch(b)))
        t1 = time.perf_counter()
        evaluator.update(predictions, b)
        t2 = time.perf_counter()
        predict_s, update_s = predict_s + t1 - t0, update_s + t2 - t1
    start = time.perf_counter()
    metrics = evaluator.compute()
    cocoeval_s = time.perf_counter() - start
    return dict(
        eval_images=num_images,
        eval_canvas=args.eval_size,
        eval_batch=args.batch,
        pipeline_read_s=read_s,
        predict_compile_s=compile_s,
        predict_s=predict_s,
        update_s=update_s,
        cocoeval_s=cocoeval_s,
        images_per_s=num_images / (predict_s + update_s + cocoeval_s),
        images_per_s_without_cocoeval=num_images / (predict_s + update_s),
        num_detections=int(metrics["num_detections"]),
        bbox_AP=metrics["bbox_AP"],
        segm_AP=metrics["segm_AP"],
    )


def report(args, overrides: dict, loss_cfg: SetLossConfig, train: dict | None, ev: dict | None) -> str:
    device = jax.devices()[0]
    lines = [
        f"Machine: {os.cpu_count()} CPUs ({platform.machine()}), device {device.platform}:{device.device_kind}; "
        f"jax {jax.__version__}; host allocator {runtime.host_allocator()}; load average {os.getloadavg()[0]:.1f} "
        f"at the end; {datetime.datetime.now():%Y-%m-%d %H:%M}; `python -m benchmarks.detection "
        f"{' '.join(sys.argv[1:])}`.",
        f"Model: {args.backbone} ({', '.join(f'{k}={v}' for k, v in overrides.items())}) + cluster decoder "
        f"({args.decoder_text}), {args.classes} classes; batch {args.batch} at {args.size}x{args.size}; "
        f"{args.objects} objects in {args.slots} slots per image; masks on, {loss_cfg.num_points} points; "
        f"median of {args.repeats} after a warm-up call.",
        "",
    ]
    if train:
        lines += [
            "| params | train step ms | matching ms | matching / step | loss (incl. matching) ms | loss / step "
            "| matcher < 10% of step | first call s (step / matching / loss) |",
            "|" + "---|" * 8,
            f"| {train['params_m']:.2f}M | {train['step_ms']:.1f} | {train['matching_ms']:.1f} | "
            f"{train['matching_share']:.1%} | {train['loss_ms']:.1f} | {train['loss_share']:.1%} | "
            f"{'yes' if train['matcher_under_10pct'] else 'no'} | {train['step_first_s']:.1f} / "
            f"{train['matching_first_s']:.1f} / {train['loss_first_s']:.1f} |",
            "",
        ]
    if ev:
        lines += [
            "| eval images | canvas | batch | predict + device_get s | evaluator.update s | COCOeval s (bbox+segm) "
            "| img/s with COCOeval | img/s without | detections | bbox / segm AP |",
            "|" + "---|" * 10,
            f"| {ev['eval_images']} | {ev['eval_canvas']} | {ev['eval_batch']} | {ev['predict_s']:.2f} | "
            f"{ev['update_s']:.2f} | {ev['cocoeval_s']:.2f} | {ev['images_per_s']:.2f} | "
            f"{ev['images_per_s_without_cocoeval']:.2f} | {ev['num_detections']} | {ev['bbox_AP']:.3f} / "
            f"{ev['segm_AP']:.3f} |",
            "",
            f"Eval: shapes validation (128 px) upsampled to the {ev['eval_canvas']} canvas, untrained model with the "
            f"3 shapes thing classes, top_k 100: many low-score detections with large masks, so the COCOeval "
            f"time is an upper-ish bound. Not counted: reading the batches ({ev['pipeline_read_s']:.1f} s) and "
            f"compiling predict ({ev['predict_compile_s']:.1f} s).",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (nano backbone, 128 px): under 2 minutes")
    parser.add_argument("--backbone", help="registry preset of the backbone (default clusterformer_tiny)")
    parser.add_argument("--size", type=int, help="train image side (default 512)")
    parser.add_argument("--batch", type=int, help="images per train step and per eval batch (default 2)")
    parser.add_argument("--queries", type=int, help="decoder queries (default 100)")
    parser.add_argument("--classes", type=int, help="classes of the train benchmark (default 80)")
    parser.add_argument("--objects", type=int, help="synthetic objects per image (default 7)")
    parser.add_argument("--slots", type=int, help="target slots per image (default 100)")
    parser.add_argument("--eval_images", type=int, help="shapes validation images to evaluate (default 64)")
    parser.add_argument("--eval_size", type=int, help="eval canvas side (default 512)")
    parser.add_argument("--repeats", type=int, help="timed calls per train measurement (default 5)")
    parser.add_argument("--skip", choices=("train", "eval"), help="leave out one part")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers to this json file")
    args = parser.parse_args()
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.objects > args.slots:
        parser.error(f"--objects {args.objects} is more than --slots {args.slots}")
    decoder = DecoderConfig(num_queries=args.queries, **preset["decoder"])
    args.decoder_text = ", ".join(f"{k}={getattr(decoder, k)}" for k in ("dim", "num_queries", "num_layers"))
    coco_detection = _dense_configs().coco_config("instance_segmentation", "tiny").detection.to_dict()
    loss_fields = {f.name for f in dataclasses.fields(SetLossConfig)}
    loss = {k: v for k, v in coco_detection.items() if k in loss_fields}
    if args.num_points is not None:
        loss["num_points"] = args.num_points
    loss_cfg = SetLossConfig(**loss, use_masks=True)
    overrides = backbone_overrides(args.backbone, args.size, args.backbone_kwargs)
    train = ev = train_variables = None
    if args.skip != "train":
        train_variables, train = bench_train(args, decoder, loss_cfg, overrides)
        print(f"train: {json.dumps(train)}", flush=True)
    if args.skip != "eval":
        eval_overrides = backbone_overrides(args.backbone, args.eval_size, args.backbone_kwargs)
        reuse = train_variables if eval_overrides == overrides else None
        ev = bench_eval(args, decoder, eval_overrides, reuse)
        print(f"eval: {json.dumps(ev)}", flush=True)
    text = report(args, overrides, loss_cfg, train, ev)
    print("\n" + text)
    if args.json:
        with open(args.json, "w") as f:
            config = {k: v for k, v in vars(args).items() if k != "decoder"}
            json.dump(dict(config=config, overrides=overrides, train=train, eval=ev), f, indent=1, default=str)


if __name__ == "__main__":
    main()
