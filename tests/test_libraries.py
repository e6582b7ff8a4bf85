"""The library registry is the only place that knows libraries: a fourth one, written here, gates end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from parity import libraries
from parity.cli import EXIT_DRIFT, EXIT_PASS, EXIT_USAGE, main
from parity.libraries import Library
from parity.preprocess import Preprocess
from parity.spec import LibraryVocabulary, load_spec
from tests.conftest import EXAMPLE_FIXTURES


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


class Toy(Library):
    """Its own create, extraction points and eval preprocessing; nothing else in parity is edited."""

    vocabulary = LibraryVocabulary(name="toy", extract_modes=("pooled", "projected"),
                                   preprocess_source="the toy library's fixed 32 px transform")
    points = {"pooled": "pooled feature", "projected": "projection"}

    def create(self, spec, *, meta: bool = False):
        with torch.device("meta") if meta else torch.device("cpu"):
            return ToyNet(**spec.backbone.kwargs)

    def trunk(self, model, pixels, mode):
        return model.features(pixels)

    def take(self, model, pooled, mode):
        return model.proj(pooled) if mode == "projected" else pooled

    def resolve_preprocess(self, spec, backbone):
        from torchvision import transforms

        size = 32
        transform = Preprocess((transforms.Resize(size), transforms.CenterCrop(size)), transforms.ToTensor(),
                               transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
                               channel_order=spec.preprocess.channel_order, value_scale=spec.preprocess.value_scale)
        return transform, {"library": self.name, "size": size, "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.fixture
def toy_library():
    libraries.register(Toy())
    yield
    libraries.unregister("toy")


def _toy_project(root: Path) -> Path:
    """Weights, a spec and a fixture captured from the spec's own pipeline, for the toy library."""
    from safetensors.torch import save_file

    from parity.pipeline import build_pipeline
    from parity.source import capture_pipeline
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
    assert "library = 'toy' is not accepted. Accepted values: timm, transformers, open_clip" in err


def test_the_toy_vocabulary_checks_its_own_extraction_points(toy_library, tmp_path):
    from parity.errors import SpecError

    spec_path = tmp_path / "spec.toml"
    spec_path.write_text('[backbone]\nlibrary = "toy"\nmodel = "toynet"\nextract = "pre_logits"\n\n'
                         '[head]\nclass = "m:C"\nweights = "w"\n')
    with pytest.raises(SpecError, match="extract = 'pre_logits' is not accepted. Accepted values: pooled, projected"):
        load_spec(spec_path)
