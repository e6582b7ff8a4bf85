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
