"""The operator's command line: `python -m relay.admin [--json] <command>` (locally `make admin ARGS="<command>"`).

It reads the app's settings from the environment, as the app does: in Azure, identity-based storage
(AzureWebJobsStorage__accountName or __tableServiceUri; DefaultAzureCredential, so `az login` is
enough, with a Storage Table Data Contributor role on the account; AzureWebJobsStorage__credential
left unset, since "managedidentity" means the app's own identity) and RELAY_TABLE_PREFIX. With
`--settings FILE` the Values of a local.settings.json-style file come first and the environment wins,
as under Core Tools; `make admin` passes the file `make run` writes while the local stack is up
(.azurite/stack.settings.json: its Azurite, emulator and simulator ports). Most commands need the
storage settings only; `conversations end` needs Direct Line's too, and replaying a reply or an event
the provider's or the event webhook's (Key Vault references are not resolved here: export the values).

Parsing and printing only: what each command does is in relay/operations.py. Exit codes: 0 done, 1
not found, refused or failed (with a message, never a traceback), 2 a usage mistake.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay import operations
from relay.clock import SYSTEM_CLOCK
from relay.errors import RelayError, SettingsError, StoreError
from relay.store import RelayStore
from relay.store.conversations import ConversationKey
from relay.store.dead_letters import DeadLetter, DeadLetterKind

if TYPE_CHECKING:
    from relay.conversations import RelayContext

__all__ = ["main"]

DEFAULT_LIMIT = 50


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a reader that goes before the output ends (`| head -1`) ends it quietly."""
    try:
        return _run(argv)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor a complaint when Python flushes at exit
        return 1


