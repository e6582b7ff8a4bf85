"""`parity init` on a repository written apart from the bundled examples: the spec it scaffolds passes the gate
once its TODOs are set, and nothing else is edited.

The repository (built in a temporary folder) is a small team's own: a head with BatchNorm and a site
embedding in ``mlcore/heads.py``, saved in a training checkpoint beside its hyperparameters; a timm CLIP
ViT-B/16 backbone at reduced width and depth, created in the app from constants (so that the model
name cannot be read from the code); metadata as CSV with its own field names, embeddings extracted
with timm's own API; a ``deploy/app.py`` with ``predict``, a root ``handler.py``, a FastAPI service and
a Gradio Blocks app.
"""

from __future__ import annotations

import csv
import re
import shlex
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from parity.cli import EXIT_DRIFT, EXIT_PASS, EXIT_USAGE, main
from parity.commands.init import init_spec
from parity.errors import SpecError
from parity.libraries import CallSite, guess_backbones
from parity.spec import load_spec

MODEL = "vit_base_patch16_clip_224.openai"
BACKBONE_KWARGS = {"embed_dim": 48, "depth": 2, "num_heads": 3}
SITES = (0, 2, 1, 1, 0, 2)

HEADS = '''
"""Scoring heads."""
import torch
from torch import nn


class SiteScorer(nn.Module):
    """Batch-normalised embedding and a learned site vector, then an MLP with BatchNorm."""

    def __init__(self, embedding_dim: int = 512, sites: int = 8, hidden: int = 32, outputs: int = 3,
                 dropout: float = 0.2):
        super().__init__()
        self.norm = nn.BatchNorm1d(embedding_dim)
        self.site = nn.Embedding(sites, 4)
        self.body = nn.Sequential(nn.Linear(embedding_dim + 4, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
                                  nn.Dropout(dropout), nn.Linear(hidden, outputs))

    def forward(self, embedding, input_biases):
        return self.body(torch.cat([self.norm(embedding), self.site(input_biases[:, 0])], dim=1))
'''

APP = '''
"""The service's model code."""
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

from mlcore.heads import SiteScorer

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "vit_base_patch16_clip_224.openai"
BACKBONE_KWARGS = dict(embed_dim=48, depth=2, num_heads=3)

backbone = timm.create_model(BACKBONE, pretrained=False, **BACKBONE_KWARGS)
backbone.load_state_dict(load_file(ROOT / "checkpoints" / "backbone.safetensors"), strict=True)
backbone.eval()
saved = torch.load(ROOT / "checkpoints" / "scorer_best.pt", map_location="cpu", weights_only=True)
head = SiteScorer(**saved["hparams"])
head.load_state_dict(saved["state_dict"], strict=True)
head.eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=backbone))


def scores(image, site):
    with torch.inference_mode():
        pixels = transform(image.convert("RGB")).unsqueeze(0)
        embedding = backbone.forward_head(backbone.forward_features(pixels), pre_logits=True)
        return head(embedding, torch.tensor([[int(s) for s in site]]))[0]


def predict(image, site):
    return scores(image, site).tolist()
'''

HANDLER = '''
from deploy.app import scores


class EndpointHandler:
    def __init__(self, path=""):
        self.path = path

    def __call__(self, data):
        site = data.get("parameters", {}).get("input_biases", [0])
        return scores(data["inputs"], site).tolist()
'''

SERVICE = '''
import io

from fastapi import FastAPI, File, UploadFile
from PIL import Image

from deploy.app import predict

api = FastAPI()


@api.post("/v1/score")
async def score(file: UploadFile = File(...)):
    return {"scores": predict(Image.open(io.BytesIO(await file.read())), [0])}
'''

SPACE = '''
import gradio as gr

from deploy.app import predict

with gr.Blocks() as demo:
    image = gr.Image(type="pil")
'''


