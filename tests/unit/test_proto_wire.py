"""Wire compatibility of ``protos/runtime/v1/api.proto`` with an independent CRI reference.

The reference is the PyPI package ``container-runtime-interface-api`` (``cri_api.v1.api_pb2``, built by other
people from the upstream kubernetes/cri-api proto).  Every message (field names, numbers, types, labels, type
names of message/enum fields, oneofs, map entries), every enum value and every service method (input/output
types, streaming flags) of the reference must be identical in ours.  Ours may add what newer Kubernetes
versions added; those additions are pinned in ``KNOWN_ADDITIONS`` (and listed in docs/protos.md), so an
accidental extra field fails too.

Both modules register ``runtime.v1.*`` in protobuf's default descriptor pool, so they can never be imported
into one process: each side is dumped to JSON by a child process (this file run as a script) and compared.

How a broken proto fails (done once, in a scratch copy of the tree: ``VersionRequest.version`` changed from
1 to 2, ``tools/gen_protos.py`` run, this test run; nothing of it was kept)::

    E AssertionError: protos/runtime/v1/api.proto is not wire-compatible with cri_api.v1.api_pb2 (1 problems):
    E     message runtime.v1.VersionRequest field version: number: reference 1, ours 2
    FAILED tests/unit/test_proto_wire.py::test_every_reference_item_is_identical_in_ours

``test_checker_reports_a_changed_field_number`` repeats that experiment on the dumped data on every run, so
the checker itself cannot silently stop seeing such a change.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
OURS = "virtlet.cri.gen.api_pb2"
REFERENCE = "cri_api.v1.api_pb2"
REFERENCE_V1ALPHA2 = "cri_api.v1alpha2.api_pb2"

# What our proto has beyond the reference package (Kubernetes newer than the reference: 1.35+).
KNOWN_ADDITIONS = sorted([
    "field runtime.v1.AttachRequest.audit_request_id = 6",
    "field runtime.v1.ExecRequest.audit_request_id = 7",
    "field runtime.v1.ImageSpec.image_ref = 20",
    "field runtime.v1.RuntimeFeatures.user_namespaces_host_network = 2",
    "message runtime.v1.StreamContainerStatsRequest",
    "message runtime.v1.StreamContainerStatsResponse",
    "message runtime.v1.StreamContainersRequest",
    "message runtime.v1.StreamContainersResponse",
    "message runtime.v1.StreamImagesRequest",
    "message runtime.v1.StreamImagesResponse",
    "message runtime.v1.StreamPodSandboxMetricsRequest",
    "message runtime.v1.StreamPodSandboxMetricsResponse",
    "message runtime.v1.StreamPodSandboxStatsRequest",
    "message runtime.v1.StreamPodSandboxStatsResponse",
    "message runtime.v1.StreamPodSandboxesRequest",
    "message runtime.v1.StreamPodSandboxesResponse",
    "method runtime.v1.ImageService.StreamImages",
    "method runtime.v1.RuntimeService.StreamContainerStats",
    "method runtime.v1.RuntimeService.StreamContainers",
    "method runtime.v1.RuntimeService.StreamPodSandboxMetrics",
    "method runtime.v1.RuntimeService.StreamPodSandboxStats",
    "method runtime.v1.RuntimeService.StreamPodSandboxes",
])

Dump = dict[str, Any]


# ---------------------------------------------------------------- dumping (runs in a child process)

def dump_module(module: str) -> Dump:
    """The wire-relevant facts of one generated ``*_pb2`` module's file, keyed by full name."""
    import importlib

    from google.protobuf import descriptor_pb2

    fdp = descriptor_pb2.FileDescriptorProto()
    importlib.import_module(module).DESCRIPTOR.CopyToProto(fdp)
    ftype = descriptor_pb2.FieldDescriptorProto.Type.Name
    flabel = descriptor_pb2.FieldDescriptorProto.Label.Name
    out: Dump = {"package": fdp.package, "messages": {}, "enums": {}, "methods": {}}

    def enum(e: Any, prefix: str) -> None:
        out["enums"][f"{prefix}.{e.name}"] = {v.name: v.number for v in e.value}

    def message(m: Any, prefix: str) -> None:
        full = f"{prefix}.{m.name}"
        oneof = {f.name: m.oneof_decl[f.oneof_index].name for f in m.field if f.HasField("oneof_index")}
        out["messages"][full] = {
            "map_entry": m.options.map_entry,
            "oneofs": [o.name for o in m.oneof_decl],
            "fields": {f.name: {"number": f.number, "type": ftype(f.type), "label": flabel(f.label),
                                "type_name": f.type_name, "proto3_optional": f.proto3_optional,
                                "oneof": oneof.get(f.name)}
                       for f in m.field},
        }
        for e in m.enum_type:
            enum(e, full)
        for n in m.nested_type:
            message(n, full)

    for e in fdp.enum_type:
        enum(e, fdp.package)
    for m in fdp.message_type:
        message(m, fdp.package)
    for s in fdp.service:
        for md in s.method:
            out["methods"][f"{fdp.package}.{s.name}.{md.name}"] = {
                "input": md.input_type, "output": md.output_type,
                "client_streaming": md.client_streaming, "server_streaming": md.server_streaming}
    return out


