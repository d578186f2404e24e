"""Image pulls through real HTTP/HTTPS servers, real qemu-img images, a real tmpfs and a real SIGKILL.

Every bad input asserts the error class, a message a user can act on, and an unchanged store.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers.http_server import ImageHttpServer, Pki, free_port, make_pki
from virtlet import errors
from virtlet.images import ImageStore
from virtlet.images.policy import SourcePolicy

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = SourcePolicy.build(allow=["127.0.0.0/8"])  # the servers here are on loopback, denied by default


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def www(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("virtlet-img-www")
    qemu_img("create", "-q", "-f", "qcow2", str(d / "disk.qcow2"), "32M")
    qemu_img("create", "-q", "-f", "raw", str(d / "disk.raw"), "1M")
    qemu_img("create", "-q", "-f", "qcow2", str(d / "base.qcow2"), "8M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(d / "base.qcow2"), "-F", "qcow2",
             str(d / "child.qcow2"))
    (d / "page.bin").write_bytes(b"<html><body>not an image</body></html>\n")
    with open(d / "big.raw", "wb") as f:  # 4 MiB with non-zero content
        f.write(os.urandom(1 << 20) * 4)
    return d


@pytest.fixture(scope="module")
def server(www: Path) -> Iterator[ImageHttpServer]:
    with ImageHttpServer(www, slow_rate=512 * 1024) as srv:
        yield srv


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("virtlet-img-pki"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ImageStore]:
    s = ImageStore(tmp_path / "images", tmp_path / "translations", default_scheme="http", policy=LOOPBACK)
    try:
        yield s
    finally:
        s.close()


def translations(store: ImageStore, name: str, doc: dict[str, object]) -> None:
    d = store.translator.directory
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(yaml.safe_dump(doc))


def snapshot(store: ImageStore) -> tuple[list[str], list[str], list[object]]:
    return (sorted(p.name for p in store.data_dir.iterdir()), sorted(p.name for p in store.tmp_dir.iterdir()),
            store.list())


def fails(store: ImageStore, name: str, exc: type[errors.VirtletError], *fragments: str) -> str:
    before = snapshot(store)
    with pytest.raises(exc) as info:
        store.pull(name)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, msg
    assert snapshot(store) == before, "a failed pull changed the store"
    return msg


def test_pull_qcow2_and_raw(store: ImageStore, server: ImageHttpServer) -> None:
    q = store.pull(server.name("files/disk.qcow2") + ":latest")
    assert q.format == "qcow2" and q.virtual_size == 32 << 20
    assert q.names == (server.name("files/disk.qcow2"),)
    assert q.path.read_bytes()[:4] == b"QFI\xfb"
    assert store.ref(q, server.name("files/disk.qcow2")) == f"{server.name('files/disk.qcow2')}@{q.digest}"
    r = store.pull(server.name("files/disk.raw"))
    assert (r.format, r.virtual_size) == ("raw", 1 << 20)
    assert {i.digest for i in store.list()} == {q.digest, r.digest}
    assert store.status(q.digest) == store.status(q.digest.removeprefix("sha256:")) == store.status(
        server.name("files/disk.qcow2") + ":v2") == q
    assert list(store.tmp_dir.iterdir()) == []


def test_digest_pin(store: ImageStore, server: ImageHttpServer) -> None:
    name = server.name("files/disk.qcow2")
    digest = store.pull(name).digest
    store.remove(digest)
    assert store.pull(f"{name}@{digest}").digest == digest
    fails(store, f"{server.name('files/disk.raw')}@sha256:{'0' * 64}", errors.FailedPrecondition,
          "not the pinned sha256:000")


def test_redirect_followed(store: ImageStore, server: ImageHttpServer) -> None:
    assert store.pull(server.name("redirect/disk.raw")).format == "raw"


def test_not_found(store: ImageStore, server: ImageHttpServer) -> None:
    fails(store, server.name("files/missing.qcow2"), errors.NotFound, "404",
          server.url("files/missing.qcow2"))


def test_connection_refused(store: ImageStore) -> None:
    fails(store, f"127.0.0.1:{free_port()}/disk.qcow2", errors.Unavailable, "refused")


def test_stalled_server_times_out(store: ImageStore, server: ImageHttpServer) -> None:
    translations(store, "10-stall.yaml", {
        "translations": [{"name": "stalled", "url": server.url("stall/x"), "transport": "quick"}],
        "transports": {"quick": {"timeout": 500}}})
    fails(store, "stalled", errors.Unavailable, "sent nothing for 0.5 s", "'quick'")


def test_redirect_loop(store: ImageStore, server: ImageHttpServer) -> None:
    translations(store, "10-loop.yaml", {
        "translations": [{"name": "loop", "url": server.url("loop/x"), "transport": "few"}],
        "transports": {"few": {"maxRedirects": 3}}})
    fails(store, "loop", errors.FailedPrecondition, "more than 3 redirects", "redirect loop")


def test_html_page_refused(store: ImageStore, server: ImageHttpServer) -> None:
    fails(store, server.name("html/download"), errors.InvalidArgument, "text/html", "not a disk image")
    # the same page served as octet-stream is caught by the sniff
    fails(store, server.name("files/page.bin"), errors.InvalidArgument, "HTML/XML markup")


def test_truncated_download(store: ImageStore, server: ImageHttpServer) -> None:
    fails(store, server.name("truncate/disk.qcow2"), errors.Unavailable, "closed the connection", "missing")


def test_progress_is_logged(tmp_path: Path, server: ImageHttpServer,
                            caplog: pytest.LogCaptureFixture) -> None:
    s = ImageStore(tmp_path / "images", tmp_path / "tr", default_scheme="http", progress_interval=0.3,
                   policy=LOOPBACK)
    try:
        with caplog.at_level(logging.INFO, logger="virtlet.images.pull"):
            s.pull(server.name("slow/disk.raw"))  # 1 MiB at 512 KiB/s: about 2 s
    finally:
        s.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "virtlet.images.pull"]
    assert any(re.search(r"MiB of 1\.0 MiB \(\d+%\) at [\d.]+ MiB/s$", m) for m in lines), lines
    assert lines[-1].endswith("(100%) at " + lines[-1].split(" at ")[-1]) and "done" in lines[-1]


def test_backing_file_refused(store: ImageStore, server: ImageHttpServer) -> None:
    fails(store, server.name("files/child.qcow2"), errors.InvalidArgument, "backing file")


def test_non_http_translation_refused(store: ImageStore) -> None:
    translations(store, "10-file.yaml", {"translations": [{"name": "local", "url": "file:///etc/passwd"}]})
    fails(store, "local", errors.InvalidArgument, "file:///etc/passwd", "only http and https", "10-file.yaml")


def test_translation_with_proxy(store: ImageStore, server: ImageHttpServer, www: Path) -> None:
    with ImageHttpServer(www, proxy=True) as proxy:
        translations(store, "10-proxy.yaml", {
            "translations": [{"regexp": "via-proxy/(.*)", "url": server.url("files/$1"), "transport": "p"}],
            "transports": {"p": {"proxy": f"http://127.0.0.1:{proxy.port}"}}})
        assert store.pull("via-proxy/disk.raw").format == "raw"
        assert proxy.count("/files/disk.raw") == 1


def test_disk_full(tmp_path: Path, server: ImageHttpServer) -> None:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "virtlet-test-img", str(mnt)], check=True)
    try:
        s = ImageStore(mnt / "images", tmp_path / "translations", default_scheme="http", policy=LOOPBACK)
        try:
            fails(s, server.name("files/big.raw"), errors.ResourceExhausted, "no space left")
            assert s.pull(server.name("files/disk.raw")).format == "raw"  # still usable
        finally:
            s.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# -- HTTPS ---------------------------------------------------------------------------------------------------

def tls_doc(server: ImageHttpServer, certs: list[dict[str, str]], **tls: object) -> dict[str, object]:
    return {"translations": [{"regexp": "secure/(.*)", "url": server.url("files/$1"), "transport": "t"}],
            "transports": {"t": {"timeout": 5000, "tls": {"certificates": certs, **tls}}}}


def test_https_with_ca_from_profile(store: ImageStore, www: Path, pki: Pki) -> None:
    with ImageHttpServer(www, tls=pki) as srv:
        translations(store, "20-tls.yaml", tls_doc(srv, [{"cert": pki.pem(pki.ca_cert)}]))
        assert store.pull("secure/disk.qcow2").format == "qcow2"


def test_https_server_name(store: ImageStore, www: Path, pki: Pki) -> None:
    with ImageHttpServer(www, tls=pki) as srv:
        ca = [{"cert": pki.pem(pki.ca_cert)}]
        translations(store, "20-tls.yaml", tls_doc(srv, ca, serverName="localhost"))
        assert store.pull("secure/disk.raw").format == "raw"
        translations(store, "20-tls.yaml", tls_doc(srv, ca, serverName="other"))
        fails(store, "secure/disk.qcow2", errors.FailedPrecondition, "TLS verification", "other")


def test_https_unknown_ca_refused(store: ImageStore, www: Path, pki: Pki) -> None:
    with ImageHttpServer(www, tls=pki) as srv:
        translations(store, "20-tls.yaml", tls_doc(srv, []))
        fails(store, "secure/disk.qcow2", errors.FailedPrecondition, "TLS verification of 127.0.0.1",
              "tls.certificates")
        translations(store, "20-tls.yaml", tls_doc(srv, [], insecure=True))
        assert store.pull("secure/disk.qcow2").format == "qcow2"


def test_https_client_certificate(store: ImageStore, www: Path, pki: Pki) -> None:
    with ImageHttpServer(www, tls=pki, require_client_cert=True) as srv:
        translations(store, "20-tls.yaml", tls_doc(srv, [{"cert": pki.pem(pki.ca_cert)}]))
        fails(store, "secure/disk.qcow2", errors.FailedPrecondition, "TLS")
        translations(store, "20-tls.yaml", tls_doc(srv, [
            {"cert": pki.pem(pki.ca_cert)},
            {"cert": pki.pem(pki.client_cert), "key": pki.pem(pki.client_key)}]))
        assert store.pull("secure/disk.qcow2").format == "qcow2"


# -- crash safety --------------------------------------------------------------------------------------------

def test_sigkill_during_download(tmp_path: Path, server: ImageHttpServer) -> None:
    image_dir, tr = tmp_path / "images", tmp_path / "translations"
    code = (f"from pathlib import Path; from virtlet.images import ImageStore; "
            f"from virtlet.images.policy import SourcePolicy; "
            f"ImageStore(Path({str(image_dir)!r}), Path({str(tr)!r}), default_scheme='http', "
            f"policy=SourcePolicy.build(allow=['127.0.0.0/8']))"
            f".pull({server.name('slow/big.raw')!r})")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            parts = list((image_dir / "tmp").glob("*.part")) if (image_dir / "tmp").is_dir() else []
            if parts and parts[0].stat().st_size > 0:
                break
            assert child.poll() is None, "the pull ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no partial download appeared")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert list((image_dir / "tmp").glob("*.part")), "expected a partial file to be left by SIGKILL"
    s = ImageStore(image_dir, tr, default_scheme="http", policy=LOOPBACK)
    try:
        s.cleanup_at_start()
        assert list((image_dir / "tmp").iterdir()) == [] and list((image_dir / "data").iterdir()) == []
        assert s.list() == []
        assert s.pull(server.name("files/big.raw")).size == 4 << 20
    finally:
        s.close()
