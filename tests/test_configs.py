"""Every config file under configs/ and every argument it accepts, loaded the way ``--config=configs/X.py:arg``
loads it (ml_collections' config-file flag parser), equals its recorded value and field type in
tests/golden_configs.json; bad arguments are one-line ValueErrors.

The golden file stores, per ``FILE[:ARG]``, the fields that differ from ``configs/common.py``'s
``get_config()`` (``set``: path -> [type, value]; ``removed``: paths), and that base in full under ``""``.
After an intended config change, rewrite it with ``python tests/test_configs.py --write`` and say why in the
commit message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest
from absl import flags
from ml_collections import ConfigDict, config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden_configs.json")
# ml_collections loads a config file with SourceFileLoader.load_module(), deprecated since Python 3.10
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

_TABLE6 = {
    "a": ("baseline", "recurrent", "dispatch", "both"),
    "b": ("T1", "T2", "T3", "T4"),
    "c": ("cosine", "vanilla", "criss_cross", "kmeans", "recurrent"),
    "d": ("e16", "e24", "e32", "e40", "e48"),
    "e": ("none", "fc", "confidence", "fc_similarity", "eq6"),
    "f": ("free", "feature_embedding", "mixed_selection", "scene_adaptive", "encoder_centers"),
}
_COC = ("coc_tiny", "coc_tiny2", "coc_tiny_plain", "coc_small", "coc_medium", "coc_base_dim64", "coc_base_dim96")
_PACA = ("paca_tiny", "paca_small", "paca_base") + tuple(
    f"pacavit_{name}"
    for name in (
        "tiny_p2cconv_100_0",
        "small_p2cconv_100_0",
        "base_p2cconv_100_0",
        "small_p2cmlp_100_0",
        "small_p2cconv_2_0",
        "small_p2cconv_49_0",
        "small_p2cconv_49_100",
        "small_p2cconv_100_49",
        "small_p2cconv_100",
        "small_p2cconv_100_blockwise",
    )
)
_GMF = ("gmf_miny", "gmf_tiny", "gmf_small", "gmf_base", "gmf_large", "miny")


def cases() -> list[tuple[str, str | None]]:
    """(file under configs/, argument or None) for every config and argument."""
    out: list[tuple[str, str | None]] = [("common.py", None), ("quickstart.py", None)]
    for variant in ("tiny", "small"):
        out += [(f"clusterformer_{variant}_imagenet.py", arg) for arg in (None, "paper", "official")]
        out += [(f"clusterformer_{variant}_{task}.py", None) for task in ("ade20k", "coco_detection")]
        out += [(f"clusterformer_{variant}_{task}.py", None) for task in ("coco_instance", "coco_panoptic")]
    out.append(("paca_tiny_ade20k.py", None))
    out += [("coc_imagenet.py", arg) for arg in (None,) + _COC + tuple(f"{m},quickstart" for m in _COC)]
    out += [("paca_imagenet.py", arg) for arg in (None,) + _PACA + tuple(f"{m},quickstart" for m in _PACA)]
    out += [("gmf_imagenet.py", arg) for arg in (None,) + _GMF]
    for task in ("detection", "instance", "panoptic", "semantic"):
        out += [(f"shapes_{task}.py", arg) for arg in (None, "clusterformer", "paca", "coc")]
    for table, rows in _TABLE6.items():
        quick = () if table == "f" else tuple(f"{row},quickstart" for row in rows)
        out += [(f"ablations/table6{table}.py", arg) for arg in rows + quick]
    return out


def case_name(filename: str, arg: str | None) -> str:
    return filename if arg is None else f"{filename}:{arg}"


def load(filename: str, arg: str | None = None) -> ConfigDict:
    """The config ``--config=configs/FILENAME[:ARG]`` gives (before command-line overrides)."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True)
    values(["main", f"--config={case_name(os.path.join(REPO, 'configs', filename), arg)}"])
    return values.config


def flatten(config: ConfigDict, prefix: str = "") -> dict[str, list]:
    """path -> [field type, JSON value] of every leaf (tuples as lists, placeholders as None)."""
    out: dict[str, list] = {}
    for key in sorted(config.keys()):
        value, path = config[key], f"{prefix}{key}"
        if isinstance(value, ConfigDict):
            out.update(flatten(value, path + "."))
        else:
            kind = config.get_type(key)
            out[path] = [getattr(kind, "__name__", str(kind)), json.loads(json.dumps(value, default=list))]
    return out


def diff(base: dict[str, list], flat: dict[str, list]) -> dict[str, object]:
    return {
        "set": {k: v for k, v in flat.items() if base.get(k) != v},
        "removed": sorted(set(base) - set(flat)),
    }


def record() -> dict[str, object]:
    base = flatten(load("common.py"))
    golden: dict[str, object] = {"": base}
    for filename, arg in cases():
        golden[case_name(filename, arg)] = diff(base, flatten(load(filename, arg)))
    return golden