def load(module: str) -> Dump:
    """Dump ``module`` in a fresh interpreter, so the two ``runtime.v1`` files never share a pool."""
    done = subprocess.run([sys.executable, __file__, module], capture_output=True, text=True, cwd=REPO,
                          timeout=60, check=False)
    if done.returncode != 0:
        hint = " (install the dev extras: pip install -e '.[dev]')" if module.startswith("cri_api") else ""
        pytest.fail(f"could not dump {module}{hint}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


# ---------------------------------------------------------------- comparing

def compare(ref: Dump, ours: Dump) -> tuple[list[str], list[str]]:
    """(problems, additions): every reference item must be identical in ours; ours may add items."""
    problems: list[str] = []
    additions: list[str] = []
    for name, want in ref["enums"].items():
        have = ours["enums"].get(name)
        if have is None:
            problems.append(f"enum {name} is missing")
            continue
        for value, number in want.items():
            if value not in have:
                problems.append(f"enum {name} value {value} (= {number}) is missing")
            elif have[value] != number:
                problems.append(f"enum {name} value {value}: number: reference {number}, ours {have[value]}")
        additions += [f"enum value {name}.{v} = {n}" for v, n in have.items() if v not in want]
    additions += [f"enum {name}" for name in ours["enums"] if name not in ref["enums"]]

    for name, want in ref["messages"].items():
        have = ours["messages"].get(name)
        if have is None:
            problems.append(f"message {name} is missing")
            continue
        for key in ("map_entry", "oneofs"):
            if want[key] != have[key]:
                problems.append(f"message {name}: {key}: reference {want[key]}, ours {have[key]}")
        for field, wf in want["fields"].items():
            hf = have["fields"].get(field)
            if hf is None:
                problems.append(f"message {name} field {field} (= {wf['number']}) is missing")
                continue
            problems += [f"message {name} field {field}: {key}: reference {wf[key]}, ours {hf[key]}"
                         for key in wf if wf[key] != hf[key]]
        additions += [f"field {name}.{f} = {hf['number']}" for f, hf in have["fields"].items()
                      if f not in want["fields"]]
    additions += [f"message {name}" for name in ours["messages"] if name not in ref["messages"]]

    for name, want in ref["methods"].items():
        have = ours["methods"].get(name)
        if have is None:
            problems.append(f"method {name} is missing")
            continue
        problems += [f"method {name}: {key}: reference {want[key]}, ours {have[key]}"
                     for key in want if want[key] != have[key]]
    additions += [f"method {name}" for name in ours["methods"] if name not in ref["methods"]]
    return problems, sorted(additions)


# ---------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def ours() -> Dump:
    return load(OURS)


@pytest.fixture(scope="module")
def reference() -> Dump:
    return load(REFERENCE)


def test_every_reference_item_is_identical_in_ours(reference: Dump, ours: Dump) -> None:
    problems, additions = compare(reference, ours)
    print(f"reference {REFERENCE}: {len(reference['messages'])} messages, {len(reference['enums'])} enums, "
          f"{len(reference['methods'])} methods, all identical in ours; our additions:")
    for item in additions:
        print(f"  + {item}")
    assert not problems, (f"protos/runtime/v1/api.proto is not wire-compatible with {REFERENCE} "
                          f"({len(problems)} problems):\n  " + "\n  ".join(problems))


def test_our_additions_are_the_known_ones(reference: Dump, ours: Dump) -> None:
    _, additions = compare(reference, ours)
    assert additions == KNOWN_ADDITIONS, (
        "our proto's additions over the reference changed; update KNOWN_ADDITIONS and docs/protos.md:\n"
        f"  new: {sorted(set(additions) - set(KNOWN_ADDITIONS))}\n"
        f"  gone: {sorted(set(KNOWN_ADDITIONS) - set(additions))}")


def test_the_brief_s_rpcs_are_present(ours: Dump) -> None:
    methods = ours["methods"]
    for name in ("RuntimeConfig", "GetContainerEvents", "ListMetricDescriptors", "ListPodSandboxMetrics",
                 "CheckpointContainer", "UpdatePodSandboxResources", "Attach", "Exec", "PortForward"):
        assert f"runtime.v1.RuntimeService.{name}" in methods
    assert methods["runtime.v1.RuntimeService.GetContainerEvents"]["server_streaming"] is True
    assert "container_filesystems" in ours["messages"]["runtime.v1.ImageFsInfoResponse"]["fields"]


def test_checker_reports_a_changed_field_number(reference: Dump, ours: Dump) -> None:
    broken = copy.deepcopy(ours)
    broken["messages"]["runtime.v1.VersionRequest"]["fields"]["version"]["number"] = 2
    problems, _ = compare(reference, broken)
    assert problems == ["message runtime.v1.VersionRequest field version: number: reference 1, ours 2"]


def test_checker_reports_a_changed_type_and_a_missing_method(reference: Dump, ours: Dump) -> None:
    broken = copy.deepcopy(ours)
    broken["messages"]["runtime.v1.ContainerStatus"]["fields"]["exit_code"]["type"] = "TYPE_INT64"
    del broken["methods"]["runtime.v1.ImageService.PullImage"]
    broken["methods"]["runtime.v1.RuntimeService.GetContainerEvents"]["server_streaming"] = False
    problems, _ = compare(reference, broken)
    assert sorted(problems) == [
        "message runtime.v1.ContainerStatus field exit_code: type: reference TYPE_INT32, ours TYPE_INT64",
        "method runtime.v1.ImageService.PullImage is missing",
        "method runtime.v1.RuntimeService.GetContainerEvents: server_streaming: reference True, ours False",
    ]


def _short(type_name: str) -> str:
    return type_name.rsplit(".", 1)[-1] if type_name else ""


def test_v1alpha2_methods_map_onto_wire_compatible_v1_methods(ours: Dump) -> None:
    """What makes the ``runtime.v1alpha2`` alias sound: every v1alpha2 RPC exists in v1 with messages whose
    shared field numbers carry the same wire types (checked transitively through nested messages)."""
    alpha = load(REFERENCE_V1ALPHA2)
    problems: list[str] = []
    seen: set[str] = set()

    def same_wire(alpha_msg: str, v1_msg: str) -> None:
        if (alpha_msg, v1_msg) in seen:
            return
        seen.add((alpha_msg, v1_msg))
        a, b = alpha["messages"][alpha_msg], ours["messages"][v1_msg]
        by_number = {f["number"]: (name, f) for name, f in b["fields"].items()}
        for name, fa in a["fields"].items():
            if fa["number"] not in by_number:
                continue  # dropped in v1: an old client's field is ignored, which is the compatible outcome
            v1_name, fb = by_number[fa["number"]]
            for key in ("type", "label"):
                if fa[key] != fb[key]:
                    problems.append(f"{alpha_msg}.{name} vs {v1_msg}.{v1_name}: {key} {fa[key]} != {fb[key]}")
            if fa["type"] == fb["type"] == "TYPE_MESSAGE":
                same_wire(fa["type_name"].lstrip("."), fb["type_name"].lstrip("."))

    for name, am in alpha["methods"].items():
        v1_name = name.replace("runtime.v1alpha2.", "runtime.v1.", 1)
        vm = ours["methods"].get(v1_name)
        if vm is None:
            problems.append(f"{name} has no v1 counterpart")
            continue
        for key in ("input", "output"):
            if _short(am[key]) != _short(vm[key]):
                problems.append(f"{name}: {key} {am[key]} vs {vm[key]}")
            else:
                same_wire(am[key].lstrip("."), vm[key].lstrip("."))
        for key in ("client_streaming", "server_streaming"):
            if am[key] != vm[key]:
                problems.append(f"{name}: {key}: v1alpha2 {am[key]}, v1 {vm[key]}")
    assert len(alpha["methods"]) == 29
    assert not problems, "\n".join(problems)


if __name__ == "__main__":
    print(json.dumps(dump_module(sys.argv[1]), sort_keys=True))
