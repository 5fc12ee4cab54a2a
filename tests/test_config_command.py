"""`ndovu-proxy config`: the effective settings, where each came from, secrets masked; and
`--version`. The real command in a subprocess."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

from proxy import config
from tests.procs import MakeCommand


SECRET, INBOUND, PASSWORD = "cl13nt-s3cret", "inb0und-t0ken", "pa55w0rd"


def lines_by_key(stdout: list[str]) -> dict[str, str]:
    return {line.split(" = ", 1)[0]: line for line in stdout}


async def test_config_shows_every_kind_of_source_and_masks_secrets(command: MakeCommand, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text('upstream:\n  url: "http://${UP_HOST}:9000"\n  read_timeout: 7\n'
                    'forwarding:\n  inbound_token: "${TOK}"\n')
    env = {"NDOVU_CLIENT_ID": "id-1", "NDOVU_CLIENT_SECRET": SECRET, "NDOVU_PROXY_CONFIG": str(path),
           "UP_HOST": "up.example", "TOK": INBOUND}
    cmd = command("config", "--log-level", "debug", env=env)
    assert await cmd.run() == 0, cmd.output()
    by_key = lines_by_key(cmd.stdout)
    assert set(by_key) == {"config", *config.DEFAULTS}
    assert by_key["config"] == f"config = {path}  # env NDOVU_PROXY_CONFIG"
    assert by_key["listen"] == "listen = 127.0.0.1:8080  # default"
    assert by_key["upstream.url"] == f"upstream.url = http://up.example:9000  # file {path} via ${{UP_HOST}}"
    assert by_key["upstream.read_timeout"] == f"upstream.read_timeout = 7  # file {path}"
    assert by_key["auth.client_id"] == "auth.client_id = id-1  # env NDOVU_CLIENT_ID"
    assert by_key["auth.client_secret"] == "auth.client_secret = <set>  # env NDOVU_CLIENT_SECRET"
    assert by_key["forwarding.inbound_token"] == f"forwarding.inbound_token = <set>  # file {path} via ${{TOK}}"
    assert by_key["forwarding.allowed_paths"] == 'forwarding.allowed_paths = ["/api/v3/partners/"]  # default'
    assert by_key["logging.level"] == "logging.level = debug  # flag --log-level"
    assert SECRET not in cmd.output() and INBOUND not in cmd.output()


async def test_config_json_gives_value_and_source_per_key(command: MakeCommand, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f'auth:\n  client_secret: "{SECRET}"\n')
    cmd = command("config", "--json", "--config", str(path), "--upstream", "http://127.0.0.1:9",
                  "--admin-listen", "off", env={"NDOVU_CLIENT_ID": "id-1"})
    assert await cmd.run() == 0, cmd.output()
    doc = json.loads("\n".join(cmd.stdout))
    assert doc["config"] == {"value": str(path), "source": "flag --config"}
    assert doc["upstream.url"] == {"value": "http://127.0.0.1:9", "source": "flag --upstream"}
    assert doc["admin_listen"] == {"value": "off", "source": "flag --admin-listen"}
    assert doc["auth.client_secret"] == {"value": "<set>", "source": f"file {path}"}
    assert doc["forwarding.inbound_token"] == {"value": None, "source": "default"}
    assert doc["upstream.tls_verify"] == {"value": True, "source": "default"}
    assert SECRET not in cmd.output()


async def test_config_validates_like_serve(command: MakeCommand, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"upstrem: 1\nupstream:\n  url: http://user:{PASSWORD}@up.example\n")
    cmd = command("config", "--config", str(path), env={"NDOVU_CLIENT_ID": "id-1", "NDOVU_CLIENT_SECRET": SECRET})
    assert await cmd.run() == 1
    assert cmd.stdout == []
    assert cmd.stderr == ["ndovu-proxy: config error: upstrem: unknown key; did you mean upstream?",
                          "ndovu-proxy: config error: upstream.url: not a valid http(s) URL"]
    assert PASSWORD not in cmd.output() and SECRET not in cmd.output()


def test_a_password_in_a_url_is_masked() -> None:
    mask = config._mask_url_passwords  # noqa: SLF001
    assert mask("https://user:pa55@host/x") == "https://user:<set>@host/x"
    assert mask(["http://u:p@h", "/plain"]) == ["http://u:<set>@h", "/plain"]
    assert mask("https://host:8443/x") == "https://host:8443/x"
    assert mask(5) == 5


async def test_version_prints_the_installed_version(command: MakeCommand) -> None:
    cmd = command("--version")
    assert await cmd.run() == 0
    assert cmd.stdout == [f"ndovu-proxy {version('ndovu-proxy')}"]


def test_config_into_a_closed_pipe_prints_no_traceback() -> None:
    """`ndovu-proxy config | head`: the reader is gone before the command writes."""
    import subprocess
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "ndovu-proxy")
    env = {"NDOVU_CLIENT_ID": "a", "NDOVU_CLIENT_SECRET": "s", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([exe, "config"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # long before the interpreter has started and written anything
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=30) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err


async def test_config_shows_each_routes_own_keys_and_the_egress_variables(command: MakeCommand, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text('routes:\n  - name: prod\n    listen: "127.0.0.1:${PORT}"\n'
                    f'    auth: {{client_secret: "{SECRET}"}}\n'
                    '  - {name: dev, listen: "127.0.0.1:8081", upstream: {proxy: direct}}\n')
    env = {"NDOVU_CLIENT_ID": "id-1", "NDOVU_CLIENT_SECRET": "top-secret-x", "PORT": "8080",
           "https_proxy": f"http://user:{PASSWORD}@proxy.corp:3128", "HTTPS_PROXY": "http://ignored:1"}
    cmd = command("config", "--config", str(path), env=env)
    assert await cmd.run() == 0, cmd.output()
    by_key = lines_by_key(cmd.stdout)
    assert by_key["routes[prod].listen"] == f"routes[prod].listen = 127.0.0.1:8080  # file {path} via ${{PORT}}"
    assert "listen" not in by_key  # the routes listen, not the top level: no line says otherwise
    assert "admin_listen" in by_key
    assert by_key["routes[prod].auth.client_secret"] == f"routes[prod].auth.client_secret = <set>  # file {path}"
    assert by_key["routes[dev].upstream.proxy"] == f"routes[dev].upstream.proxy = direct  # file {path}"
    # the lower-case variable wins, as curl reads them; its password is masked
    assert by_key["env.https_proxy"] == "env.https_proxy = http://user:<set>@proxy.corp:3128  # env https_proxy"
    assert "env.HTTPS_PROXY" not in by_key
    assert SECRET not in cmd.output() and PASSWORD not in cmd.output() and "top-secret-x" not in cmd.output()
