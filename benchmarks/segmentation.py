"""Semantic / panoptic segmentation benchmark: the train step and the share of each loss term, and the eval path.

  python -m benchmarks.segmentation                 # ClusterFormer-T + cluster decoder, batch 2 at 512; 500 eval img
  python -m benchmarks.segmentation --quick         # tiny sizes (nano backbone, 128 px): checks the script
  python -m benchmarks.segmentation --quick --task panoptic  # one of the two models only (half the compiling)
  python -m benchmarks.segmentation --json out.json # also writes the numbers

Part 1, training (synthetic data), for each of the two models:
  * semantic: configs/dense.py ``ade20k_config('tiny')`` (150 free queries = the class centers, CE 5 + dice 1 on
    every decoder layer), built by ``SemanticTask``;
  * panoptic: ``coco_config('panoptic_segmentation', 'tiny')`` (128 queries, 133 classes of which 80 things,
    Eq. 7 over kMaX's terms with the config's weights), built by ``PanopticTask``;
both with --backbone on --batch random images of --size px. Targets are synthetic but of the real structure:
per image a segment map of --bands horizontal stuff bands (random stuff classes) with --objects random
ellipses (random thing classes; for ADE every class is stuff, so any class) painted on top, giving the
semantic label map at full size and one stride-4 instance mask per segment in --slots padded slots. The
backbone gets ``runtime.with_execution_settings`` and 8x8-token windows, as benchmarks/detection.py (whose
helpers this imports). Timed, each the median of --repeats calls after a warm-up call, with block_until_ready:
  * step: value_and_grad of the task's ``loss_fn`` through the model (train=True) + AdamW update, donated;
  * every loss term alone: value_and_grad w.r.t. the model outputs it reads, on fixed outputs of the model
    (train=False) after the step, jitted on its own:
      semantic: 'ce' (ce_weight x ``pixel_cross_entropy``, all layers), 'dice' (dice_weight x ``class_dice``,
        all layers), 'loss' (the whole ``SemanticTask.loss_fn``);
      panoptic (``panoptic_losses``): 'matching' (``kmax_match`` of the final layer, no gradient: shared by
        every layer under share_final_matching), and with that matching held fixed 'pq_style' (the six PQ-style
        TERMS, L_th + L_st + kMaX's PQ-style loss, class + mask, all layers, computed together by the
        criterion's ``_layer_terms``), 'mask_id' (mask-ID CE, all layers), 'insdis' (instance discrimination,
        final layer), 'aux_semantic' (auxiliary semantic CE); 'loss' (the whole ``PanopticTask.loss_fn``,
        matching included).
Shares are of the separately jitted step, so fusion inside the step can make them slightly off; the terms of
a model need not add up to its 'loss' exactly (the whole loss fuses them, and shares the target preparation).

Part 2, evaluation: the shapes dataset (clusterformer_jax/data/shapes.py, 128 px) through each task's eval
path with the train part's architecture (decoder as above; semantic: 6 queries = the 6 shapes classes;
panoptic: the shapes config's post-processing at the canvas, ``upsample`` 4), **untrained** (the train part's
parameters when the shapes match, as in --quick, else a fresh init). The images are the first --eval_images
of --eval_split: the validation split holds 200, so the default takes 500 from **train** (its COCO-format
export is the panoptic ground truth). Canvas --eval_size (128: the images' own size; larger upsamples).
Per batch: the jitted model forward (host-to-device included, block_until_ready), then the jitted
``task.predict`` (semantic: the final layer's logits; panoptic: ``panoptic_postprocess_batch``) +
``jax.device_get``, then ``evaluator.update``; then ``evaluator.compute`` (semantic: mIoU from the confusion
matrix; panoptic: PQ / SQ / RQ, mIoU_pan and pycocotools mAP^Th_pan). Images/s are given with the model's
forward included and excluded (post-processing, update and compute only). Batches are read before timing
(not counted); both jitted functions are compiled on a warm-up batch; the pass is timed once.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
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

from benchmarks.detection import _dense_configs, _shapes_configs, backbone_overrides, median_ms, run_once  # noqa: E402
from clusterformer_jax import runtime  # noqa: E402
from clusterformer_jax.data import dense_pipeline  # noqa: E402
from clusterformer_jax.tasks import panoptic_losses as PL  # noqa: E402
from clusterformer_jax.tasks.panoptic import PanopticTask  # noqa: E402
from clusterformer_jax.tasks.semantic import SemanticTask, class_dice, grid_labels, pixel_cross_entropy  # noqa: E402

KINDS = ("semantic", "panoptic")
TASK_NAMES = {"semantic": "semantic_segmentation", "panoptic": "panoptic_segmentation"}
PQ_TERMS = tuple(name for name in PL.TERMS if "thing" in name or "stuff" in name or "_pq_" in name)
FULL = dict(
    backbone="clusterformer_tiny",
    size=512,
    batch=2,
    semantic_classes=150,  # ADE20K
    panoptic_classes=133,  # COCO panoptic: 80 things + 53 stuff
    things=80,
    queries=128,  # the COCO panoptic config's
    bands=3,
    objects=7,
    slots=100,
    eval_images=500,
    eval_split="train",
    eval_size=128,
    eval_batch=8,
    repeats=3,
    decoder={},  # the configs' (dim 256, 6 layers, T = 3)
    backbone_kwargs={},
)
QUICK = dict(
    backbone="clusterformer_nano",
    size=128,
    batch=1,
    semantic_classes=6,  # the shapes classes: the eval part reuses the train part's models and parameters
    panoptic_classes=6,
    things=3,
    queries=16,
    bands=2,
    objects=3,
    slots=16,
    eval_images=8,
    eval_split="train",
    eval_size=128,
    eval_batch=4,
    repeats=2,
    # one EM step and two decoder layers: XLA compile time dominates a quick run on a busy 2-core machine
    decoder=dict(dim=64, num_layers=2, layer_strides=(32, 8), num_iters=1, num_heads=4, ffn_dim=256),
    backbone_kwargs=dict(num_iters=1),
)


def synthetic_segments(rng: np.random.Generator, args, classes: int, things: int) -> dict:
    """Per image --bands horizontal stuff bands and --objects ellipses on top, as a batch of the dense pipeline's
    keys: 'image_mask', 'semantic' (B, S, S), 'classes', 'instance_valid', 'is_crowd', 'is_thing' (B, slots),
    'instance_masks' (B, slots, S/4, S/4) sampled at the stride-4 cell centres. Classes [0, things) are things;
    with things = 0 every segment draws from all classes (ADE20K)."""
    b, side, slots = args.batch, args.size, args.slots
    stuff_pool = np.arange(things, classes) if things < classes else np.arange(classes)
    thing_pool = np.arange(things) if things else np.arange(classes)
    ids = np.zeros((b, side, side), np.int32)
    cls = np.full((b, slots), -1, np.int32)
    is_thing = np.zeros((b, slots), bool)
    ys, xs = (np.mgrid[:side, :side] + 0.5) / side
    for i in range(b):
        ids[i] = np.searchsorted(np.sort(rng.uniform(0, 1, args.bands - 1)), ys)
        cls[i, : args.bands] = rng.choice(stuff_pool, args.bands)
        for k in range(args.objects):
            (cx, cy), (rx, ry) = rng.uniform(0.2, 0.8, 2), rng.uniform(0.03, 0.2, 2)
            ids[i][((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0] = args.bands + k
            cls[i, args.bands + k] = rng.choice(thing_pool)
            is_thing[i, args.bands + k] = things > 0
    masks = ids[:, None, 2::4, 2::4] == np.arange(slots)[None, :, None, None]
    return dict(
        image_mask=np.ones((b, side, side), bool),
        semantic=np.take_along_axis(cls, ids.reshape(b, -1), 1).reshape(ids.shape),
        classes=cls,
        instance_valid=(cls >= 0) & masks.any(axis=(2, 3)),
        is_crowd=np.zeros((b, slots), bool),
        is_thing=is_thing,
        instance_masks=masks.astype(np.float32),
    )


def build_task(kind: str, config, info: dict):
    return SemanticTask(config, info) if kind == "semantic" else PanopticTask(config, info)


def train_task(kind: str, args):
    """The recipe's task (config + synthetic dataset facts) with the benchmark's decoder and class count."""
    dense = _dense_configs()
    config = dense.ade20k_config("tiny") if kind == "semantic" else dense.coco_config(TASK_NAMES[kind], "tiny")
    config.model.decoder.update(args.decoder)
    classes = args.semantic_classes if kind == "semantic" else args.panoptic_classes
    config.model.decoder.num_queries = classes if kind == "semantic" else args.queries
    things = 0 if kind == "semantic" else args.things
    info = dict(
        num_classes=classes,
        image_size=args.size,
        class_names=tuple(f"c{c}" for c in range(classes)),
        is_thing=tuple(c < things for c in range(classes)),
        category_ids=tuple(range(1, classes + 1)),
    )
    return build_task(kind, config, info), config, things


def semantic_terms(task: SemanticTask) -> dict:
    """name -> (fn(outputs, batch, rng), output keys differentiated, with gradient)."""
    ce_w, dice_w = task.options["ce_weight"], task.options["dice_weight"]

    def per_layer(loss, weight, o, batch, rng):
        logits = task.pixel_logits(o).astype(jnp.float32)
        labels = grid_labels(batch["semantic"], logits.shape[2:4])
        return weight * jnp.sum(jax.vmap(lambda x: loss(x, labels))(logits))

    keys = ("mask_logits",)
    return {
        "ce": (functools.partial(per_layer, pixel_cross_entropy, ce_w), keys, True),
        "dice": (functools.partial(per_layer, class_dice, dice_w), keys, True),
        "loss": (lambda o, b, r: task.loss_fn(o, b, r)[0], keys, True),
    }


def panoptic_terms(task: PanopticTask) -> dict:
    """As ``semantic_terms``; the terms but 'matching' and 'loss' read the batch's fixed matching (see main)."""
    cfg = task.loss_config

    def prepared(o, batch):
        return PL._prepare(task.targets(batch, o["mask_logits"].shape[-2:]), o["mask_logits"].shape[-2:])

    def layers(fn, o, batch):
        """fn(class_logits, mask_logits, t, query_index, matched) summed over the layers (shared matching)."""
        t, c, m = prepared(o, batch), o["class_logits"], o["mask_logits"]
        qi, mt = (jnp.broadcast_to(x, (c.shape[0],) + x.shape) for x in (batch["query_index"], batch["matched"]))
        return jnp.sum(jax.lax.map(lambda a: fn(a[0], a[1], t, a[2], a[3]), (c, m, qi, mt)))

    def pq_style(o, batch, rng):
        final = (o["class_logits"][-1], o["mask_logits"][-1])

        def fn(c, m, t, q, k):  # the criterion's own per-layer terms; the unused mask-ID CE is dead code
            terms = PL._layer_terms(c, m, t, q, k, final, cfg)
            return sum(terms[name] for name in PQ_TERMS)

        return layers(fn, o, batch)

    def mask_id(o, batch, rng):
        weight = cfg.lambda_aux * cfg.mask_id_weight
        return layers(lambda c, m, t, q, k: weight * PL.mask_id_cross_entropy(m, t, q, k), o, batch)

    def insdis(o, batch, rng):
        t, emb = prepared(o, batch), PL._final(o["pixel_embeddings"], 4)
        loss = PL.instance_discrimination(emb, t, rng, cfg.num_samples, cfg.temperature, cfg.sample_temperature)
        return cfg.lambda_aux * cfg.insdis_weight * loss

    def aux_semantic(o, batch, rng):
        t = prepared(o, batch)
        loss = PL.auxiliary_semantic_loss(PL._final(o["semantic_logits"], 4), t["semantic"], t.get("pixel_valid"))
        return cfg.lambda_aux * cfg.aux_semantic_weight * loss

    def matching(o, batch, rng):
        return PL.kmax_match(o["class_logits"][-1], o["mask_logits"][-1], prepared(o, batch))

    logits = ("class_logits", "mask_logits")
    return {
        "matching": (matching, logits, False),
        "pq_style": (pq_style, logits, True),
        "mask_id": (mask_id, ("mask_logits",), True),
        "insdis": (insdis, ("pixel_embeddings",), True),
        "aux_semantic": (aux_semantic, ("semantic_logits",), True),
        "loss": (lambda o, b, r: task.loss_fn(o, b, r)[0], logits + ("pixel_embeddings", "semantic_logits"), True),
    }


