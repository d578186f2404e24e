"""Golden files of the rendered seeds: what a guest reads is reviewed as text in
``golden/cloudinit/<case>/``.

Regenerate after an intended change with
``VIRTLET_UPDATE_GOLDEN=1 pytest tests/unit/test_cloudinit_golden.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.unit.test_cloudinit_cases import CASES
from virtlet.cloudinit import render

GOLDEN = Path(__file__).parent / "golden" / "cloudinit"
UPDATE = os.environ.get("VIRTLET_UPDATE_GOLDEN") == "1"


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    seed = render(CASES[case])
    case_dir = GOLDEN / case
    if UPDATE:
        shutil.rmtree(case_dir, ignore_errors=True)
        for rel, data in seed.files.items():
            (case_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (case_dir / rel).write_bytes(data)
        (case_dir / "LABEL").write_text(seed.volume_label + "\n")
    expected = sorted(str(p.relative_to(case_dir)) for p in case_dir.rglob("*") if p.is_file())
    assert sorted([*seed.files, "LABEL"]) == expected, f"file set of {case} changed"
    assert (case_dir / "LABEL").read_text() == seed.volume_label + "\n"
    for rel, data in seed.files.items():
        assert data.decode() == (case_dir / rel).read_text(), f"{case}/{rel} differs from the golden file"


@pytest.mark.parametrize("case", sorted(CASES))
def test_generated_files_parse(case: str) -> None:
    """Every generated file is valid YAML/JSON (a golden file could be wrong in a way a reviewer misses)."""
    for rel, data in render(CASES[case]).files.items():
        text = data.decode()
        if rel.endswith(".json"):
            assert isinstance(json.loads(text), dict)
        elif rel.endswith(("user-data", "user_data")) and not text.startswith("#cloud-config\n"):
            assert text.startswith("#!")
        else:
            assert isinstance(yaml.safe_load(text), dict | None)
