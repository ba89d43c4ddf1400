"""Block rematerialisation (models/remat.py): same gradients as without it, the same dropout / stochastic-depth
masks in the recomputation as in the forward pass, and on CPU (where ``nn.remat``'s optimization barrier is
removed before CSE merges the recomputation back into the forward) temporaries that actually shrink."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clusterformer_jax import runtime
from clusterformer_jax.models.registry import create_model, model_fields
from clusterformer_jax.models.remat import remat
from tests import presets

SMALL = {  # every backbone family at a few thousand parameters; GroupMixFormer updates BatchNorm statistics
    # one block per stage (the nano's stage 3 has two), T = 2 EM iterations: each remat boundary and the EM
    # scan (rolled on the CPU, unrolled on accelerators) as in the nano, with ~20% less to trace and compile
    "clusterformer_nano": presets.NANO_CUT,
    "coc_tiny": dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), num_heads=(1, 1, 1, 1), head_dim=4),
    "paca_tiny": dict(
        depths=(1, 1, 2, 1),
        dims=(8, 12, 16, 20),
        num_heads=(2, 3, 4, 4),
        mlp_ratios=(4, 4, 4, 4),
        clusters=(5, 3, 4, 0),
        onsite=(0, 1, 2, 0),
        clustering_kernel=3,
    ),
    "gmf_miny": dict(dims=(20, 30, 40, 40), depths=(1, 1, 1, 1), mlp_ratios=(4, 4, 2, 2)),
}


@functools.lru_cache(maxsize=None)
def _variables(name: str):
    """The plain model's initial variables, shared by its rematted variants (remat changes no variable).
    Compiled like the trainer's init (op by op, the bigger models cost 2-3x compiling it)."""
    model = create_model(name, num_classes=5, **SMALL[name], drop_path_rate=0.0, **_execution(name, "cpu"))
    rng, images = jax.random.PRNGKey(0), _inputs()[0][:1]
    return jax.jit(model.init).lower(rng, images).compile(runtime.one_shot_compiler_options("cpu"))(rng, images)


def _grads(name, remat_blocks, images, labels, **overrides):
    model = create_model(name, num_classes=5, remat=remat_blocks, **SMALL[name], **overrides)
    variables = _variables(name)
    params, extra = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def loss(p):
        out = model.apply(
            {"params": p, **extra},
            images,
            train=True,
            rngs={"dropout": jax.random.PRNGKey(1)},
            mutable=list(extra) or False,
        )
        logits = out[0] if extra else out
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return jax.jit(jax.grad(loss))(params)


def _execution(name: str, backend: str) -> dict:
    """The execution fields ``name`` has, as resolved for one device of ``backend``, but always the grouped
    depthwise convolution: the shifted one compiles several times slower and has its own test (test_models)."""
    fields = dict(runtime.execution_settings(backend, 1, "glibc"), depthwise_impl="grouped")
    return {k: v for k, v in fields.items() if k in model_fields(name)}


@functools.lru_cache(maxsize=None)
def _plain_grads(name: str):
    """The plain model's gradients with the CPU's execution fields (shared by the cases of one model)."""
    return _grads(name, False, *_inputs(), drop_path_rate=0.0, **_execution(name, "cpu"))


def _inputs():
    return jnp.asarray(np.random.RandomState(0).rand(2, 32, 32, 3), jnp.float32), jnp.array([1, 3])


# one worker runs the cases of one model (its plain gradients are computed once for both of them); the models
# spread over the workers
@pytest.mark.parametrize(
    "name,backend",
    [
        pytest.param(name, backend, marks=pytest.mark.xdist_group(f"remat_{name}"))
        for name, backend in [(name, "cpu") for name in sorted(SMALL)]
        + [("clusterformer_nano", "gpu"), ("paca_tiny", "gpu")]
    ],
)
def test_remat_gives_the_gradients_of_the_plain_model(name, backend):
    """'gpu': the rematted model with the accelerator's execution fields (flax's nn.remat, whose static_argnums
    differ for ClusterFormer's and PaCa's blocks; one-pass clustering, unrolled EM, grouped depthwise
    convolutions), against the plain model with the CPU's."""
    plain = _plain_grads(name)
    rematted = _grads(name, True, *_inputs(), drop_path_rate=0.0, **_execution(name, backend))
    assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(rematted)
    # float32 rounding only (the recomputation is fused apart from the forward pass, and BatchNorm over the
    # 2x1x1 last-stage maps magnifies it): within 1e-5 of the largest gradient
    top = max(float(jnp.max(jnp.abs(a))) for a in jax.tree_util.tree_leaves(plain))
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(rematted)):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * top, (name, a.shape)


class _Dropout(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic):
        return nn.Dropout(0.5)(x, deterministic=deterministic)


class _TwoBlocks(nn.Module):
    impl: str

    @nn.compact
    def __call__(self, x):
        block = remat(_Dropout, (2,), self.impl)
        return block(name="b1")(block(name="b0")(x, False), False)


@pytest.mark.parametrize("impl", ["tied", "barrier"])
def test_the_recomputation_draws_the_forward_passs_dropout_masks(impl):
    x = jnp.asarray(np.random.RandomState(0).rand(4000) + 0.5, jnp.float32)
    out, vjp = jax.vjp(lambda x: _TwoBlocks(impl).apply({}, x, rngs={"dropout": jax.random.PRNGKey(2)}), x)
    (grad_x,) = vjp(jnp.ones_like(out))
    # out = x * m0 * m1 * 4 with both masks drawn in the forward pass; the backward recomputes both blocks
    kept = out != 0
    assert 0.15 < float(kept.mean()) < 0.35
    np.testing.assert_array_equal(grad_x, jnp.where(kept, 4.0, 0.0))


def _nano_grad_temps(images, remat_blocks: bool, remat_impl: str = "tied") -> int:
    model = create_model("clusterformer_nano", remat=remat_blocks, remat_impl=remat_impl)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images[:1])["params"]  # the sizes need no values
    loss = lambda p: jnp.sum(model.apply({"params": p}, images))  # noqa: E731
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes


def test_tied_remat_shrinks_the_train_steps_temporaries_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU path (recomputation tied to the cotangent)")
    images = jnp.zeros((2, 32, 32, 3), jnp.float32)  # plain 2.9 MiB; tied 0.37x, barrier 0.99x of it
    plain = _nano_grad_temps(images, False)
    assert _nano_grad_temps(images, True, "tied") < 0.75 * plain
    # why the tie: nn.remat alone saves nothing here, its recomputation merged back into the forward pass
    assert _nano_grad_temps(images, True, "barrier") > 0.9 * plain
