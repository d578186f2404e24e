"""The interceptor's diagnostics: the optional cProfile dump per call (VIRTLET_PROFILE_DIR) and a call log line
whose ids are formatted only when the line is written."""

from __future__ import annotations

import logging
import pstats
from pathlib import Path
from typing import Any

import pytest

from virtlet.cri import interceptor
from virtlet.cri.gen import api_pb2 as api


def _status(request: Any, context: Any) -> api.PodSandboxStatusResponse:
    return api.PodSandboxStatusResponse(status=api.PodSandboxStatus(id=request.pod_sandbox_id))


def test_profile_dir_gets_one_dump_per_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(interceptor.PROFILE_DIR_ENV, str(tmp_path))
    handler = interceptor._wrap_unary("/runtime.v1.RuntimeService/PodSandboxStatus", _status)
    resp = handler(api.PodSandboxStatusRequest(pod_sandbox_id="abc"), None)
    assert resp.status.id == "abc"
    dumps = list(tmp_path.glob("PodSandboxStatus-*.prof"))
    assert len(dumps) == 1
    assert any("_status" in fn for (_f, _l, fn) in pstats.Stats(str(dumps[0])).stats)  # type: ignore[attr-defined]


def test_no_profile_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(interceptor.PROFILE_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    handler = interceptor._wrap_unary("/runtime.v1.RuntimeService/PodSandboxStatus", _status)
    assert handler(api.PodSandboxStatusRequest(pod_sandbox_id="abc"), None).status.id == "abc"
    assert list(tmp_path.iterdir()) == []


def test_call_line_still_names_the_ids(caplog: pytest.LogCaptureFixture) -> None:
    handler = interceptor._wrap_unary("/runtime.v1.RuntimeService/StopPodSandbox",
                                      lambda r, c: api.StopPodSandboxResponse())
    with caplog.at_level(logging.INFO, logger="virtlet.cri"):
        handler(api.StopPodSandboxRequest(pod_sandbox_id="sb-1"), None)
    assert any("StopPodSandbox" in r.getMessage() and "sb-1" in r.getMessage() for r in caplog.records)