def time_term(fn, keys, grad: bool, outputs: dict, batch: dict, rng, repeats: int) -> tuple[float, float]:
    """Median ms of ``fn`` (value_and_grad w.r.t. ``keys`` of the outputs when ``grad``), the rest as arguments."""
    diff = {k: outputs[k] for k in keys}
    rest = {k: v for k, v in outputs.items() if k not in keys}
    call = jax.value_and_grad(lambda d, r, b, k: fn({**r, **d}, b, k)) if grad else (lambda d, r, b, k: fn(d, b, k))
    jitted = jax.jit(call)
    return median_ms(lambda: jax.block_until_ready(jitted(diff, rest, batch, rng)), repeats)


def bench_train(kind: str, args, overrides: dict) -> tuple[dict, dict, dict]:
    """(variables after the timed steps, the task's decoder fields, numbers)."""
    task, config, things = train_task(kind, args)
    model = task.build_model(args.backbone, overrides)
    rs = np.random.default_rng(0)
    batch = synthetic_segments(rs, args, task.num_classes, things)
    batch["image"] = rs.standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
    batch = jax.tree.map(jnp.asarray, batch)  # arguments of every jitted function, not baked-in constants
    start = time.perf_counter()
    keys = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    init = functools.partial(model.init, train=False)
    variables = run_once(init, keys, batch["image"][:1], batch["image_mask"][:1])
    params, extra = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    init_s = time.perf_counter() - start
    tx = optax.adamw(1e-4)
    mutable = list(extra) or False  # BatchNorm statistics, if a backbone has them (updates dropped here)

    def apply(p, b, train, rng=None):
        rngs = {"dropout": rng} if train else {}
        out = model.apply(
            {"params": p, **extra}, **task.model_inputs(b), train=train, rngs=rngs, mutable=train and mutable
        )
        return out[0] if train and mutable else out

    def train_step(p, o, rng, b):
        k_drop, k_loss = jax.random.split(rng)
        loss, grads = jax.value_and_grad(lambda q: task.loss_fn(apply(q, b, True, k_drop), b, k_loss)[0])(p)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    step = jax.jit(train_step, donate_argnums=(0, 1))
    state, key = [params, tx.init(params)], jax.random.PRNGKey(2)

    def run_step():
        state[0], state[1], loss = step(state[0], state[1], key, batch)
        jax.block_until_ready((state[0], loss))

    step_ms, step_first = median_ms(run_step, args.repeats)
    outputs = run_once(lambda p, b: apply(p, b, False), state[0], batch)
    terms = semantic_terms(task) if kind == "semantic" else panoptic_terms(task)
    if kind == "panoptic":  # the fixed matching that the per-term functions read
        qi, mt = run_once(lambda o, b: terms["matching"][0](o, b, None), outputs, batch)
        batch = dict(batch, query_index=qi, matched=mt)
    numbers = dict(
        params_m=sum(x.size for x in jax.tree_util.tree_leaves(state[0])) / 1e6,
        init_s=init_s,
        step_ms=step_ms,
        step_first_s=step_first,
        mask_logits_shape=list(outputs["mask_logits"].shape),
        terms={},
    )
    for name, (fn, diff_keys, grad) in terms.items():
        ms, first = time_term(fn, diff_keys, grad, outputs, batch, key, args.repeats)
        numbers["terms"][name] = dict(ms=ms, share=ms / step_ms, first_s=first, grad=grad)
        print(f"  {kind} {name}: {ms:.1f} ms ({ms / step_ms:.1%} of the step)", flush=True)
    return {"params": state[0], **extra}, config.model.decoder.to_dict(), numbers


