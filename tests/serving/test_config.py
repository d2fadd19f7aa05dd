"""serving/config.py's parse: flags, their DIGITSERVE_* variables, the flag winning over the variable,
and bad values refused before anything starts (ConfigError for a variable, argparse's exit 2 for a
flag), each as one line. Unit tests in this process (the same through `python -m serving`:
tests/serving/test_processes.py)."""
from dataclasses import fields
from pathlib import Path

import pytest

from serving import config
from serving.config import Config, ConfigError, build_parser, env_name, parse


@pytest.fixture(autouse=True)
def open_file_limit(monkeypatch):
    """This machine's `ulimit -Hn` out of the results: as if it allowed a million open files."""
    monkeypatch.setattr(config.resource, "getrlimit", lambda kind: (1024, 1 << 20))


def test_nothing_given_is_the_defaults():
    assert parse([], {}) == Config()


def test_flags_set_their_fields_with_their_types():
    settings = parse(["--exports", "models", "--host", "0.0.0.0", "--port", "9000", "--workers", "3",
                      "--max-batch-size", "8", "--batch-timeout", "0.5", "--backend", "torchscript",
                      "--reload-interval", "0"], {})
    assert settings.exports == Path("models") and settings.host == "0.0.0.0" and settings.port == 9000
    assert settings.workers == 3 and settings.max_batch_size == 8 and settings.batch_timeout == 0.5
    assert settings.backend == "torchscript" and settings.reload_interval == 0.0


def test_variables_set_the_fields_no_flag_set(tmp_path):
    settings = parse([], {"DIGITSERVE_PORT": "9001", "DIGITSERVE_WORKERS": "4", "DIGITSERVE_DEVICE": "cpu",
                          "DIGITSERVE_READ_TIMEOUT": "2.5", "DIGITSERVE_EXPORTS": "/models",
                          "DIGITSERVE_DATA_DIR": str(tmp_path), "DIGITSERVE_API_KEY": "k"})
    assert settings.port == 9001 and settings.workers == 4 and settings.device == "cpu"
    assert settings.read_timeout == 2.5 and settings.exports == Path("/models") and settings.data_dir == tmp_path
    assert settings.api_key == "k"


@pytest.mark.parametrize("argv, environ, field, value", [
    (["--workers", "3"], {"DIGITSERVE_WORKERS": "5"}, "workers", 3),
    (["--workers", "3"], {"DIGITSERVE_WORKERS": "0"}, "workers", 3),  # a bad variable behind a flag is not read
    (["--port", "8000"], {"DIGITSERVE_PORT": "9000"}, "port", 8000),  # a flag given its default still wins
    (["--device", "cpu"], {"DIGITSERVE_DEVICE": "cuda"}, "device", "cpu"),
    ([], {"DIGITSERVE_PORT": ""}, "port", 8000),  # an empty variable is not set
])
def test_the_flag_wins_over_its_variable(argv, environ, field, value):
    assert getattr(parse(argv, environ), field) == value


def test_every_setting_but_the_api_key_has_a_flag_naming_its_variable():
    parser = build_parser()
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    assert set(actions) == {f.name for f in fields(Config)} - {"api_key"}  # the key only from the environment
    for dest, action in actions.items():
        assert action.help.endswith(f"[{env_name(dest)}]"), action.help
    assert env_name("max_batch_size") == "DIGITSERVE_MAX_BATCH_SIZE"


@pytest.mark.parametrize("environ, message", [
    ({"DIGITSERVE_WORKERS": "0"}, "DIGITSERVE_WORKERS=0: must be 1..256, got 0"),
    ({"DIGITSERVE_PORT": "http"}, "DIGITSERVE_PORT=http: 'http' is not an integer"),
    ({"DIGITSERVE_DEVICE": "tpu"}, "DIGITSERVE_DEVICE=tpu: choose from auto, cpu, cuda"),
    ({"DIGITSERVE_HOST": "10.0.0.1"}, "DIGITSERVE_HOST=10.0.0.1: choose from 127.0.0.1, 0.0.0.0, ::"),
    ({"DIGITSERVE_BATCH_TIMEOUT": "2"}, "DIGITSERVE_BATCH_TIMEOUT=2: must be 0..1 seconds, got 2"),
    ({"DIGITSERVE_READ_TIMEOUT": "soon"}, "DIGITSERVE_READ_TIMEOUT=soon: 'soon' is not a number"),
    ({"DIGITSERVE_RELOAD_INTERVAL": "0.1"}, "must be 0 (no polling) or 0.5..3600 seconds, got 0.1"),
    ({"DIGITSERVE_DATA_DIR": "/nonexistent"}, "DIGITSERVE_DATA_DIR=/nonexistent: /nonexistent is not a folder"),
    ({"DIGITSERVE_MAX_HEADER_COUNT": "5"}, "DIGITSERVE_MAX_HEADER_COUNT=5: must be 8..10000, got 5"),
])
def test_a_bad_variable_is_a_config_error_naming_it(environ, message):
    with pytest.raises(ConfigError) as caught:
        parse([], environ)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("argv, message", [
    (["--port", "80"], "argument --port: must be 1024..65535, got 80"),
    (["--host", "10.0.0.1"], "argument --host: invalid choice"),
    (["--reload-interval", "0.2"], "argument --reload-interval: must be 0 (no polling) or 0.5..3600 seconds"),
    (["--max-batch-size", "many"], "argument --max-batch-size: 'many' is not an integer"),
    (["--api-key", "k"], "unrecognized arguments: --api-key k"),  # a flag would show in `ps`
])
def test_a_bad_flag_exits_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as caught:
        parse(argv, {})
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_connections_beyond_the_open_file_limit_are_refused(monkeypatch):
    monkeypatch.setattr(config.resource, "getrlimit", lambda kind: (1024, 8192))
    assert parse(["--max-connections", "7936"], {}).max_connections == 7936  # 7936 + 256 files: the hard limit
    with pytest.raises(ConfigError, match="--max-connections 7937 needs 8193 open files, and this process may "
                                          r"open at most 8192 \(ulimit -Hn\)"):
        parse(["--max-connections", "7937"], {})
    with pytest.raises(ConfigError, match="needs 8448 open files"):
        parse([], {"DIGITSERVE_MAX_CONNECTIONS": "8192"})


def test_the_default_connections_fit_a_low_open_file_limit(monkeypatch):
    """A container with `ulimit -Hn 1024` (buildah's chroot runs): the defaults refused to start."""
    monkeypatch.setattr(config.resource, "getrlimit", lambda kind: (1024, 1024))
    assert parse([], {}).max_connections == 768
    monkeypatch.setattr(config.resource, "getrlimit", lambda kind: (1024, 65536))
    assert parse([], {}).max_connections == 4096
