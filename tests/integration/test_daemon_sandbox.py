"""virtletd as a real process: Version/Status, the sandbox lifecycle over runtime.v1 and runtime.v1alpha2,
restarts (SIGTERM and SIGKILL) and the errors the kubelet gets for bad input."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers.daemon import VirtletdProcess
from virtlet.cri.gen import api_pb2 as api
from virtlet.network import netns

pytestmark = pytest.mark.network


def _config(name: str = "pod1", uid: str = "uid-1", **kw: object) -> api.PodSandboxConfig:
    cfg = api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name=name, namespace="default", uid=uid, attempt=0),
        hostname=name, labels={"app": "web", "tier": "front"}, annotations={"kubernetes.io/target-runtime":
                                                                          "virtlet.cloud"}, **kw)
    return cfg


def _run(rt: object, name: str = "pod1", uid: str = "uid-1", handler: str = "virtlet") -> str:
    return rt.RunPodSandbox(api.RunPodSandboxRequest(config=_config(name, uid), runtime_handler=handler)).pod_sandbox_id


def test_version_status_health(virtletd: VirtletdProcess) -> None:
    for version in ("v1", "v1alpha2"):
        rt = virtletd.runtime(version)
        v = rt.Version(api.VersionRequest(version="0.1.0"))
        # each API version names itself, as containerd's v1alpha2 service does (issue 17)
        assert v.runtime_name == "virtlet" and v.runtime_api_version == version and v.runtime_version
        st = rt.Status(api.StatusRequest(verbose=True))
        conds = {c.type: c for c in st.status.conditions}
        assert conds["RuntimeReady"].status, conds["RuntimeReady"].message
        assert conds["NetworkReady"].status, conds["NetworkReady"].message
        assert [h.name for h in st.runtime_handlers] == ["virtlet"]
        assert "config" in st.info
    mode = stat.S_IMODE(virtletd.socket.stat().st_mode)
    assert mode == 0o660
    rc = virtletd.runtime().RuntimeConfig(api.RuntimeConfigRequest())
    assert rc.linux.cgroup_driver == api.SYSTEMD
    virtletd.runtime().UpdateRuntimeConfig(api.UpdateRuntimeConfigRequest(
        runtime_config=api.RuntimeConfig(network_config=api.NetworkConfig(pod_cidr="10.244.0.0/24"))))


@pytest.mark.parametrize("version", ["v1", "v1alpha2"])
def test_sandbox_lifecycle(virtletd: VirtletdProcess, version: str) -> None:
    rt = virtletd.runtime(version)
    sid = _run(rt)
    assert netns.exists(sid)
    status = rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True))
    assert status.status.state == api.SANDBOX_READY
    assert status.status.metadata.name == "pod1" and status.status.labels["app"] == "web"
    assert '"netns"' in status.info["info"]
    other = _run(rt, "pod2", "uid-2", handler="")
    # filters: id prefix, state, labels
    assert [s.id for s in rt.ListPodSandbox(api.ListPodSandboxRequest(
        filter=api.PodSandboxFilter(id=sid[:8]))).items] == [sid]
    assert {s.id for s in rt.ListPodSandbox(api.ListPodSandboxRequest(
        filter=api.PodSandboxFilter(label_selector={"app": "web"}))).items} == {sid, other}
    assert rt.ListPodSandbox(api.ListPodSandboxRequest(
        filter=api.PodSandboxFilter(label_selector={"app": "db"}))).items == []
    rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid))
    rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid))  # idempotent
    assert not netns.exists(sid)
    ready = rt.ListPodSandbox(api.ListPodSandboxRequest(filter=api.PodSandboxFilter(
        state=api.PodSandboxStateValue(state=api.SANDBOX_READY)))).items
    assert [s.id for s in ready] == [other]
    notready = rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sid)).status
    assert notready.state == api.SANDBOX_NOTREADY
    rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid))
    rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid))  # idempotent
    with pytest.raises(grpc.RpcError) as exc:
        rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sid))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    assert [s.id for s in rt.ListPodSandbox(api.ListPodSandboxRequest()).items] == [other]


def test_restart_finds_sandboxes(virtletd: VirtletdProcess) -> None:
    rt = virtletd.runtime()
    sid = _run(rt)
    assert virtletd.stop() == 0  # SIGTERM: clean exit
    assert not virtletd.socket.exists()
    virtletd.start()
    rt = virtletd.runtime()
    assert rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sid)).status.state == api.SANDBOX_READY
    assert netns.exists(sid)


def test_sigkill_after_run_is_consistent(virtletd: VirtletdProcess) -> None:
    sid = _run(virtletd.runtime())
    virtletd.kill()
    assert virtletd.socket.exists()  # a stale socket is left behind ...
    virtletd.start()  # ... and replaced
    status = virtletd.runtime().PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sid)).status
    assert status.state == api.SANDBOX_READY and netns.exists(sid)


@pytest.mark.parametrize("failpoint", ["sandbox.after_netns", "sandbox.after_network"])
def test_sigkill_during_run_rolls_back(virtletd: VirtletdProcess, bridge_cni: Path, failpoint: str) -> None:
    """Frozen at a failpoint (netns made; or CNI ADD done, bridge, DHCP server running), then SIGKILLed: the
    restart removes everything, and the kubelet's Stop/Remove of what it knows still succeed."""
    virtletd.stop()
    virtletd.env = {"VIRTLET_FAILPOINT": failpoint}
    virtletd.start()
    before = set(netns.list_names())
    with pytest.raises(grpc.RpcError) as exc:
        virtletd.runtime().RunPodSandbox(api.RunPodSandboxRequest(config=_config()), timeout=10)
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # only this daemon's namespace counts: parallel test runs on the host make namespaces meanwhile
    made = {n for n in set(netns.list_names()) - before if n in virtletd.log()}
    assert len(made) == 1  # the namespace exists while the record says CREATING
    sandbox_id = made.pop()
    net = json.loads((bridge_cni / "10-bridge.conflist").read_text())["name"]
    reservations = Path("/var/lib/cni/networks") / net
    if failpoint == "sandbox.after_network":
        assert [p for p in reservations.iterdir() if p.name[0].isdigit()]
    virtletd.stop(signal.SIGKILL)
    virtletd.env = {}
    virtletd.start()
    rt = virtletd.runtime()
    rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
    rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))
    assert not netns.exists(sandbox_id)
    assert rt.ListPodSandbox(api.ListPodSandboxRequest()).items == []
    left = [p.name for p in reservations.iterdir() if p.name[0].isdigit()] if reservations.exists() else []
    assert left == [], f"host-local reservations left: {left}"
    dhcp = subprocess.run(["pgrep", "-f", f"dhcp_server.*{sandbox_id}"], capture_output=True, text=True).stdout
    assert dhcp.strip() == "", "a DHCP server of the rolled-back sandbox is still running"