def bench_eval(kind: str, args, decoder_fields: dict, overrides: dict, variables=None) -> dict:
    config = _shapes_configs().shapes_config(TASK_NAMES[kind], None)
    config.model.name = args.backbone
    for field in ("eval_short_side", "eval_max_size", "eval_pad_size"):
        config.input[field] = args.eval_size
    config.input.eval_split = f"{args.eval_split}[:{args.eval_images}]"
    keys = ("image", "image_mask", "image_id", "orig_size", "scale")
    config.input.outputs = keys + (("semantic",) if kind == "semantic" else ())
    info = dense_pipeline.get_dataset_info(config.input)
    fields = dict(decoder_fields)
    if kind == "semantic":
        fields["num_queries"] = info["num_classes"]
    config.model.decoder = ml_collections.ConfigDict(fields)
    task = build_task(kind, config, info)
    model = task.build_model(args.backbone, overrides)
    start = time.perf_counter()
    batches = list(dense_pipeline.create_eval_iterator(config.input, global_batch_size=args.eval_batch))
    read_s = time.perf_counter() - start
    num_images = int(sum(np.sum(b["mask"] > 0) for b in batches))
    key, dummy = {"params": jax.random.PRNGKey(0)}, task.dummy_inputs(1)
    init = functools.partial(model.init, train=False)
    shapes = functools.partial(jax.tree.map, lambda x: x.shape)
    if variables is None or shapes(variables) != shapes(jax.eval_shape(init, key, **dummy)):
        variables = run_once(init, key, dummy["images"], dummy["pixel_mask"])  # untrained, fresh

    forward = jax.jit(lambda v, inputs: model.apply(v, **task.model_inputs(inputs), train=False))
    predict = jax.jit(task.predict)

    def device_batch(b):
        return {k: jnp.asarray(b[k]) for k in ("image", "image_mask")}

    start = time.perf_counter()
    jax.device_get(predict(jax.block_until_ready(forward(variables, device_batch(batches[0]))), {}))
    compile_s = time.perf_counter() - start
    evaluator = task.create_evaluator()
    forward_s = predict_s = update_s = 0.0
    for b in batches:
        t0 = time.perf_counter()
        outputs = jax.block_until_ready(forward(variables, device_batch(b)))
        t1 = time.perf_counter()
        predictions = jax.device_get(predict(outputs, {}))
        t2 = time.perf_counter()
        evaluator.update(predictions, b)
        t3 = time.perf_counter()
        forward_s, predict_s, update_s = forward_s + t1 - t0, predict_s + t2 - t1, update_s + t3 - t2
    start = time.perf_counter()
    metrics = evaluator.compute()
    compute_s = time.perf_counter() - start
    without = predict_s + update_s + compute_s
    metric = "mIoU" if kind == "semantic" else "PQ"
    return dict(
        eval_images=num_images,
        eval_split=args.eval_split,
        eval_canvas=args.eval_size,
        eval_batch=args.eval_batch,
        num_queries=fields["num_queries"],
        pipeline_read_s=read_s,
        compile_s=compile_s,
        forward_s=forward_s,
        predict_s=predict_s,
        update_s=update_s,
        compute_s=compute_s,
        images_per_s_with_model=num_images / (forward_s + without),
        images_per_s_without_model=num_images / without,
        metric=metric,
        value=float(metrics[metric]),
    )


