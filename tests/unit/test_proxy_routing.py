"""The CRI proxy's pure parts: id/image prefixes, sandbox routing, list narrowing, rewriting, config."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from virtlet import errors
from virtlet.cri.gen import api_pb2 as api
from virtlet.proxy import config, naming, rewrite
from virtlet.proxy.naming import PRIMARY
from virtlet.proxy.routing import TARGET_RUNTIME_ANNOTATION, Rules

V = "virtlet.cloud"
RULES = Rules(frozenset({V}), {"virtlet": V})


# -- naming -------------------------------------------------------------------------------------------------

S1, C1 = naming.external_id(V, "s1"), naming.external_id(V, "c1")


def test_ids_round_trip() -> None:
    shown = naming.external_id(V, "abc")
    assert len(shown) == 64 and int(shown, 16) >= 0 and shown == hashlib.sha256(b"virtlet.cloud/abc").hexdigest()
    assert naming.legacy_id(V, "abc") == "virtlet.cloud__abc"
    assert naming.external_id(PRIMARY, "abc") == "abc"
    assert naming.external_id(V, "") == ""
    assert naming.split_id("virtlet.cloud__abc", {V}) == (V, "abc")
    assert naming.split_id("0123abcd", {V}) == (PRIMARY, "0123abcd")
    assert naming.split_id("", {V}) == (PRIMARY, "")


@pytest.mark.parametrize("bad", ["other.runtime__abc", "virtlet.cloud__", "__abc"])
def test_unknown_id_prefix_is_refused(bad: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="prefix") as exc:
        naming.split_id(bad, {V}, "pod_sandbox_id")
    assert "pod_sandbox_id" in str(exc.value) and "virtlet.cloud__<id>" in str(exc.value)


def test_images_round_trip() -> None:
    assert naming.split_image("virtlet.cloud/example.com/cirros:1", {V}) == (V, "example.com/cirros:1")
    assert naming.split_image("virtlet.cloud/sha256:ab", {V}) == (V, "sha256:ab")
    assert naming.split_image("docker.io/library/busybox", {V}) == (PRIMARY, "docker.io/library/busybox")
    assert naming.split_image("sha256:ab", {V}) == (PRIMARY, "sha256:ab")
    assert naming.split_image("virtlet.cloud/", {V}) == (PRIMARY, "virtlet.cloud/")
    assert naming.external_image(V, "example.com/cirros") == "virtlet.cloud/example.com/cirros"
    assert naming.external_image(V, "virtlet.cloud/x") == "virtlet.cloud/x"  # never doubled
    assert naming.external_image(PRIMARY, "busybox") == "busybox"


# -- routing ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("handler", "annotations", "expected"), [
    ("", {}, PRIMARY),
    ("runc", {}, PRIMARY),
    ("virtlet", {}, V),
    ("", {TARGET_RUNTIME_ANNOTATION: V}, V),
    ("virtlet", {TARGET_RUNTIME_ANNOTATION: V}, V),
    ("runc", {TARGET_RUNTIME_ANNOTATION: V}, V),
    ("", {TARGET_RUNTIME_ANNOTATION: ""}, PRIMARY),
])
def test_sandbox_routing(handler: str, annotations: dict[str, str], expected: str) -> None:
    assert RULES.sandbox_runtime(handler, annotations) == expected


def test_unknown_target_runtime_names_it() -> None:
    with pytest.raises(errors.InvalidArgument, match=r"'kata\.io'.*known: virtlet\.cloud"):
        RULES.sandbox_runtime("", {TARGET_RUNTIME_ANNOTATION: "kata.io"})


def test_conflicting_handler_and_annotation() -> None:
    rules = Rules(frozenset({V, "other"}), {"virtlet": V})
    with pytest.raises(errors.InvalidArgument, match="handler 'virtlet'"):
        rules.sandbox_runtime("virtlet", {TARGET_RUNTIME_ANNOTATION: "other"})


def test_custom_handler_name() -> None:
    rules = Rules(frozenset({V}), {"vm": V})
    assert rules.sandbox_runtime("vm", {}) == V
    assert rules.sandbox_runtime("virtlet", {}) == PRIMARY


def test_container_image_must_match_the_pod_runtime() -> None:
    assert RULES.container_image(V, "virtlet.cloud/example.com/cirros") == "example.com/cirros"
    assert RULES.container_image(PRIMARY, "busybox:1") == "busybox:1"
    with pytest.raises(errors.InvalidArgument, match="runtimeClassName with handler virtlet"):
        RULES.container_image(PRIMARY, "virtlet.cloud/example.com/cirros")
    with pytest.raises(errors.InvalidArgument, match="virtlet.cloud/<host>/<path>"):
        RULES.container_image(V, "busybox:1")


def test_list_targets() -> None:
    everyone = {PRIMARY, V}
    assert RULES.list_targets() == (everyone, {})
    assert RULES.list_targets(("id", "")) == (everyone, {})
    assert RULES.list_targets(("id", "virtlet.cloud__ab")) == ({V}, {"id": "ab"})
    assert RULES.list_targets(("id", "ab")) == ({PRIMARY}, {"id": "ab"})
    targets, _ = RULES.list_targets(("id", "virtlet.cloud__ab"), ("pod_sandbox_id", "cd"))
    assert targets == set()
    with pytest.raises(errors.InvalidArgument):
        RULES.list_targets(("id", "nope__ab"))
    assert RULES.image_list_targets("") == (everyone, "")
    assert RULES.image_list_targets("virtlet.cloud/x/y") == ({V}, "x/y")
    assert RULES.image_list_targets("busybox") == ({PRIMARY}, "busybox")


# -- rewrite ------------------------------------------------------------------------------------------------

def test_rewrite_image_and_container() -> None:
    img = api.Image(id="sha256:aa", repo_tags=["h/p"], repo_digests=["h/p@sha256:aa"],
                    spec=api.ImageSpec(image="h/p"))
    rewrite.image(V, img)
    assert (img.id, list(img.repo_tags), list(img.repo_digests), img.spec.image) == (
        "virtlet.cloud/sha256:aa", ["virtlet.cloud/h/p"], ["virtlet.cloud/h/p@sha256:aa"],
        "virtlet.cloud/h/p")
    c = api.Container(id="c1", pod_sandbox_id="s1", image=api.ImageSpec(image="h/p"), image_ref="sha256:aa")
    rewrite.container(V, c)
    assert (c.id, c.pod_sandbox_id, c.image.image, c.image_ref) == (
        C1, S1, "virtlet.cloud/h/p", "virtlet.cloud/sha256:aa")
    untouched = api.Container(id="c1", pod_sandbox_id="s1", image_ref="sha256:aa")
    rewrite.container(PRIMARY, untouched)
    assert (untouched.id, untouched.image_ref) == ("c1", "sha256:aa")


def test_rewrite_status_stats_events() -> None:
    resp = api.PodSandboxStatusResponse(status=api.PodSandboxStatus(id="s1"),
                                        containers_statuses=[api.ContainerStatus(id="c1")])
    rewrite.sandbox_status_response(V, resp)
    assert (resp.status.id, resp.containers_statuses[0].id) == (S1, C1)
    stats = api.PodSandboxStats(attributes=api.PodSandboxAttributes(id="s1"), linux=api.LinuxPodSandboxStats(
        containers=[api.ContainerStats(attributes=api.ContainerAttributes(id="c1"))]))
    rewrite.sandbox_stats(V, stats)
    assert (stats.attributes.id, stats.linux.containers[0].attributes.id) == (S1,
                                                                              C1)
    ev = api.ContainerEventResponse(container_id="c1", pod_sandbox_status=api.PodSandboxStatus(id="s1"))
    rewrite.container_event(V, ev)
    assert (ev.container_id, ev.pod_sandbox_status.id) == (C1, S1)
    m = api.PodSandboxMetrics(pod_sandbox_id="s1",
                              container_metrics=[api.ContainerMetrics(container_id="c1")])
    rewrite.sandbox_metrics(V, m)
    assert m.pod_sandbox_id == S1
    assert m.container_metrics[0].container_id == C1


# -- config -------------------------------------------------------------------------------------------------

def test_config_defaults_and_file_and_flags(tmp_path: Path) -> None:
    cfg = config.load([])
    assert cfg.listen == Path("/run/criproxy.sock")
    assert cfg.primary == "unix:///run/containerd/containerd.sock"
    assert dict(cfg.secondaries) == {V: "unix:///run/virtlet.sock"}
    assert cfg.handlers == {"virtlet": V}
    f = tmp_path / "p.yaml"
    f.write_text("listen: unix:///tmp/p.sock\nsecondaries: {virtlet.cloud: /tmp/v.sock}\nlog_level: DEBUG\n")
    cfg = config.load(["--config", str(f), "--virtlet-handler", "vm", "--list-timeout", "0.5"])
    assert (cfg.listen, cfg.secondaries[V], cfg.log_level, cfg.handlers, cfg.list_timeout) == (
        Path("/tmp/p.sock"), "unix:///tmp/v.sock", "debug", {"vm": V}, 0.5)


@pytest.mark.parametrize(("text", "key"), [
    ("primary: tcp://1.2.3.4:5\n", "primary"),
    ("secondaries: {virtlet.cloud: rel.sock}\n", "secondaries.virtlet.cloud"),
    ("secondaries: {Bad__Name: /x.sock}\n", "secondaries"),
    ("secondaries: [a]\n", "secondaries"),
    ("log_level: loud\n", "log_level"),
    ("list_timeout: -1\n", "list_timeout"),
    ("listenn: /x\n", "listenn"),
    ("secondaries: {}\n", "virtlet_handler"),
    ("listen: /run/virtlet.sock\n", "listen"),
])
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(config.ConfigError) as exc:
        config.load(["--config", str(f)])
    assert str(exc.value).startswith(f"{key}:")


def test_bad_flags() -> None:
    with pytest.raises(config.ConfigError, match="^secondaries:"):
        config.load(["--secondary", "virtlet.cloud"])
    with pytest.raises(config.ConfigError, match="^config:"):
        config.load(["--config", "/nonexistent/proxy.yaml"])
    cfg = config.load(["--secondary", "virtlet.cloud=/v.sock", "--secondary", "x.io=/x.sock"])
    assert cfg.secondaries == {V: "unix:///v.sock", "x.io": "unix:///x.sock"}
