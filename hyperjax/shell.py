"""`hyperjax shell`: an interactive shell over a local model, a remote MCP server and the hybrid dispatcher.

Line editing, completion and history (`$HYPERJAX_HOME/shell_history`) come from readline when stdin is a terminal.
Read from a pipe, the shell prints no prompt and runs each line as a command (`#` starts a comment); it exits with
status 1 if any command failed. A failing command prints one `error: ...` line and the shell goes on.
"""

from __future__ import annotations

import cmd
import json
import re
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from hyperjax.config import FILENAME, Config, LoadedConfig, load_config, parse_text_value, save_config, split_key
from hyperjax.errors import HyperjaxError
from hyperjax.hybrid import OPERATIONS, HybridDispatcher

if TYPE_CHECKING:
    from hyperjax.api import Model


class ShellError(HyperjaxError, ValueError):
    """A shell command is malformed: unknown command or option, missing argument."""


SUBCOMMANDS = {
    "model": ("load", "info"),
    "config": ("get", "set", "show", "save"),
    "mcp": ("connect", "disconnect", "status"),
    "hybrid": ("on", "off", "status", "policy", "force-local", "force-remote"),
    "stats": ("--json",),
}
GENERATE_OPTIONS = {
    "--max-tokens": "max_tokens",
    "-n": "max_tokens",
    "--temperature": "temperature",
    "-t": "temperature",
    "--top-k": "top_k",
    "--top-p": "top_p",
    "--min-p": "min_p",
    "--repeat-penalty": "repeat_penalty",
    "--seed": "seed",
}
GENERATE_FLAGS = {"--chat": "chat", "--ignore-eos": "ignore_eos"}
HELP = """\
commands:
  generate [--max-tokens N] [--temperature T] [--top-k K] [--top-p P] [--min-p P] [--repeat-penalty R] [--seed S]
           [--chat] [--ignore-eos] [--] PROMPT      generate (options default to the [sampling] config)
  tokenize TEXT                                     token ids of TEXT under the local model
  model load [NAME|PATH] [--memory-budget SIZE]     load a model (default: the configured one)
  model info                                        architecture, parameters, weights in memory
  config get KEY | set KEY VALUE | show | save [PATH]
  mcp connect URL [--token TOKEN] | disconnect | status
  hybrid on | off | status | policy NAME | force-local | force-remote
  stats [--json]                                    timings per operation, local and remote side by side
  help [COMMAND] · exit"""
SECRET_KEYS = ("server.token", "hybrid.token")


def _words(text: str) -> tuple[str, str]:
    """(first word, the rest with leading spaces removed)."""
    parts = text.strip().split(maxsplit=1)
    return (parts[0], parts[1] if len(parts) > 1 else "") if parts else ("", "")


def parse_generate(arg: str) -> tuple[dict[str, Any], str]:
    """(options, prompt) of `generate`'s argument: leading options, then the prompt verbatim (`--` ends options)."""
    options: dict[str, Any] = {}
    rest = arg.strip()
    while rest.startswith("-"):
        word, rest = _words(rest)
        if word == "--":
            break
        if word in GENERATE_FLAGS:
            options[GENERATE_FLAGS[word]] = True
            continue
        if word not in GENERATE_OPTIONS:
            raise ShellError(f"unknown option {word} (put -- before a prompt that starts with -)")
        value, rest = _words(rest)
        if not value:
            raise ShellError(f"{word} needs a value")
        name = GENERATE_OPTIONS[word]
        options[name] = parse_text_value(f"sampling.{name}", value)
    if not rest:
        raise ShellError("generate needs a prompt")
    return options, rest


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def stats_table(stats: dict[str, Any]) -> Table:
    """Per-operation timings in ms, local and remote side by side."""
    table = Table(title="timings (ms)")
    table.add_column("operation")
    for side in ("local", "remote"):
        for column in ("n", "min", "mean", "max", "p95"):
            table.add_column(f"{side} {column}" if column == "n" else column, justify="right")
    for op in OPERATIONS:
        cells = [op]
        for side in ("local", "remote"):
            t = stats[side]["timings"][op]
            cells += [str(t["count"]), _ms(t["min_s"]), _ms(t["mean_s"]), _ms(t["max_s"]), _ms(t["p95_s"])]
        table.add_row(*cells)
    return table


