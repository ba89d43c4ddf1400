"""Window partitions and the released code's raw reshapes, for the clustering mixer.

Inside the mixer every (image, head, window) triple is a *group*; group tensors are ``(G, N, e)``: G groups,
N = n*n tokens (or K centers), e = head_dim channels, token-major ("proper" order).

The released PyTorch code (github.com/ClusterFormer/ClusterFormer) works in NCHW and moves between
channel-first ``(G, e, n, n)`` buffers and token-major ``(G, N, e)`` views with raw C-order reshapes instead
of transposes. ``partition='raw'`` reproduces those reshapes exactly (``scramble``, the raw window split), so
an imported checkpoint computes the original's numbers; ``partition='spatial'`` cuts true windows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def scramble(t: jax.Array) -> jax.Array:
    """Proper (G, L, e) -> the (G, L, e) view the released code gets by raw-reshaping (G, e, L)."""
    g, l, e = t.shape
    return jnp.swapaxes(t, 1, 2).reshape(g, l, e)


def unscramble(t: jax.Array) -> jax.Array:
    """Inverse of ``scramble``: raw (G, L, e) view -> proper (G, L, e)."""
    g, l, e = t.shape
    return jnp.swapaxes(t.reshape(g, e, l), 1, 2)


def flash_regroup(t: jax.Array, heads: int) -> jax.Array:
    """The flash commit raw-reshapes (G, L, e) to (G/h, L, h, e) and attends per (G/h, h) slice."""
    g, l, e = t.shape
    return t.reshape(g // heads, l, heads, e).transpose(0, 2, 1, 3).reshape(g, l, e)


def flash_ungroup(t: jax.Array, heads: int) -> jax.Array:
    """Inverse of ``flash_regroup``."""
    g, l, e = t.shape
    return t.reshape(g // heads, heads, l, e).transpose(0, 2, 1, 3).reshape(g, l, e)


def raw_chunks(x: jax.Array, heads: int, windows: int) -> jax.Array:
    """(B, H, W, heads*e) -> the released code's windows, channel-first: (B*heads*windows**2, e, N).

    Per (image, head) the channel-first (e, H, W) buffer is cut into ``windows**2`` contiguous chunks of
    e*N values (N = H*W / windows**2), each read as (e, N).
    """
    b, h, w, c = x.shape
    e = c // heads
    x = x.reshape(b, h, w, heads, e).transpose(0, 3, 4, 1, 2)  # (B, heads, e, H, W)
    return x.reshape(b * heads * windows * windows, e, h * w // (windows * windows))


def window_partition(x: jax.Array, heads: int, windows: int, partition: str) -> jax.Array:
    """(B, H, W, heads*e) -> (B*heads*windows**2, n, n, e) with n = H / windows.

    ``spatial`` cuts true n x n windows; ``raw`` reads the released code's chunks (``raw_chunks``).
    """
    b, h, w, c = x.shape
    e = c // heads
    n_h, n_w = h // windows, w // windows
    if partition == "spatial":
        x = x.reshape(b, windows, n_h, windows, n_w, heads, e)
        x = x.transpose(0, 5, 1, 3, 2, 4, 6)
        return x.reshape(b * heads * windows * windows, n_h, n_w, e)
    return raw_chunks(x, heads, windows).transpose(0, 2, 1).reshape(-1, n_h, n_w, e)


def window_merge(x: jax.Array, batch: int, heads: int, windows: int, partition: str) -> jax.Array:
    """Inverse of ``window_partition``: (B*heads*windows**2, n, n, e) -> (B, H, W, heads*e)."""
    _, n_h, n_w, e = x.shape
    h, w = n_h * windows, n_w * windows
    if partition == "spatial":
        x = x.reshape(batch, heads, windows, windows, n_h, n_w, e)
        x = x.transpose(0, 2, 4, 3, 5, 1, 6)
        return x.reshape(batch, h, w, heads * e)
    x = x.transpose(0, 3, 1, 2).reshape(batch, heads, e, h, w)
    return x.transpose(0, 3, 4, 1, 2).reshape(batch, h, w, heads * e)
