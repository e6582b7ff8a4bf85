"""Cross-library parity: one set of CLIP weights served by open_clip, timm and transformers.

The reference is an open_clip pipeline (the training side); candidates load the same
OpenAI-layout checkpoint through timm's filter or parity's conversion to transformers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parity.commands.check import run_check
from parity.model.pipeline import build_pipeline
from parity.results import Status, Verdict
from parity.commands.capture import capture_pipeline
from parity.spec import load_spec
from tests.support.paths import CLASSIFIER_FIXTURES, EXAMPLE_FIXTURES

pytest.importorskip("open_clip")
pytest.importorskip("transformers")

# ViT-B/32 QuickGELU (openai) shrunk: width 64, 2 layers, head width 32 (2 heads), 224 px input.
OPEN_CLIP_KWARGS = ('{ embed_dim = 32, vision_cfg = { image_size = 224, layers = 2, width = 64, patch_size = 32, '
                    'head_width = 32 }, text_cfg = { context_length = 8, vocab_size = 64, width = 32, heads = 2, '
                    'layers = 1 } }')
TIMM_KWARGS = "{ embed_dim = 64, depth = 2, num_heads = 2, num_classes = 32 }"
HF_KWARGS = ('{ hidden_size = 64, intermediate_size = 256, num_hidden_layers = 2, num_attention_heads = 2, '
             'image_size = 224, patch_size = 32, hidden_act = "quick_gelu", projection_dim = 32 }')
# open_clip's eval transform for this model, written as timm data-config fields.
ALIGNED = ('interpolation = "bicubic"\ncrop_pct = 1.0\ninput_size = [3, 224, 224]\n'
           'mean = [0.48145466, 0.4578275, 0.40821073]\nstd = [0.26862954, 0.26130258, 0.27577711]\n')
# coins, rocket and text: the resized short side exceeds the crop by an odd number of pixels on the long side.
IMAGES = ("astronaut.png", "chelsea.png", "coffee.png", "coins.png", "rocket.jpg", "text.png")


def write(path: Path, backbone: str, *, preprocess: str = "", head_dim: int = 64) -> Path:
    root = path.parent
    path.write_text(f"""
