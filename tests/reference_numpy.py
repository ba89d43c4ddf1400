"""Plain NumPy transcriptions used as independent references by the model tests.

``official_clustering`` follows the released PyTorch ``Clustering.forward`` line by line (NCHW tensors,
raw C-order reshapes, PyTorch-layout weights) of ClusterFormer/ClusterFormer
``mmcls/models/backbones/cluster.py``. Nothing here imports the package under test.
"""

import numpy as np


def adaptive_avg_pool_nchw(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch AdaptiveAvgPool2d by its definition: bin i spans [floor(i*I/O), ceil((i+1)*I/O))."""
    *lead, h, w = x.shape
    out = np.zeros((*lead, out_h, out_w), np.float64)
    for i in range(out_h):
        r0, r1 = (i * h) // out_h, -((-(i + 1) * h) // out_h)
        for j in range(out_w):
            c0, c1 = (j * w) // out_w, -((-(j + 1) * w) // out_w)
            out[..., i, j] = x[..., r0:r1, c0:c1].mean(axis=(-1, -2))
    return out


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    ex = np.exp(x)
    return ex / ex.sum(axis=axis, keepdims=True)


def em_steps(centers, keys, values, w_c, b_c, num_iters, axis):
    """Eq. 3 on (G, K, e) centers, (G, N, e) keys/values: E-step softmax, M-step C = M V."""
    c = centers
    for _ in range(num_iters):
        q = c @ w_c + b_c if w_c is not None else c
        logits = q @ np.swapaxes(keys, 1, 2)
        if axis == "clusters":
            m = softmax(logits, axis=1)
        else:
            m = softmax(logits / np.sqrt(keys.shape[-1]), axis=2)
        c = m @ values
    return c


def _conv1x1(weight, bias, x):
    return np.einsum("oi,bihw->bohw", weight[:, :, 0, 0], x) + bias[None, :, None, None]


def _normalize(x, axis=-1):
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def official_clustering(x, sd, heads, head_dim, windows, center_hw=(10, 10), num_iters=3, variant="clusters"):
    """The released token mixer. x: (B, d, S, S). sd: torch-layout weights keyed as in the state_dict."""
    value = _conv1x1(sd["conv_v.weight"], sd["conv_v.bias"], x)
    feature = _conv1x1(sd["conv_f.weight"], sd["conv_f.bias"], x)
    x = _conv1x1(sd["conv1.weight"], sd["conv1.bias"], x)
    big_b, _, big_h, big_w = x.shape
    x = x.reshape(big_b * heads, head_dim, big_h, big_w)
    value = value.reshape(big_b * heads, head_dim, big_h, big_w)
    feature = feature.reshape(big_b * heads, head_dim, big_h, big_w)
    if windows > 1:
        n_h, n_w = big_h // windows, big_w // windows
        x = x.reshape(-1, head_dim, n_h, n_w)
        value = value.reshape(-1, head_dim, n_h, n_w)
        feature = feature.reshape(-1, head_dim, n_h, n_w)
    b, c, w, h = x.shape
    value = value.reshape(b, w * h, c)
    centers = adaptive_avg_pool_nchw(x, *center_hw)
    k = center_hw[0] * center_hw[1]
    centers_feature = adaptive_avg_pool_nchw(feature, *center_hw).reshape(b, k, c)
    feature = feature.reshape(b, w * h, c)

    if variant == "clusters":  # commit 0c384d2
        for _ in range(num_iters):
            cq = _conv1x1(sd["conv_c.weight"], sd["conv_c.bias"], centers).reshape(b, k, c)
            m = softmax(cq @ np.swapaxes(value, 1, 2), axis=-2)
            centers = (m @ feature).reshape(b, c, *center_hw)
    else:  # flash commit, in float64 instead of fp16
        cq = centers.reshape(b // heads, k, heads, c)
        vq = value.reshape(b // heads, w * h, heads, c)
        fq = feature.reshape(b // heads, w * h, heads, c)
        for _ in range(num_iters):
            logits = np.einsum("bkhc,bnhc->bhkn", cq, vq) / np.sqrt(c)
            cq = np.einsum("bhkn,bnhc->bkhc", softmax(logits, axis=-1), fq)
        centers = cq.reshape(b, c, *center_hw)

    cos = _normalize(np.swapaxes(centers.reshape(b, c, -1), 1, 2)) @ np.swapaxes(
        _normalize(np.swapaxes(x.reshape(b, c, -1), 1, 2)), 1, 2
    )
    sim = 1.0 / (1.0 + np.exp(-(sd["sim_beta"][0] + sd["sim_alpha"][0] * cos)))  # (b, K, N)
    idx = sim.argmax(axis=1)
    mask = np.zeros_like(sim)
    np.put_along_axis(mask, idx[:, None, :], 1.0, axis=1)
    sim = sim * mask
    out = ((feature[:, None, :, :] * sim[..., None]).sum(axis=2) + centers_feature) / (
        mask.sum(axis=-1, keepdims=True) + 1
    )
    out = (out[:, :, None, :] * sim[..., None]).sum(axis=1)
    out = out.reshape(b, c, w, h)
    if windows > 1:
        out = out.reshape(big_b * heads, c, big_h, big_w)
    out = out.reshape(big_b, heads * c, big_h, big_w)
    return _conv1x1(sd["conv2.weight"], sd["conv2.bias"], out)
