"""The `vp2o` command line: dotted overrides anywhere after the verb, anything else refused."""

from __future__ import annotations

import pytest

from vp2o import cli


@pytest.fixture
def parsed(monkeypatch):
    """Runs `vp2o ARGV` with the verb replaced by one that returns its parsed arguments."""
    seen = []
    monkeypatch.setattr(cli, "_eval", lambda args: seen.append(args) or 0)

    def run(*argv: str):
        assert cli.main(list(argv)) == 0
        return seen.pop()

    return run


def test_overrides_may_follow_options(parsed):
    args = parsed("eval", "--config", "c.yaml", "a.b=1", "--benchmark", "f.jsonl", "c.d=2",
                  "--log-samples", "e.f=x=y")
    assert args.config == "c.yaml" and args.benchmark == "f.jsonl" and args.log_samples
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=x=y"]  # in the order given
    assert parsed("eval", "a.b=1").overrides == ["a.b=1"]


def test_launch_takes_options_between_overrides():
    args = cli.parse_args(["launch", "c.yaml", "a.b=1", "--nodes", "2", "c.d=2", "--dry-run"])
    assert (args.config, args.nodes, args.dry_run) == ("c.yaml", 2, True)
    assert args.overrides == ["a.b=1", "c.d=2"]
    args = cli.parse_args(["launch", "--verb", "sft", "c.yaml"])
    assert (args.config, args.verb, args.overrides) == ("c.yaml", "sft", [])


@pytest.mark.parametrize("argv", [
    ("eval", "a.b=1", "--no-such-flag"),
    ("eval", "a.b=1", "--benchmark", "f.jsonl", "stray"),
    ("report", "--out", "r", "a.b=1", "--bogus"),
])
def test_unknown_arguments_are_refused_by_name(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments:" in err and argv[-1] in err
