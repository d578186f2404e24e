"""Schema migration of the state database: a database an older virtletd wrote opens with this one, and every
sandbox and container reads back as it was, with the facts that moved (host name, log directory, network)
typed.  ``data/state-v1.sql`` was written by the StateStore of schema 1 (virtletd at b09125b) and dumped; it
holds a READY sandbox with a RUNNING VM, a stopped (NOTREADY) one with an EXITED VM, a READY one without pod
network or stored config, and a half-made (CREATING) one."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from virtlet.cri.gen import api_pb2 as api
from virtlet.network.model import NicInfo, PodNetworkInfo, Route
from virtlet.state import migrations
from virtlet.state import store as st

DUMP = Path(__file__).parent / "data" / "state-v1.sql"
A, B, C, D = ("a" * 32, "b" * 32, "c" * 32, "d" * 32)
RUNNING, EXITED = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"


def _v1_database(path: Path) -> Path:
    con = sqlite3.connect(path)
    con.executescript(DUMP.read_text())
    con.execute("PRAGMA user_version = 1")  # iterdump does not carry it; schema-1 virtletd set it
    con.commit()
    con.close()
    return path


def _nic(sid: str, ip: str, ipv6: list[str]) -> NicInfo:
    return NicInfo(index=0, mac="0a:58:0a:f4:01:05", mtu=1450, ip=ip, prefix=24, gateway="10.244.1.1",
                   routes=[Route(dst="0.0.0.0/0", gw="10.244.1.1")], veth="eth0", bridge="vmbr0",
                   tap=f"vt{sid[:11]}0", ipv6=ipv6)


def _network(sid: str, ip: str, ipv6: list[str] | None = None) -> PodNetworkInfo:
    return PodNetworkInfo(sandbox_id=sid, netns_path=f"/var/run/netns/{sid}", nics=[_nic(sid, ip, ipv6 or [])],
                          dns_servers=["10.96.0.10"], dns_searches=["svc.cluster.local"], dns_options=["ndots:5"],
                          dhcp_pid=4242)


def test_v1_database_reads_back_typed(tmp_path: Path) -> None:
    db = st.StateStore(_v1_database(tmp_path / "virtlet.db"))
    assert db.schema_version() == st.SCHEMA_VERSION == 2
    web = db.require_sandbox(A)
    assert web == st.SandboxRecord(
        id=A, name="web", namespace="default", uid="uid-web", attempt=1, state=st.SANDBOX_READY, created_at=1000,
        runtime_handler="virtlet", netns=f"/var/run/netns/{A}", labels={"app": "web"}, annotations={"a": "b"},
        hostname="web-host", log_directory="/var/log/pods/default_web_uid-web",
        network=_network(A, "10.244.1.5", ["fd00::5/64"]), network_torn_down=False)
    assert web.network is not None and web.network.pod_ips == ["10.244.1.5", "fd00::5"]
    stopped = db.require_sandbox(B)
    assert (stopped.state, stopped.network_torn_down) == (st.SANDBOX_NOTREADY, True)
    assert stopped.hostname == "db" and stopped.log_directory == "/var/log/pods/default_db_uid-db"
    assert stopped.network == _network(B, "10.244.1.6")
    plain = db.require_sandbox(C)
    assert (plain.state, plain.hostname, plain.log_directory, plain.network) == (st.SANDBOX_READY, "plain", "", None)
    half = db.get_sandbox(D)
    assert half is not None and half.state == st.SANDBOX_CREATING and half.hostname == "half-host"
    assert [s.id for s in db.list_sandboxes()] == [A, B, C, D]

    running = db.require_container(RUNNING)
    assert running == st.ContainerRecord(
        id=RUNNING, sandbox_id=A, name="vm", attempt=0, state=st.CONTAINER_RUNNING, created_at=1100,
        image="localhost/cirros.qcow2", image_ref="sha256:" + "c" * 64, log_path="vm/0.log", started_at=1200,
        labels={"c": "1"}, annotations={"ca": "x"}, config=b"\x0a\x04\x0a\x02vm",
        extra={"domain": "virtlet-11111111-vm", "dir": "/var/lib/virtlet/containers/1111", "creating": False})
    exited = db.require_container(EXITED)
    assert (exited.state, exited.started_at, exited.finished_at, exited.exit_code, exited.reason, exited.message) \
        == (st.CONTAINER_EXITED, 2200, 2300, 3, "Error", "guest powered off")
    assert [c.id for c in db.list_containers(A)] == [RUNNING]
    db.close()


def test_migrated_database_keeps_working(tmp_path: Path) -> None:
    """The migrated database is an ordinary one: state changes, the one-live-container rule, reopen."""
    path = _v1_database(tmp_path / "virtlet.db")
    db = st.StateStore(path)
    with pytest.raises(Exception, match="exactly one container"):
        db.add_container(st.ContainerRecord(
            id="c2", sandbox_id=A, name="vm", attempt=1, state=st.CONTAINER_CREATED, created_at=1, image="i",
            image_ref="r", log_path=""))
    db.update_container(RUNNING, state=st.CONTAINER_EXITED, finished_at=5)
    db.update_sandbox(A, state=st.SANDBOX_NOTREADY, network_torn_down=True)
    db.close()
    db = st.StateStore(path)  # a second open migrates nothing
    assert db.schema_version() == 2
    rec = db.require_sandbox(A)
    assert rec.state == st.SANDBOX_NOTREADY and rec.hostname == "web-host" and rec.network is not None
    db.close()


def test_unreadable_network_json_does_not_stop_the_migration(tmp_path: Path) -> None:
    """Decision: one damaged row must not keep virtletd (and every other pod) from starting; it loses its
    network copy (the teardown finds what was made without it)."""
    path = _v1_database(tmp_path / "virtlet.db")
    con = sqlite3.connect(path)
    con.execute("UPDATE sandboxes SET network=?, config=? WHERE id=?", ('{"nics": [{"bad": 1}]}', b"\x0a\xff", A))
    con.commit()
    con.close()
    db = st.StateStore(path)
    rec = db.require_sandbox(A)
    assert rec.network is None and rec.log_directory == ""
    assert rec.hostname == "web"  # neither the config nor the network said: the pod name, as schema 1 did
    assert db.require_sandbox(B).network == _network(B, "10.244.1.6")
    db.close()


@pytest.mark.parametrize("config", [
    api.PodSandboxConfig(),
    api.PodSandboxConfig(hostname="h", log_directory="/l"),
    api.PodSandboxConfig(metadata=api.PodSandboxMetadata(name="n", uid="u", attempt=300), hostname="ü-host",
                         log_directory="/var/log/pods/x", dns_config=api.DNSConfig(servers=["1.1.1.1"]),
                         port_mappings=[api.PortMapping(container_port=22, host_port=65535)],
                         labels={"a": "b" * 300}, annotations={"k": "v"},
                         linux=api.LinuxPodSandboxConfig(cgroup_parent="/x", sysctls={"a": "b"})),
])
def test_proto_strings_agrees_with_protobuf(config: api.PodSandboxConfig) -> None:
    """The migration's hand-written reader finds the same hostname and log_directory as protobuf does."""
    got = migrations._proto_strings(config.SerializeToString(), {2, 3})
    assert (got.get(2, ""), got.get(3, "")) == (config.hostname, config.log_directory)


@pytest.mark.parametrize("blob", [b"\x12\x05ab", b"\x12", b"\x80", b"\x0f"])
def test_proto_strings_refuses_malformed(blob: bytes) -> None:
    with pytest.raises(ValueError):
        migrations._proto_strings(blob, {2, 3})