def test_duplicate_sandbox_refused(virtletd: VirtletdProcess) -> None:
    """RunPodSandbox for (name, namespace, uid, attempt) of an existing sandbox is refused as containerd refuses
    it ("name is reserved"), READY or NOTREADY, until RemovePodSandbox; a new attempt is a new sandbox."""
    rt = virtletd.runtime()
    sid = _run(rt)
    for _ in range(2):  # READY, then NOTREADY
        code, msg = _code_and_message(rt.RunPodSandbox, api.RunPodSandboxRequest(config=_config(),
                                                                                 runtime_handler="virtlet"))
        assert code == grpc.StatusCode.ALREADY_EXISTS, msg
        assert "pod1_default_uid-1_0" in msg and "is reserved for" in msg and sid in msg
        assert [s.id for s in rt.ListPodSandbox(api.ListPodSandboxRequest()).items] == [sid]
        rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid))
    retry = api.PodSandboxConfig()
    retry.CopyFrom(_config())
    retry.metadata.attempt = 1
    second = rt.RunPodSandbox(api.RunPodSandboxRequest(config=retry, runtime_handler="virtlet")).pod_sandbox_id
    rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid))
    third = _run(rt)  # the name is free again once the sandbox is removed
    assert {s.id for s in rt.ListPodSandbox(api.ListPodSandboxRequest()).items} == {second, third}