@pytest.fixture(scope="module")
def golden() -> dict[str, object]:
    with open(GOLDEN) as f:
        return json.load(f)


def test_golden_lists_every_case(golden):
    assert sorted(golden) == sorted([""] + [case_name(f, a) for f, a in cases()])


def test_every_config_file_is_covered():
    files = {f for f, _ in cases()}
    for folder in ("", "ablations"):
        for name in sorted(os.listdir(os.path.join(REPO, "configs", folder))):
            path = os.path.join(folder, name) if folder else name
            if not name.endswith(".py") or name == "__init__.py":
                continue
            with open(os.path.join(REPO, "configs", path)) as f:
                has_get_config = "\ndef get_config(" in f.read()
            assert has_get_config == (path in files), path


def _changes(want: dict[str, list], got: dict[str, list]) -> dict[str, tuple]:
    return {k: (want.get(k), got.get(k)) for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)}


def test_configs_equal_golden(golden):
    """A difference names the case and the changed fields (recorded -> now); an intended change: rewrite the
    golden file with ``python tests/test_configs.py --write`` and say why in the commit message."""
    base = flatten(load("common.py"))
    mismatches = [f"configs/common.py: {_changes(golden[''], base)}"] if base != golden[""] else []
    for filename, arg in cases():
        name = case_name(filename, arg)
        want, got = golden[name], diff(golden[""], flatten(load(filename, arg)))
        if got != want:
            removed = f" removed {want['removed']} -> {got['removed']}" if got["removed"] != want["removed"] else ""
            mismatches.append(f"{name}: {_changes(want['set'], got['set'])}{removed}")
    fix = "intended? python tests/test_configs.py --write, and say why in the commit message"
    assert not mismatches, f"{len(mismatches)} configs differ from tests/golden_configs.json ({fix}):\n" + "\n".join(
        mismatches[:20]
    )


def test_dense_sections_hold_every_field_the_tasks_read():
    """The tasks list their sections' fields and read them without fallbacks; configs/dense.py writes each
    value once (the decoder's and the losses' from their dataclasses)."""
    from clusterformer_jax.models.decoder import DecoderConfig
    from clusterformer_jax.tasks import detection, panoptic, semantic
    from configs import dense

    assert set(dense.semantic_config()) == set(semantic.FIELDS)
    required = set(detection._PREDICT_FIELDS + detection._TASK_FIELDS)
    assert required <= set(dense.detection_config()) <= required | set(detection._LOSS_FIELDS)
    required = set(panoptic._POST_FIELDS + panoptic._OTHER_FIELDS)
    assert required <= set(dense.panoptic_config()) <= required | set(panoptic._LOSS_FIELDS)
    assert set(dense.decoder_config()) == {f.name for f in dataclasses.fields(DecoderConfig)} - {"em_unroll"}


def test_a_section_without_a_field_is_a_one_line_error():
    from clusterformer_jax.errors import ConfigError
    from clusterformer_jax.tasks import registry

    info = {"num_classes": 6, "image_size": 16, "class_names": tuple("abcdef")}
    config = load("shapes_semantic.py")
    registry.create_task(config, info)
    config.unlock()
    del config.semantic.ce_weight
    with pytest.raises(ConfigError) as error:
        registry.create_task(config, info)
    assert str(error.value) == (
        "config.semantic lacks field 'ce_weight': build the config from configs/dense.py (semantic_config())"
    )


@pytest.mark.parametrize(
    "filename,arg",
    [
        ("clusterformer_tiny_imagenet.py", "papr"),
        ("coc_imagenet.py", "coc_huge"),
        ("coc_imagenet.py", "coc_tiny,quick"),
        ("paca_imagenet.py", "paca_tiny,quickstart,x"),
        ("gmf_imagenet.py", "gmf_huge"),
        ("shapes_detection.py", "vit"),
        ("ablations/table6c.py", "mean"),
        ("ablations/table6a.py", "both,imagenet"),
        ("ablations/table6f.py", "free,quickstart"),
    ],
)
def test_bad_argument_is_one_line_value_error(filename, arg):
    with pytest.raises(flags.IllegalFlagValueError) as info:
        load(filename, arg)
    last = str(info.value).strip().splitlines()[-1]
    assert last.startswith("ValueError: ") and "got" in last, last


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    sys.path.insert(0, REPO)
    lines = []
    for name, entry in sorted(record().items()):
        fields, removed = (entry, None) if name == "" else (entry["set"], entry["removed"])
        body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(fields.items()))
        if name:
            body = f' "removed": {json.dumps(removed)}, "set": {{\n{body}}}'
        lines.append(f" {json.dumps(name)}: {{\n{body}}}")
    with open(GOLDEN, "w") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