def report(args, overrides: dict, eval_overrides: dict, train: dict, ev: dict) -> str:
    device = jax.devices()[0]
    lines = [
        f"Machine: {os.cpu_count()} CPUs ({platform.machine()}), device {device.platform}:{device.device_kind}; "
        f"jax {jax.__version__}; host allocator {runtime.host_allocator()}; load average {os.getloadavg()[0]:.1f} "
        f"at the end; {datetime.datetime.now():%Y-%m-%d %H:%M}; `python -m benchmarks.segmentation "
        f"{' '.join(sys.argv[1:])}`.",
        f"Models: {args.backbone} ({', '.join(f'{k}={v}' for k, v in overrides.items())}) + cluster decoder "
        f"({', '.join(f'{k}={v}' for k, v in args.decoder.items()) or 'the configs'}); semantic "
        f"{args.semantic_classes} classes (one query each), panoptic {args.panoptic_classes} classes ({args.things} "
        f"things), {args.queries} queries; batch {args.batch} at {args.size}x{args.size}; {args.bands} bands + "
        f"{args.objects} objects in {args.slots} slots per image; median of {args.repeats} after a warm-up call.",
        "",
    ]
    if train:
        lines += [
            "| model | params | train step ms | term | term ms | term / step | first call s (step / term) |",
            "|" + "---|" * 7,
        ]
        for kind, t in train.items():
            for name, term in t["terms"].items():
                label = name + ("" if term["grad"] else " (forward only)")
                lines.append(
                    f"| {kind} | {t['params_m']:.2f}M | {t['step_ms']:.1f} | {label} | {term['ms']:.1f} | "
                    f"{term['share']:.1%} | {t['step_first_s']:.1f} / {term['first_s']:.1f} |"
                )
        lines.append("")
    if ev:
        lines += [
            "| task | images | canvas | batch | queries | model forward s | predict + device_get s | update s "
            "| compute s | img/s with model | img/s without model | metric (untrained) |",
            "|" + "---|" * 12,
        ]
        for kind, e in ev.items():
            lines.append(
                f"| {kind} | {e['eval_images']} ({e['eval_split']}) | {e['eval_canvas']} | {e['eval_batch']} | "
                f"{e['num_queries']} | {e['forward_s']:.2f} | {e['predict_s']:.2f} | {e['update_s']:.2f} | "
                f"{e['compute_s']:.2f} | {e['images_per_s_with_model']:.2f} | "
                f"{e['images_per_s_without_model']:.2f} | {e['metric']} {e['value']:.3f} |"
            )
        if eval_overrides != overrides:
            lines += ["", f"Eval backbone fields: {', '.join(f'{k}={v}' for k, v in eval_overrides.items())}."]
        read = ", ".join(f"{k} {e['pipeline_read_s']:.1f} s / {e['compile_s']:.1f} s" for k, e in ev.items())
        lines += ["", f"Not counted (reading the batches / compiling forward + predict): {read}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (nano backbone, 128 px); ~5 min of CPU")
    parser.add_argument("--backbone", help="registry preset of the backbone (default clusterformer_tiny)")
    parser.add_argument("--size", type=int, help="train image side (default 512)")
    parser.add_argument("--batch", type=int, help="images per train step (default 2)")
    parser.add_argument("--semantic_classes", type=int, help="semantic classes = queries (default 150)")
    parser.add_argument("--panoptic_classes", type=int, help="panoptic classes (default 133)")
    parser.add_argument("--things", type=int, help="panoptic thing classes among them (default 80)")
    parser.add_argument("--queries", type=int, help="panoptic decoder queries (default 128)")
    parser.add_argument("--bands", type=int, help="synthetic stuff bands per image (default 3)")
    parser.add_argument("--objects", type=int, help="synthetic objects per image (default 7)")
    parser.add_argument("--slots", type=int, help="target slots per image (default 100)")
    parser.add_argument("--eval_images", type=int, help="shapes images to evaluate (default 500)")
    parser.add_argument("--eval_split", help="shapes split they come from (default train: validation has 200)")
    parser.add_argument("--eval_size", type=int, help="eval canvas side (default 128: the images' size)")
    parser.add_argument("--eval_batch", type=int, help="images per eval batch (default 8)")
    parser.add_argument("--repeats", type=int, help="timed calls per train measurement (default 3)")
    parser.add_argument("--task", choices=KINDS, help="only this model (default both)")
    parser.add_argument("--skip", choices=("train", "eval"), help="leave out one part")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers to this json file")
    args = parser.parse_args()
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.bands + args.objects > args.slots or args.bands < 1:
        parser.error(f"--bands {args.bands} + --objects {args.objects} must be in [1, --slots {args.slots}]")
    if args.size % 4:
        parser.error(f"--size {args.size} must be a multiple of 4")
    kinds = (args.task,) if args.task else KINDS
    overrides = backbone_overrides(args.backbone, args.size, args.backbone_kwargs)
    eval_overrides = backbone_overrides(args.backbone, args.eval_size, args.backbone_kwargs)
    train, ev = {}, {}
    for kind in kinds:
        variables, decoder_fields = None, None
        if args.skip != "train":
            variables, decoder_fields, train[kind] = bench_train(kind, args, overrides)
            print(f"train {kind}: {json.dumps(train[kind])}", flush=True)
        if args.skip != "eval":
            if decoder_fields is None:
                decoder_fields = train_task(kind, args)[1].model.decoder.to_dict()
            reuse = variables if eval_overrides == overrides else None
            ev[kind] = bench_eval(kind, args, decoder_fields, eval_overrides, reuse)
            print(f"eval {kind}: {json.dumps(ev[kind])}", flush=True)
        del variables
    text = report(args, overrides, eval_overrides, train, ev)
    print("\n" + text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(config=vars(args), overrides=overrides, eval_overrides=eval_overrides, train=train, eval=ev),
                f,
                indent=1,
                default=str,
            )


if __name__ == "__main__":
    main()