def _code_and_message(call: object, *args: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as exc:
        call(*args)  # type: ignore[operator]
    return exc.value.code(), exc.value.details()


def test_bad_input(virtletd: VirtletdProcess) -> None:
    rt = virtletd.runtime()
    code, msg = _code_and_message(rt.RunPodSandbox, api.RunPodSandboxRequest(
        config=_config(), runtime_handler="runc"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "runtime handler 'runc'" in msg
    code, msg = _code_and_message(rt.RunPodSandbox, api.RunPodSandboxRequest(config=api.PodSandboxConfig()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "metadata" in msg
    code, msg = _code_and_message(rt.RunPodSandbox, api.RunPodSandboxRequest(config=api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name="x", namespace="default"))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "metadata.uid" in msg
    code, msg = _code_and_message(rt.ListPodSandbox, api.ListPodSandboxRequest(
        filter=api.PodSandboxFilter(label_selector={"bad key!": "x"})))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "bad key!" in msg
    code, msg = _code_and_message(rt.ListPodSandbox, api.ListPodSandboxRequest(
        filter=api.PodSandboxFilter(label_selector={"app": "-bad value-"})))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "-bad value-" in msg
    code, msg = _code_and_message(rt.PodSandboxStatus, api.PodSandboxStatusRequest(pod_sandbox_id="nope"))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in msg
    code, msg = _code_and_message(rt.ContainerStatus, api.ContainerStatusRequest(container_id="nope"))
    assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED), msg
    # Stop/Remove of unknown ids succeed, as the kubelet expects
    rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id="nope"))
    rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id="nope"))
    # nothing half-created was left by the failures
    assert rt.ListPodSandbox(api.ListPodSandboxRequest()).items == []


def test_unimplemented_answers_with_a_message(virtletd: VirtletdProcess) -> None:
    code, msg = _code_and_message(virtletd.runtime().CheckpointContainer,
                                  api.CheckpointContainerRequest(container_id="x"))
    assert code == grpc.StatusCode.UNIMPLEMENTED and "CheckpointContainer" in msg


