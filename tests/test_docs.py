"""The docs: a spec reference that cannot fall behind the parser, a site that builds strictly, a short README."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from parity.errors import SpecError
from parity.spec import SpecField, library_names, load_spec, spec_fields

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "docs" / "gen_spec_reference.py"


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    """docs/gen_spec_reference.py, imported as mkdocs imports a hook: from its file."""
    spec = importlib.util.spec_from_file_location("gen_spec_reference", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sections(markdown: str) -> dict[str, str]:
    """Heading of each ``## `` section -> its text."""
    parts = re.split(r"^## (.+)$", markdown, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def _documented(markdown: str, table: str, field: str) -> bool:
    heading = "Top level" if table == "" else f"`[{table}]`"
    return any(heading in title and re.search(rf"^\| `{re.escape(field)}` \|", text, flags=re.MULTILINE)
               for title, text in _sections(markdown).items())


def test_every_field_the_parser_accepts_is_in_the_generated_reference(generator):
    markdown = generator.render()
    for library in library_names():
        fields = spec_fields(library)
        # Tables whose fields are read in code of their own, not only through a shared helper.
        assert {"", "backbone", "preprocess", "head", "runtime", "decisions", "candidate", "candidates.NAME",
                "reference", "matrix"} <= set(fields)
        assert {f"tolerance.{stage}" for stage in ("pixels", "embedding", "head", "outputs")} <= set(fields)
        missing = [f"{table}.{name}" for table, names in fields.items() for name in names
                   if not _documented(markdown, table, name)]
        assert not missing, missing
    # Vocabulary from the parser reaches the page: each library's extraction points, the matrix axes' values.
    assert "transformers: `\"pooler_output\"`" in markdown and "`\"autocast_bfloat16\"`" in markdown


@pytest.mark.parametrize("table", ["backbone", "preprocess", "head", "runtime", "decisions", "candidate",
                                   "reference", "tolerance.embedding"])
def test_spec_fields_are_the_fields_the_parser_names_when_it_refuses_one(tmp_path, table):
    """An independent reading of the parser: its own list of accepted fields in an unknown-field error."""
    tables = {"backbone": 'model = "m"', "head": 'class = "h:H"\nweights = "w.pth"'}
    tables[table] = tables.get(table, "") + "\nnot_a_field = 1"
    (tmp_path / "spec.toml").write_text("".join(f"[{name}]\n{body}\n" for name, body in tables.items()))
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "spec.toml")
    listed = str(info.value).rpartition(": ")[2].split(", ")
    assert sorted(listed) == sorted(spec_fields()[table])


def test_a_field_without_a_description_stops_the_build(generator, monkeypatch):
    real = generator.spec_fields

    def with_a_new_field(library: str = "timm") -> dict[str, dict[str, SpecField]]:
        fields = real(library)
        fields["runtime"]["warmup_batches"] = SpecField("warmup_batches", ("integer",), default=0)
        return fields

    monkeypatch.setattr(generator, "spec_fields", with_a_new_field)
    with pytest.raises(generator.UndocumentedFields, match=r"runtime\.warmup_batches"):
        generator.render()
    monkeypatch.undo()
    monkeypatch.delitem(generator.FIELDS, "head.input_biases_order")
    with pytest.raises(generator.UndocumentedFields, match=r"head\.input_biases_order"):
        generator.render()


def test_the_site_builds_strictly(tmp_path):
    """Broken links, anchors, pages left out of the nav, an undocumented spec field: each fails the build."""
    missing = [name for name in ("mkdocs", "material") if importlib.util.find_spec(name) is None]
    if missing and not os.environ.get("PARITY_REQUIRE_EXTRAS"):
        pytest.skip(f"{', '.join(missing)} not installed (pip install -e '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    site = tmp_path / "site"
    in_tree = (ROOT / "site").exists()  # `make docs` builds there; this build must not
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    reference = (site / "spec-reference" / "index.html").read_text(encoding="utf-8")
    assert "candidates.NAME" in reference and "ray_address" in reference
    assert 'class="mermaid"' in (site / "architecture" / "index.html").read_text(encoding="utf-8")
    assert (ROOT / "site").exists() == in_tree


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_is_short_starts_with_the_two_commands_and_links_to_pages_that_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = readme.splitlines()
    assert len(lines) <= 220
    first_block = readme.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
    assert readme.index("```sh") < readme.index("\n## ")
    assert [line.split()[:2] for line in first_block] == [["make", "parity"], ["make", "test"]]
    for target in re.findall(r"\]\((docs/[^)\s]+)\)", readme):
        path, _, anchor = target.partition("#")
        assert (ROOT / path).is_file(), target
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(encoding="utf-8"), flags=re.MULTILINE)
            assert anchor in {_slug(h) for h in headings}, target


# -- "Gate your service": every spec the candidates page shows is one the parser and the runners accept ----------

