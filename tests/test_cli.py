"""The `lorafleet` command table and its error path, without starting Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorafleet.cli import COMMANDS, build_parser, main


def test_every_command_is_in_the_table_and_takes_home(tmp_path: Path) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == list(COMMANDS)
    argv = {"base": ["base", "build"], "train": ["train", "x.yaml"], "eval": ["eval", "base"],
            "predict": ["predict", "a", "d.jsonl", "--out", "o"],
            "adapters": ["adapters", "list"], "serve": ["serve"], "ask": ["ask", "qa", "why"],
            "rag": ["rag", "search", "q", "--collection", "kb"], "sweep": ["sweep"],
            "compare": ["compare", "c.yaml"], "prompts": ["prompts", "c.yaml"], "plan": ["plan", "c.yaml"]}
    assert set(argv) == set(COMMANDS)
    for words in argv.values():
        args = parser.parse_args([*words, "--home", str(tmp_path)])
        assert args.home == str(tmp_path) and callable(args.fn)


def test_base_import_gguf_flags() -> None:
    args = build_parser().parse_args(["base", "import-gguf", "--out", "m", "--gguf", "f.gguf"])
    assert (args.out, args.gguf, args.fn.__name__) == ("m", "f.gguf", "cmd_base_import_gguf")


def test_home_is_applied_once_before_the_command(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LORAFLEET_HOME", "/nowhere")
    assert main(["adapters", "list", "--json", "--home", str(tmp_path / "h")]) == 0
    assert os.environ["LORAFLEET_HOME"] == str((tmp_path / "h").resolve())
    assert capsys.readouterr().out.strip() == "[]"


def test_serve_config_problems_are_one_clean_error(tmp_path: Path, monkeypatch, capsys) -> None:
    """Every problem at once, exit 2, no traceback, before Ray starts."""
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))
    bad = tmp_path / "serve.yaml"
    bad.write_text("applications:\n  - name: x\n    args:\n      tasks: {sentiment: a}\n      max_tokens: 900\n")
    assert main(["serve", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: invalid config {bad}: 2 problem(s)")
    assert "unknown task 'sentiment'" in err and "max_tokens=900 must be below max_model_len=512" in err
    ok = tmp_path / "ok.yaml"
    ok.write_text("applications:\n  - args: {max_tokens: 100}\n")
    assert main(["serve", str(ok)]) == 2
    assert f"base model {tmp_path / 'models' / 'tiny'} not found" in capsys.readouterr().err


def test_train_config_problems_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lrr: 1\n")
    assert main(["train", str(bad)]) == 2
    assert "train.lrr: unknown key" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="give a CONFIG file"):
        main(["train"])


def _watch(states: list, *, grace_s: float = 100.0) -> tuple[str | None, int]:
    """watch_app over scripted Serve states, one every 10 s of a fake clock; stops when they run out."""
    from lorafleet.cli.serve import watch_app

    t = {"now": 0.0, "asked": 0}

    def status() -> str:
        state = states[t["asked"]]
        t["asked"] += 1
        t["now"] += 10
        if isinstance(state, Exception):
            raise state
        return state

    why = watch_app(status, every_s=0.0, grace_s=grace_s, clock=lambda: t["now"],
                    stopped=lambda: t["asked"] >= len(states))
    return why, t["asked"]


def test_serve_exits_on_a_dead_app_and_waits_out_a_replica_restart() -> None:
    # Serve replacing a dead engine replica (UNHEALTHY, DEPLOYING) within the grace: keep serving.
    assert _watch(["RUNNING", "UNHEALTHY", "DEPLOYING", "UNHEALTHY", "RUNNING", "RUNNING"]) == (None, 6)
    # The grace restarts after each recovery; it is counted from the first unhealthy answer.
    assert _watch(["UNHEALTHY"] * 5 + ["RUNNING"] + ["UNHEALTHY"] * 5, grace_s=45) == (None, 11)
    why, asked = _watch(["RUNNING"] + ["UNHEALTHY"] * 20, grace_s=45)
    assert why == "the application stayed UNHEALTHY for 45 s" and asked == 7
    assert _watch(["RUNNING", "DEPLOY_FAILED", "RUNNING"]) == ("the application is DEPLOY_FAILED", 2)
    assert _watch(["RUNNING", "MISSING"]) == ("the application is MISSING", 2)
    why, asked = _watch(["RUNNING", ConnectionError("GCS is gone"), "RUNNING"])
    assert why == "Ray Serve does not answer (ConnectionError: GCS is gone)" and asked == 2
