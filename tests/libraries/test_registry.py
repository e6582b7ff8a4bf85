"""The library registry is the only place that knows libraries: a fourth one, written here, gates end to end
and explains its preprocessing, and no module outside `parity.libraries` branches on a library's name."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from parity import libraries
from parity.cli import EXIT_DRIFT, EXIT_PASS, EXIT_USAGE, main
from parity.libraries import Library
from parity.preprocess.transform import Preprocess
from parity.preprocess.config import PreprocessConfig, derived_fields, require_same
from parity.spec import LibraryVocabulary, load_spec
from tests.support.paths import EXAMPLE_FIXTURES, ROOT


class ToyNet(nn.Module):
    """A backbone no other library builds: a strided conv, then a pooled feature and a projection."""

    def __init__(self, width: int = 8, out: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, kernel_size=4, stride=4)
        self.act = nn.SiLU()
        self.proj = nn.Linear(width, out, bias=False)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.act(self.stem(pixels)).mean(dim=(2, 3))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(pixels))


TOY_MEAN, TOY_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _toy_transform(size: int, *, channel_order: str = "rgb", value_scale: str = "unit") -> Preprocess:
    from torchvision import transforms

    return Preprocess((transforms.Resize(size), transforms.CenterCrop(size)), transforms.ToTensor(),
                      transforms.Normalize(TOY_MEAN, TOY_STD), channel_order=channel_order, value_scale=value_scale)


def _describe_toy(size: int, *, source: str, channel_order: str = "rgb", value_scale: str = "unit") -> PreprocessConfig:
    """What `_toy_transform` does, in the shared fields: torchvision Resize(int) and CenterCrop on PIL."""
    return PreprocessConfig(
        library="toy", source=source, resize="shortest_edge", resize_size=size, resize_rounding="truncate",
        crop_size=(size, size),
        **derived_fields("shortest_edge", size, (size, size), crop_rule="round_half_even", pad_rule="ceil",
                         fill=(0, 0, 0)),
        interpolation="bilinear", resize_backend="pil", antialias=True, rescale_factor=1 / 255,
        mean=TOY_MEAN, std=TOY_STD, convert_rgb="none", channel_order=channel_order, value_scale=value_scale)


class Toy(Library):
    """Its own create, extraction points, eval preprocessing and its description; nothing else in parity is edited."""

    vocabulary = LibraryVocabulary(name="toy", extract_modes=("pooled", "projected"),
                                   preprocess_source="the toy library's fixed 32 px transform")
    points = {"pooled": "pooled feature", "projected": "projection"}
    source_forms = {"toy": "toy:SIZE"}

    def create(self, spec, *, meta: bool = False):
        with torch.device("meta") if meta else torch.device("cpu"):
            return ToyNet(**spec.backbone.kwargs)

    def trunk(self, model, pixels, mode):
        return model.features(pixels)

    def take(self, model, pooled, mode):
        return model.proj(pooled) if mode == "projected" else pooled

    def resolve_preprocess(self, spec, backbone):
        size = 32
        transform = _toy_transform(size, channel_order=spec.preprocess.channel_order,
                                   value_scale=spec.preprocess.value_scale)
        return transform, {"library": self.name, "size": size, "mean": list(TOY_MEAN), "std": list(TOY_STD)}

    def describe_preprocess(self, record, *, source):
        return _describe_toy(record["size"], source=source, channel_order=record.get("channel_order", "rgb"),
                             value_scale=record.get("value_scale", "unit"))

    def describe_source(self, prefix, rest, text):
        return _describe_toy(int(rest), source=text)

    def create_transform(self, config):
        size = config.crop_size[0] if config.crop_size else 0
        variant = dict(channel_order=config.channel_order, value_scale=config.value_scale)
        require_same(config, _describe_toy(size, source=config.source, **variant))
        return _toy_transform(size, **variant)


@pytest.fixture
def toy_library():
    libraries.register(Toy())
    yield
    libraries.unregister("toy")


def _toy_project(root: Path) -> Path:
    """Weights, a spec and a fixture captured from the spec's own pipeline, for the toy library."""
    from safetensors.torch import save_file

    from parity.model.pipeline import build_pipeline
    from parity.commands.capture import capture_pipeline
    from tests.support.heads import CustomDNN

    torch.manual_seed(0)
    save_file(ToyNet(width=8).state_dict(), str(root / "backbone.safetensors"))
    save_file(CustomDNN(input_dim=8, hidden_dim=16, num_outputs=3).state_dict(), str(root / "head.safetensors"))
    spec_path = root / "toy.toml"
    spec_path.write_text(
        'name = "toy"\nfixtures = "fixture"\n\n'
        '[backbone]\nlibrary = "toy"\nmodel = "toynet"\nkwargs = { width = 8 }\ncheckpoint = "backbone.safetensors"\n\n'
        '[head]\nclass = "tests.support.heads:CustomDNN"\nweights = "head.safetensors"\n'
        'kwargs = { input_dim = 8, hidden_dim = 16, num_outputs = 3 }\n'
    )
    images = sorted((EXAMPLE_FIXTURES / "images").glob("*.png"))[:4]
    capture_pipeline(build_pipeline(load_spec(spec_path)), images, root / "fixture", golden=[images[0].name])
    return spec_path


