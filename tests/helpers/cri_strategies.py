"""Hypothesis strategies for CRI requests: valid, boundary and hostile fields (used by the CRI fuzzer,
``tests/integration/test_cri_fuzz.py``).

``known=False`` leaves out the hostile values of areas whose fixes are made elsewhere (quantities, YAML alias
bombs, image-name parsing, image source policy): it exists only to run the fuzzer on a branch that lacks those
fixes, so that it finds what else is wrong.  The fuzzer runs with ``known=True`` unless told otherwise.

Paths the kubelet itself chooses (``log_directory``, ``log_path``) are kept inside the test's world directory:
the kubelet is trusted with them, and a fuzzer must not make virtletd write into the host's ``/etc``.
"""

from __future__ import annotations

from hypothesis import strategies as st

from virtlet.cri.gen import api_pb2 as api

# Text a protobuf string can carry (valid UTF-8: no lone surrogates), including NUL and control characters.
_CHARS = st.characters(exclude_categories=("Cs",))

SPECIAL_STRINGS = (
    "", " ", "\x00", "a\x00b", "\n", "\t", "\r\n", "..", ".", "/", "//", "-", "--", "\\", "%s%n", "{{.}}", "${x}",
    "é", "Ω", "ß", "İ", "\u200b", "\u202e", "\ufeff", "🙂", "二", "²", "١٢", "ＡＢ", "NaN", "inf", "-0", "0",
    "null", "~", "true", "'", "\"", "`", "$(id)", "; rm -rf x", "<xml>", "&amp;", "[", "]", "{", "}", "*", ":",
    "@", "#", "?", "&", "=", "a" * 63, "a" * 64, "a" * 253, "a" * 254,
)


@st.composite
def _huge(draw: st.DrawFn, low: int = 1_000, high: int = 300_000) -> str:
    unit = draw(st.sampled_from(["a", "é", "\x00", "/", "../", "🙂", "-", " ", "0"]))
    return unit * (draw(st.integers(low, high)) // len(unit.encode()))


def text(max_size: int = 40, huge: bool = True) -> st.SearchStrategy[str]:
    """Any string: random unicode, the special strings above, and (``huge``) 1 kB - 300 kB repetitions."""
    options = [st.text(_CHARS, max_size=max_size), st.sampled_from(SPECIAL_STRINGS)]
    if huge:
        options.append(_huge())
    return st.one_of(*options)


def dns_label() -> st.SearchStrategy[str]:
    return st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z")


def safe_name() -> st.SearchStrategy[str]:
    return st.from_regex(r"\A[a-z][a-z0-9]{0,7}\Z")


def label_map(hostile: bool) -> st.SearchStrategy[dict[str, str]]:
    valid = st.dictionaries(dns_label(), st.one_of(st.just(""), dns_label()), max_size=3)
    if not hostile:
        return valid
    many = st.integers(100, 5_000).map(lambda n: {f"k{i}": "v" * (i % 64) for i in range(n)})
    return st.one_of(valid, st.dictionaries(text(), text(), max_size=4), many)


def int32() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(-2**31, 2**31 - 1), st.sampled_from([0, 1, -1, 2**31 - 1, -2**31]))


def int64() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(-2**63, 2**63 - 1), st.sampled_from([0, 1, -1, 2**63 - 1, -2**63, 16 << 20,
                                                                      512 << 20, 1 << 40]))


def uint32() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**32 - 1]))


# -- annotations ---------------------------------------------------------------------------------------------
TARGET = {"kubernetes.io/target-runtime": "virtlet.cloud"}

_QUANTITIES_PLAIN = ("1Gi", "2Gi", "512Mi", "0", "", "lots", "-1Gi", "1.5Gi", "10G", "1e3", "0x10", "1Gi ", " 1Gi",
                     "１Gi", "1gi", "Gi", "1.", ".5Gi")
# known area (bounded quantity parser, root volume cap): fixed by another helper
_QUANTITIES_KNOWN = ("1e99999999", "1e5000", "8Ei", "9Ei", "1E18", "99999999999999999999999Ki", "1e-99999999",
                     "1" + "0" * 5000)
