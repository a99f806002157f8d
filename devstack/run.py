"""`make run`: the whole local stack in one command, stopped together on Ctrl-C.

Creates local.settings.json from the sample when it is absent, starts each component on its
loopback port, wires the endpoints the components need into the host's environment (which wins
over local.settings.json, as it does under Core Tools), prints each URL, and stops everything
when interrupted or when any component dies.

`--bot echo` (the default) puts the botbuilder echo bot (devstack/bot.py) behind the Direct Line
emulator, and the relay uses the settings file's DIRECTLINE_SECRET. `--bot copilot` (`make run
BOT=copilot`) runs the emulator's Copilot-like bot instead and the relay in token endpoint mode,
as in front of a Copilot Studio agent without web channel security: DIRECTLINE_TOKEN_ENDPOINT is the
emulator's agent token endpoint, DIRECTLINE_SECRET and DIRECTLINE_ENDPOINT are emptied (no secret
anywhere; the Direct Line host is discovered from regionalchannelsettings).

While the stack is up, the settings its host runs with (the settings file's, with the ports and
endpoints wired in) are in `<data dir>/stack.settings.json`, in the settings file's format, so that
`make admin` (`python -m relay.admin --settings .azurite/stack.settings.json`) works on this stack's
tables, bot and simulator; it is removed when the stack stops.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from devstack.bot import EchoBot
from devstack.channels import ProviderSimulator
from devstack.directline import DirectLineEmulator
from devstack.procs import ROOT, Azurite, ManagedProcess, http_ok, port_open, python_module
from relay.settings import SETTINGS


@dataclass(frozen=True)
class Ports:
    host: int = 7071
    azurite: tuple[int, int, int] = (10000, 10001, 10002)
    directline: int = 3000
    bot: int = 3978
    simulator: int = 3001


DATA_DIR = ROOT / ".azurite"
STACK_SETTINGS = "stack.settings.json"
"""In the data dir while the stack is up: the host's settings, for `make admin`."""


def ensure_local_settings(target: Path = ROOT / "local.settings.json") -> Path:
    if not target.exists():
        shutil.copyfile(ROOT / "local.settings.sample.json", target)
        print(f"created {target} from local.settings.sample.json")
    return target


def local_values(settings_file: Path) -> dict[str, str]:
    return {k: str(v) for k, v in json.loads(settings_file.read_text()).get("Values", {}).items()}


def write_stack_settings(target: Path, host_env: dict[str, str]) -> None:
    """The app settings of `host_env` in local.settings.json's format (dev-only values, like that file's)."""
    values = {name: value for name, value in host_env.items() if name in SETTINGS}
    target.write_text(json.dumps({"IsEncrypted": False, "Values": values}, indent=2))


def busy(port: int, what: str) -> None:
    if port_open(port):
        sys.exit(f"port {port} for {what} is already in use: stop what holds it, or pass another port")


BOTS = ("echo", "copilot")