def _side_line(side: str, s: dict[str, Any]) -> str:
    rate = "-" if s["mean_tokens_per_s"] is None else f"{s['mean_tokens_per_s']:.1f}"
    return (
        f"{side}: {s['count']} requests, {s['errors']} errors, {s['fallbacks']} fallbacks, "
        f"{s['tokens']} tokens, {rate} tok/s end to end"
    )


class Shell(cmd.Cmd):
    """The command loop; state: the configuration, the dispatcher (which owns the local model) and hybrid on/off."""

    def __init__(self, loaded: LoadedConfig, *, stdin: IO[str], stdout: IO[str], interactive: bool):
        super().__init__(stdin=stdin, stdout=stdout)
        self.use_rawinput = interactive
        self.interactive = interactive
        self.prompt = "hyperjax> " if interactive else ""
        self.intro = "hyperjax shell · type help for the commands, exit to leave" if interactive else None
        self.loaded = loaded
        self.failures = 0
        self.console = Console(file=stdout, width=None if interactive else 140, highlight=False)
        self.dispatcher = HybridDispatcher(self._load_configured, policy="local")
        self.hybrid_on = False
        if self.config.hybrid.remote_url is not None:
            self._apply(hybrid_on=True)

    @property
    def config(self) -> Config:
        return self.loaded.config

    # ---- plumbing ---------------------------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def onecmd(self, line: str) -> bool:
        try:
            return bool(super().onecmd(line))
        except HyperjaxError as exc:
            self._fail(str(exc))
        except KeyboardInterrupt:
            self._fail("interrupted")
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
        return False

    def _fail(self, message: str) -> None:
        self.failures += 1
        self.say("error: " + " ".join(message.split()))

    def emptyline(self) -> bool:
        return False

    def default(self, line: str) -> bool:
        if line.lstrip().startswith("#"):
            return False
        raise ShellError(f"unknown command {_words(line)[0]!r} (type help)")

    def completenames(self, text: str, *ignored: Any) -> list[str]:
        return [name for name in super().completenames(text, *ignored) if name != "EOF"]

    def completedefault(self, text: str, line: str, begidx: int, endidx: int) -> list[str]:
        words = line[:begidx].split()
        if len(words) != 1:
            return []
        return [sub for sub in SUBCOMMANDS.get(words[0], ()) if sub.startswith(text)]

    def _set(self, values: dict[str, Any]) -> None:
        self.loaded = LoadedConfig(
            self.config.with_values(values), self.loaded.path, self.loaded.sources | dict.fromkeys(values, "shell")
        )

    def _load_configured(self) -> Model:
        import hyperjax

        return hyperjax.load(self.config.model.name, progress=self.interactive, memory_budget=self.config.memory.budget)

    def _apply(self, *, hybrid_on: bool | None = None, values: dict[str, Any] | None = None) -> None:
        """Set hybrid on/off and config values, and configure the dispatcher; on failure nothing changes."""
        on = self.hybrid_on if hybrid_on is None else hybrid_on
        config = self.config.with_values(values or {})
        h = config.hybrid
        policy = h.policy if on else "local"
        if h.remote_url is None and policy in ("remote", "prefer-remote"):
            raise ShellError(f"policy {policy!r} needs a remote server: mcp connect URL first")
        self.dispatcher.configure(
            policy=policy, remote_url=h.remote_url, token=h.token, timeout_s=h.timeout_s, retries=h.retries
        )
        self.hybrid_on = on
        if values:
            self._set(values)

    # ---- commands ---------------------------------------------------------------------------------------------------

    def do_help(self, arg: str) -> None:
        """help [COMMAND]: the list of commands, or one command's usage."""
        if arg.strip():
            super().do_help(arg)
        else:
            self.say(HELP)

    def do_exit(self, arg: str) -> bool:
        """exit: leave the shell (also quit, or end of input)."""
        return True

    do_quit = do_exit

    def do_EOF(self, arg: str) -> bool:
        if self.interactive:
            self.say("")
        return True

    def do_generate(self, arg: str) -> None:
        """generate [options] PROMPT: continue PROMPT on the side the hybrid policy picks (help lists options)."""
        options, prompt = parse_generate(arg)
        sampling = self.config.sampling
        defaults = {k: getattr(sampling, k) for k in sampling.__dataclass_fields__}
        result = self.dispatcher.generate(prompt, **(defaults | options))
        side = result.side if not result.fell_back else f"local after remote failed ({result.error})"
        self.say(result.text)
        self.say(
            f"[{side} · {result.tokens} tokens · {result.tokens_per_s:.1f} tok/s · {result.latency_s:.2f} s · "
            f"{result.finish_reason}]"
        )

    def do_tokenize(self, arg: str) -> None:
        """tokenize TEXT: the token ids of TEXT under the local model (special tokens parsed)."""
        if not arg:
            raise ShellError("tokenize needs a text")
        ids = self.dispatcher.local_model().tokenize(arg)
        self.say(" ".join(map(str, ids)))
        self.say(f"[{len(ids)} tokens]")

    def do_model(self, arg: str) -> None:
        """model load [NAME|PATH] [--memory-budget SIZE] | model info"""
        sub, rest = _words(arg)
        if sub == "load":
            self._model_load(rest)
        elif sub == "info":
            self._model_info()
        else:
            raise ShellError("usage: model load [NAME|PATH] [--memory-budget SIZE] | model info")

    def _model_load(self, rest: str) -> None:
        values: dict[str, Any] = {}
        match = re.search(r"(?:^|\s)--memory-budget\s+(\S+)", rest)
        if match:
            values["memory.budget"] = parse_text_value("memory.budget", match.group(1))
            rest = (rest[: match.start()] + rest[match.end() :]).strip()
        if rest:
            values["model.name"] = rest
        previous = self.loaded
        self._set(values)
        try:
            t0 = time.perf_counter()
            model = self._load_configured()
        except BaseException:
            self.loaded = previous
            raise
        self.dispatcher.set_local(model)
        name = model.gguf.get("general.name", None) or Path(model.path).name
        self.say(f"loaded {name} from {model.path} in {time.perf_counter() - t0:.2f} s")

    def _model_info(self) -> None:
        info = self.dispatcher.local_model().info()
        file, memory = info["file"], info["memory"]
        self.say(f"{info['name']} · {file['architecture']} · {file['parameters']:,} parameters · {info['path']}")
        self.say(", ".join(f"{k}={v}" for k, v in info["config"].items()))
        weights = ", ".join(
            f"{fmt} {_size(row['bytes'])}" for fmt, row in sorted(memory.get("weights_by_format", {}).items())
        )
        self.say(f"weights in memory: {weights} · RSS {_size(memory['rss_bytes'])}")

    def do_config(self, arg: str) -> None:
        """config get KEY | set KEY VALUE | show | save [PATH]  (keys are section.key, e.g. sampling.temperature)"""
        sub, rest = _words(arg)
        if sub == "show":
            for section, values in self.config.as_dict().items():
                for name, value in values.items():
                    key = f"{section}.{name}"
                    self.say(f"{key} = {self._shown(key, value)}  ({self.loaded.sources.get(key, 'default')})")
        elif sub == "get" and rest:
            split_key(rest)
            self.say(f"{rest} = {self._shown(rest, self.config.get(rest))}")
        elif sub == "set" and len(rest.split(maxsplit=1)) == 2:
            key, text = rest.split(maxsplit=1)
            value = parse_text_value(key, text)
            if key.startswith("hybrid."):
                self._apply(values={key: value})
            else:
                self._set({key: value})
            self.say(f"{key} = {self._shown(key, value)}")
        elif sub == "save":
            from hyperjax.io.registry import hyperjax_home

            path = Path(rest) if rest else self.loaded.path or hyperjax_home() / FILENAME
            self.say(f"saved {save_config(self.config, path)}")
        else:
            raise ShellError("usage: config get KEY | config set KEY VALUE | config show | config save [PATH]")

    @staticmethod
    def _shown(key: str, value: Any) -> str:
        if value is None:
            return "unset"
        return "(hidden)" if key in SECRET_KEYS else json.dumps(value)

    def do_mcp(self, arg: str) -> None:
        """mcp connect URL [--token TOKEN] | mcp disconnect | mcp status"""
        sub, rest = _words(arg)
        if sub == "connect" and rest:
            self._connect(rest)
        elif sub == "disconnect":
            needs_remote = self.config.hybrid.policy in ("remote", "prefer-remote")
            self._apply(hybrid_on=self.hybrid_on and not needs_remote, values={"hybrid.remote_url": None})
            self.say("disconnected" + (" · hybrid off (its policy needs a remote)" if needs_remote else ""))
        elif sub == "status":
            self._mcp_status()
        else:
            raise ShellError("usage: mcp connect URL [--token TOKEN] | mcp disconnect | mcp status")

    def _connect(self, rest: str) -> None:
        url, options = _words(rest)
        values: dict[str, Any] = {"hybrid.remote_url": url}
        if options:
            flag, token = _words(options)
            if flag != "--token" or not token or len(token.split()) != 1:
                raise ShellError("usage: mcp connect URL [--token TOKEN]")
            values["hybrid.token"] = token
        if not url.startswith(("http://", "https://")):
            raise ShellError(f"{url!r} is not an http(s) URL (e.g. http://127.0.0.1:8765/mcp)")
        previous, was_on = self.loaded, self.hybrid_on
        self._apply(hybrid_on=True, values=values)
        try:
            info = self.dispatcher.remote_info()
        except HyperjaxError as exc:
            self.loaded = previous
            self._apply(hybrid_on=was_on)
            raise ShellError(f"cannot connect to {url}: {type(exc).__name__}: {exc}") from None
        policy = self.config.hybrid.policy
        self.say(f"connected to {url} · remote model {info.get('name')} · hybrid on, policy {policy}")

    def _mcp_status(self) -> None:
        h = self.config.hybrid
        if h.remote_url is None:
            self.say("not connected")
            return
        token = "token set" if h.token else "no token"
        t0 = time.perf_counter()
        try:
            info = self.dispatcher.remote_info()
        except HyperjaxError as exc:
            self.say(f"{h.remote_url} · {token} · not answering: {type(exc).__name__}: {exc}")
            return
        counts = info.get("generations", {})
        self.say(
            f"connected to {h.remote_url} · {token} · remote model {info.get('name')} · "
            f"{counts.get('completed', 0)} generations served · answered in {(time.perf_counter() - t0) * 1000:.0f} ms"
        )

    def do_hybrid(self, arg: str) -> None:
        """hybrid on | off | status | policy NAME | force-local | force-remote"""
        sub, rest = _words(arg)
        if sub == "on":
            self._apply(hybrid_on=True)
        elif sub == "off":
            self._apply(hybrid_on=False)
        elif sub == "policy" and rest:
            self._apply(hybrid_on=True, values={"hybrid.policy": parse_text_value("hybrid.policy", rest)})
        elif sub in ("force-local", "force-remote"):
            self._apply(hybrid_on=True, values={"hybrid.policy": sub.removeprefix("force-")})
        elif sub != "status":
            raise ShellError("usage: hybrid on | off | status | policy NAME | force-local | force-remote")
        self._hybrid_status()

    def _hybrid_status(self) -> None:
        h = self.config.hybrid
        state = f"hybrid {'on' if self.hybrid_on else 'off'}"
        self.say(
            f"{state} · policy {self.dispatcher.policy} (configured {h.policy}) · remote {h.remote_url or 'none'} · "
            f"timeout {h.timeout_s:g} s · retries {h.retries}"
        )

    def do_stats(self, arg: str) -> None:
        """stats [--json]: timings per operation (count, min, mean, max, p95), local and remote side by side."""
        stats = self.dispatcher.stats()
        if arg.strip() == "--json":
            self.say(json.dumps(stats, indent=2))
        elif not arg.strip():
            self.console.print(stats_table(stats))
            self.say(_side_line("local", stats["local"]))
            self.say(_side_line("remote", stats["remote"]))
        else:
            raise ShellError("usage: stats [--json]")


def _history_file() -> Path:
    from hyperjax.io.registry import hyperjax_home

    return hyperjax_home() / "shell_history"


def run_shell(
    config_path: str | None = None,
    model: str | None = None,
    *,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
) -> int:
    """Run the shell until `exit` or end of input; 0, or 1 when input was not a terminal and a command failed."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty()
    loaded = load_config(config_path, flags={"model.name": model})
    shell = Shell(loaded, stdin=stdin, stdout=stdout, interactive=interactive)
    readline = None
    if interactive:
        try:
            import readline
        except ImportError:
            readline = None
    history = _history_file()
    if readline is not None:
        readline.set_history_length(1000)
        if history.is_file():
            readline.read_history_file(history)
    try:
        while True:
            try:
                shell.cmdloop()
                break
            except KeyboardInterrupt:
                shell.intro = None
                shell.say("^C")
    finally:
        if readline is not None:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)
    return 1 if shell.failures and not interactive else 0