_VCPU_PLAIN = ("1", "2", "0", "-1", "", "x", "1.5", "100000", " 1", "01")
_VCPU_KNOWN = ("²", "١", "１", "𝟐")

_USER_DATA_PLAIN = ("", "{}", "users: []", "[not, a, map", "- a list\n- not a map\n", "runcmd:\n  - [echo, hi]\n",
                    "x: !!python/object/apply:os.system ['id']\n", "\x00", "a: b\n" * 2000, "#cloud-config\nfoo: 1\n",
                    "write_files:\n  - path: /x\n    content: \"\\x00\"\n")
# known area (YAML aliases refused / bounded, annotations size-capped): fixed by another helper
_ALIAS_BOMB = ('a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
               'c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n'
               'e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n'
               'g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n')
_USER_DATA_KNOWN = (_ALIAS_BOMB, "x: &a [*a]\n", "x: &a {y: *a}\n", "a: &a x\nb: *a\n")


def _choice(plain: tuple[str, ...], known: tuple[str, ...], with_known: bool) -> st.SearchStrategy[str]:
    return st.sampled_from(plain + known if with_known else plain)


def annotations(hostile: bool, known: bool) -> st.SearchStrategy[dict[str, str]]:
    """Pod/container annotations: always the target-runtime one, plus Virtlet* keys with odd values."""
    base = st.just(dict(TARGET))
    if not hostile:
        return base
    virtlet = st.fixed_dictionaries({}, optional={
        "VirtletRootVolumeSize": _choice(_QUANTITIES_PLAIN, _QUANTITIES_KNOWN, known),
        "VirtletVCPUCount": _choice(_VCPU_PLAIN, _VCPU_KNOWN, known),
        "VirtletCloudInitUserData": _choice(_USER_DATA_PLAIN, _USER_DATA_KNOWN, known),
        "VirtletCloudInitMetaData": _choice(_USER_DATA_PLAIN, _USER_DATA_KNOWN, known),
        "VirtletCloudInitUserDataScript": st.sampled_from(["", "#!/bin/sh\necho hi\n", "\x00"]),
        "VirtletCloudInitUserDataOverwrite": st.sampled_from(["true", "false", "yes", "", "x"]),
        "VirtletCloudInitImageType": st.sampled_from(["nocloud", "configdrive", "floppy", "", "NoCloud"]),
        "VirtletSSHKeys": st.sampled_from(["", "not a key", "ssh-rsa AAAAB3NzaC1yc2E= a@b\n" * 3, "\x00"]),
        "VirtletDiskDriver": st.sampled_from(["virtio", "scsi", "ide", "nvme", "", "x"]),
        "VirtletSystemUUID": st.sampled_from(["", "not-a-uuid", "123e4567-e89b-12d3-a456-426614174000",
                                              "00000000-0000-0000-0000-000000000000"]),
        "VirtletCPUModel": st.sampled_from(["", "host-model", "host-passthrough", "x"]),
        "VirtletLibvirtCPUSetting": st.sampled_from(["", "mode: host-passthrough\n", "[", "model: {value: x}\n",
                                                     "<cpu/>"]),
        "VirtletForceDHCPNetworkConfig": st.sampled_from(["true", "false", "", "x"]),
    })
    extra = st.dictionaries(text(max_size=20, huge=False), text(), max_size=3)
    return st.builds(lambda v, e: {**e, **v, **TARGET}, virtlet, extra)


# -- images --------------------------------------------------------------------------------------------------
_IMAGE_PLAIN = ("", " ", "nope/x", "virtlet.cloud/", "virtlet.cloud/nope", "sha256:", "sha256:" + "0" * 64,
                "fuzz/img", "FUZZ/IMG-A", "fuzz/img-a:v1", "fuzz/img-a@sha256:" + "0" * 64,
                "127.0.0.1:1/missing.qcow2", "fuzz/img a")
