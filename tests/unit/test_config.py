"""Configuration precedence (defaults < file < env < flags) and errors that name the bad key."""

from pathlib import Path

import pytest

from virtlet import config


def test_defaults() -> None:
    cfg = config.load([], environ={})
    assert cfg.listen == "/run/virtlet.sock"
    assert cfg.state_dir == Path("/var/lib/virtlet")
    assert cfg.libvirt_uri == "qemu:///system"
    assert cfg.stream_address == "127.0.0.1:10010"
    assert cfg.image_translations_dir == Path("/etc/virtlet/images")
    assert cfg.cni_bin_dir == (Path("/opt/cni/bin"), Path("/usr/lib/cni"))
    assert cfg.kvm == "auto"


def test_precedence_file_env_flag(tmp_path: Path) -> None:
    f = tmp_path / "virtlet.yaml"
    f.write_text("listen: /file.sock\nstate_dir: /file-state\nlog_level: debug\nkvm: 'off'\n")
    env = {"VIRTLET_LISTEN": "/env.sock", "VIRTLET_STATE_DIR": "/env-state"}
    cfg = config.load(["--config", str(f), "--listen", "/flag.sock"], environ=env)
    assert cfg.listen == "/flag.sock"  # flag beats env and file
    assert cfg.state_dir == Path("/env-state")  # env beats file
    assert cfg.log_level == "debug"  # file beats default
    assert cfg.kvm == "off"


def test_config_from_env_variable(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("cni_bin_dir: [/a, /b]\n")
    cfg = config.load([], environ={"VIRTLET_CONFIG": str(f), "VIRTLET_CNI_CONF_DIR": "/x"})
    assert cfg.cni_bin_dir == (Path("/a"), Path("/b"))
    assert cfg.cni_conf_dir == Path("/x")


@pytest.mark.parametrize(
    ("content", "args", "env", "needle"),
    [
        ("kvm: maybe\n", [], {}, "kvm"),
        ("bogus_key: 1\n", [], {}, "bogus_key"),
        ("", ["--log-level", "loud"], {}, "--log-level"),
        ("", [], {"VIRTLET_STREAM_ADDRESS": "nohostport"}, "VIRTLET_STREAM_ADDRESS"),
        ("listen: [1, 2]\n", [], {}, "listen"),
        ("- a list\n", [], {}, "YAML map"),
        ("key: [unclosed\n", [], {}, "not valid YAML"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, content: str, args: list[str], env: dict[str, str],
                                 needle: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(content)
    with pytest.raises(config.ConfigError) as exc:
        config.load(["--config", str(f), *args], environ=env)
    assert needle in str(exc.value)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(["--config", str(tmp_path / "nope.yaml")], environ={})


def test_markdown_table_lists_every_setting() -> None:
    table = config.markdown_table()
    for s in config.SETTINGS:
        assert f"`{s.flag}`" in table and f"`{s.env}`" in table


def test_docs_table_is_current() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    assert config.markdown_table() in doc, "docs/configuration.md is stale: python -m virtlet.config --markdown"


def test_shutdown_grace() -> None:
    assert config.load([]).shutdown_grace == 30
    assert config.load(["--shutdown-grace", "5"]).shutdown_grace == 5
    for bad in ("-1", "1.5", "²", "3601", ""):
        with pytest.raises(config.ConfigError, match="--shutdown-grace"):
            config.load(["--shutdown-grace", bad])


def test_metrics_address() -> None:
    assert config.load([]).metrics_address == "127.0.0.1:9474"
    assert config.load(["--metrics-address", ""]).metrics_address == ""
    assert config.load(["--metrics-address", "[::1]:0"]).metrics_address == "[::1]:0"
    with pytest.raises(config.ConfigError, match="metrics"):
        config.load(["--metrics-address", "9474"])
