"""Property tests: whatever a user (or an attacker) puts in a recipe or a bundle.json, edgetl answers with one of its
own typed errors (EdgetlError subclasses: one line, exit 2), never with a stray TypeError/KeyError/... traceback.

(a) recipe-like data through ``edgetl.config.parse_recipe`` (and as YAML text through ``load_recipe``, and through
    ``edgetl run --set`` overrides): arbitrary nested data and mutations of a valid recipe (dropped, renamed and
    re-typed keys).
(b) bundle.json content through ``edgetl.verify.bundle.load_bundle``: mutations of a real bundle from
    tests/bundle_factory.py (wrong types, missing keys, odd paths, absurd numbers) and arbitrary JSON.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgetl.cli.run_cmd import apply_overrides
from edgetl.config import load_recipe, parse_recipe
from edgetl.errors import EdgetlError

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID_RECIPE: dict[str, Any] = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())


def only_edgetl_errors(fn, *args: Any) -> Any:
    """Call ``fn``; success or an EdgetlError subclass is fine, anything else propagates (and fails the test)."""
    try:
        return fn(*args)
    except EdgetlError as exc:
        line = exc.one_line()
        assert line and "\n" not in line
        return None


# --- strategies --------------------------------------------------------------------------------------------------

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=16)
absurd_numbers = st.sampled_from(
    [0, -1, -(2**63), 2**64, 10**30, 1e308, -1e308, float("inf"), float("-inf"), float("nan"), 1e-300, 0.5, True, False]
)
leaves = st.none() | st.booleans() | st.integers() | st.floats() | text | absurd_numbers
values = st.recursive(leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(text, c, max_size=4), max_leaves=12)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into nested dicts and lists."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        out.append(prefix + (key,))
        out.extend(_paths(child, prefix + (key,)))
    return out


def _get(node: Any, path: tuple) -> Any:
    for key in path:
        node = node[key]
    return node


@st.composite
def mutated(draw, base: dict, replacement=values, new_keys=text, max_mutations: int = 3) -> dict:
    """``base`` with 1..max_mutations of: drop a key, rename a key (typo or arbitrary), replace a value."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, max_mutations))):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _get(doc, path[:-1]), path[-1]
        op = draw(st.sampled_from(["drop", "rename", "replace", "replace"]))
        if op == "drop":
            del parent[key]
        elif op == "rename" and isinstance(parent, dict):
            typo = (key[:-1] + key[-1] * 2) if isinstance(key, str) and key else "x"
            parent[draw(st.sampled_from([typo, key.upper() if isinstance(key, str) else "K"]) | new_keys)] = parent.pop(
                key
            )
        else:
            parent[key] = draw(replacement)
    return doc


# --- (a) recipes -------------------------------------------------------------------------------------------------


@SETTINGS
@given(st.one_of(values, st.dictionaries(st.sampled_from(sorted(VALID_RECIPE)) | text, values, max_size=5)))
def test_parse_recipe_arbitrary_data(raw):
    only_edgetl_errors(parse_recipe, raw, "recipe")


@SETTINGS
@given(mutated(VALID_RECIPE))
@example({**VALID_RECIPE, "finetune": {**VALID_RECIPE["finetune"], "image_size": float("nan")}})
@example({**VALID_RECIPE, "finetune": {**VALID_RECIPE["finetune"], "epochs": 10**30}})
@example({**VALID_RECIPE, "stages": "finetune"})
def test_parse_recipe_mutations(raw):
    only_edgetl_errors(parse_recipe, raw, "recipe")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("props")


@SMALL
@given(doc=mutated(VALID_RECIPE))
def test_load_recipe_yaml_of_mutations(scratch, doc):
    path = scratch / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    only_edgetl_errors(load_recipe, path)


