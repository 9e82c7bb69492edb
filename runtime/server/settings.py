"""`adapterserve serve` flags, ADAPTERSERVE_* variables and the --config file, read into one ServerConfig.

The flags are built from the config dataclasses (runtime/config.py): every field with help is a flag
--field-name and an environment variable ADAPTERSERVE_FIELD_NAME. Precedence: flag > environment >
config file (JSON, or TOML on Python 3.11+) > default. A value that does not parse is a ConfigError
naming its source; unknown or abbreviated flags are argparse errors. Both exit 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from typing import Any, Optional

from adapterserve.runtime.config import ClusterConfig, RuntimeConfig, ServerConfig
from adapterserve.runtime.errors import ConfigError

ENV_PREFIX = "ADAPTERSERVE_"
# Bool fields whose flag reads better under another name: --examples / --no-examples.
_BOOL_FLAGS = {"register_examples": "examples"}


@dataclasses.dataclass(frozen=True)
class Setting:
    owner: str  # "server", "runtime" or "cluster"
    name: str  # the dataclass field
    kind: type  # str, int, float, bool, or list (repeatable str)
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + _BOOL_FLAGS.get(self.name, self.name).replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


def _kind(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is list:
        return list
    return hint


OWNERS = {"server": ServerConfig, "runtime": RuntimeConfig, "cluster": ClusterConfig}


def settings(cluster: bool = False) -> list[Setting]:
    """serve's settings; with cluster, `adapterserve cluster`'s own after them."""
    out = []
    for owner, cls in OWNERS.items():
        if owner == "cluster" and not cluster:
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "help" not in f.metadata:
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out.append(Setting(owner, f.name, _kind(hints[f.name]), default, f.metadata["help"]))
    return out


def _convert(setting: Setting, raw: Any, source: str) -> Any:
    if setting.kind is list:
        if isinstance(raw, str):
            return [v.strip() for v in raw.split(",") if v.strip()]
        if isinstance(raw, list) and all(isinstance(v, str) for v in raw):
            return raw
        raise ConfigError(f"{source}: expected a list of strings, got {raw!r}")
    if setting.kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{source}: expected true or false, got {raw!r}")
    try:
        return setting.kind(raw)
    except (TypeError, ValueError):
        what = {int: "an integer", float: "a number", str: "a string"}.get(setting.kind, setting.kind.__name__)
        raise ConfigError(f"{source}: expected {what}, got {raw!r}") from None


def _read_config_file(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    try:
        if path.endswith(".toml"):
            import tomllib  # Python 3.11+

            values = tomllib.loads(data.decode())
        else:
            values = json.loads(data)
    except ImportError:
        raise ConfigError(f"--config {path}: TOML needs Python 3.11+; use a JSON file") from None
    except ValueError as e:
        raise ConfigError(f"--config {path}: not valid {'TOML' if path.endswith('.toml') else 'JSON'} ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a table of setting names to values")
    return {k.replace("-", "_"): v for k, v in values.items()}


def add_serve_args(p: argparse.ArgumentParser, cluster: bool = False) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="JSON or TOML file of settings (names as the flags, without --; flags and ADAPTERSERVE_* win)")
    for s in settings(cluster):
        help_ = f"{s.help} [env {s.env}]"
        if s.kind is bool:
            p.add_argument(s.flag, dest=s.name, action=argparse.BooleanOptionalAction, default=s.default,
                           help=help_ + f" (default: {'on' if s.default else 'off'})")
        elif s.kind is list:
            p.add_argument(s.flag.rstrip("s"), dest=s.name, action="append", default=None, metavar="VALUE",
                           help=help_ + " (env: comma-separated)")
        else:
            p.add_argument(s.flag, dest=s.name, type=str, default=None, metavar=s.kind.__name__.upper(),
                           help=help_ + (f" (default: {s.default})" if s.default is not None else ""))
    p.add_argument("--log-level", default=os.environ.get(ENV_PREFIX + "LOG_LEVEL", "INFO"),
                   help=f"logging level [env {ENV_PREFIX}LOG_LEVEL] (default: INFO)")


def config_from_args(args: argparse.Namespace, environ: Optional[dict] = None) -> ServerConfig:
    return _configs(args, environ, cluster=False)[0]


def cluster_config_from_args(args: argparse.Namespace,
                             environ: Optional[dict] = None) -> tuple[ServerConfig, ClusterConfig]:
    return _configs(args, environ, cluster=True)


def _configs(args: argparse.Namespace, environ: Optional[dict], cluster: bool) -> tuple[ServerConfig, ClusterConfig]:
    environ = os.environ if environ is None else environ
    file_values = _read_config_file(args.config) if args.config else {}
    known = {s.name: s for s in settings(cluster)}
    unknown = sorted(set(file_values) - set(known) - {"log_level"})
    if unknown:
        raise ConfigError(f"--config {args.config}: unknown setting(s) {', '.join(unknown)}")
    values: dict[str, dict] = {"server": {}, "runtime": {}, "cluster": {}}
    for s in known.values():
        value, given = None, False
        if s.name in file_values:
            value, given = _convert(s, file_values[s.name], f"--config {args.config}: {s.name}"), True
        if s.env in environ:
            value, given = _convert(s, environ[s.env], f"{s.env}={environ[s.env]!r}"), True
        flag_value = getattr(args, s.name)
        if s.kind is bool:
            if flag_value != s.default:
                value, given = flag_value, True
        elif flag_value is not None:
            value, given = _convert(s, flag_value, f"{s.flag} {flag_value!r}"), True
        if given:
            values[s.owner][s.name] = value
    if values["server"].get("data_dir") == "":
        values["server"]["data_dir"] = None
    runtime_config = RuntimeConfig(**values["runtime"])
    return ServerConfig(runtime=runtime_config, **values["server"]), ClusterConfig(**values["cluster"])


def parse_config(argv=None, environ: Optional[dict] = None) -> tuple[ServerConfig, str]:
    """(config, log level) from argv; raises ConfigError for a bad value, SystemExit(2) for a bad flag."""
    p = argparse.ArgumentParser(prog="adapterserve serve", description="serve adapters over gRPC",
                                allow_abbrev=False)
    add_serve_args(p)
    args = p.parse_args(argv)
    return config_from_args(args, environ), args.log_level


def configuration_markdown() -> str:
    """docs/configuration.md, generated from the config dataclasses (tests/unit/test_settings.py keeps
    the file current): `python -m adapterserve.runtime.server.settings > docs/configuration.md`."""
    rows = ["# Configuration", "",
            "Generated from `runtime/config.py` by `python -m adapterserve.runtime.server.settings`; do not edit.",
            "",
            "Every setting is a flag of `adapterserve serve`, an environment variable, and a key of the optional",
            "`--config FILE` (JSON, or TOML on Python 3.11+; keys as the flag names without `--`). A flag wins over",
            "the environment, which wins over the file, which wins over the default. A value that does not parse",
            "stops the server with one line naming its source (exit code 2). `adapterserve cluster` takes every",
            "setting and the `cluster:` ones (docs/scale-out.md).", "",
            "| flag | environment | default | what |", "|---|---|---|---|"]
    for s in settings(cluster=True):
        flag = f"`{s.flag}` / `--no-{s.flag[2:]}`" if s.kind is bool else (
            f"`{s.flag.rstrip('s')} VALUE` (repeatable)" if s.kind is list else f"`{s.flag} {s.kind.__name__.upper()}`")
        if s.name == "data_dir":
            default = "`~/.local/share/adapterserve`"
        elif isinstance(s.default, bool):
            default = "on" if s.default else "off"
        elif isinstance(s.default, list):
            default = ", ".join(s.default) or "—"
        else:
            default = "—" if s.default is None else s.default
        rows.append(f"| {flag} | `{s.env}` | {default} | {s.help.replace('|', '/')} |")
    rows += ["| `--config FILE` | — | — | JSON or TOML file of settings |",
             f"| `--log-level LEVEL` | `{ENV_PREFIX}LOG_LEVEL` | INFO | logging level |", "",
             "Outside the flags:", "",
             "| environment | what |", "|---|---|",
             f"| `{ENV_PREFIX}CACHE` | cache root for exported ONNX graphs and built kernels (default `~/.cache/adapterserve`) |",
             f"| `{ENV_PREFIX}KERNEL_DIR` | where native kernels are built and looked up (default `$ADAPTERSERVE_CACHE/kernels`); "
             "`adapterserve build-kernels --kernel-dir` fills it |",
             f"| `{ENV_PREFIX}NATIVE` | `off` forces every portable path (no C kernel, no ONNX Runtime custom op) |",
             f"| `{ENV_PREFIX}LORA_AMX` | `off`: the int8 graph's bf16 LoRA ops take their portable loop instead of AMX tiles |",
             f"| `{ENV_PREFIX}ADDRESS` | default `--address` of the client commands (`classify`, `register`, ...) |", ""]
    return "\n".join(rows)


if __name__ == "__main__":
    print(configuration_markdown(), end="")