name = "{path.stem}"
[backbone]
{backbone}
[preprocess]
{preprocess}
[head]
class = "reference.models:MLPClassifier"
weights = "{root / f'head{head_dim}.pth'}"
kwargs = {{ embedding_dim = {head_dim}, num_classes = 4, hidden_dims = [16], dropout = 0.0 }}
[decisions]
argmax = true
""")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """OpenAI-layout weights, heads, and a fixture frozen from the open_clip reference pipeline."""
    import open_clip
    from safetensors.torch import save_file

    from reference.models import MLPClassifier

    root = tmp_path_factory.mktemp("crosslib")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None, embed_dim=32,
                                   vision_cfg={"image_size": 224, "layers": 2, "width": 64, "patch_size": 32,
                                               "head_width": 32},
                                   text_cfg={"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1})
    with torch.no_grad():  # fan-in variance, so that embeddings depend on the image
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "positional" not in name:
                param.normal_(0.0, param[0].numel() ** -0.5)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(root / "clip.safetensors"))
    for dim in (64, 32):
        torch.save(MLPClassifier(dim, 4, hidden_dims=[16], dropout=0.0).state_dict(), root / f"head{dim}.pth")
    checkpoint = f'checkpoint = "{root / "clip.safetensors"}"'
    specs = {
        "open_clip": write(root / "open_clip.toml", f'library = "open_clip"\nmodel = "ViT-B-32-quickgelu"\n'
                                                   f'kwargs = {OPEN_CLIP_KWARGS}\n{checkpoint}\nextract = "pooled"'),
        "timm": write(root / "timm.toml", f'model = "vit_base_patch32_clip_quickgelu_224.openai"\nkwargs = {TIMM_KWARGS}\n'
                                          f'{checkpoint}\ncheckpoint_format = "open_clip"\nextract = "pre_logits"',
                      preprocess=ALIGNED),
        "timm_own": write(root / "timm_own.toml", f'model = "vit_base_patch32_clip_quickgelu_224.openai"\n'
                                                  f'kwargs = {TIMM_KWARGS}\n{checkpoint}\ncheckpoint_format = "open_clip"\n'
                                                  'extract = "pre_logits"'),
        "hf": write(root / "hf.toml", f'library = "transformers"\nmodel = "CLIPVisionModel"\nkwargs = {HF_KWARGS}\n'
                                      f'{checkpoint}\ncheckpoint_format = "open_clip"',
                    preprocess='library = "timm"\n' + ALIGNED),
        "hf_projection": write(root / "hf_proj.toml", f'library = "transformers"\n'
                                                      f'model = "CLIPVisionModelWithProjection"\nkwargs = {HF_KWARGS}\n'
                                                      f'{checkpoint}\ncheckpoint_format = "open_clip"\n'
                                                      'extract = "image_embeds"',
                               preprocess='library = "timm"\n' + ALIGNED, head_dim=32),
        "open_clip_projection": write(root / "open_clip_proj.toml",
                                      f'library = "open_clip"\nmodel = "ViT-B-32-quickgelu"\nkwargs = {OPEN_CLIP_KWARGS}\n'
                                      f'{checkpoint}\nextract = "encode_image"', head_dim=32),
    }
    images = [EXAMPLE_FIXTURES / "images" / name for name in IMAGES]
    fixtures = {}
    for name in ("open_clip", "open_clip_projection"):
        pipeline = build_pipeline(load_spec(specs[name]))
        fixtures[name] = capture_pipeline(pipeline, images, root / f"fixture_{name}", golden=IMAGES)
    return specs, fixtures


@pytest.mark.parametrize("candidate", ["timm", "hf"])
def test_aligned_preprocessing_reproduces_open_clip_embeddings(world, candidate):
    specs, fixtures = world
    report = run_check(load_spec(specs[candidate]), fixtures=fixtures["open_clip"])
    assert report.stage("pixels").status is Status.PASS
    embedding = report.stage("embedding")
    assert embedding.status is Status.PASS, embedding
    assert embedding.comparison.max_abs < 1e-5
    assert report.verdict is Verdict.PARITY, [(s.stage, s.status, s.headline) for s in report.stages]


def test_projection_embeddings_agree_across_libraries(world):
    specs, fixtures = world
    report = run_check(load_spec(specs["hf_projection"]), fixtures=fixtures["open_clip_projection"])
    assert report.stage("embedding").status is Status.PASS
    assert report.passed


def test_weights_of_another_library_are_not_compared_by_name(world):
    specs, fixtures = world
    weights = run_check(load_spec(specs["hf"]), fixtures=fixtures["open_clip"]).stage("weights")
    assert weights.status is Status.PASS  # the head's tensors are still compared
    not_compared = weights.headline.partition("backbone not compared: ")[2]
    assert "open_clip" in not_compared and "transformers" in not_compared and "embedding stage" in not_compared


def test_timm_own_preprocessing_is_named_as_the_drift(world):
    specs, fixtures = world
    report = run_check(load_spec(specs["timm_own"]), fixtures=fixtures["open_clip"])
    pixels = report.stage("pixels")
    assert pixels.status is Status.FAIL
    text = "\n".join(pixels.notes)
    (resize,) = [n for n in pixels.notes if n.startswith("resize_size: ")]
    assert resize.startswith("resize_size: 224 (reference) vs 248 (candidate)")
    assert "224x224" in resize and "timm crops tighter" in resize and "10.7%" in resize
    assert "crop_pct: 1 (reference) vs 0.9032 (candidate)" in text
    assert report.stage("embedding").comparison.min_cosine < 0.9999


def test_hf_processor_against_open_clip_shifts_odd_images_by_one_pixel(world):
    specs, fixtures = world
    text = load_spec(specs["hf"]).path.read_text()
    spec = specs["hf"].with_name("hf_processor.toml")
    spec.write_text(text.replace('library = "timm"\n' + ALIGNED,
                                 f'library = "transformers"\nconfig = "{write_processor_config(spec.parent)}"\n'
                                 'processor = "slow"\n'))
    pixels = run_check(load_spec(spec), fixtures=fixtures["open_clip"]).stage("pixels")
    assert pixels.status is Status.FAIL
    worst = {sample.name for sample in pixels.comparison.worst if sample.max_abs > 0}
    assert worst <= {"coins.png", "rocket.jpg", "text.png"} and worst
    assert any("crop_offset_rounding" in note for note in pixels.notes)


def write_processor_config(directory: Path) -> Path:
    from transformers import CLIPImageProcessor

    CLIPImageProcessor().save_pretrained(directory)
    return directory / "preprocessor_config.json"


@pytest.fixture(scope="module")
def hf_checkpoint(world, tmp_path_factory):
    """The same weights as a transformers CLIPVisionModelWithProjection state_dict file."""
    from safetensors.torch import save_file

    specs, _ = world
    backbone = build_pipeline(load_spec(specs["hf_projection"])).backbone
    path = tmp_path_factory.mktemp("hf_format") / "vision.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_transformers_weights_load_into_other_libraries(world, hf_checkpoint, library):
    specs, fixtures = world
    if library == "timm":
        backbone = (f'model = "vit_base_patch32_clip_quickgelu_224.openai"\nkwargs = {TIMM_KWARGS}\n'
                    f'checkpoint = "{hf_checkpoint}"\ncheckpoint_format = "transformers"\nextract = "forward"')
        preprocess = ALIGNED
    else:
        backbone = (f'library = "open_clip"\nmodel = "ViT-B-32-quickgelu"\nkwargs = {OPEN_CLIP_KWARGS}\n'
                    f'checkpoint = "{hf_checkpoint}"\ncheckpoint_format = "transformers"\nextract = "encode_image"')
        preprocess = ""
    spec = write(hf_checkpoint.parent / f"{library}_from_hf.toml", backbone, preprocess=preprocess, head_dim=32)
    # The heads live next to the open_clip fixture's specs.
    spec.write_text(spec.read_text().replace(str(hf_checkpoint.parent / "head32.pth"),
                                             str(specs["open_clip"].parent / "head32.pth")))
    report = run_check(load_spec(spec), fixtures=fixtures["open_clip_projection"])
    assert report.stage("embedding").status is Status.PASS
    assert report.passed, [(s.stage, s.status, s.headline) for s in report.stages]


def test_timm_preprocessing_for_another_library_needs_every_field(world):
    from parity.errors import SpecError

    specs, _ = world
    spec = load_spec(specs["hf"])
    with pytest.raises(SpecError, match=r"missing \[preprocess\].crop_pct, mean"):
        build_pipeline(spec.replace(preprocess={"crop_pct": None, "mean": None}))


def timm_serving_spec(tmp_path: Path) -> Path:
    """A spec that serves the bundled clip_mlp fixture (transformers weights and processor) with timm."""
    fixture = CLASSIFIER_FIXTURES
    spec = tmp_path / "timm_serving.toml"
    spec.write_text(f"""
