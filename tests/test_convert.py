"""Released-checkpoint conversion: real key names and shapes in, identical state_dict out; the shared files API."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from clusterformer_jax import convert
from clusterformer_jax.convert import common
from clusterformer_jax.convert import mmcls_clusterformer as conv
from clusterformer_jax.models.registry import create_model


def released_state_dict(
    depths, dims=(96, 192, 384, 768), mlp=(8, 8, 4, 4), heads=(3, 6, 12, 24), e=32, classes=1000, seed=0
):
    """Key names and shapes of a released mmcls checkpoint (upstream ClusterFormer/ClusterFormer)."""
    rng = np.random.RandomState(seed)
    shapes = {"backbone.patch_embed.proj.weight": (dims[0], 5, 4, 4), "backbone.patch_embed.proj.bias": (dims[0],)}
    for i, (depth, d) in enumerate(zip(depths, dims)):
        inner, hidden = heads[i] * e, int(d * mlp[i])
        for j in range(depth):
            p = f"backbone.network.{2 * i}.{j}."
            for norm in ("norm1", "norm2"):
                shapes[p + norm + ".weight"] = shapes[p + norm + ".bias"] = (d,)
            for name in ("conv1", "conv_v", "conv_f"):
                shapes[p + f"token_mixer.{name}.weight"] = (inner, d, 1, 1)
                shapes[p + f"token_mixer.{name}.bias"] = (inner,)
            shapes[p + "token_mixer.conv_c.weight"] = (e, e, 1, 1)
            shapes[p + "token_mixer.conv_c.bias"] = (e,)
            shapes[p + "token_mixer.conv2.weight"] = (d, inner, 1, 1)
            shapes[p + "token_mixer.conv2.bias"] = (d,)
            shapes[p + "token_mixer.sim_alpha"] = shapes[p + "token_mixer.sim_beta"] = (1,)
            shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (hidden, d, 1, 1), (hidden,)
            shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (d, hidden, 1, 1), (d,)
            shapes[p + "layer_scale_1"] = shapes[p + "layer_scale_2"] = (d,)
        if i:
            shapes[f"backbone.network.{2 * i - 1}.proj.weight"] = (d, dims[i - 1], 3, 3)
            shapes[f"backbone.network.{2 * i - 1}.proj.bias"] = (d,)
        shapes[f"backbone.norm{2 * i}.weight"] = shapes[f"backbone.norm{2 * i}.bias"] = (d,)
    shapes["head.fc.weight"], shapes["head.fc.bias"] = (classes, sum(dims)), (classes,)
    return {k: rng.randn(*s).astype(np.float32) for k, s in shapes.items()}


def test_round_trip_tiny_official(tmp_path):
    sd = released_state_dict((2, 2, 6, 2))
    assert sum(v.size for v in sd.values()) == 31_633_696
    path = str(tmp_path / "cluster_tiny.safetensors")
    save_file(sd, path)
    params = conv.convert(path, "clusterformer_tiny_official")
    back = conv.flax_to_state_dict(params)
    assert sorted(back) == sorted(sd)
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key], err_msg=key)
    # Semantics of the layouts: a 3x3 conv tap and a 1x1 conv entry land where Flax reads them.
    w = sd["backbone.network.1.proj.weight"]
    assert params["backbone"]["downsample_1"]["kernel"][2, 0, 5, 7] == w[7, 5, 2, 0]
    w = sd["backbone.network.4.3.token_mixer.conv_v.weight"]
    assert params["backbone"]["stage_2_block_3"]["token_mixer"]["conv_v"]["kernel"][10, 20] == w[20, 10, 0, 0]
    assert params["backbone"]["stage_1_block_0"]["token_mixer"]["em"]["conv_c"]["bias"][3] == (
        sd["backbone.network.2.0.token_mixer.conv_c.bias"][3]
    )


def test_converted_params_run_and_cli_writes_loadable_file(tmp_path):
    sd = released_state_dict((1, 1, 1, 1), classes=10, seed=1)
    src, out = str(tmp_path / "small.safetensors"), str(tmp_path / "flax.safetensors")
    save_file(sd, src)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from clusterformer_jax.convert.mmcls_clusterformer import main;"
            f"sys.argv=['x','--checkpoint','{src}','--output','{out}','--model','clusterformer_tiny_official'];main()",
        ],
        capture_output=True,
        text=True,
    )
    # the tiny preset has depths (2,2,6,2): the CLI must refuse a (1,1,1,1) checkpoint in one line
    assert result.returncode != 0 and "lacks" in result.stderr.strip().splitlines()[-1]
    model = create_model("clusterformer_tiny_official", depths=(1, 1, 1, 1), num_classes=10)
    abstract = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 224, 224, 3))))
    params = conv.state_dict_to_flax(sd, abstract["params"])
    common.save_flax_params(params, out)
    reloaded = common.load_flax_params(out)
    logits = jax.jit(model.apply)({"params": reloaded}, jnp.ones((1, 224, 224, 3)))
    assert logits.shape == (1, 10) and bool(jnp.all(jnp.isfinite(logits)))


def test_shape_and_key_errors_name_the_key():
    model = create_model("clusterformer_tiny_official", depths=(1, 1, 1, 1))
    abstract = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 224, 224, 3))))
    sd = released_state_dict((1, 1, 1, 1))
    bad = dict(sd, **{"backbone.norm0.weight": np.zeros((97,), np.float32)})
    with pytest.raises(ValueError, match=r"'backbone.norm0.weight' has shape \(97,\)"):
        conv.state_dict_to_flax(bad, abstract["params"])
    with pytest.raises(ValueError, match="keys the model lacks, first 'backbone.extra'"):
        conv.state_dict_to_flax(dict(sd, **{"backbone.extra": np.zeros(1)}), abstract["params"])


def test_pth_checkpoint_when_torch_is_installed(tmp_path):
    torch = pytest.importorskip("torch")
    sd = released_state_dict((2, 2, 6, 2), seed=2)
    path = str(tmp_path / "epoch_300.pth")
    torch.save({"meta": {}, "state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
    back = conv.flax_to_state_dict(conv.convert(path, "clusterformer_tiny_official"))
    np.testing.assert_array_equal(back["head.fc.weight"], sd["head.fc.weight"])


def test_load_variables_reads_params_files_and_variables_files(tmp_path):
    """Converters write bare params or {'params', 'batch_stats'}; the trainer's one entry point reads both."""
    params = {"backbone": {"conv": {"kernel": np.ones((3, 3, 2, 4), np.float32)}}, "head": {"bias": np.zeros(4)}}
    stats = {"backbone": {"bn": {"mean": np.full((4,), 2.0, np.float32)}}}
    common.save_flax_params(params, str(tmp_path / "params.safetensors"))
    common.save_flax_params({"params": params, "batch_stats": stats}, str(tmp_path / "variables.safetensors"))
    bare = convert.load_variables(str(tmp_path / "params.safetensors"))
    full = convert.load_variables(str(tmp_path / "variables.safetensors"))
    assert set(bare) == {"params"} and set(full) == {"params", "batch_stats"}
    for loaded in (bare, full):
        np.testing.assert_array_equal(
            loaded["params"]["backbone"]["conv"]["kernel"], params["backbone"]["conv"]["kernel"]
        )
    np.testing.assert_array_equal(full["batch_stats"]["backbone"]["bn"]["mean"], stats["backbone"]["bn"]["mean"])


def test_converters_share_one_cli_runner_and_reader():
    """Every converter takes the file helpers and the command line from convert.common, not from a peer."""
    import importlib

    for name in ("mmcls_clusterformer", "groupmixformer", "timm_context_cluster", "paca_vit"):
        module = importlib.import_module(f"clusterformer_jax.convert.{name}")
        assert module.read_checkpoint is common.read_checkpoint
        assert module.run_converter_cli is common.run_converter_cli
