"""What the CLI says when something is wrong: one line on stderr naming what to fix, nothing on
stdout, a non-zero exit."""

import pytest

from tests.cli.test_cli import one_line_error


def test_a_url_without_scheme_is_refused_with_a_hint(cli):
    line = one_line_error(cli.run("auth", "key", "--apikey", "x", "--url", "aichor.example.com", check=False))
    assert line == (
        "Error: the server address aichor.example.com has no scheme: "
        "give it as --url https://aichor.example.com (or http://)"
    )
    line = one_line_error(cli.run("auth", "key", "--apikey", "x", "--url", "ftp://aichor.example.com", check=False))
    assert line == "Error: the server address ftp://aichor.example.com must start with https:// or http://"
    assert not (cli.home / "aichor" / "config.json").exists()  # nothing was stored


@pytest.mark.parametrize("url", ["http://no-such-host.invalid", "http://127.0.0.1:9"])
def test_an_unreachable_server_is_named(cli, url):
    line = one_line_error(cli.run("auth", "key", "--apikey", "x", "--url", url, check=False))
    assert line == f"Error: cannot reach the aichor server at {url}"


def test_usage_errors_are_one_line_with_where_to_look(cli):
    result = cli.run("experiments", "logs", check=False)
    assert result.returncode == 2
    assert one_line_error(result) == "Error: Missing argument 'EXPERIMENT'. (see `aichor experiments logs --help`)"
    result = cli.run("experiments", "list", "--limit", "0", check=False)
    assert result.returncode == 2 and "'--limit'" in one_line_error(result)
    assert "No such command 'nope'" in one_line_error(cli.run("experiments", "nope", check=False))


def test_a_bare_group_shows_its_help(cli):
    result = cli.run("experiments", check=False)
    assert result.returncode == 2 and result.stderr.startswith("Usage: aichor experiments")
