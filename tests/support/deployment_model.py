"""A deployed model written apart from the bundled examples, for the deployment matrix's tests: a tiny
transformers CLIPVisionModel (random weights, its own image processor) and a grading head with a site
embedding, a BatchNorm1d and an MLP; the fixture frozen from it by `parity freeze`.

The head's weights are set per test to give it a known numerical weakness (`grade_head`), and the spec
names a head class (`GradeHead`, or `BatchCentredGradeHead`, the shipped bug of centring on the batch).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tests.support.paths import EXAMPLE_FIXTURES

EMBEDDING = 32
HIDDEN = 48
OUTPUTS = 4
SITES = 3
SCALE = 0.25
VISION = {"hidden_size": EMBEDDING, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8}


class GradeHead(nn.Module):
    """Embedding + site -> Linear -> BatchNorm1d -> GELU -> Linear: four grades, positive above 0."""

    def __init__(self, embedding_dim: int = EMBEDDING, hidden: int = HIDDEN, num_outputs: int = OUTPUTS,
                 sites: int = SITES) -> None:
        super().__init__()
        self.site = nn.Embedding(sites, hidden)
        self.fc1 = nn.Linear(embedding_dim, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, num_outputs)

    def hidden(self, embedding: torch.Tensor, input_biases: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc1(embedding) + self.site(input_biases[:, 0]))

    def forward(self, embedding: torch.Tensor, input_biases: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.hidden(embedding, input_biases)))


class BatchCentre(nn.Module):
    """Features minus the batch's mean feature: every output depends on its batch-mates."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


class BatchCentredGradeHead(GradeHead):
    """The shipped bug: the hidden features re-centred on the batch's mean after the norm (same weights)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.centre = BatchCentre()

    def forward(self, embedding: torch.Tensor, input_biases: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.centre(self.hidden(embedding, input_biases))))


def grade_head(embeddings: np.ndarray, sites: np.ndarray, *, weakness: str = "none") -> GradeHead:
    """A GradeHead whose BatchNorm statistics are those of ``embeddings``' hidden features (eval mode).

    ``weakness``: ``"float16"``: fc1's features are ~300x larger, so BatchNorm's running_var (~1e5) is beyond
    float16's range (65504) while every activation fits it; ``"int8"``: one hidden feature is an outlier
    (~1000, unused by fc2), so per-tensor int8 quantization of fc2's input rounds every other feature away.
    """
    torch.manual_seed(11)
    head = GradeHead()
    with torch.no_grad():
        if weakness == "float16":
            head.fc1.weight.mul_(300.0)
            head.fc1.bias.mul_(300.0)
            head.site.weight.mul_(300.0)
        head.train()
        head.norm.momentum = None  # a cumulative average: the statistics of exactly these features
        head.hidden(torch.as_tensor(embeddings), torch.as_tensor(sites))
        head.eval()
        if weakness == "int8":
            head.norm.bias[0] = 1000.0
            head.fc2.weight[:, 0] = 0.0
    return head


def _backbone(directory: Path, weakness: str = "none") -> None:
    """The backbone; ``weakness`` ``"int8"``: one hidden unit of the first layer's MLP is an outlier (~1000,
    unused by fc2), so per-tensor int8 quantization of fc2's input rounds every other unit away."""
    import transformers

    torch.manual_seed(3)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).eval()
    if weakness == "int8":
        modules = dict(model.named_modules())  # transformers nests the trunk in vision_model or not, by version
        mlp = next(m for n, m in modules.items() if n.endswith("encoder.layers.0.mlp"))
        norm = next(m for n, m in modules.items() if n.endswith("post_layernorm"))
        with torch.no_grad():
            mlp.fc1.weight[0] = 0.0
            mlp.fc1.bias[0] = 1000.0
            mlp.fc2.weight[:, 0] = 0.0
            norm.weight.mul_(SCALE)
    model.save_pretrained(directory)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                    ).save_pretrained(directory)


SPEC = """name = "grader"
fixtures = "{fixtures}"

[backbone]
library = "transformers"
model = "CLIPVisionModel"
checkpoint = "{backbone}"
extract = "pooler_output"

[preprocess]
library = "transformers"
processor = "slow"

[head]
class = "tests.support.deployment_model:{head_class}"
weights = "{weights}"

[decisions]
threshold = 0.0
{decisions}
[runtime]
device = "cpu"
dtype = "float32"
batch_size = 8
{extra}"""


def write_grader_spec(root: Path, *, head_class: str = "GradeHead", weights: Path | None = None,
                      fixtures: Path | None = None, decisions: str = "", extra: str = "",
                      name: str = "grader.toml") -> Path:
    """The deployment spec in ``root`` (backbone in ``root/backbone``, head weights ``root/head.pth`` by default)."""
    path = root / name
    path.write_text(SPEC.format(fixtures=fixtures or root / "fixture", backbone=root / "backbone",
                                head_class=head_class, weights=weights or root / "head.pth",
                                decisions=decisions, extra=extra))
    return path


def build_grader(root: Path, *, weakness: str = "none", decisions: str = "", extra: str = "",
                 backbone_weakness: str = "none") -> Path:
    """Backbone (with ``backbone_weakness``, `_backbone`), images, embeddings, a head with ``weakness`` and its
    fixture frozen by `parity freeze`: the spec."""
    from parity.commands.freeze import FieldMap, freeze
    from parity.model.batches import embed_images
    from parity.model.pipeline import build_pipeline
    from parity.spec import load_spec

    _backbone(root / "backbone", backbone_weakness)
    photos = root / "data" / "photos"
    photos.mkdir(parents=True)
    names = sorted(p.name for p in (EXAMPLE_FIXTURES / "images").iterdir() if p.suffix in (".png", ".jpg"))
    for name in names:
        shutil.copyfile(EXAMPLE_FIXTURES / "images" / name, photos / name)
    sites = np.arange(len(names))[:, None] % SITES
    torch.save(GradeHead().state_dict(), root / "head.pth")  # a placeholder to build the pipeline with
    pipeline = build_pipeline(load_spec(write_grader_spec(root)), fingerprints=False)
    embeddings = embed_images(pipeline, [photos / n for n in names])
    torch.save(grade_head(embeddings, sites, weakness=weakness).state_dict(), root / "head.pth")
    np.save(root / "clip.npy", embeddings)
    rows = [{"file": f"photos/{n}", "site": int(s)} for n, s in zip(names, sites[:, 0])]
    (root / "metadata.json").write_text(json.dumps(rows))
    spec = write_grader_spec(root, decisions=decisions, extra=extra)
    result = freeze(load_spec(spec), embeddings=root / "clip.npy", metadata=root / "metadata.json",
                    images=root / "data", out=root / "fixture", field_map=FieldMap("file", ("site",)))
    assert result.written, result
    return spec