# known area (image name parsing, image source policy): fixed by other helpers
# (a host part with an empty or over-long DNS label, such as "../x" or "a" * 300, answers INTERNAL from the IDNA
# codec: the same finding of image-name parsing)
_IMAGE_KNOWN = ("fuzz[", "[::1", "x:99999/a", "x:abc/a", "x:-1/a", "a\x00b", "\x00", "169.254.169.254/latest",
                "127.0.0.1/x", "localhost:22/x", "[fe80::1]/x", "0.0.0.0/x", "a" * 300 + ":1/x", "a" * 300,
                "../../etc/passwd", "/", "//", "a..b/x", ".x/y", "fuzz/imgé")
_IMAGE_ALPHABET = st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789./-_:@")


def image_name(known_names: list[str], known: bool) -> st.SearchStrategy[str]:
    """An image name: one the translations serve, odd ones, and random text."""
    plain = st.one_of(st.sampled_from(_IMAGE_PLAIN), st.text(_IMAGE_ALPHABET, max_size=30).filter(
        lambda s: not _port_like(s) and not _bad_dns_label(s)))
    options = [st.sampled_from(known_names), st.sampled_from(known_names).map(lambda n: "virtlet.cloud/" + n),
               st.sampled_from(known_names).map(lambda n: n + ":latest"), plain]
    if known:
        options += [st.sampled_from(_IMAGE_KNOWN), text(max_size=30, huge=False)]
    return st.one_of(*options)


def _bad_dns_label(name: str) -> bool:
    """A name whose host part has an empty or over-long label (a known finding)."""
    host = name.split("/", 1)[0].rsplit(":", 1)[0]
    return "/" in name and any(not label or len(label) > 63 for label in host.split("."))


def _port_like(name: str) -> bool:
    """A name whose host part has a port that is not 1-65535 digits (a known finding)."""
    host = name.split("/", 1)[0]
    if ":" not in host:
        return False
    port = host.rsplit(":", 1)[1]
    return not (port.isdigit() and port.isascii() and 0 < int(port) < 65536)


# -- whole requests ------------------------------------------------------------------------------------------
def port_mappings(hostile: bool) -> st.SearchStrategy[list[api.PortMapping]]:
    mapping = st.builds(api.PortMapping, protocol=st.sampled_from([0, 1, 2]),
                        container_port=int32() if hostile else st.integers(1, 65535),
                        host_port=int32() if hostile else st.just(0),
                        host_ip=text(max_size=20, huge=False) if hostile else st.just(""))
    return st.lists(mapping, max_size=3 if not hostile else 50)


def dns_config(hostile: bool) -> st.SearchStrategy[api.DNSConfig]:
    items = st.lists(text(max_size=20, huge=False), max_size=4) if hostile else st.just([])
    if not hostile:
        return st.just(api.DNSConfig(servers=["10.96.0.10"], searches=["default.svc.cluster.local"],
                                     options=["ndots:5"]))
    return st.builds(api.DNSConfig, servers=items, searches=items, options=items)


def container_resources(hostile: bool) -> st.SearchStrategy[api.LinuxContainerResources | None]:
    if not hostile:
        return st.none()
    return st.one_of(st.none(), st.builds(
        api.LinuxContainerResources, memory_limit_in_bytes=int64(), cpu_quota=int64(), cpu_period=int64(),
        cpu_shares=int64(), cpuset_cpus=text(max_size=10, huge=False), oom_score_adj=int64()))


def envs(hostile: bool) -> st.SearchStrategy[list[api.KeyValue]]:
    valid = st.lists(st.builds(api.KeyValue, key=st.from_regex(r"\A[A-Z_][A-Z0-9_]{0,8}\Z"), value=dns_label()),
                     max_size=3)
    if not hostile:
        return valid
    many = st.integers(100, 10_000).map(lambda n: [api.KeyValue(key=f"K{i}", value="v") for i in range(n)])
    return st.one_of(valid, st.lists(st.builds(api.KeyValue, key=text(), value=text()), max_size=4), many)
