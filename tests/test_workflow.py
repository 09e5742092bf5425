"""The release CI workflow names only nox sessions that exist, and runs the stages in order."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml
from conftest import ROOT


def _sessions() -> set[str]:
    """Every session nox lists (selected by default or not), parametrized ones by full name."""
    out = subprocess.run([sys.executable, "-m", "nox", "-l", "-f", str(ROOT / "noxfile.py")],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return {m.group(1) for m in re.finditer(r"^[*-] (\S+) ->", out, re.M)}


def test_workflow_uses_existing_sessions_only() -> None:
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    sessions = _sessions()
    used = []
    for job in wf["jobs"].values():
        for step in job["steps"]:
            for m in re.finditer(r'nox -s (?:"([^"]+)"|(\S+))', step.get("run", "")):
                name = m.group(1) or m.group(2)
                if "${{" in name:  # a matrix session: check every value of the matrix
                    for t in job["strategy"]["matrix"]["type"]:
                        used.append(name.replace("${{ matrix.type }}", t))
                else:
                    used.append(name)
    assert used and set(used) <= sessions, set(used) - sessions
    assert wf["jobs"]["gguf"]["needs"] == "convert" and wf["jobs"]["awq"]["needs"] == "convert"
    assert set(wf["jobs"]["gate-and-release"]["needs"]) == {"gguf", "awq"}
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as true
    assert "gpu_runner" in triggers["workflow_dispatch"]["inputs"] and "tags" in triggers["push"]
