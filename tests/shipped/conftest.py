"""The photo tagger's reference, built once per session, and its deployments."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.shipped.deploy import CANDIDATES, deploy, serve, url_candidate, write_spec
from tests.shipped.reference import Reference, build_reference


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """Model files, images and the frozen fixture of the photo tagger."""
    return build_reference(tmp_path_factory.mktemp("photo_tags"))


# deployed(kind, replacements) -> a context manager giving the deployment's spec
Deployed = Callable[..., AbstractContextManager[Path]]


@pytest.fixture(scope="session")
def deployed(reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> Deployed:
    """``deployed(kind, replacements)``: a context giving the spec of a fresh deployment of ``kind``.

    For the service (``url``) the context also runs it on a free 127.0.0.1 port and stops it on exit.
    """

    @contextlib.contextmanager
    def open_deployment(kind: str, replacements: Mapping[str, str] | None = None) -> Iterator[Path]:
        folder = deploy(reference, tmp_path_factory.mktemp(kind) / "repo", kind, replacements)
        if kind != "url":
            yield write_spec(reference, folder, CANDIDATES[kind])
            return
        with serve(folder) as url:
            yield write_spec(reference, folder, url_candidate(url))

    return open_deployment