def test_a_registered_fourth_library_runs_parity_check_end_to_end(toy_library, tmp_path, capsys):
    spec_path = _toy_project(tmp_path)
    spec = load_spec(spec_path)
    assert (spec.backbone.library, spec.backbone.extract, spec.preprocess.library) == ("toy", "pooled", "toy")

    assert main(["check", "--spec", str(spec_path)]) == EXIT_PASS
    out = capsys.readouterr().out
    assert "PASS" in out

    # The library's other extraction point is a different embedding: the gate sees the drift.
    drifted = tmp_path / "drifted.toml"
    drifted.write_text(spec_path.read_text().replace('checkpoint = "backbone', 'extract = "projected"\ncheckpoint = "backbone'))
    assert main(["check", "--spec", str(drifted)]) == EXIT_DRIFT


def test_an_unregistered_library_is_refused_with_the_registered_names(tmp_path, capsys):
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text('[backbone]\nlibrary = "toy"\nmodel = "toynet"\n\n[head]\nclass = "m:C"\nweights = "w"\n')
    assert main(["check", "--spec", str(spec_path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "library = 'toy'" in err
    accepted = err.partition("Accepted values: ")[2].splitlines()[0]
    assert {"timm", "transformers", "open_clip"} <= set(accepted.replace(",", " ").split())


def test_the_toy_vocabulary_checks_its_own_extraction_points(toy_library, tmp_path):
    from parity.errors import SpecError

    spec_path = tmp_path / "spec.toml"
    spec_path.write_text('[backbone]\nlibrary = "toy"\nmodel = "toynet"\nextract = "pre_logits"\n\n'
                         '[head]\nclass = "m:C"\nweights = "w"\n')
    with pytest.raises(SpecError, match="extract = 'pre_logits' is not accepted. Accepted values: pooled, projected"):
        load_spec(spec_path)


def test_a_registered_fourth_library_explains_its_preprocessing(toy_library, tmp_path, capsys):
    """Its source prefix, spec, fixture record and transform all go through the registry."""
    spec_path = _toy_project(tmp_path)
    images = [str(p) for p in sorted((EXAMPLE_FIXTURES / "images").glob("*.png"))[:2]]
    # The spec's resolved preprocessing (describe_preprocess) and the source toy:32 (describe_source) agree,
    # and so do the fixture's recorded one and the source, measured on the fixture's images (create_transform).
    assert main(["explain-preprocess", str(spec_path), "toy:32"]) == EXIT_PASS
    report = tmp_path / "same.json"
    assert main(["explain-preprocess", str(tmp_path / "fixture"), "toy:32", "--json", str(report)]) == EXIT_PASS
    same = json.loads(report.read_text())
    assert len(same["images"]) == 4 and all(image["max_abs"] == 0 for image in same["images"])

    # Another size: both the fields and the measured pixels say so.
    report = tmp_path / "sizes.json"
    assert main(["explain-preprocess", "toy:32", "toy:40", "--images", *images, "--json", str(report)]) == EXIT_DRIFT
    sizes = json.loads(report.read_text())
    assert {d["field"] for d in sizes["differences"]} == {"resize_size", "crop_size"}
    assert [tuple(image["shapes"][1]) for image in sizes["images"]] == [(3, 40, 40)] * 2

    # Against a built-in library: each side is built by its own adapter.
    report = tmp_path / "timm.json"
    code = main(["explain-preprocess", "toy:224", "timm:vit_base_patch32_clip_quickgelu_224.openai",
                 "--images", images[0], "--json", str(report)])
    assert code == EXIT_DRIFT
    against_timm = json.loads(report.read_text())
    assert {"resize_size", "interpolation", "mean", "std"} <= {d["field"] for d in against_timm["differences"]}
    assert against_timm["images"][0]["shapes"] == [[3, 224, 224], [3, 224, 224]]
    assert against_timm["images"][0]["max_abs"] > 0

    # An edited description the toy cannot build is refused by the toy adapter itself.
    from parity.errors import SpecError

    edited = libraries.resolve_source("toy:32")
    with pytest.raises(SpecError, match="toy cannot reproduce this preprocessing: interpolation = 'bicubic'"):
        libraries.create_transform(dataclasses.replace(edited, interpolation="bicubic"))
    capsys.readouterr()
    assert main(["explain-preprocess", "tf:resnet", "toy:32"]) == EXIT_USAGE
    assert "toy:SIZE" in capsys.readouterr().err  # the registered form is offered


def test_an_unregistered_source_prefix_is_refused(capsys):
    assert main(["explain-preprocess", "toy:32", "timm:vit_base_patch32_clip_quickgelu_224.openai"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "unknown preprocessing source prefix 'toy'" in err and "toy:SIZE" not in err


# -- nothing outside the registry branches on a library's name -----------------------------------

# Every name a built-in library goes by: spec names, description names, explain-preprocess prefixes.
LIBRARY_WORDS = frozenset({"timm", "open_clip", "transformers", "hf", "hf-slow", "transformers-fast",
                           "transformers-slow"})
# (module, word, where): a use of the word that is not a library's name.
ALLOWED = {
    # the pip extra that provides an importable module: `transformers` and `open_clip` are module names
    ("parity/extras.py", "transformers", "dict key"),
    ("parity/extras.py", "open_clip", "dict key"),
}
_STRING_TESTS = ("startswith", "endswith", "removeprefix", "removesuffix")
_LOOKUPS = ("get", "pop", "setdefault")


def _words(node: ast.AST | None, words: frozenset[str]) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in words:
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [w for element in node.elts for w in _words(element, words)]
    return []


def library_name_uses(source: str, words: frozenset[str] = LIBRARY_WORDS) -> list[tuple[int, str, str]]:
    """(line, word, where) for each comparison, membership test, dict key, subscript, lookup key,
    string-prefix test or match pattern that uses one of ``words``: what a branch on a library's name
    looks like. Docstrings, messages and default values are not branches and are not reported."""
    found = []
    for node in ast.walk(ast.parse(source)):
        places: list[tuple[str, ast.AST | None]] = []
        if isinstance(node, ast.Compare):
            places = [("comparison", operand) for operand in (node.left, *node.comparators)]
        elif isinstance(node, ast.Dict):
            places = [("dict key", key) for key in node.keys]
        elif isinstance(node, ast.Subscript):
            places = [("subscript", node.slice)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in _STRING_TESTS:
                places = [(f".{node.func.attr}()", arg) for arg in node.args]
            elif node.func.attr in _LOOKUPS:
                places = [(f".{node.func.attr}() key", arg) for arg in node.args[:1]]
        elif isinstance(node, ast.MatchValue):
            places = [("match", node.value)]
        elif isinstance(node, ast.MatchMapping):
            places = [("match key", key) for key in node.keys]
        found += [(node.lineno, word, where) for where, place in places for word in _words(place, words)]
    return sorted(found)


def test_the_scan_finds_each_way_of_branching_on_a_name_and_nothing_else():
    branches = '''
if spec.backbone.library == "timm": pass
if config.library in ("transformers-fast", "transformers-slow"): pass
converters = {"open_clip": convert}
convert = converters["transformers"]
if text.startswith(("hf:", "hf-slow")): pass
mode = options.get("timm")
match library:
    case "open_clip": pass
'''
    assert [(line, word) for line, word, _ in library_name_uses(branches)] == [
        (2, "timm"), (3, "transformers-fast"), (3, "transformers-slow"), (4, "open_clip"), (5, "transformers"),
        (6, "hf-slow"), (7, "timm"), (9, "open_clip")]
    not_branches = '''
"""timm and open_clip both resize."""
def f(library="timm"):
    raise ValueError(f"{library} is not timm")
record.get("library", "timm")
'''
    assert library_name_uses(not_branches) == []


def test_no_module_outside_the_registry_branches_on_a_library_name():
    registered = frozenset(word for name in ("timm", "transformers", "open_clip")
                           for adapter in (libraries.get(name),)
                           for word in (adapter.name, *adapter.description_libraries, *adapter.source_forms))
    assert registered <= LIBRARY_WORDS  # the list above covers every name the built-in adapters use
    offenders = []
    for path in sorted((ROOT / "parity").rglob("*.py")):
        module = path.relative_to(ROOT).as_posix()
        if module.startswith("parity/libraries/"):
            continue
        offenders += [f"{module}:{line}: {word!r} as {where}"
                      for line, word, where in library_name_uses(path.read_text(), LIBRARY_WORDS)
                      if (module, word, where) not in ALLOWED]
    assert not offenders, "ask parity.libraries instead of naming a library:\n" + "\n".join(offenders)


def test_importing_parity_loads_no_backbone_library():
    """timm, transformers and open_clip load only when a spec or source uses them."""
    code = ("import importlib, pkgutil, sys, parity, parity.cli, parity.commands.check; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(parity.__path__, 'parity.')]; "
            "print(sorted(m for m in ('timm', 'transformers', 'open_clip') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True)
    assert run.stdout.strip() == "[]", run.stdout + run.stderr


def test_where_an_unset_preprocess_field_comes_from_is_the_adapters_word(toy_library):
    """Diagnosis shows an unset field's resolved value with these words (`parity.commands.diagnose._current_words`)."""
    from types import SimpleNamespace

    def spec(backbone: str):
        return SimpleNamespace(backbone=SimpleNamespace(library=backbone))

    timm_ = libraries.get("timm")
    assert timm_.unset_preprocess_origin(spec("timm")) == \
        "the model's pretrained_cfg (timm.data.resolve_model_data_config)"
    assert timm_.unset_preprocess_origin(spec("transformers")) == "timm's defaults"
    # Libraries whose recorded configuration does not hold [preprocess] fields by name resolve none.
    assert [libraries.get(name).unset_preprocess_origin(spec(name)) for name in ("transformers", "open_clip", "toy")] \
        == [None, None, None]
