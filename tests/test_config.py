"""Configuration: precedence of flags, environment, file and defaults; errors with file and line; TOML round trip."""

from __future__ import annotations

import tomllib

import pytest

from hyperjax.config import Config, find_config_file, load_config, save_config, to_toml
from hyperjax.errors import ConfigError


def write(path, text: str):
    path.write_text(text)
    return path


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path):
    path = write(tmp_path / "c.toml", "[sampling]\ntemperature = 0.1\ntop_k = 5\nseed = 1\n[hybrid]\nretries = 4\n")
    environ = {"HYPERJAX_SAMPLING_TOP_K": "7", "HYPERJAX_SAMPLING_SEED": "2", "HYPERJAX_HOME": "/elsewhere"}
    loaded = load_config(path, environ=environ, flags={"sampling.seed": 3, "sampling.top_p": None})
    s = loaded.config.sampling
    assert (s.temperature, s.top_k, s.seed, s.top_p) == (0.1, 7, 3, 0.95)
    assert loaded.config.hybrid.retries == 4 and loaded.path == path
    sources = loaded.sources
    assert [sources[f"sampling.{k}"] for k in ("temperature", "top_k", "seed")] == ["file", "env", "flag"]
    assert sources["sampling.top_p"] == "default"


def test_file_is_found_in_cwd_then_home(tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HYPERJAX_HOME", str(home))
    assert find_config_file(cwd) is None
    home.mkdir()
    in_home = write(home / "hyperjax.toml", "[memory]\nbudget = '64MB'\n")
    assert find_config_file(cwd) == in_home
    in_cwd = write(cwd / "hyperjax.toml", "[memory]\nbudget = 1000000\n")
    assert find_config_file(cwd) == in_cwd
    monkeypatch.chdir(cwd)
    assert load_config(environ={}).config.memory.budget == 1_000_000


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("[model]\nname = 'x'\n\n[sampling]\n# comment\ntemprature = 0.5\n", 6, "unknown key 'sampling.temprature'"),
        ("[sampling]\ntop_k = 4\n[hybrid]\npolicy = 'auto'\nretries = '2'\n", 5, "hybrid.retries must be an integer"),
        ("[sampling]\nseed = true\n", 2, "sampling.seed must be an integer, got true"),
        ("[server]\nport = 8765.0\n", 2, "server.port must be an integer"),
        ("[server]\nport = 70000\n", 2, "server.port must be in [1, 65535]"),
        ("[hybrid]\n\npolicy = 'fastest'\n", 3, "choose one of local, remote"),
        ("[model]\nname = 'x'\n[nonsense]\nkey = 1\n", 3, "unknown section [nonsense]"),
        ("sampling.temperature = 'hot'\n", 1, "sampling.temperature must be a number"),
        ("[sampling]\ntop_k = 1\n[sampling.extra]\nx = 1\n", 3, "unknown key 'sampling.extra'"),
    ],
)
def test_bad_keys_and_types_name_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(f"{path}:{line}: ") and message in str(info.value), str(info.value)


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"invalid TOML: .*line 2"):
        load_config(write(tmp_path / "broken.toml", "[sampling]\ntop_k = \n"), environ={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml", environ={})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"HYPERJAX_SAMPLING_TEMP": "0"}, r"unknown variable \$HYPERJAX_SAMPLING_TEMP"),
        ({"HYPERJAX_SAMPLING_TOP_K": "many"}, r"\$HYPERJAX_SAMPLING_TOP_K: sampling.top_k must be an integer"),
        ({"HYPERJAX_HYBRID_TIMEOUT_S": "-1"}, "hybrid.timeout_s must be positive"),
    ],
)
def test_environment_errors_name_the_variable(environ, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, environ=environ)


def test_environment_values_are_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYPERJAX_HOME", str(tmp_path))
    environ = {
        "HYPERJAX_SAMPLING_TEMPERATURE": "0",
        "HYPERJAX_HYBRID_REMOTE_URL": "http://h:1/mcp",
        "HYPERJAX_MEMORY_BUDGET": "64MB",
        "HYPERJAX_MCP_TOKEN": "not a config key",
    }
    config = load_config(environ=environ).config
    assert config.sampling.temperature == 0.0 and isinstance(config.sampling.temperature, float)
    assert config.hybrid.remote_url == "http://h:1/mcp" and config.memory.budget == "64MB"


def test_save_then_load_round_trips(tmp_path):
    config = Config().with_values(
        {
            "model.name": 'C:\\models\\a "quoted" ünïcode.gguf',
            "sampling.temperature": 0.0,
            "sampling.min_p": 1e-05,
            "sampling.max_tokens": 7,
            "memory.budget": "48MB",
            "server.token": "s3cret",
            "hybrid.policy": "auto",
            "hybrid.remote_url": "http://127.0.0.1:9/mcp",
            "hybrid.timeout_s": 2.5,
        }
    )
    path = save_config(config, tmp_path / "sub" / "saved.toml")
    assert load_config(path, environ={}).config == config
    assert path.stat().st_mode & 0o777 == 0o600
    assert "token" not in tomllib.loads(to_toml(Config()))["hybrid"]  # unset keys are left out
    assert load_config(save_config(Config(), tmp_path / "defaults.toml"), environ={}).config == Config()


def test_generate_command_takes_defaults_from_file_then_env_then_flags(tiny_llama_gguf, tmp_path):
    import os
    import subprocess
    import sys

    import hyperjax

    options = {"max_tokens": 6, "temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    sampling = "".join(f"{k} = {v}\n" for k, v in options.items())
    write(tmp_path / "hyperjax.toml", f'[model]\nname = "{tiny_llama_gguf}"\n[sampling]\n{sampling}seed = 1\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERJAX_")} | {"HYPERJAX_HOME": str(tmp_path)}

    def generated(*flags: str, **variables: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "hyperjax", "generate", "hello", "--no-stream", *flags],
            capture_output=True, text=True, cwd=tmp_path, env=env | variables, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.removesuffix("\n")

    model = hyperjax.load(tiny_llama_gguf)
    expected = {seed: model.generate("hello", seed=seed, **options).text for seed in (1, 2, 3)}
    assert len(set(expected.values())) == 3  # the seed decides the text, so the text tells which layer won
    assert generated() == expected[1]
    assert generated(HYPERJAX_SAMPLING_SEED="2") == expected[2]
    assert generated("--seed", "3", HYPERJAX_SAMPLING_SEED="2") == expected[3]