def _run(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for name, value in vars(args).items():
        # A shell passes any bytes (`$'\xff'`); Python gives the undecodable ones as lone surrogates, which no id
        # holds and no key can be made of.
        if isinstance(value, str) and not _is_text(value):
            parser.error(f"argument {name}: not valid UTF-8 text")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        environ = _environment(args.settings)
        result = args.run(_Tools(environ), args)
    except StoreError as error:
        print(f"error: storage: {error} (is the account reachable, and are the storage settings right?)",
              file=sys.stderr)
        return 1
    except RelayError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(json.dumps(result, indent=2, default=_json_value) if args.json else _human(result), flush=True)
    return 0


def _is_text(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


class _Tools:
    """The store and the relay's context, made on first use from `environ` (SettingsError names what is missing)."""

    def __init__(self, environ: Mapping[str, str]):
        self._environ = environ

    @functools.cached_property
    def store(self) -> RelayStore:
        from relay.settings import StorageSettings

        return RelayStore.from_settings(StorageSettings.from_environ(self._environ))

    def context(self) -> RelayContext:
        """Every setting of the app read (Direct Line's, the providers'...): only the commands that call out need it."""
        from relay.channels import get_adapter
        from relay.conversations import RelayContext
        from relay.directline import DirectLineClient
        from relay.settings import Settings

        settings = Settings.from_environ(self._environ)
        return RelayContext(settings=settings, store=self.store,
                            directline=DirectLineClient(settings.directline, clock=SYSTEM_CLOCK),
                            adapter=functools.cache(lambda name: get_adapter(name, settings, clock=SYSTEM_CLOCK)),
                            clock=SYSTEM_CLOCK)


# ------------------------------------------------------------------------------------------ commands

def _stats(tools: _Tools, args: argparse.Namespace) -> dict[str, Any]:
    return dataclasses.asdict(operations.get_stats(tools.store))


def _conversations_list(tools: _Tools, args: argparse.Namespace) -> list[dict[str, Any]]:
    records = tools.store.conversations.list_records(channel=args.channel, limit=args.limit)
    return [{"channel": r.key.channel, "user": r.key.user, "state": r.state.value,
             "conversation_id": r.conversation_id, "last_activity_at": r.last_activity_at,
             "next_poll_at": r.next_poll_at} for r in records]


def _conversations_show(tools: _Tools, args: argparse.Namespace) -> dict[str, Any]:
    return operations.conversation_view(tools.store, ConversationKey(args.channel, args.user))


def _conversations_end(tools: _Tools, args: argparse.Namespace) -> dict[str, Any]:
    key = ConversationKey(args.channel, args.user)
    ended = operations.end_conversation(tools.context(), key)
    return {"channel": key.channel, "user": key.user, "outcome": "ended" if ended else "already_ended"}


def _letters_list(tools: _Tools, args: argparse.Namespace) -> list[dict[str, Any]]:
    letters = tools.store.dead_letters.list_letters(kind=args.kind and DeadLetterKind(args.kind), limit=args.limit)
    return [_letter_summary(letter) for letter in sorted(letters, key=lambda letter: letter.created_at)]


def _letters_show(tools: _Tools, args: argparse.Namespace) -> dict[str, Any]:
    letter = tools.store.dead_letters.get_letter(args.id)
    if letter is None:
        raise operations.NotFound(f"no dead letter {args.id}")
    return {**_letter_summary(letter), "reason": letter.reason, "replay_started_at": letter.replay_started_at,
            "parts_sent": letter.parts_sent, "payload": dict(letter.payload)}


_REPLAYED = {
    operations.ReplayOutcome.QUEUED: "back in its outbox: the relay's next poll posts it to the bot",
    operations.ReplayOutcome.ALREADY_QUEUED: "an earlier replay put it back in its outbox: it waits for the next poll",
    operations.ReplayOutcome.ALREADY_POSTED: "an earlier replay put it back, and Direct Line took it",
    operations.ReplayOutcome.DELIVERED: "delivered",
}


def _letters_replay(tools: _Tools, args: argparse.Namespace) -> dict[str, Any]:
    outcome = operations.replay_letter(tools.store, args.id, context=tools.context, force=args.force)
    return {"id": args.id, "outcome": outcome.value, "detail": _REPLAYED[outcome]}


def _letters_discard(tools: _Tools, args: argparse.Namespace) -> dict[str, Any]:
    letter = operations.discard_letter(tools.store, args.id)
    return {"id": letter.letter_id, "outcome": "discarded"}


def _sessions_revoke(tools: _Tools, args: argparse.Namespace) -> dict[str, Any]:
    operations.revoke_session(tools.store, args.conversation_id)
    return {"conversation_id": args.conversation_id, "outcome": "revoked"}


def _letter_summary(letter: DeadLetter) -> dict[str, Any]:
    return {"id": letter.letter_id, "kind": letter.kind.value, "channel": letter.key.channel, "user": letter.key.user,
            "created_at": letter.created_at, "reason": letter.reason[:80]}


# ------------------------------------------------------------------------------------------ arguments

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m relay.admin", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Look into a running relay and repair what went wrong.",
        epilog="Settings come from the environment, as the app reads them. In Azure: AzureWebJobsStorage__accountName\n"
               "(or __tableServiceUri) and RELAY_TABLE_PREFIX, with DefaultAzureCredential (az login, and a Storage\n"
               "Table Data Contributor role on the account; leave AzureWebJobsStorage__credential unset, which means\n"
               "the app's managed identity). --settings FILE reads a local.settings.json-style file's Values first\n"
               "(the environment wins, as under Core Tools). `make admin ARGS=\"...\"` passes\n"
               ".azurite/stack.settings.json, which `make run` writes while the local stack is up.\n"
               "`conversations end` needs the Direct Line settings too; replaying a reply the provider's, an\n"
               "event RELAY_EVENT_WEBHOOK_URL and _SECRET (Key Vault references are not resolved: export values).\n\n"
               "Times are UTC. Exit codes: 0 done, 1 not found, refused or failed, 2 usage.")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables")
    parser.add_argument("--settings", type=Path, metavar="FILE",
                        help="a local.settings.json-style file whose Values are read first (the environment wins)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    # --json after the command as well as before it (`stats --json`).
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    stats = commands.add_parser("stats", parents=[output],
                                help="open conversations, due now, outbox depth and oldest age, dead letters by kind, "
                                     "live Web Chat sessions (scans every table)")
    stats.set_defaults(run=_stats)

    conversations = commands.add_parser("conversations", help="list, show or end conversations").add_subparsers(
        dest="action", required=True, metavar="action")
    listing = conversations.add_parser("list", parents=[output], help="conversations (a scan; at most --limit)")
    listing.add_argument("--channel", help="only this channel's (twilio, whatsapp, ...)")
    listing.add_argument("--limit", type=_positive, default=DEFAULT_LIMIT)
    listing.set_defaults(run=_conversations_list)
    for name, run, what in (("show", _conversations_show, "a conversation's record (never its token)"),
                            ("end", _conversations_end, "end a conversation as the idle timer does: the bot gets "
                                                        "endOfConversation, the user's next message starts anew")):
        command = conversations.add_parser(name, parents=[output], help=what)
        command.add_argument("channel", help="the channel: twilio, whatsapp, messagebird, bird, generic")
        command.add_argument("user", help="the user's address on it (phone number, WhatsApp id, ...)")
        command.set_defaults(run=run)

    letters = commands.add_parser("dead-letters", help="list, show, replay or discard dead letters").add_subparsers(
        dest="action", required=True, metavar="action")
    listing = letters.add_parser("list", parents=[output], help="dead letters, oldest first (a scan; at most --limit)")
    listing.add_argument("--kind", choices=[kind.value for kind in DeadLetterKind])
    listing.add_argument("--limit", type=_positive, default=DEFAULT_LIMIT)
    listing.set_defaults(run=_letters_list)
    for name, run, what in (
            ("show", _letters_show, "a dead letter with its reason and payload"),
            ("replay", _letters_replay, "send it again, once: a user's message back to the outbox (the relay posts it "
                                        "with its original clientActivityID), a reply to the provider, an event to "
                                        "the event webhook; deleted once that succeeded"),
            ("discard", _letters_discard, "delete it without sending it")):
        command = letters.add_parser(name, parents=[output], help=what)
        command.add_argument("id", help="the letter's id, as `dead-letters list` prints it")
        command.set_defaults(run=run)
        if name == "replay":
            command.add_argument("--force", action="store_true",
                                 help="send it even though an earlier replay began and did not finish (it may have "
                                      "reached its recipient)")

    sessions = commands.add_parser("sessions", help="Web Chat sessions").add_subparsers(
        dest="action", required=True, metavar="action")
    revoke = sessions.add_parser("revoke", parents=[output],
                                 help="the page of this Direct Line conversation can no longer resume or refresh "
                                      "(Web Chat sessions are keyed by their conversation id)")
    revoke.add_argument("conversation_id", help="the Direct Line conversation id of the Web Chat session")
    revoke.set_defaults(run=_sessions_revoke)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _environment(settings_file: Path | None) -> dict[str, str]:
    """The environment over the Values of `settings_file` (when given), as Core Tools merges them."""
    if settings_file is None:
        return dict(os.environ)
    try:
        values = json.loads(settings_file.read_text()).get("Values", {})
    except FileNotFoundError:
        raise SettingsError(f"no settings file {settings_file} (`make run` writes .azurite/stack.settings.json while "
                            "the local stack is up: start it first)") from None
    except (OSError, ValueError, AttributeError) as error:
        raise SettingsError(f"cannot read the settings file {settings_file}: {type(error).__name__}") from None
    return {**{k: str(v) for k, v in values.items()}, **os.environ}


# ------------------------------------------------------------------------------------------ printing

def _human(result: Any) -> str:
    if isinstance(result, list):
        return _table(result) if result else "(none)"
    if "open_conversations" in result:
        return _stats_text(result)
    return "\n".join(f"{name:<24}{_text(value)}" for name, value in result.items())


def _stats_text(stats: dict[str, Any]) -> str:
    oldest = stats["oldest_waiting_seconds"]
    letters = ", ".join(f"{kind} {count}" for kind, count in stats["dead_letters"].items())
    return "\n".join([
        f"{'open conversations':<24}{stats['open_conversations']}",
        f"{'due now':<24}{stats['due_now']}",
        f"{'outbox depth':<24}{stats['outbox_depth']}"
        + (f" (oldest waiting {oldest:.0f} s)" if oldest is not None else ""),
        f"{'dead letters':<24}{sum(stats['dead_letters'].values())} ({letters})",
        f"{'live Web Chat sessions':<24}{stats['live_sessions']}",
    ])


def _table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    cells = [[_text(row[column]) for column in columns] for row in rows]
    widths = [max(len(column), *(len(row[i]) for row in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.upper().ljust(width) for column, width in zip(columns, widths, strict=True))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M:%S}"
    if isinstance(value, list | dict):
        return json.dumps(value, default=_json_value, ensure_ascii=False)
    return str(value)


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


if __name__ == "__main__":
    sys.exit(main())
