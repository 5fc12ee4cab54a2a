"""`proxy.egress`: which egress proxy a URL goes through, read from `upstream.proxy` or the
environment (`config.load` builds `settings.upstream.egress`). Pure: no socket anywhere."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from proxy import config
from proxy.egress import DIRECT, Egress, ProxyURL, is_loopback, parse_no_proxy, parse_proxy

CREDS = {"NDOVU_CLIENT_ID": "id-1", "NDOVU_CLIENT_SECRET": "raw-secret"}
PASSWORD = "pa55-w0rd-in-the-url"
CORP = ProxyURL("proxy.corp", 3128)
OTHER = ProxyURL("other.corp", 8080)


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def shows_no_password(text: str, password: str = PASSWORD) -> bool:
    encoded = base64.b64encode(f"user:{password}".encode()).decode()
    return password not in text and encoded not in text and "55-w0rd" not in text


# --- parse_proxy ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "host", "port"), [
    ("http://proxy.corp:3128", "proxy.corp", 3128),
    ("http://proxy.corp:3128/", "proxy.corp", 3128),  # a bare trailing slash is no path
    ("proxy.corp:3128", "proxy.corp", 3128),  # no scheme: http://, as curl reads it
    ("http://proxy.corp", "proxy.corp", 80),  # no port: 80, as curl
    ("http://PROXY.Corp:3128", "proxy.corp", 3128),
    ("http://10.0.0.7:8080", "10.0.0.7", 8080),
    ("http://[fd00::7]:3128", "fd00::7", 3128),
])
def test_parse_proxy_reads_host_and_port(text: str, host: str, port: int) -> None:
    via = parse_proxy(text)
    assert (via.host, via.port, via.authorization) == (host, port, None)


def test_str_of_a_proxy_is_its_url_and_brackets_ipv6() -> None:
    assert str(parse_proxy("proxy.corp:3128")) == "http://proxy.corp:3128"
    assert str(parse_proxy("http://[fd00::7]:3128")) == "http://[fd00::7]:3128"
    assert parse_proxy("http://proxy.corp").url == "http://proxy.corp:80"


def test_credentials_become_the_proxy_authorization_value_and_are_never_shown() -> None:
    via = parse_proxy(f"http://user:{PASSWORD}@proxy.corp:3128")
    assert via.authorization == basic("user", PASSWORD)
    assert (via.host, via.port) == ("proxy.corp", 3128)
    for shown in (str(via), repr(via), via.url, f"{via}", f"{via!r}"):
        assert shows_no_password(shown), shown
        assert "user" not in shown
    assert str(via) == "http://proxy.corp:3128"


def test_percent_encoded_credentials_are_decoded_before_encoding() -> None:
    via = parse_proxy("http://dom%5Cuser:p%40ss%3Aword@proxy.corp:3128")
    assert via.authorization == basic("dom\\user", "p@ss:word")
    assert "p@ss" not in repr(via) and "p%40ss" not in repr(via)


def test_a_user_without_a_password_sends_an_empty_one() -> None:
    assert parse_proxy("http://user@proxy.corp:3128").authorization == basic("user", "")


def test_proxies_with_other_credentials_are_not_equal() -> None:
    assert parse_proxy("http://a:1@proxy.corp:3128") != parse_proxy("http://a:2@proxy.corp:3128")
    assert parse_proxy("http://proxy.corp:3128") == CORP


@pytest.mark.parametrize(("text", "says"), [
    (f"https://user:{PASSWORD}@proxy.corp:3128", "only http:// proxies are supported, not https://"),
    (f"socks5://user:{PASSWORD}@proxy.corp:1080", "only http:// proxies are supported, not socks5://"),
    (f"socks5h://user:{PASSWORD}@proxy.corp:1080", "only http:// proxies are supported, not socks5h://"),
    (f"http://user:{PASSWORD}@proxy.corp:3128/pac/proxy.pac", "a proxy URL has no path"),
    (f"http://user:{PASSWORD}@proxy.corp:3128/?x=1", "a proxy URL has no path"),
    (f"http://user:{PASSWORD}@proxy.corp:3128#frag", "a proxy URL has no path"),
    (f"http://user:{PASSWORD}@proxy.corp:99999", "not a valid proxy URL"),
    (f"http://user:{PASSWORD}@proxy.corp:port", "not a valid proxy URL"),
    (f"http://user:{PASSWORD}@proxy.corp:0", "a proxy URL's port must be 1-65535"),
    (f"http://user:{PASSWORD}@:3128", "not a valid proxy URL"),
    ("http://", "not a valid proxy URL"),
    ("http://[fd00::7:3128", "not a valid proxy URL"),
])
def test_parse_proxy_refuses_what_it_cannot_use_without_echoing_a_password(text: str, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_proxy(text)
    assert says in str(caught.value)
    assert shows_no_password(str(caught.value)) and shows_no_password(repr(caught.value))
    # no chained error of urllib's in a traceback either
    assert caught.value.__context__ is None or caught.value.__suppress_context__


# --- NO_PROXY -------------------------------------------------------------------------------


def test_parse_no_proxy_splits_on_commas_and_spaces_and_lowers() -> None:
    assert parse_no_proxy(" Example.COM, .corp.test  10.0.0.0/8,,*.dev.test ") == (
        "example.com", ".corp.test", "10.0.0.0/8", "*.dev.test")
    assert parse_no_proxy("") == ()
    assert parse_no_proxy(" , ") == ()


def routed(no_proxy: str, url: str) -> ProxyURL | None:
    return Egress(https=CORP, http=CORP, no_proxy=parse_no_proxy(no_proxy)).proxy_for(url)


@pytest.mark.parametrize(("no_proxy", "url"), [
    ("example.com", "https://example.com/"),
    ("example.com", "https://api.example.com/"),  # a name covers its subdomains
    ("example.com", "https://a.b.example.com:8443/"),
    (".example.com", "https://api.example.com/"),  # a leading dot: the same
    (".example.com", "https://example.com/"),
    ("*.example.com", "https://api.example.com/"),
    ("EXAMPLE.com", "https://API.example.COM/"),  # case-insensitive both ways
    ("example.com.", "https://api.example.com/"),  # trailing dots ignored both ways
    ("example.com", "https://api.example.com./"),
    ("*", "https://anything.test/"),
    ("other.test, *", "http://anything.test/"),
    ("10.1.2.3", "https://10.1.2.3/"),
    ("10.0.0.0/8", "https://10.200.3.4:8443/"),
    ("192.168.0.0/16 10.0.0.0/8", "http://10.0.0.1/"),
    ("fd00::/8", "https://[fd12::1]/"),
    ("fd12::1", "https://[fd12::1]/"),
    ("api.example.com:8443", "https://api.example.com:8443/"),
    ("api.example.com:443", "https://api.example.com/"),  # the scheme's port counts
    ("api.example.com:80", "http://api.example.com/"),
    ("[fd12::1]:443", "https://[fd12::1]/"),
    ("10.0.0.0/8:8443", "https://10.1.1.1:8443/"),
])
def test_no_proxy_bypasses(no_proxy: str, url: str) -> None:
    assert routed(no_proxy, url) is None


@pytest.mark.parametrize(("no_proxy", "url"), [
    ("", "https://example.com/"),
    ("example.com", "https://badexample.com/"),  # a suffix only at a dot
    ("example.com", "https://example.com.evil.test/"),
    (".example.com", "https://notexample.com/"),
    ("api.example.com", "https://example.com/"),  # a subdomain does not cover its parent
    ("10.1.2.3", "https://10.1.2.4/"),
    ("10.0.0.0/8", "https://11.0.0.1/"),
    ("10.0.0.0/8", "https://ten.example/"),  # a network never matches a name
    ("ten.example", "https://10.0.0.1/"),
    ("fd00::/8", "https://[fe80::1]/"),
    ("api.example.com:8443", "https://api.example.com/"),  # the port must match too
    ("api.example.com:443", "http://api.example.com/"),
    ("api.example.com:nope", "https://api.example.com/"),  # an unreadable entry matches nothing
])
def test_no_proxy_does_not_bypass(no_proxy: str, url: str) -> None:
    assert routed(no_proxy, url) is CORP


# --- which proxy for which URL ---------------------------------------------------------------


def test_each_scheme_takes_its_own_proxy() -> None:
    egress = Egress(https=CORP, http=OTHER)
    assert egress.proxy_for("https://api.example.com/x") is CORP
    assert egress.proxy_for("http://api.example.com/x") is OTHER
    assert egress.proxy_for("ftp://api.example.com/x") is None
    assert Egress(https=CORP).proxy_for("http://api.example.com/") is None
    assert Egress(http=OTHER).proxy_for("https://api.example.com/") is None
    assert DIRECT.proxy_for("https://api.example.com/") is None
    assert DIRECT == Egress()


@pytest.mark.parametrize("url", [
    "http://localhost:8081/", "https://LOCALHOST/", "http://localhost.:8081/", "http://app.localhost/",
    "http://127.0.0.1:8081/", "https://127.8.9.10/", "http://[::1]:8081/", "http://[::ffff:127.0.0.1]:8081/",
])
def test_loopback_is_never_proxied_whatever_no_proxy_says(url: str) -> None:
    assert Egress(https=CORP, http=CORP).proxy_for(url) is None
    assert Egress(https=CORP, http=CORP, no_proxy=("example.com",)).proxy_for(url) is None


@pytest.mark.parametrize(("host", "loopback"), [
    ("localhost", True), ("LocalHost.", True), ("x.localhost", True), ("127.0.0.1", True), ("127.255.0.9", True),
    ("::1", True), ("[::1]", True), ("::ffff:127.0.0.2", True),
    ("localhost.example", False), ("mylocalhost", False), ("128.0.0.1", False), ("0.0.0.0", False),
    ("::", False), ("::ffff:10.0.0.1", False), ("10.0.0.1", False), ("", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# --- from the configuration ---------------------------------------------------------------


def egress_of(environ: dict[str, str], flags: dict[str, object] | None = None) -> Egress:
    return config.load(flags or {}, {**CREDS, **environ}).upstream.egress


def test_no_proxy_settings_mean_direct() -> None:
    assert egress_of({}) == DIRECT


def test_the_variables_are_read_in_either_case() -> None:
    egress = egress_of({"HTTPS_PROXY": "http://proxy.corp:3128", "HTTP_PROXY": "other.corp:8080",
                        "NO_PROXY": ".internal.test"})
    assert egress == Egress(https=CORP, http=OTHER, no_proxy=(".internal.test",))
    egress = egress_of({"https_proxy": "http://proxy.corp:3128", "http_proxy": "other.corp:8080",
                        "no_proxy": ".internal.test"})
    assert egress == Egress(https=CORP, http=OTHER, no_proxy=(".internal.test",))


def test_lower_case_variables_win_over_upper_case() -> None:
    egress = egress_of({
        "https_proxy": "http://proxy.corp:3128", "HTTPS_PROXY": "http://upper.corp:1",
        "http_proxy": "http://other.corp:8080", "HTTP_PROXY": "http://upper.corp:2",
        "no_proxy": "lower.test", "NO_PROXY": "upper.test",
    })
    assert egress == Egress(https=CORP, http=OTHER, no_proxy=("lower.test",))


def test_an_empty_lower_case_variable_counts_as_unset() -> None:
    assert egress_of({"https_proxy": "", "HTTPS_PROXY": "http://proxy.corp:3128"}).https == CORP


def test_the_environment_proxies_the_default_upstream_and_spares_a_loopback_one() -> None:
    env = {"HTTPS_PROXY": "http://proxy.corp:3128", "HTTP_PROXY": "http://proxy.corp:3128"}
    settings = config.load({}, {**CREDS, **env})
    assert settings.upstream.egress.proxy_for(settings.upstream.url) == CORP
    assert settings.upstream.egress.proxy_for(settings.auth.token_url) == CORP
    settings = config.load({"upstream.url": "http://127.0.0.1:8081"}, {**CREDS, **env})
    assert settings.upstream.egress.proxy_for(settings.upstream.url) is None
    assert settings.upstream.egress.proxy_for(settings.auth.token_url) is None


def test_no_proxy_from_the_environment_spares_the_upstream() -> None:
    env = {"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "localhost,.ndovu.co"}
    settings = config.load({}, {**CREDS, **env})
    assert settings.upstream.egress.proxy_for(settings.upstream.url) is None


def test_upstream_proxy_wins_over_the_variables_for_both_schemes() -> None:
    env = {"https_proxy": "http://other.corp:8080", "HTTP_PROXY": "http://other.corp:8080", "no_proxy": "*"}
    egress = egress_of(env, {"upstream.proxy": "http://proxy.corp:3128"})
    assert egress.https == CORP and egress.http == CORP
    # NO_PROXY belongs to the variables: with upstream.proxy set, it is not read
    assert egress.proxy_for("https://api.example.com/") == CORP
    assert egress.proxy_for("http://127.0.0.1:8081/") is None  # loopback, still never


def test_upstream_proxy_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ndovu.yaml"
    path.write_text("upstream:\n  proxy: http://user:${PROXY_PASSWORD}@proxy.corp:3128\n")
    egress = egress_of({"NDOVU_PROXY_CONFIG": str(path), "PROXY_PASSWORD": PASSWORD,
                        "HTTPS_PROXY": "http://other.corp:8080"})
    assert egress.https == ProxyURL("proxy.corp", 3128, basic("user", PASSWORD))


@pytest.mark.parametrize("word", ["direct", "DIRECT", " Direct "])
def test_direct_means_never_whatever_the_environment_says(word: str) -> None:
    egress = egress_of({"HTTPS_PROXY": "http://proxy.corp:3128", "http_proxy": "http://proxy.corp:3128"},
                       {"upstream.proxy": word})
    assert egress == DIRECT
    assert egress.proxy_for("https://api.example.com/") is None


def test_a_bad_upstream_proxy_is_a_config_error_naming_the_key_not_the_password() -> None:
    with pytest.raises(config.ConfigErrors) as caught:
        config.load({"upstream.proxy": f"socks5://user:{PASSWORD}@proxy.corp:1080"}, CREDS)
    assert [e.key for e in caught.value.errors] == ["upstream.proxy"]
    text = str(caught.value)
    assert "only http:// proxies are supported" in text and "direct" in text
    assert shows_no_password(text)


@pytest.mark.parametrize("var", ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"])
def test_a_bad_proxy_variable_is_a_config_error_naming_the_variable(var: str) -> None:
    with pytest.raises(config.ConfigErrors) as caught:
        config.load({}, {**CREDS, var: f"http://user:{PASSWORD}@proxy.corp:3128/path"})
    assert [e.key for e in caught.value.errors] == [var]
    text = str(caught.value)
    assert "a proxy URL has no path" in text and "upstream.proxy" in text
    assert shows_no_password(text)


def test_direct_overrides_a_bad_variable() -> None:
    assert egress_of({"HTTPS_PROXY": "socks5://proxy.corp:1080"}, {"upstream.proxy": "direct"}) == DIRECT


def test_effective_config_masks_proxy_passwords() -> None:
    env = {**CREDS, "HTTPS_PROXY": f"http://user:{PASSWORD}@proxy.corp:3128"}
    shown = config.effective({"upstream.proxy": f"http://user:{PASSWORD}@other.corp:8080"}, env)
    assert shown["upstream.proxy"][0] == "http://user:<set>@other.corp:8080"
    assert shown["env.HTTPS_PROXY"] == ("http://user:<set>@proxy.corp:3128", "env HTTPS_PROXY")
    assert shows_no_password(repr(shown))