def build_stack(ports: Ports, settings_file: Path, data_dir: Path,
                bot_kind: str = "echo") -> list[tuple[ManagedProcess, str]]:
    """Each component with the URL a person would open; started in this order. `bot_kind`: one of BOTS."""
    azurite = Azurite(location=data_dir, ports=ports.azurite, log_path=data_dir / "logs" / "azurite.log")
    # As under Core Tools, an app setting exported in the shell wins over the settings file.
    values = {**local_values(settings_file), **{k: v for k, v in os.environ.items() if k in SETTINGS}}
    bot: EchoBot | None = None
    directline_env: dict[str, str]
    if bot_kind == "copilot":
        emulator = DirectLineEmulator(secret=secrets.token_urlsafe(32), port=ports.directline, copilot=True,
                                      enhanced_auth=True, log_path=data_dir / "logs" / "directline.log")
        directline_env = {"DIRECTLINE_TOKEN_ENDPOINT": emulator.token_endpoint, "DIRECTLINE_SECRET": "",
                          "DIRECTLINE_ENDPOINT": ""}
        described = "Copilot-like agent, token endpoint mode: no secret"
    else:
        if not values.get("DIRECTLINE_SECRET"):
            sys.exit(f"{settings_file.name} has no DIRECTLINE_SECRET: the Direct Line emulator needs one")
        bot = EchoBot(port=ports.bot, log_path=data_dir / "logs" / "bot.log")
        # Enhanced authentication on, as on many production bots: reconnect with the secret is refused.
        emulator = DirectLineEmulator(secret=values["DIRECTLINE_SECRET"], port=ports.directline, bot_url=bot.url,
                                      enhanced_auth=True, log_path=data_dir / "logs" / "directline.log")
        directline_env = {"DIRECTLINE_ENDPOINT": emulator.base_url, "DIRECTLINE_TOKEN_ENDPOINT": ""}
        described = "enhanced authentication"
    host_url = f"http://127.0.0.1:{ports.host}"
    simulator = ProviderSimulator(port=ports.simulator, relay_url=host_url, values=values,
                                  log_path=data_dir / "logs" / "simulator.log")
    # Loopback provider URLs follow the ports actually used, so the simulator and the host agree.
    loopback = {**simulator.api_bases(), "RELAY_PUBLIC_BASE_URL": host_url}
    host_env = {
        # The host resolves %RELAY_POLL_QUEUE% itself (poll_batch's trigger): a settings file older than it lacks it.
        "RELAY_POLL_QUEUE": SETTINGS["RELAY_POLL_QUEUE"].default or "",
        **os.environ,
        **values,
        **{k: v for k, v in loopback.items() if values.get(k, "").startswith("http://127.0.0.1:")},
        "AzureWebJobsStorage": azurite.connection_string,
        **directline_env,
        "PYTHONUNBUFFERED": "1",
    }
    host = ManagedProcess(
        "functions host",
        python_module("devstack.host", "--port", str(ports.host), "--settings", str(settings_file)),
        env=host_env,
        ready=lambda: http_ok(f"http://127.0.0.1:{ports.host}/api/health"),
    )
    return [
        (azurite, f"table storage http://127.0.0.1:{azurite.table_port}/devstoreaccount1 (data in {data_dir})"),
        *([(bot, f"{bot.url} (botbuilder echo bot)")] if bot is not None else []),
        (emulator, f"{emulator.base_url} (Direct Line emulator, {described}; admin {emulator.admin_url}/)"),
        (simulator, f"{simulator.page_url} (provider simulator: a phone per channel)"),
        (host, f"http://127.0.0.1:{ports.host}/api/health (Web Chat demo: http://127.0.0.1:{ports.host}/api/webchat/demo)"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the relay's whole local stack.")
    parser.add_argument("--host-port", type=int, default=Ports.host)
    parser.add_argument("--directline-port", type=int, default=Ports.directline)
    parser.add_argument("--bot-port", type=int, default=Ports.bot)
    parser.add_argument("--simulator-port", type=int, default=Ports.simulator)
    parser.add_argument("--azurite-ports", default=",".join(map(str, Ports.azurite)),
                        help="blob,queue,table ports (default 10000,10001,10002)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="where Azurite keeps its data")
    parser.add_argument("--settings", type=Path, default=ROOT / "local.settings.json",
                        help="the settings file (created from local.settings.sample.json when absent)")
    parser.add_argument("--bot", choices=BOTS, default="echo",
                        help="echo: the botbuilder echo bot, with the secret; copilot: the emulator's Copilot-like "
                             "agent, in token endpoint mode")
    args = parser.parse_args(argv)
    blob, queue, table = (int(p) for p in args.azurite_ports.split(","))
    ports = Ports(host=args.host_port, azurite=(blob, queue, table), directline=args.directline_port,
                  bot=args.bot_port, simulator=args.simulator_port)
    for port in (ports.host, *ports.azurite, ports.directline, ports.simulator,
                 *((ports.bot,) if args.bot == "echo" else ())):
        busy(port, "the local stack")

    settings_file = ensure_local_settings(args.settings)
    stack = build_stack(ports, settings_file, args.data_dir, args.bot)
    started: list[ManagedProcess] = []
    stopping = threading.Event()

    def interrupt(*_) -> None:
        """The first Ctrl-C (or SIGTERM) stops the stack; more of them must not cut the clean-up short."""
        if not stopping.is_set():
            stopping.set()
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        for process, url in stack:
            print(f"starting {process.name} ...", flush=True)
            started.append(process.start())
            print(f"  {process.name:<16} {url}", flush=True)
        host = stack[-1][0]
        write_stack_settings(args.data_dir / STACK_SETTINGS, host.env or {})
        print("local stack is up; Ctrl-C stops it (make admin ARGS=\"stats\" looks into it)", flush=True)
        while not stopping.wait(1):
            dead = [p for p in started if p.returncode is not None]
            if dead:
                print(f"{dead[0].name} exited with {dead[0].returncode}; stopping", flush=True)
                return 1
    except KeyboardInterrupt:
        pass
    finally:
        (args.data_dir / STACK_SETTINGS).unlink(missing_ok=True)
        for process in reversed(started):
            process.stop()
        print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