@SMALL
@given(
    body=st.one_of(
        text,
        st.text(max_size=200),
        st.binary(max_size=200),
        st.sampled_from(
            [
                "!!python/object/apply:os.system ['echo pwned']\n",
                "a: &x [*x]\n",
                "finetune: !!binary aGVsbG8=\n",
                "finetune:\n  data: 2024-01-01\n",
                "? [a, b]\n: c\n",
                "finetune: {data: x}\nfinetune: {data: y}\n",
                "---\n---\n",
            ]
        ),
    )
)
def test_load_recipe_arbitrary_text(scratch, body):
    path = scratch / "text.yaml"
    if isinstance(body, bytes):
        path.write_bytes(body)
    else:
        path.write_text(body, encoding="utf-8")
    only_edgetl_errors(load_recipe, path)


@SMALL
@given(
    overrides=st.lists(
        st.one_of(
            text,
            st.builds(
                lambda k, v: f"{k}={v}",
                st.sampled_from(
                    [
                        "finetune.epochs",
                        "finetune",
                        "export.format",
                        "stages",
                        "finetune.augment.flip",
                        "x.y.z",
                        ".",
                        "finetune..epochs",
                        "name",
                    ]
                )
                | text,
                text | st.sampled_from(["[1, 2]", "{a: 1}", "null", "~", "'"]),
            ),
        ),
        max_size=3,
    )
)
def test_set_overrides(overrides):
    """``edgetl run --set KEY=VALUE``: applied to a valid recipe, then validated (what run_recipe does)."""

    def apply_and_parse():
        raw = apply_overrides(copy.deepcopy(VALID_RECIPE), overrides)
        return parse_recipe(raw, "recipe")

    only_edgetl_errors(apply_and_parse)


# --- (b) bundle.json ---------------------------------------------------------------------------------------------

ODD_PATHS = [
    "../x",
    "/etc/passwd",
    "a/../../b",
    "..",
    ".",
    "",
    "sample/../../x",
    "sample/../labels.txt",
    "inside_link",
    "sample",
    "C:\\windows\\x",
    "\\\\server\\share",
    "a\x00b",
    "~/x",
    "x" * 300,
    "sample/images.npy/..",
    "./labels.txt",
    "labels.txt/",
]
bundle_values = st.one_of(
    values, absurd_numbers, st.sampled_from(ODD_PATHS), st.lists(absurd_numbers, min_size=0, max_size=3)
)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    """A real honest bundle (onnx fp32, tflite fp32, tflite int8), nested so ``../x`` has something to find."""
    import bundle_factory

    root = tmp_path_factory.mktemp("bundle")
    (root / "outer").mkdir()
    (root / "outer" / "x").write_text("outside the bundle\n")
    bundle = bundle_factory.make_bundle(root / "outer" / "b")
    os.symlink(root / "outer" / "x", bundle / "inside_link")
    return bundle


@pytest.fixture(scope="module")
def valid_bundle_json(bundle_dir) -> dict:
    from edgetl.verify.bundle import load_bundle

    load_bundle(bundle_dir)  # the base document is valid
    return json.loads((bundle_dir / "bundle.json").read_text())


def _load_with(bundle_dir: Path, content: str | bytes) -> None:
    from edgetl.verify.bundle import load_bundle

    path = bundle_dir / "bundle.json"
    original = path.read_bytes()
    try:
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        only_edgetl_errors(load_bundle, bundle_dir)
    finally:
        path.write_bytes(original)


@st.composite
def odd_file_entries(draw, base: dict) -> dict:
    """Add or redirect file references to odd paths (files keys, artifact files, sample paths)."""
    doc = copy.deepcopy(base)
    where = draw(st.sampled_from(["files", "artifact", "sample"]))
    odd = draw(st.sampled_from(ODD_PATHS))
    if where == "files":
        doc["files"][odd] = draw(st.sampled_from(["0" * 64, next(iter(base["files"].values())), "nothex"]))
    elif where == "artifact":
        doc["artifacts"][draw(st.integers(0, len(doc["artifacts"]) - 1))]["file"] = odd
    else:
        doc["sample"][draw(st.sampled_from(["images", "labels", "reference_outputs"]))] = odd
    return doc


