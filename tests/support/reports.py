"""Reading rendered reports: a report as its JSON document, the plots in an HTML report, the cases of a junit file,
and the drift the report tests gate (bilinear for the example's bicubic) with the fix it must print."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from parity.report.console import document

DRIFT = {'interpolation = "bicubic"': 'interpolation = "bilinear"'}
FIX = 'set [preprocess].interpolation = "bicubic"'
# A reference an offline reader would have to fetch: a report must carry everything inline.
NETWORK = re.compile(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", re.I)


def plain_document(result: Any) -> dict:
    """``result``'s report document as `parity report` reads it back (through JSON)."""
    return json.loads(json.dumps(document(result)))


def html_plots(html: str) -> dict[tuple[str, str], str]:
    """(plot kind, subject) -> the figure's body, for every plot in an HTML report."""
    found = re.findall(r'<figure class="plot" data-plot="([a-z]+)" data-subject="([a-z]+)">(.*?)</figure>', html, re.S)
    return {(kind, subject): body for kind, subject, body in found}


def junit_cases(path: Path) -> dict[str, ET.Element]:
    """Test case name -> element, in the file's order, of a junit.xml's one test suite."""
    suite = ET.parse(path).getroot().find("testsuite")
    return {case.get("name"): case for case in suite.findall("testcase")}