CANDIDATES_PAGE = ROOT / "docs" / "candidates.md"
# What a spec holds besides its candidates; the page's tables leave it out (they are pasted next to it).
REFERENCE_TABLES = {"backbone": {"model": "vit_base_patch16_clip_224"},
                    "head": {"class": "heads:Scorer", "weights": "head.pth"}}


def _toml_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```toml\n(.*?)^```$", markdown, flags=re.MULTILINE | re.DOTALL)


def _runner_refusal(candidate) -> str | None:
    """What the candidate's runner refuses before its first request, checked with the runner's own code."""
    from parity.runners import gradio, http, mlflow, oip

    try:
        if candidate.kind == "url":
            http.check_url(candidate.target)
            if candidate.format == "mlflow":
                mlflow.request_send(candidate.send)
            elif candidate.send not in (None, *http.SENDS):
                return f"send = {candidate.send!r}"
        elif candidate.kind == "oip":
            oip.model_url(candidate.target)
            if candidate.send not in (None, *oip.SENDS) or candidate.output_key or candidate.labels:
                return "send, output_key or labels"
        elif candidate.kind == "mlflow_model":
            mlflow.request_send(candidate.send)
        elif candidate.kind in ("gradio", "gradio_app"):
            if candidate.kind == "gradio":
                gradio.check_url(candidate.target)
            if candidate.send is not None or (candidate.kind == "gradio_app" and candidate.headers):
                return "send or headers"
        elif candidate.kind == "endpoint_handler" and candidate.send not in (None, "pil", "bytes"):
            return f"send = {candidate.send!r}"
    except SpecError as e:
        return str(e)
    return None


def test_every_spec_on_the_candidates_page_is_accepted(tmp_path):
    """Each ```toml block, with a [backbone] and [head] added, parses; its candidates pass their runner's checks;
    the "Gate your service" section shows every kind, and its commands name the tables it shows."""
    import tomllib

    from parity.spec import CANDIDATE_KINDS, parse_spec

    page = CANDIDATES_PAGE.read_text(encoding="utf-8")
    gate = _sections(page)["Gate your service"]
    shown: dict[str, str] = {}
    for i, block in enumerate(_toml_blocks(page)):
        document = tomllib.loads(block)
        folder = tmp_path / f"block{i}"
        folder.mkdir()
        tables = [document.get("candidate", {}), *document.get("candidates", {}).values()]
        for file in {t[k].rpartition(":")[0] for t in tables for k in ("python", "gradio_app") if k in t}:
            if file.endswith(".py"):  # a file target must exist to be imported; its code is not what is tested
                (folder / file).parent.mkdir(parents=True, exist_ok=True)
                (folder / file).write_text("")
        spec = parse_spec({**REFERENCE_TABLES, **document}, path=folder / "parity.toml")
        for candidate in (spec.candidate, *spec.candidates.values()):
            assert _runner_refusal(candidate) is None, (block, _runner_refusal(candidate))
        if block in gate:
            shown.update((name, c.kind) for name, c in spec.candidates.items())
    assert set(CANDIDATE_KINDS) <= set(shown.values()), set(CANDIDATE_KINDS) - set(shown.values())
    named = set(re.findall(r"--candidate ([A-Za-z0-9_][A-Za-z0-9_.-]*)(?![\w.:-])", gate)) - {"NAME"}
    assert named and named <= set(shown), named - set(shown)
    assert "mlflow" in gate and 'format = "mlflow"' in gate


# -- the architecture page: its diagram is the import-linter layers contract ---------------------------------------

def test_the_architecture_diagram_is_the_layers_contract():
    """Every module of the layers contract is a node, every arrow points down the contract's order and joins each
    layer to the next; the other contracts and the architecture tests the page names exist."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers"]
    rank = {name.strip(): i for i, layer in enumerate(layers) for name in layer.split("|")}
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    (diagram,) = re.findall(r"^```mermaid\n(.*?)^```$", page, flags=re.MULTILINE | re.DOTALL)
    nodes = set(re.findall(r"^\s*(\w+)\[", diagram, flags=re.MULTILINE))
    arrows = re.findall(r"^\s*(\w+) --> (\w+)\s*$", diagram, flags=re.MULTILINE)
    assert nodes == set(rank), nodes ^ set(rank)
    assert all(rank[a] < rank[b] for a, b in arrows), [(a, b) for a, b in arrows if rank[a] >= rank[b]]
    joined = {(rank[a], rank[b]) for a, b in arrows}
    assert all((i, i + 1) in joined for i in range(len(layers) - 1)), sorted(joined)
    for contract in contracts:
        if contract["type"] != "layers":
            assert contract["name"] in page, contract["name"]
    tests = (ROOT / "tests" / "test_architecture.py").read_text()
    named = set(re.findall(r"`(test_\w+)`", page))
    assert named and all(f"def {name}(" in tests for name in named), named
