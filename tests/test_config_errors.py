"""Config errors that teach: a "did you mean" for a slipped key, where a YAML slip is, and
every problem of one config in one run."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import config
from proxy.errors import ConfigError
from tests.procs import MakeCommand


CREDS = {"NDOVU_CLIENT_ID": "id-1", "NDOVU_CLIENT_SECRET": "raw-secret"}


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ndovu.yaml"
    path.write_text(text)
    return str(path)


def load_errors(tmp_path: Path, text: str, env: dict[str, str] = CREDS) -> list[str]:
    with pytest.raises(config.ConfigErrors) as err:
        config.load({"config": write(tmp_path, text)}, env)
    return [str(e) for e in err.value.errors]


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("upstrem:\n  url: http://x\n", "upstrem: unknown key; did you mean upstream?"),
        ("auth:\n  client_secert: s\n", "auth.client_secert: unknown key; did you mean auth.client_secret?"),
        ("listne: 1\n", "listne: unknown key; did you mean listen?"),
        ("shutdown_timout: 3\n", "shutdown_timout: unknown key; did you mean shutdown_timeout?"),
        # the right name in the wrong section
        ("upstream:\n  client_id: x\n", "upstream.client_id: unknown key; did you mean auth.client_id?"),
        # nothing close: no guess
        ("upstream:\n  colour: blue\n", "upstream.colour: unknown key"),
        ("zzzzzz: 1\n", "zzzzzz: unknown key"),
    ],
)
def test_an_unknown_key_gets_a_did_you_mean_when_one_is_close(tmp_path: Path, yaml_text: str, message: str) -> None:
    assert load_errors(tmp_path, yaml_text) == [message]


def test_a_yaml_syntax_error_shows_line_column_and_the_line(tmp_path: Path) -> None:
    text = 'listen: "127.0.0.1:8080"\nupstream:\n  url: [http://x\n  read_timeout: 5\n'
    [error] = load_errors(tmp_path, text)
    assert error.startswith(f"config: {tmp_path / 'ndovu.yaml'} is not valid YAML at line ")
    assert "\n" not in error  # one line, as the CLI prints it
    assert error.endswith("at line 4, column 15: expected ',' or ']', but got ':'; the line: '  read_timeout: 5'")


def test_a_yaml_error_at_the_end_of_the_file_shows_the_last_line(tmp_path: Path) -> None:
    [error] = load_errors(tmp_path, "a: [\n")
    assert error.endswith("at line 2, column 1: expected the node content, but found '<stream end>'; "
                          "the last line before it is line 1; the line: 'a: ['")


def test_a_yaml_error_on_a_secret_line_does_not_show_the_secret(tmp_path: Path) -> None:
    text = 'auth:\n  client_secret: "sup3r-s3cret\n  client_id: x\n'
    [error] = load_errors(tmp_path, text)
    assert "not valid YAML at line" in error
    assert "sup3r-s3cret" not in error


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = ("upstrem:\n  url: http://x\n"
            "auth:\n  client_secert: s\n  backoff_initial: 10\n  backoff_max: 5\n"
            "logging:\n  level: loud\n"
            "upstream:\n  read_timeout: soon\n"
            'listen: "8080"\n')
    errors = load_errors(tmp_path, text, {"NDOVU_CLIENT_ID": "a:b"})
    assert errors == [
        "upstrem: unknown key; did you mean upstream?",
        "auth.client_secert: unknown key; did you mean auth.client_secret?",
        "auth.client_secret: missing; set NDOVU_CLIENT_SECRET or auth.client_secret_file",
        "auth.client_id: must not contain ':' with auth.style ndovu",
        "auth.backoff_max: must be at least auth.backoff_initial",
        "listen: expected HOST:PORT, got '8080'",
        "upstream.read_timeout: expected a number, got 'soon'",
        "logging.level: expected one of debug, info, warning, error, got 'loud'",
    ]


def test_the_collected_error_still_reads_as_its_first(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        config.load({"config": write(tmp_path, "logging:\n  level: loud\n  format: xml\n")}, CREDS)
    assert err.value.key == "logging.level"
    assert err.value.problem.startswith("expected one of debug")
    assert str(err.value).splitlines() == [
        "logging.level: expected one of debug, info, warning, error, got 'loud'",
        "logging.format: expected one of json, console, auto, got 'xml'",
    ]


def test_a_bad_upstream_url_is_reported_once_and_the_token_path_still_checked() -> None:
    with pytest.raises(config.ConfigErrors) as err:
        config.load({"upstream.url": "ftp://x", "auth.token_path": "auth"}, CREDS)
    assert [e.key for e in err.value.errors] == ["upstream.url", "auth.token_path"]


MANY = ("upstrem:\n  url: http://x\nauth:\n  client_secert: s\nlogging:\n  format: xml\n"
        "shutdown_timeout: -1\n")
MANY_LINES = [
    "ndovu-proxy: config error: upstrem: unknown key; did you mean upstream?",
    "ndovu-proxy: config error: auth.client_secert: unknown key; did you mean auth.client_secret?",
    "ndovu-proxy: config error: auth.client_secret: missing; set NDOVU_CLIENT_SECRET or auth.client_secret_file",
    "ndovu-proxy: config error: logging.format: expected one of json, console, auto, got 'xml'",
    "ndovu-proxy: config error: shutdown_timeout: must not be negative",
]


@pytest.mark.parametrize("sub", ["serve", "check"])
async def test_serve_and_check_print_every_error_one_line_each_and_exit_1(
    command: MakeCommand, tmp_path: Path, sub: str
) -> None:
    cmd = command(sub, "--config", write(tmp_path, MANY), env={"NDOVU_CLIENT_ID": "x"})
    assert await cmd.run() == 1
    assert cmd.stderr == MANY_LINES
    assert cmd.stdout == []


@pytest.mark.parametrize("sub", ["serve", "check"])
async def test_serve_and_check_show_where_the_yaml_is_broken(command: MakeCommand, tmp_path: Path, sub: str) -> None:
    path = write(tmp_path, "listen: 127.0.0.1:8080\nupstream:\n  url: [oops\n")
    cmd = command(sub, "--config", path, env={"NDOVU_CLIENT_ID": "x", "NDOVU_CLIENT_SECRET": "y"})
    assert await cmd.run() == 1
    [line] = cmd.stderr
    assert line.startswith(f"ndovu-proxy: config error: config: {path} is not valid YAML at line ")
    assert line.endswith("while parsing a flow sequence at line 3, column 8; the line: '  url: [oops'")