def test_second_daemon_on_live_socket_refuses(virtletd: VirtletdProcess) -> None:
    second = VirtletdProcess(virtletd.base / "second", ["--libvirt-uri", "test:///default", "--kvm", "off"])
    second.base.mkdir()
    second.socket = virtletd.socket  # the live socket of the first daemon
    proc = subprocess.run(second.cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "in use" in proc.stderr
    assert virtletd.healthy()


def test_invalid_config_stops_with_named_key(world_dir: Path) -> None:
    d = VirtletdProcess(world_dir, ["--kvm", "sometimes"])
    proc = subprocess.run(d.cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--kvm" in proc.stderr and "auto, on, off" in proc.stderr


def test_kvm_auto_falls_back_to_tcg_and_says_so(world_dir: Path, bridge_cni: Path) -> None:
    """On these machines /dev/kvm opens but guests hang: auto must pick TCG and say so in Status; on must
    refuse to start.  (On a node with working KVM, auto picks KVM and the message says that instead.)"""
    from virtlet.vm import kvm

    probe = kvm.probe_kvm()
    base = world_dir / "auto"
    base.mkdir()
    d = VirtletdProcess(base, ["--libvirt-uri", "test:///default", "--kvm", "auto", "--cni-conf-dir",
                               str(bridge_cni), "--image-dir", str(base / "images")])
    d.start(timeout=60)
    try:
        conds = {c.type: c for c in d.runtime().Status(api.StatusRequest()).status.conditions}
        message = conds["RuntimeReady"].message
        if probe.ok:
            assert "KVM works" in message
        else:
            assert "TCG" in message and "KVM does not work" in message, message
            assert "KVM does not work" in d.log()
    finally:
        d.stop()
    if not probe.ok:
        on = VirtletdProcess(base, ["--libvirt-uri", "test:///default", "--kvm", "on"])
        proc = subprocess.run(on.cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "KVM does not work here" in proc.stderr, proc.stderr


def test_loopback_only_network_is_refused_clearly(world_dir: Path, loopback_cni: Path, netns_guard: Any) -> None:
    """A CNI network that gives the pod only `lo` cannot carry a VM: FAILED_PRECONDITION naming why, nothing left."""
    base = world_dir / "lo-only"
    base.mkdir()
    d = VirtletdProcess(base, ["--libvirt-uri", "test:///default", "--kvm", "off", "--cni-conf-dir",
                               str(loopback_cni), "--image-dir", str(base / "images")])
    netns_guard.logs.append(d.log_path)
    d.start()
    try:
        code, msg = _code_and_message(d.runtime().RunPodSandbox, api.RunPodSandboxRequest(config=_config()))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "no interface inside the pod network" in msg, msg
        assert d.runtime().ListPodSandbox(api.ListPodSandboxRequest()).items == []
    finally:
        d.stop()


def test_upgrade_from_schema_1_database(virtletd: VirtletdProcess, world_dir: Path) -> None:
    """virtletd started on a state database an older virtletd (schema 1) wrote migrates it and answers the CRI
    from it: host name and log directory come out of the old stored PodSandboxConfig, the IPs out of the old
    network JSON.  The dump's ids and paths are made unique to this test first (no fixed names on a shared node)."""
    import sqlite3
    import uuid

    virtletd.stop()
    dump = (Path(__file__).parents[1] / "unit" / "data" / "state-v1.sql").read_text()
    ids = {c * 32: uuid.uuid4().hex for c in "abcd"}
    cids = {f"{d * 8}-{d * 4}-{d * 4}-{d * 4}-{d * 12}": str(uuid.uuid4()) for d in "12"}
    for old, new in {**ids, **cids}.items():
        dump = dump.replace(old, new)
    dump = dump.replace("/var/lib/virtlet/containers/1111", str(world_dir / "gone"))
    logs = world_dir / "logs-v1"
    db_path = virtletd.state_dir / "virtlet.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    con = sqlite3.connect(db_path)
    con.executescript(dump)
    for sid, blob in con.execute("SELECT id, config FROM sandboxes").fetchall():  # log dirs into the world dir
        if blob:
            cfg = api.PodSandboxConfig.FromString(blob)
            cfg.log_directory = cfg.log_directory.replace("/var/log/pods", str(logs))
            con.execute("UPDATE sandboxes SET config=? WHERE id=?", (cfg.SerializeToString(), sid))
    con.execute("PRAGMA user_version = 1")
    con.commit()
    con.close()
    virtletd.start()
    rt = virtletd.runtime()
    web, db = ids["a" * 32], ids["b" * 32]
    status = rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=web, verbose=True), timeout=30)
    assert status.status.network.ip == "10.244.1.5"
    assert [ip.ip for ip in status.status.network.additional_ips] == ["fd00::5"]
    info = json.loads(status.info["info"])
    web_logs = f"{logs}/default_web_uid-web"
    assert info["hostname"] == "web-host" and info["log_directory"] == web_logs
    assert info["network"]["nics"][0]["mac"] == "0a:58:0a:f4:01:05" and "hostname" not in info["network"]
    # the netns of the old pods is gone (as after a reboot): start-up recovery marks them NOTREADY
    assert status.status.state == api.SANDBOX_NOTREADY
    [running] = status.containers_statuses
    assert running.id == cids["1" * 8 + "-1111-1111-1111-" + "1" * 12] and running.log_path == f"{web_logs}/vm/0.log"
    stopped = rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=db), timeout=30).status
    assert stopped.state == api.SANDBOX_NOTREADY and stopped.network.ip == "10.244.1.6"
    exited = rt.ContainerStatus(api.ContainerStatusRequest(
        container_id=cids["2" * 8 + "-2222-2222-2222-" + "2" * 12]), timeout=30).status
    assert (exited.state, exited.exit_code, exited.reason) == (api.CONTAINER_EXITED, 3, "Error")
    assert exited.log_path == f"{logs}/default_db_uid-db/vm/2.log"
    assert {s.id for s in rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=30).items} >= {web, db}
