"""Settings: sources and precedence, ${VAR} expansion, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from proxy import config
from proxy.errors import ConfigError

CREDS = {"NDOVU_CLIENT_ID": "id-1", "NDOVU_CLIENT_SECRET": "raw-secret"}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ndovu.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_with_credentials_from_the_environment() -> None:
    s = config.load({}, CREDS)
    assert str(s.listen) == "127.0.0.1:8080"
    assert str(s.admin_listen) == "127.0.0.1:9901"
    assert s.upstream.url == "https://be-dev-1.dev.ndovu.co"
    assert s.auth.token_url == "https://be-dev-1.dev.ndovu.co/api/v3/partners/auth"
    assert s.auth.client_secret is not None and s.auth.client_secret.reveal() == "raw-secret"
    assert s.forwarding.allowed_paths == ("/api/v3/partners/",)
    assert s.forwarding.max_body_bytes == 104857600
    assert s.logging.format == "auto"
    assert s.shutdown_timeout == 20


def test_precedence_flags_over_environment_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'listen: "127.0.0.1:7000"\nupstream:\n  url: "http://file.example"\n  read_timeout: 7\n')
    env = {**CREDS, "NDOVU_PROXY_CONFIG": path, "NDOVU_UPSTREAM_URL": "http://env.example/base/"}
    s = config.load({"listen": "127.0.0.1:9000"}, env)
    assert s.listen.port == 9000  # flag beats file
    assert s.upstream.url == "http://env.example/base"  # env beats file; trailing / dropped
    assert s.auth.token_url == "http://env.example/base/api/v3/partners/auth"  # base path kept
    assert s.upstream.read_timeout == 7  # file beats default
    assert s.config_file == path
    assert config.load({"config": path}, CREDS).upstream.url == "http://file.example"


def test_variables_in_yaml_strings(tmp_path: Path) -> None:
    path = write(tmp_path, 'auth:\n  client_id: "${MY_ID}"\n  client_secret: "${MY_SECRET:-fallback}"\n'
                 'upstream:\n  url: "http://${HOST:-localhost}:${PORT}"\n')
    s = config.load({"config": path}, {"MY_ID": "abc", "PORT": "8181"})
    assert s.auth.client_id == "abc"
    assert s.auth.client_secret is not None and s.auth.client_secret.reveal() == "fallback"
    assert s.upstream.url == "http://localhost:8181"


def test_secret_file_wins_over_a_secret_from_any_source(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from-file\r\n")
    path = write(tmp_path, f"auth:\n  client_secret_file: {secret}\n")
    s = config.load({"config": path}, CREDS)
    assert s.auth.client_secret is None
    assert s.auth.client_secret_file == str(secret)
    assert config.read_secret_file(str(secret)) == "from-file"
    secret.write_text("two-newlines\n\n")
    assert config.read_secret_file(str(secret)) == "two-newlines\n"  # only one is stripped
    secret.write_text("  spaced  ")
    assert config.read_secret_file(str(secret)) == "  spaced  "


@pytest.mark.parametrize(
    ("yaml_text", "env", "key", "words"),
    [
        ('upstream:\n  url: "ftp://x"\n', CREDS, "upstream.url", "not a valid http(s) URL"),
        ('upstream:\n  url: "https://"\n', CREDS, "upstream.url", "not a valid http(s) URL"),
        ("upstream:\n  colour: blue\n", CREDS, "upstream.colour", "unknown key"),
        ("listne: 1\n", CREDS, "listne", "unknown key"),
        ("upstream:\n  read_timeout: soon\n", CREDS, "upstream.read_timeout", "expected a number"),
        ("upstream:\n  connect_timeout: 0\n", CREDS, "upstream.connect_timeout", "greater than 0"),
        ("upstream:\n  max_connections: 2.5\n", CREDS, "upstream.max_connections", "whole number"),
        ("upstream:\n  tls_verify: maybe\n", CREDS, "upstream.tls_verify", "true or false"),
        ("", {"NDOVU_CLIENT_ID": "x"}, "auth.client_secret", "set NDOVU_CLIENT_SECRET or auth.client_secret_file"),
        ("", {"NDOVU_CLIENT_SECRET": "x"}, "auth.client_id", "set NDOVU_CLIENT_ID"),
        ("", {"NDOVU_CLIENT_ID": "a:b", "NDOVU_CLIENT_SECRET": "x"}, "auth.client_id", "':'"),
        ("auth:\n  client_secret_file: /nonexistent/secret\n", CREDS, "auth.client_secret_file", "cannot read"),
        ("auth:\n  backoff_initial: 10\n  backoff_max: 5\n", CREDS, "auth.backoff_max", "at least"),
        ("auth:\n  token_path: auth\n", CREDS, "auth.token_path", "starting with /"),
        ("forwarding:\n  allowed_paths: [api]\n", CREDS, "forwarding.allowed_paths", "starting with /"),
        ("forwarding:\n  allowed_clients: [10.0.0.300/8]\n", CREDS, "forwarding.allowed_clients", "not a CIDR"),
        ("forwarding:\n  max_body_bytes: -1\n", CREDS, "forwarding.max_body_bytes", "negative"),
        ("logging:\n  level: loud\n", CREDS, "logging.level", "expected one of"),
        ('listen: "8080"\n', CREDS, "listen", "HOST:PORT"),
        ('admin_listen: "localhost:99999"\n', CREDS, "admin_listen", "HOST:PORT"),
        ("upstream: 3\n", CREDS, "upstream", "mapping"),
        ("- a\n- b\n", CREDS, "config", "mapping"),
        ("a: [\n", CREDS, "config", "not valid YAML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, yaml_text: str, env: dict[str, str], key: str, words: str) -> None:
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as err:
        config.load({"config": path}, env)
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}: ")
    assert words in str(err.value)


def test_missing_config_file_is_an_error() -> None:
    with pytest.raises(ConfigError, match="^config: cannot read"):
        config.load({"config": "/nonexistent/ndovu.yaml"}, CREDS)


@pytest.mark.parametrize("value", [None, "off", ""])
def test_admin_listener_can_be_turned_off(tmp_path: Path, value: Any) -> None:
    path = write(tmp_path, "admin_listen: null\n" if value is None else f'admin_listen: "{value}"\n')
    assert config.load({"config": path}, CREDS).admin_listen is None


def test_ipv6_addresses_and_lists_from_flags() -> None:
    s = config.load({"listen": "[::1]:8080", "forwarding.allowed_clients": "127.0.0.1/32, ::1/128"}, CREDS)
    assert s.listen.host == "::1" and str(s.listen) == "[::1]:8080"
    assert len(s.forwarding.allowed_clients) == 2


def test_settings_never_show_the_secret() -> None:
    s = config.load({"forwarding.inbound_token": "inbound-xyz"}, CREDS)
    assert "raw-secret" not in repr(s)
    assert "inbound-xyz" not in repr(s)
    with pytest.raises(AttributeError):
        s.admin_listen = s.admin_listen  # type: ignore[misc]  # frozen


def test_the_example_file_is_valid_and_shows_the_defaults() -> None:
    example = str(Path(__file__).parent.parent / "config.example.yaml")
    defaults = config.load({}, CREDS)
    assert config.load({"config": example}, CREDS) == dataclasses.replace(defaults, config_file=example)


DOUBLED = ("upstream.url: the base path /api/v3/partners would be doubled: the token URL would be "
           "http://host/api/v3/partners/api/v3/partners/auth; use http://host")


@pytest.mark.parametrize(
    ("url", "flags", "message"),
    [
        ("http://host/api/v3/partners", {}, DOUBLED),
        ("http://host/api/v3/partners/", {}, DOUBLED),  # the trailing / changes nothing
        ("http://host/api/v3", {}, ("upstream.url: the base path /api/v3 would be doubled: the token URL "
                                    "would be http://host/api/v3/api/v3/partners/auth; use http://host")),
        ("https://gw.example:8443/ndovu/api/v3/partners", {},
         ("upstream.url: the base path /ndovu/api/v3/partners would double /api/v3/partners: the token URL "
          "would be https://gw.example:8443/ndovu/api/v3/partners/api/v3/partners/auth; use https://gw.example:8443/ndovu")),
        # the token path is a full URL: the allowed_paths prefix still shows the slip
        ("http://host/api/v3/partners", {"auth.token_path": "http://auth.example/token"},
         ("upstream.url: the base path /api/v3/partners would be doubled: a request to /api/v3/partners/ "
          "would go to http://host/api/v3/partners/api/v3/partners/; use http://host")),
        # a token path of the user's own
        ("http://host/oauth/v2", {"auth.token_path": "/oauth/v2/token", "forwarding.allowed_paths": []},
         ("upstream.url: the base path /oauth/v2 would be doubled: the token URL would be "
          "http://host/oauth/v2/oauth/v2/token; use http://host")),
        # an allowed_paths prefix of the user's own
        ("http://host/v1/orders", {"forwarding.allowed_paths": "/api/v3/partners/,/v1/orders"},
         ("upstream.url: the base path /v1/orders would be doubled: a request to /v1/orders would go to "
          "http://host/v1/orders/v1/orders; use http://host")),
    ],
)
def test_a_base_path_that_repeats_the_api_path_is_refused(url: str, flags: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load({"upstream.url": url, **flags}, CREDS)
    assert err.value.key == "upstream.url"
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("url", "flags"),
    [
        ("http://host/gateway", {}),
        ("http://host/gw/api", {}),  # one segment in common: a gateway prefix that happens to say api
        ("http://host/api", {}),
        ("http://host/api/v2", {}),  # /api/v2 is not the start of /api/v3/...
        ("http://host/partners/api", {}),
        ("http://host/api/v3/partners", {"auth.token_path": "http://host/auth", "forwarding.allowed_paths": []}),
        ("http://host/v3/partners", {}),  # ends with segments of the path, but not its first ones
    ],
)
def test_a_gateway_base_path_is_kept(url: str, flags: dict[str, Any]) -> None:
    s = config.load({"upstream.url": url, **flags}, CREDS)
    assert s.upstream.url == url


def test_shutdown_delay_defaults_to_0_and_takes_a_number_of_seconds(tmp_path: Path) -> None:
    assert config.load({}, CREDS).shutdown_delay == 0
    assert config.load({"config": write(tmp_path, "shutdown_delay: 2.5\n")}, CREDS).shutdown_delay == 2.5
    for text, words in (("shutdown_delay: -1\n", "must not be negative"), ("shutdown_delay: soon\n", "expected a number"),
                        ("shutdown_delay: true\n", "expected a number")):
        with pytest.raises(ConfigError) as err:
            config.load({"config": write(tmp_path, text)}, CREDS)
        assert str(err.value).startswith("shutdown_delay: ") and words in str(err.value)
