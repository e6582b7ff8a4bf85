"""load_spec: the example's values, and a named, actionable SpecError for every bad field."""

from __future__ import annotations

from pathlib import Path

import pytest

from parity.errors import ParityError, SpecError
from parity.results import Tolerance
from parity.spec import INTERPOLATIONS, Spec, default_tolerance, load_spec
from tests.support.paths import EXAMPLE_SPEC, ROOT

MINIMAL = """\
[backbone]
model = "vit_base_patch16_clip_224.openai"

[head]
class = "heads:Head"
weights = "weights/head.pth"
"""


def _spec(tmp_path: Path, extra: str = "", *, base: str = MINIMAL) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(base + extra)
    return path


def _error(path: Path) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return str(info.value)


def test_example_spec_values():
    spec = load_spec(EXAMPLE_SPEC)
    assert spec.path == EXAMPLE_SPEC
    assert spec.name == "clip_dnn"
    assert spec.fixtures == ROOT / "fixtures" / "clip_dnn"
    assert spec.backbone.model == "vit_large_patch14_clip_quickgelu_336.openai"
    assert spec.backbone.kwargs == {"embed_dim": 64, "depth": 2, "num_heads": 2}
    assert spec.backbone.checkpoint == ROOT / "fixtures" / "clip_dnn" / "backbone.safetensors"
    assert spec.backbone.extract == "pre_logits"
    pp = spec.preprocess
    assert (pp.input_size, pp.interpolation, pp.crop_pct, pp.crop_mode) == ((3, 336, 336), "bicubic", 1.0, "center")
    assert pp.mean == (0.48145466, 0.4578275, 0.40821073)
    assert pp.std == (0.26862954, 0.26130258, 0.27577711)
    assert spec.head.class_path == "reference.models:MultiLabelRegressionNN"
    assert spec.head.weights == ROOT / "fixtures" / "clip_dnn" / "dnnV1_model_best.pth"
    assert spec.head.kwargs["bias_cardinalities"] == [3, 4]
    assert (spec.runtime.device, spec.runtime.dtype, spec.runtime.batch_size) == ("cpu", "float32", 8)
    assert spec.tolerances == {}
    assert spec.matrix["interpolation"] == ("bicubic", "bilinear")


def test_paths_resolve_against_the_spec_folder_not_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "specs").mkdir()
    path = _spec(tmp_path / "specs", base='fixtures = "../data/fx"\n' + MINIMAL)
    monkeypatch.chdir(tmp_path / "specs")
    spec = load_spec("spec.toml")
    assert spec.path == path
    assert spec.head.weights == tmp_path / "specs" / "weights" / "head.pth"
    assert spec.fixtures == tmp_path / "data" / "fx"
    assert spec.name == "spec"  # defaults to the file's stem
    assert spec.backbone.checkpoint is None


def test_missing_file(tmp_path):
    message = _error(tmp_path / "nope.toml")
    assert message.startswith(f"spec file not found: {tmp_path / 'nope.toml'}")


def test_invalid_toml(tmp_path):
    path = _spec(tmp_path, "[runtime\n")
    assert _error(path).startswith(f"{path}: not valid TOML: ")


def test_misspelled_field_is_named_with_a_suggestion(tmp_path):
    path = _spec(tmp_path, '[preprocess]\ninterpolaton = "bicubic"\n')
    message = _error(path)
    assert message.startswith(f"{path}: unknown field [preprocess].interpolaton.")
    assert "'interpolation'?" in message  # the suggestion
    accepted = message.split("Accepted fields in [preprocess]: ")[1].split(", ")
    assert {"interpolation", "crop_pct", "crop_mode", "input_size", "mean", "std"} <= set(accepted)


def test_unknown_section_is_named(tmp_path):
    assert "unknown field preprocss. Did you mean 'preprocess'?" in _error(_spec(tmp_path, "[preprocss]\n"))


def test_wrong_type_is_named_with_expected_and_got(tmp_path):
    path = _spec(tmp_path, '[preprocess]\ncrop_pct = "big"\n')
    message = _error(path)
    assert message.startswith(f"{path}: [preprocess].crop_pct ")
    assert "int or float" in message and "'big' (str)" in message


