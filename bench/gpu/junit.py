"""The end-to-end phase's JUnit XML report, read back: each test's outcome and message."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def junit_outcomes(path: Path) -> list[dict[str, str]]:
    """Each test of a JUnit XML report: name, outcome and the message of a non-pass."""
    import xml.etree.ElementTree as ElementTree

    if not path.exists():
        return []
    outcomes = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        marks = [child for child in case if child.tag in ("failure", "error", "skipped")]
        outcome = marks[0].tag if marks else "passed"
        message = _failure_text(marks[0]) if marks else ""
        name = f"{case.attrib.get('classname', '')}::{case.attrib.get('name', '')}"
        outcomes.append({"test": name, "outcome": outcome, "message": message})
    return outcomes


def _failure_text(mark: Any) -> str:
    """The first line of a non-pass's message and, for a failure, its last lines."""
    lines = (mark.attrib.get("message", "") or "").splitlines()
    text = lines[0][:200] if lines else ""
    body = (mark.text or "").strip().splitlines()
    if mark.tag != "skipped" and body:
        text += " | " + " / ".join(line.strip() for line in body[-6:])[-600:]
    return text
