"""Translation configs: precedence, prefixes, regexp substitution, profiles, reloads and errors."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from virtlet import errors
from virtlet.images.translate import Translator


def write(d: Path, name: str, doc: object) -> None:
    d.mkdir(exist_ok=True)
    (d / name).write_text(yaml.safe_dump(doc))


def test_untranslated_names_use_default_scheme(tmp_path: Path) -> None:
    assert Translator(tmp_path / "none").resolve("h.example/x.img").url == "https://h.example/x.img"
    assert Translator(tmp_path / "none", "http").resolve("h.example/x.img").url == "http://h.example/x.img"
    with pytest.raises(ValueError):
        Translator(tmp_path, "ftp")


def test_exact_beats_regexp_and_files_in_sorted_order(tmp_path: Path) -> None:
    write(tmp_path, "10-a.yaml", {"translations": [{"regexp": "cirros", "url": "https://a/regexp"},
                                                   {"name": "ubuntu", "url": "https://a/ubuntu"}]})
    write(tmp_path, "20-b.yaml", {"translations": [{"name": "cirros", "url": "https://b/exact"},
                                                   {"name": "ubuntu", "url": "https://b/ubuntu"}]})
    t = Translator(tmp_path)
    assert t.resolve("cirros").url == "https://b/exact"  # exact in a later file beats an earlier regexp
    assert t.resolve("ubuntu").url == "https://a/ubuntu"  # among exact names, the first file wins
    assert "10-a.yaml" in t.resolve("ubuntu").origin


def test_regexp_substitution_is_whole_name(tmp_path: Path) -> None:
    write(tmp_path, "t.yml", {"translations": [
        {"regexp": r"ubuntu/(\d+)\.(?P<minor>\d+)", "url": "https://img/$1/${minor}/${1}-$$"}]})
    t = Translator(tmp_path)
    assert t.resolve("ubuntu/22.04").url == "https://img/22/04/22-$"
    assert t.resolve("xubuntu/22.04").url == "https://xubuntu/22.04"  # no partial match


def test_prefix(tmp_path: Path) -> None:
    write(tmp_path, "m.yaml", {"prefix": "mirror", "translations": [{"name": "cirros", "url": "http://m/c.img"}]})
    t = Translator(tmp_path)
    assert t.resolve("mirror/cirros").url == "http://m/c.img"
    assert t.resolve("cirros").url == "https://cirros"


def test_transport_profile(tmp_path: Path) -> None:
    write(tmp_path, "p.yaml", {
        "translations": [{"name": "x", "url": "https://h/x", "transport": "slow"}],
        "transports": {"slow": {"timeout": 1500, "maxRedirects": 2, "proxy": "http://proxy:3128",
                                "tls": {"serverName": "h.example", "insecure": True}}}})
    p = Translator(tmp_path).resolve("x").transport
    assert (p.name, p.timeout, p.max_redirects, p.proxy) == ("slow", 1.5, 2, "http://proxy:3128")
    assert p.tls.server_name == "h.example" and p.tls.insecure


def test_ca_and_client_certificates_are_told_apart(tmp_path: Path) -> None:
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=t"],
                   check=True, capture_output=True, timeout=60)
    write(tmp_path / "tr", "p.yaml", {
        "translations": [{"name": "x", "url": "https://h/x", "transport": "t"}],
        "transports": {"t": {"tls": {"certificates": [{"cert": cert.read_text()},
                                                      {"cert": cert.read_text(), "key": key.read_text()}]}}}})
    tls = Translator(tmp_path / "tr").resolve("x").transport.tls
    assert len(tls.ca_certs) == 1 and len(tls.client_certs) == 1


def test_non_http_url_is_invalid_argument(tmp_path: Path) -> None:
    write(tmp_path, "f.yaml", {"translations": [{"name": "x", "url": "file:///etc/shadow"}]})
    with pytest.raises(errors.InvalidArgument, match="file:///etc/shadow.*only http and https"):
        Translator(tmp_path).resolve("x")


@pytest.mark.parametrize(("doc", "fragment"), [
    ({"translations": [{"name": "x"}]}, "'url'"),
    ({"translations": [{"name": "x", "regexp": "x", "url": "http://h"}]}, "exactly one"),
    ({"translations": [{"regexp": "(", "url": "http://h"}]}, "bad regexp"),
    ({"translations": [{"name": "x", "url": "http://h", "transport": "nope"}]}, "'nope' is not defined"),
    ({"transports": {"t": {"timeout": -1}}}, "timeout"),
    ({"transports": {"t": {"proxy": "socks5://p"}}}, "proxy"),
    ({"transports": {"t": {"tls": {"certificates": [{"cert": "not pem"}]}}}}, "not usable PEM"),
    ({"translation": []}, "unknown keys"),
    (["a list"], "mapping"),
])
def test_broken_file_fails_resolution_naming_it(tmp_path: Path, doc: object, fragment: str) -> None:
    write(tmp_path, "bad.yaml", doc)
    write(tmp_path, "good.yaml", {"translations": [{"name": "x", "url": "http://h/x"}]})
    with pytest.raises(errors.FailedPrecondition) as info:
        Translator(tmp_path).resolve("x")
    assert "bad.yaml" in str(info.value) and fragment in str(info.value)


def test_reload_on_change_only(tmp_path: Path) -> None:
    t = Translator(tmp_path)
    assert t.resolve("x").url == "https://x"
    write(tmp_path, "a.yaml", {"translations": [{"name": "x", "url": "http://one/x"}]})
    assert t.resolve("x").url == "http://one/x"
    loaded = t._exact
    assert t.resolve("x").url == "http://one/x" and t._exact is loaded  # unchanged files are not re-parsed
    tmp = tmp_path / "a.yaml.new"
    tmp.write_text(yaml.safe_dump({"translations": [{"name": "x", "url": "http://two/x"}]}))
    os.replace(tmp, tmp_path / "a.yaml")  # same size, new inode
    assert t.resolve("x").url == "http://two/x"
    (tmp_path / "a.yaml").unlink()
    assert t.resolve("x").url == "https://x"


def test_readable_file_with_a_client_key_is_warned_about(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from tests.helpers.http_server import make_pki

    pki = make_pki(tmp_path / "pki")
    d = tmp_path / "tr"
    write(d, "key.yaml", {"translations": [{"name": "a", "url": "https://h/a", "transport": "t"}],
                          "transports": {"t": {"tls": {"certificates": [
                              {"cert": pki.pem(pki.client_cert), "key": pki.pem(pki.client_key)}]}}}})
    write(d, "nokey.yaml", {"translations": [{"name": "b", "url": "https://h/b"}]})
    (d / "key.yaml").chmod(0o644)
    (d / "nokey.yaml").chmod(0o644)
    t = Translator(d)
    with caplog.at_level("WARNING", logger="virtlet.images.translate"):
        assert t.resolve("a").url == "https://h/a"  # a warning, not a refusal
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "key.yaml holds a TLS client key but has mode 0644" in warned[0], warned
    assert "PRIVATE KEY" not in caplog.text
    caplog.clear()
    (d / "key.yaml").chmod(0o600)
    os.utime(d / "key.yaml", ns=(1, 1))  # a change the translator notices: it re-reads the files
    with caplog.at_level("WARNING", logger="virtlet.images.translate"):
        t.resolve("a")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_name_fallback_off_is_not_found(tmp_path: Path) -> None:
    write(tmp_path, "t.yaml", {"translations": [{"name": "known", "url": "https://h/known"}]})
    t = Translator(tmp_path, fallback=False)
    assert t.resolve("known").trusted
    with pytest.raises(errors.NotFound, match="no image translation matches"):
        t.resolve("h.example/x.img")


def test_regexp_that_sets_the_host_is_untrusted(tmp_path: Path) -> None:
    write(tmp_path, "t.yaml", {"translations": [{"regexp": "any/(.*)", "url": "http://$1"},
                                                {"regexp": "m/(.*)", "url": "https://mirror/$1"}]})
    t = Translator(tmp_path)
    assert not t.resolve("any/h/x").trusted and t.resolve("m/x").trusted
    assert not t.resolve("plain.example/x").trusted