@pytest.mark.parametrize(("toml", "expected"), [
    ("[tolerance.embedding]\natol = -1e-5\n", "[tolerance].embedding.atol = -1e-05 is impossible; it must be >= 0"),
    ("[tolerance.embedding]\nmin_cosine = 1.5\n", "[tolerance].embedding.min_cosine = 1.5 is impossible"),
    ("[tolerance.embedding]\nrtol = nan\n", "[tolerance].embedding.rtol = nan is impossible"),
    ("[preprocess]\ncrop_pct = 0\n", "[preprocess].crop_pct = 0 is impossible; it must be >= 0.05 and <= 1"),
    ("[preprocess]\ncrop_pct = 1.5\n", "[preprocess].crop_pct = 1.5 is impossible; it must be >= 0.05 and <= 1"),
    ("[preprocess]\ncrop_pct = true\n", "[preprocess].crop_pct must be int or float, got True (bool)"),
    ("[preprocess]\ninput_size = [3, 224]\n", "[preprocess].input_size must be a positive int or [3, H, W]"),
    ("[preprocess]\nstd = [0.5, 0.0, 0.5]\n", "[preprocess].std must be positive"),
    ("[preprocess]\nmean = [0.5, 0.5]\n", "[preprocess].mean must be 3 finite numbers"),
    ("[runtime]\nbatch_size = 0\n", "[runtime].batch_size = 0 is impossible; it must be >= 1"),
    ("[runtime]\nbatch_size = true\n", "[runtime].batch_size must be int, got True (bool)"),
    ("[runtime]\ndtype = \"float8\"\n", "[runtime].dtype = 'float8' is not accepted."),
    ("[runtime]\ndevice = \"tpu\"\n", "[runtime].device = 'tpu' is not accepted."),
    ("[tolerance.embeding]\natol = 1e-3\n", "unknown field [tolerance].embeding. Did you mean 'embedding'?"),
])
def test_impossible_values_are_named(tmp_path, toml, expected):
    path = _spec(tmp_path, toml)
    message = _error(path)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_unknown_interpolation_lists_the_accepted_values(tmp_path):
    path = _spec(tmp_path, '[preprocess]\ninterpolation = "cubic"\n')
    message = _error(path)
    assert message.startswith(f"{path}: [preprocess].interpolation = 'cubic' ")
    assert message.rpartition(": ")[2].split(", ") == list(INTERPOLATIONS)


def test_head_class_needs_module_and_class(tmp_path):
    path = _spec(tmp_path, base=MINIMAL.replace("heads:Head", "heads.Head"))
    message = _error(path)
    assert message.startswith(f"{path}: [head].class ")
    assert "'package.module:ClassName'" in message and message.endswith("got 'heads.Head'")


def test_missing_required_field(tmp_path):
    path = _spec(tmp_path, base=MINIMAL.replace('weights = "weights/head.pth"\n', ""))
    assert _error(path) == f"{path}: missing required field [head].weights"


def test_spec_error_is_a_value_error(tmp_path):
    with pytest.raises(ValueError):
        load_spec(_spec(tmp_path, "[runtime]\nbatch_size = 0\n"))
    assert issubclass(SpecError, ParityError)


def test_replace_changes_only_the_named_field():
    spec = load_spec(EXAMPLE_SPEC)
    changed = spec.replace(preprocess={"interpolation": "bilinear"})
    assert isinstance(changed, Spec)
    assert changed.preprocess.interpolation == "bilinear"
    assert spec.preprocess.interpolation == "bicubic"
    assert changed.preprocess.crop_pct == spec.preprocess.crop_pct
    assert changed.preprocess.mean == spec.preprocess.mean
    assert (changed.backbone, changed.head, changed.runtime) == (spec.backbone, spec.head, spec.runtime)


@pytest.mark.parametrize(("stage", "dtype", "expected"), [
    ("embedding", "float32", Tolerance(1e-5, 1.3e-6, 0.99999, "default for float32")),
    ("outputs", "float32", Tolerance(1e-5, 1.3e-6, None, "default for float32")),
    ("embedding", "float64", Tolerance(1e-7, 1e-7, 0.999999, "default for float64")),
    ("head", "float16", Tolerance(1e-2, 1e-2, None, "default for float16")),
    ("embedding", "bfloat16", Tolerance(5e-2, 5e-2, 0.999, "default for bfloat16")),
    # Preprocessing runs in float32 whatever the model dtype.
    ("pixels", "bfloat16", Tolerance(1e-5, 1.3e-6, None, "default for bfloat16")),
])
def test_default_tolerance(stage, dtype, expected):
    assert default_tolerance(stage, dtype) == expected


def test_spec_tolerance_has_origin_spec_and_defaults_for_unset_fields(tmp_path):
    spec = load_spec(_spec(tmp_path, '[runtime]\ndtype = "bfloat16"\n\n[tolerance.embedding]\natol = 1e-3\n'))
    assert spec.tolerances == {"embedding": Tolerance(1e-3, 5e-2, 0.999, "spec")}


def test_input_biases_order_with_mixed_types_is_a_spec_error(tmp_path):
    path = _spec(tmp_path, 'input_biases_order = ["a", 1]\n')
    assert "[head].input_biases_order must be a permutation of 0..N-1" in _error(path)