[backbone]
model = "vit_base_patch32_clip_quickgelu_224.openai"
kwargs = {{ embed_dim = 64, depth = 2, num_heads = 2, num_classes = 0 }}
checkpoint = "{fixture / 'backbone' / 'model.safetensors'}"
checkpoint_format = "transformers"
extract = "pre_logits"
[preprocess]
{ALIGNED}
[head]
class = "reference.models:MLPClassifier"
weights = "{fixture / 'mlp_classifier.pth'}"
kwargs = {{ embedding_dim = 64, num_classes = 6, hidden_dims = [128], dropout = 0.1 }}
[decisions]
argmax = true
verification_threshold = 0.6418
""")
    return spec


def test_serving_the_transformers_classifier_with_timm_names_the_preprocessing_gap(tmp_path):
    fixture = CLASSIFIER_FIXTURES
    spec = timm_serving_spec(tmp_path)
    report = run_check(load_spec(spec), fixtures=fixture)
    assert report.stage("load").status is Status.PASS
    pixels = report.stage("pixels")
    assert pixels.status is Status.FAIL
    named = "\n".join(pixels.notes)
    assert "crop_offset_rounding: floor (reference) vs round_half_even (candidate)" in named
    assert "resize_backend: tensor (reference) vs pil (candidate)" in named
    advice = "\n".join(report.stage("embedding").notes)
    assert "[backbone].model" not in advice and "[backbone].kwargs" not in advice  # names of another library
    # The same weights: images whose crop is not shifted embed within a few 1e-3, and no decision flips.
    assert report.stage("embedding").comparison.min_cosine > 0.99
    assert report.verdict is Verdict.DRIFT_NO_FLIPS


def test_extraction_point_is_compared_across_libraries(world):
    specs, fixtures = world
    spec = load_spec(specs["timm"])
    report = run_check(spec.replace(backbone={"extract": "forward"}), fixtures=fixtures["open_clip"])
    assert report.stage("embedding").status is Status.FAIL
    (fix,) = [n for n in report.stage("embedding").notes if n.startswith("Fix: set [backbone].extract")]
    # The fix in the candidate library's terms, and the extraction points both sides return.
    assert fix.startswith('Fix: set [backbone].extract = "pre_logits" ')
    assert 'open_clip extract = "pooled"' in fix and '"forward" returns the projection' in fix
    clean = run_check(spec, fixtures=fixtures["open_clip"])
    assert not [d for d in clean.config_diffs if d.field.startswith("backbone.")
                and d.field != "backbone.library"]  # QuickGELU is QuickGELU in both; names of modules are not compared


def test_diagnose_explains_a_preprocessing_no_spec_field_reaches(tmp_path):
    from parity.commands.diagnose import diagnose

    result = diagnose(load_spec(timm_serving_spec(tmp_path)), fixtures=CLASSIFIER_FIXTURES, samples=2)
    assert result.drift and not result.confirmed
    assert result.notes[0] == "The preprocessing differs from the fixture's:"
    assert any("crop_offset_rounding: floor (reference) vs round_half_even (candidate)" in n for n in result.notes)
