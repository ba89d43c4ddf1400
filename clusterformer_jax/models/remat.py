"""Block rematerialisation that saves memory on every backend, XLA CPU included.

``nn.remat`` (``jax.checkpoint``) keeps a block's inputs and recomputes the rest in the backward pass, and
stops XLA from merging the recomputation into the forward pass with an optimization barrier on those inputs.
XLA's CPU compiler removes optimization barriers before its common-subexpression pass, so there the
recomputed block is merged back, every intermediate stays alive and the step's temporaries do not shrink.

``tied_checkpoint`` instead recomputes the block from inputs tied to the output cotangent (``x + 0 * g``,
one element of g): the recomputation then differs from the forward for CSE and cannot run before the
backward pass reaches the block. Same values: ``x + 0 * g`` is ``x`` for finite g.
``remat(cls, static_argnums, impl)`` picks one: ``'barrier'`` (``nn.remat``) or ``'tied'``.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import lift
from flax.core.scope import Scope

from clusterformer_jax.errors import ModelConfigError


def _tie(tree: Any, anchor: jax.Array) -> Any:
    """Every floating-point leaf plus ``anchor`` (a zero that depends on the cotangent); other leaves as they are."""
    return jax.tree_util.tree_map(
        lambda a: a + anchor.astype(a.dtype) if jnp.issubdtype(jnp.result_type(a), jnp.inexact) else a, tree
    )


def tied_checkpoint(fn: Callable[..., Any], static_argnums: Sequence[int] = ()) -> Callable[..., Any]:
    """``fn`` whose backward pass keeps only the inputs and recomputes the rest from them, tied to the cotangent."""
    static_argnums = tuple(static_argnums)

    def wrapped(*args):
        static = {i: args[i] for i in static_argnums}
        dynamic = tuple(a for i, a in enumerate(args) if i not in static)

        def call(*dyn):
            it = iter(dyn)
            return fn(*(static[i] if i in static else next(it) for i in range(len(args))))

        @jax.custom_vjp
        def run(*dyn):
            return call(*dyn)

        def run_fwd(*dyn):
            return call(*dyn), dyn

        def run_bwd(dyn, cotangent):
            floats = [g for g in jax.tree_util.tree_leaves(cotangent) if jnp.issubdtype(g.dtype, jnp.inexact)]
            anchor = 0 * floats[0].reshape(-1)[0] if floats else jnp.zeros(())
            return jax.vjp(call, *_tie(dyn, anchor))[1](cotangent)

        run.defvjp(run_fwd, run_bwd)
        return run(*dynamic)

    return wrapped


def _set_counters(counters: dict, state: dict) -> None:
    """Sets a flax rng counter dict (nested) in place to ``state``; child scopes hold the inner dicts."""
    for key in [k for k in counters if k not in state]:
        del counters[key]
    for key, value in state.items():
        if isinstance(value, dict) and isinstance(counters.get(key), dict):
            _set_counters(counters[key], value)
        else:
            counters[key] = copy.deepcopy(value)


def _lift_tied_checkpoint(fn, variables=True, rngs=True, static_argnums=()):
    """``flax.core.lift.checkpoint`` with ``tied_checkpoint`` in place of ``jax.checkpoint``.

    jax.checkpoint traces the block once; here the forward and the backward's recomputation each trace it,
    and flax's rng counters (shared with the enclosing scopes) advance on every trace. Every trace after the
    first therefore starts from the counters the first one saw, so that dropout and stochastic depth draw
    the same masks in the recomputation, and puts the counters back afterwards.
    """

    def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):
        first = []  # the counters the first trace started from

        def rematted(variable_groups, rng_groups, *args):
            scopes = scope_fn(variable_groups, rng_groups)
            leaves = jax.tree_util.tree_leaves(scopes, is_leaf=lambda s: isinstance(s, Scope))
            counters = list({id(sc.rng_counters): sc.rng_counters for sc in leaves}.values())
            if not first:
                first.extend(copy.deepcopy(counters))
                return fn(scopes, *args), repack_fn(scopes)
            before = copy.deepcopy(counters)
            for dst, src in zip(counters, first):
                _set_counters(dst, src)
            out = fn(scopes, *args), repack_fn(scopes)
            for dst, src in zip(counters, before):
                _set_counters(dst, src)
            return out

        shifted = tuple(i + 2 for i in static_argnums)  # after variable_groups and rng_groups
        return tied_checkpoint(rematted, shifted)(variable_groups, rng_groups, *args)

    return lift.pack(inner, (variables,), (variables,), (rngs,), name="remat")


REMAT_IMPLS = ("barrier", "tied")
# What a rematerialised block keeps for its backward pass (``jax.checkpoint_policies``): 'nothing_saveable'
# only the block's inputs; 'dots_saveable' also every matmul result; 'dots_with_no_batch_dims_saveable' the
# results of the matmuls without batch dimensions (the projections and MLPs, not the per-group clustering).
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")


def remat(
    module_cls: type, static_argnums: Sequence[int] = (), impl: str = "barrier", policy: str = "nothing_saveable"
) -> type:
    """``module_cls`` rematerialised by ``nn.remat`` (``impl='barrier'``) or ``tied_checkpoint`` (``'tied'``),
    keeping what ``policy`` (one of ``REMAT_POLICIES``) saves.

    ``static_argnums`` count ``self`` as 0, as in ``nn.remat``; ``__call__`` takes positional arguments only.
    """
    if impl not in REMAT_IMPLS:
        raise ModelConfigError(f"model field remat_impl={impl!r} is not one of {REMAT_IMPLS}")
    if policy not in REMAT_POLICIES:
        raise ModelConfigError(f"model field remat_policy={policy!r} is not one of {REMAT_POLICIES}")
    if impl == "barrier":
        saveable = None if policy == "nothing_saveable" else getattr(jax.checkpoint_policies, policy)
        return nn.remat(module_cls, static_argnums=tuple(static_argnums), policy=saveable)
    if policy != "nothing_saveable":
        raise ModelConfigError(
            f"model field remat_policy={policy!r} needs remat_impl='barrier' (the 'tied' CPU form keeps only the "
            "block inputs)"
        )
    return nn.transforms.lift_transform(
        _lift_tied_checkpoint, module_cls, static_argnums=tuple(i - 1 for i in static_argnums)
    )