def test_bundle_mutations(bundle_dir, valid_bundle_json):
    @SETTINGS
    @given(mutated(valid_bundle_json, replacement=bundle_values, new_keys=text | st.sampled_from(ODD_PATHS)))
    def check(doc):
        _load_with(bundle_dir, json.dumps(doc))

    check()


def test_bundle_odd_paths(bundle_dir, valid_bundle_json):
    @SMALL
    @given(odd_file_entries(valid_bundle_json))
    def check(doc):
        _load_with(bundle_dir, json.dumps(doc))

    check()


def test_bundle_arbitrary_json(bundle_dir):
    @SMALL
    @given(
        st.one_of(
            values,
            st.dictionaries(
                st.sampled_from(["schema", "labels", "input", "artifacts", "files", "sample", "reference"]) | text,
                values,
                max_size=7,
            ),
        )
    )
    def check(doc):
        _load_with(bundle_dir, json.dumps(doc))

    check()


def test_bundle_arbitrary_bytes(bundle_dir):
    @SMALL
    @given(st.binary(max_size=300) | st.text(max_size=300))
    def check(content):
        _load_with(bundle_dir, content)

    check()


# Minimal, named edge cases (each found by the properties above or a probe of them): one edit of the honest bundle.
KNOWN_EDGE_CASES = {
    "height_inf": lambda d: d["input"].update(height=float("inf")),
    "height_nan": lambda d: d["input"].update(height=float("nan")),
    "height_1e300": lambda d: d["input"].update(height=1e300),
    "channels_text": lambda d: d["input"].update(channels="abc"),
    "channels_null": lambda d: d["input"].update(channels=None),
    "channels_list": lambda d: d["input"].update(channels=[]),
    "range_nan": lambda d: d["input"].update(range=[0, float("nan")]),
    "input_quant_zero_point_inf": lambda d: d["artifacts"][2].update(input_quant=[1.0, float("inf")]),
    "input_quant_zero_point_nan": lambda d: d["artifacts"][2].update(input_quant=[1.0, float("nan")]),
    "input_quant_scale_huge_int": lambda d: d["artifacts"][2].update(input_quant=[10**400, 0]),
    "files_key_name_too_long": lambda d: d["files"].update({"x" * 300: "0" * 64}),
    "artifact_file_name_too_long": lambda d: d["artifacts"][0].update(file="x" * 300),
    "sample_path_name_too_long": lambda d: d["sample"].update(images="x" * 300),
    "files_key_nul": lambda d: d["files"].update({"a\x00b": "0" * 64}),
    "files_key_parent": lambda d: d["files"].update({"../x": "0" * 64}),
    "files_key_absolute": lambda d: d["files"].update({"/etc/passwd": "0" * 64}),
    "files_key_symlink_out": lambda d: d["files"].update({"inside_link": "0" * 64}),
    "artifact_file_dotdot": lambda d: d["artifacts"][0].update(file="a/../../b"),
    "sample_count_list": lambda d: d["sample"].update(count=[60]),
    "reference_dict": lambda d: d.update(reference={}),
    "schema_huge_version": lambda d: d.update(schema="edgetl.bundle/" + "9" * 5000),
}


@pytest.mark.parametrize("edit", list(KNOWN_EDGE_CASES.values()), ids=list(KNOWN_EDGE_CASES))
def test_bundle_known_edge_cases(bundle_dir, valid_bundle_json, edit):
    """Every one of these documents is invalid: load_bundle must refuse it with one edgetl error line (a load that
    succeeds, e.g. a path that escapes the bundle accepted, fails the test)."""
    from edgetl.verify.bundle import load_bundle

    doc = copy.deepcopy(valid_bundle_json)
    edit(doc)
    path = bundle_dir / "bundle.json"
    original = path.read_bytes()
    try:
        path.write_text(json.dumps(doc))
        with pytest.raises(EdgetlError) as info:
            load_bundle(bundle_dir)
        line = info.value.one_line()
        assert line and "\n" not in line
    finally:
        path.write_bytes(original)