def _images(folder: Path) -> list[str]:
    """Photos of several sizes and modes, drawn from a seeded generator."""
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True)
    names = []
    for i, (w, h) in enumerate([(320, 240), (200, 260), (224, 224), (300, 180), (260, 260), (240, 320)]):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], axis=-1)
        pixels = np.clip(base + rng.integers(-30, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        name = f"shot_{i}.jpg" if i % 2 else f"shot_{i}.png"
        image.save(folder / name, quality=90) if name.endswith(".jpg") else (
            image.convert("L") if i == 4 else image).save(folder / name)
        names.append(name)
    return names


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The team's repository, with training artifacts made by its own code paths (timm's API, not parity's)."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("scoring_repo")
    (root / "mlcore").mkdir()
    (root / "mlcore" / "__init__.py").write_text("")
    (root / "mlcore" / "heads.py").write_text(HEADS)
    (root / "deploy").mkdir()
    (root / "deploy" / "app.py").write_text(APP)
    (root / "deploy" / "service.py").write_text(SERVICE)
    (root / "deploy" / "space.py").write_text(SPACE)
    (root / "handler.py").write_text(HANDLER)
    (root / "checkpoints").mkdir()
    torch.manual_seed(11)
    backbone = timm.create_model(MODEL, pretrained=False, **BACKBONE_KWARGS).eval()
    save_file(backbone.state_dict(), root / "checkpoints" / "backbone.safetensors")
    sys.path.insert(0, str(root))
    try:
        from mlcore.heads import SiteScorer

        hparams = {"embedding_dim": 48, "sites": 3, "hidden": 16, "outputs": 3}
        head = SiteScorer(**hparams).train()
        for _ in range(4):  # moves BatchNorm's running statistics away from their initial values
            head(torch.randn(8, 48) * 2 + 0.5, torch.randint(0, 3, (8, 1)))
        torch.save({"state_dict": head.state_dict(), "hparams": hparams, "epoch": 7},
                   root / "checkpoints" / "scorer_best.pt")
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n.split(".")[0] == "mlcore"]:
            del sys.modules[name]
    names = _images(root / "data" / "images")
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=backbone))
    with torch.inference_mode():
        pixels = torch.stack([transform(Image.open(root / "data" / "images" / n).convert("RGB")) for n in names])
        embeddings = backbone.forward_head(backbone.forward_features(pixels), pre_logits=True).numpy()
    (root / "artifacts").mkdir()
    np.save(root / "artifacts" / "embeddings.npy", embeddings)
    with open(root / "data" / "meta.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "site", "quality", "split"])
        for i, (name, site) in enumerate(zip(names, SITES)):
            writer.writerow([f"images/{name}", site, round(0.1 * i, 2), "val" if i % 3 else "train"])
    return root


@pytest.fixture
def clean_modules():
    """The repository's packages are imported by check; another test's copies must not be found instead."""
    def forget():
        for name in [n for n in sys.modules if n.split(".")[0] in ("mlcore", "deploy")]:
            del sys.modules[name]

    forget()
    yield
    forget()


def _set_todo(text: str, key: str, value: str) -> str:
    """What a user does: replace the one TODO line of ``key`` with a value, nothing else."""
    pattern = re.compile(rf"^{re.escape(key)} = \"TODO: .*\"$", re.M)
    assert len(pattern.findall(text)) == 1, f"no single TODO line for {key}"
    return pattern.sub(f"{key} = {value}", text)


def _commands(output: str) -> list[list[str]]:
    return [shlex.split(line.strip())[1:] for line in output.splitlines()
            if line.strip().startswith(("parity freeze ", "parity check "))]


def _init(root: Path, *args: str) -> int:
    return main(["init", str(root), *args])


def _copy(repo: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(repo, tmp_path / "scoring_repo"))


def test_the_scaffolded_spec_passes_once_its_todos_are_set(repo, tmp_path, monkeypatch, capsys, clean_modules):
    root = _copy(repo, tmp_path)
    monkeypatch.chdir(root)
    assert _init(root) == EXIT_DRIFT  # written, with values left to set
    output = capsys.readouterr().out
    assert "3 value(s) to set" in output
    spec = root / "parity.toml"
    text = spec.read_text()

    # Every inferred value says where it came from; what the repository does not show is a TODO.
    values = [line for line in text.splitlines() if re.match(r"^[A-Za-z_][\w.]* = ", line)]
    todos = [line for line in values if " = \"TODO: " in line]
    assert [line.split(" = ")[0] for line in todos] == ["model", "kwargs.num_heads", "url"]
    assert all("  # " in line for line in values if line not in todos), [v for v in values if "  # " not in v]
    for expected in ('class = "mlcore.heads:SiteScorer"  # mlcore/heads.py:7: loads checkpoints/scorer_best.pt '
                     'with strict=True',
                     "kwargs.sites = 3  # checkpoints/scorer_best.pt['hparams']",
                     'state_dict_key = "state_dict"  # checkpoints/scorer_best.pt: the weights are nested',
                     "kwargs.embed_dim = 48  # checkpoints/backbone.safetensors: patch_embed.proj.weight is 48 wide",
                     'extract = "pre_logits"  # artifacts/embeddings.npy is 48 wide',
                     'python = "deploy/app.py:predict"  # deploy/app.py:32: def predict(image, site)',
                     'endpoint_handler = "handler.py"  # handler.py:5: class EndpointHandler',
                     'field = "file"  # deploy/service.py:13: the UploadFile parameter of the route',
                     'gradio_app = "deploy/space.py:demo"  # deploy/space.py:6: gradio.Blocks object'):
        assert expected in text, expected
    assert "vit_base_patch16_clip_224, vit_base_patch16_clip_quickgelu_224" in todos[0]
    assert "--map image=path --map input_biases=site" in output

    # The gate refuses the spec by the field's name until the TODOs are set.
    assert main(["check", "--spec", "parity.toml"]) == EXIT_USAGE
    assert "[backbone].model is still a TODO" in capsys.readouterr().err

    text = _set_todo(text, "model", f'"{MODEL}"')
    text = _set_todo(text, "kwargs.num_heads", "3")
    text = _set_todo(text, "url", '"http://127.0.0.1:8000/v1/score"')
    spec.write_text(text)
    freeze, check = _commands(output)
    assert freeze[0] == "freeze" and check == ["check", "--spec", "parity.toml"]
    assert main(freeze) == EXIT_PASS, capsys.readouterr()
    assert main(check) == EXIT_PASS, capsys.readouterr().out
    # The shipped code as the scaffold names it: the app's predict and the Inference Endpoints handler.
    for name in ("app", "handler"):
        assert main([*check, "--candidate", name]) == EXIT_PASS, capsys.readouterr().out


def test_refuses_to_overwrite_a_spec_without_force(repo, tmp_path, capsys, clean_modules):
    root = _copy(repo, tmp_path)
    (root / "parity.toml").write_text("# mine\n")
    assert _init(root, "--no-verify") == EXIT_USAGE
    assert "already exists; parity init does not overwrite a spec. Pass --force" in capsys.readouterr().err
    assert (root / "parity.toml").read_text() == "# mine\n"
    assert _init(root, "--no-verify", "--force") == EXIT_DRIFT
    text = (root / "parity.toml").read_text()
    assert 'class = "mlcore.heads:SiteScorer"' in text and "not verified" in text
    assert "mlcore" not in sys.modules  # --no-verify: the head's module was not imported


def test_a_repository_with_nothing_recognisable(tmp_path, monkeypatch, capsys):
    root = tmp_path / "notes"
    root.mkdir()
    (root / "README.md").write_text("experiments\n")
    (root / "serve.py").write_text('raise SystemExit("serve.py was run")\n\n\ndef predict(img):\n    return [0.0]\n')
    (root / "weights.pt").write_bytes(b"not a checkpoint")
    monkeypatch.chdir(root)
    assert _init(root) == EXIT_DRIFT
    output = capsys.readouterr().out
    assert "note: skipped weights.pt" in output  # sources are read, never run: serve.py did not exit parity
    assert "missing for freeze: metadata" in output and "EMBEDDINGS.npy" in output
    text = (root / "parity.toml").read_text()
    for key in ("library", "model", "checkpoint", "class", "weights"):
        assert re.search(rf'^{key} = "TODO: ', text, re.M), key
    assert 'python = "serve.py:predict"' in text
    with pytest.raises(SpecError, match=r"\[backbone\]\.library is still a TODO: .TODO: the backbone's library, one of timm"):
        load_spec(root / "parity.toml")


def test_bad_input_is_exit_2_with_what_to_change(tmp_path, capsys):
    assert _init(tmp_path / "absent") == EXIT_USAGE
    assert "is not a directory; pass the repository" in capsys.readouterr().err
    assert main(["init", str(tmp_path), "--out", str(tmp_path / "spec.txt")]) == EXIT_USAGE
    assert "a spec is a .toml file" in capsys.readouterr().err


def test_head_kwargs_fitted_to_shapes_and_backbone_from_a_literal_call(repo, tmp_path, clean_modules):
    """No stored hyperparameters, no call of the head class: its kwargs come from the tensor shapes,
    verified by a strict load; the backbone's name and kwargs from a literal ``timm.create_model`` call."""
    root = tmp_path / "lab"
    (root / "mlcore").mkdir(parents=True)
    (root / "mlcore" / "heads.py").write_text(HEADS)
    (root / "train.py").write_text(textwrap.dedent(f'''
        import timm
        model = timm.create_model("{MODEL}", pretrained=False, embed_dim=48, depth=2, num_heads=3)
    '''))
    (root / "backbone.safetensors").write_bytes((repo / "checkpoints" / "backbone.safetensors").read_bytes())
    sys.path.insert(0, str(root))
    try:
        from mlcore.heads import SiteScorer

        torch.save(SiteScorer(embedding_dim=40, sites=5, hidden=12, outputs=2).state_dict(), root / "head.pth")
    finally:
        sys.path.remove(str(root))
    for name in [n for n in sys.modules if n.split(".")[0] == "mlcore"]:
        del sys.modules[name]
    result = init_spec(root)
    assert result.todos == ()  # nothing to set: the spec loads as written
    text = result.text
    assert f'model = "{MODEL}"  # train.py:3: timm.create_model(' in text
    assert "kwargs.num_heads = 3  # train.py:3: timm.create_model(..., num_heads=3)" in text
    for key, value in (("embedding_dim", 40), ("sites", 5), ("hidden", 12), ("outputs", 2)):
        assert f"kwargs.{key} = {value}  # fitted to head.pth's tensor shapes" in text
    spec = load_spec(result.spec)
    assert spec.head.kwargs == {"embedding_dim": 40, "sites": 5, "hidden": 12, "outputs": 2}
    assert spec.backbone.kwargs == {"embed_dim": 48, "depth": 2, "num_heads": 3}


def test_todo_values_are_refused_by_name_wherever_they_are(tmp_path):
    from parity.spec import parse_spec

    spec = {"backbone": {"model": "m"}, "head": {"class": "a.b:C", "weights": "w.pth",
                                                 "kwargs": {"sizes": [3, "TODO: the second size"]}}}
    with pytest.raises(SpecError, match=r"\[head\]\.kwargs\.sizes\[1\] is still a TODO: 'TODO: the second size'"):
        parse_spec(spec, path=tmp_path / "s.toml")
    # A value that only contains the word is a value.
    parse_spec({**spec, "head": {**spec["head"], "kwargs": {"note": "a TODOlist"}}}, path=tmp_path / "s.toml")


def test_guess_backbones_from_the_tensors_alone():
    """A full-width ViT-B/16 CLIP: the width's own models fit; what tensors cannot show is a TODO."""
    import timm

    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=0)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    (guess,) = guess_backbones(shapes, [CallSite("other.create_model", ("vit_x",))], source="b.pth")
    assert guess.model is None and "vit_base_patch16_clip_224, vit_base_patch16_clip_quickgelu_224;" in guess.todos["model"]
    assert guess.kwargs == {"embed_dim": 768, "depth": 12, "num_classes": 0, "num_heads": 12}
    assert guess.origins["kwargs.num_classes"] == "b.pth: no head.* tensors (a model without a classifier)"
