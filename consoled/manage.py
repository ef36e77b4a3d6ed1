"""``consoled-manage``: the operator's command line.

    consoled-manage [--config-file F ...] db upgrade | db version
    consoled-manage token create --instance UUID --type TYPE --host H --port P
                                 [--internal-access-path P] [--tls-port P] [--ttl S]
    consoled-manage token create --instance UUID --type serial --next-free [--host H]
    consoled-manage token show TOKEN
    consoled-manage token list [--instance UUID] [--host H]
    consoled-manage token revoke --instance UUID
    consoled-manage token clean
    consoled-manage session list [--all]
    consoled-manage session kick ID | --instance UUID [--reason TEXT] [--takeover]
    consoled-manage serial allocate | release | list    (consoled/manage_serial.py)
    consoled-manage check

``check`` (consoled/check.py) reports, one line each, what would stop the
daemon from starting with these files, and what an operator would regret.

Every failure is one line on stderr and a non-zero exit: 2 for a bad
command line or configuration, 1 for a database that cannot be used.
A token is printed once, inside the access URL of ``token create``; every
other command shows only the first 8 hex of its hash.
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any, NoReturn

from twisted.internet import defer, task

from consoled.check import run_check
from consoled.config import ConfigError, Settings, load_settings
from consoled.manage_serial import (
    SerialCommandError,
    add_serial_parser,
    next_free_token,
    run_serial,
)
from consoled.store import Store, open_store, schema
from consoled.store.engine import describe_error
from consoled.tokens import CONSOLE_TYPES, ConnectInfo


class CommandError(Exception):
    """A failure to report as one line, with an exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _uuid(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a UUID")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number from 1 to 65535")
    return port


def _ttl(text: str) -> int:
    try:
        ttl = int(text)
    except ValueError:
        ttl = 0
    if ttl < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds >= 1")
    return ttl


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="consoled-manage", description="Manage consoled's database.")
    parser.add_argument(
        "--config-file",
        action="append",
        default=[],
        metavar="FILE",
        help="INI file (nova.conf works as it is); repeatable, later files win",
    )
    area = parser.add_subparsers(dest="area", required=True, parser_class=_Parser)

    area.add_parser(
        "check",
        help="would the daemon start with these files? one line per finding",
    )

    api_key = area.add_parser("api-key", help="keys of the management API").add_subparsers(
        dest="command", required=True
    )
    api_key.add_parser(
        "create", help="print a new key (once) and the digest for [consoled] api_key_hashes"
    )

    db = area.add_parser("db", help="schema migrations").add_subparsers(
        dest="command", required=True
    )
    db.add_parser("upgrade", help="upgrade the schema to this version's head")
    db.add_parser("version", help="print the schema revision")

    token = area.add_parser("token", help="console tokens").add_subparsers(
        dest="command", required=True
    )
    create = token.add_parser("create", help="authorize a console; prints its access URL")
    create.add_argument("--instance", required=True, type=_uuid)
    create.add_argument("--type", required=True, choices=CONSOLE_TYPES, dest="console_type")
    create.add_argument("--host", help="required, except with --next-free")
    create.add_argument("--port", type=_port, help="required, except with --next-free")
    create.add_argument(
        "--next-free",
        action="store_true",
        help="serial: the first of the instance's allocated ports nobody holds",
    )
    create.add_argument("--internal-access-path")
    create.add_argument("--tls-port", type=_port)
    create.add_argument("--ttl", type=_ttl, help="seconds (default: [consoleauth] token_ttl)")
    show = token.add_parser("show", help="print where a token leads (never the token)")
    show.add_argument("token")
    listing = token.add_parser("list", help="list tokens (hash prefixes only)")
    listing.add_argument("--instance", type=_uuid)
    listing.add_argument("--host")
    revoke = token.add_parser("revoke", help="delete every token of an instance")
    revoke.add_argument("--instance", required=True, type=_uuid)
    token.add_parser("clean", help="delete expired tokens")

    add_serial_parser(area, _uuid)

    session = area.add_parser("session", help="console sessions").add_subparsers(
        dest="command", required=True
    )
    slist = session.add_parser("list", help="live sessions (with --all, ended ones too)")
    slist.add_argument("--all", action="store_true")
    kick = session.add_parser("kick", help="close sessions, whichever proxy holds them")
    which = kick.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", type=_session_id)
    which.add_argument("--instance", type=_uuid)
    kick.add_argument("--reason", default="")
    kick.add_argument(
        "--takeover",
        action="store_true",
        help="hand a serial port to its first spectator; the writer becomes read-only",
    )
    return parser


def _session_id(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a session id")
    return int(text)


def _seconds(value: float) -> str:
    value = int(value)
    return (
        f"{value // 3600}h{value % 3600 // 60:02d}m"
        if value >= 3600
        else f"{value // 60}m{value % 60:02d}s"
    )


def _describe(info: ConnectInfo, now: float) -> list[tuple[str, Any]]:
    remaining = info.expires - int(now)
    state = f"in {remaining}s" if remaining > 0 else f"expired {-remaining}s ago"
    return [
        ("token hash", f"{info.hash_prefix}…"),
        ("console type", info.console_type),
        ("instance", info.instance_uuid),
        ("host", info.host),
        ("port", info.port),
        ("tls port", info.tls_port if info.tls_port is not None else "-"),
        ("internal access path", info.internal_access_path or "-"),
        ("access url base", info.access_url_base or "-"),
        ("expires", f"{_iso(info.expires)} ({state})"),
    ]


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@defer.inlineCallbacks
def run(
    args: argparse.Namespace, settings: Settings, store: Store, embedded: bool, out: Any
) -> Any:
    """Carry out one command against an open store."""
    if args.area == "db":
        if args.command == "upgrade":
            yield store.upgrade_schema()
        current = yield store.schema_revision()
        out.write(f"{current or 'none'} (head: {schema.head_revision()})\n")
        return
    if embedded:
        yield store.upgrade_schema()
    else:
        yield store.check_schema()
    now = store.clock.seconds()
    if args.area == "session":
        yield _session_command(args, store, now, out)
    elif args.area == "serial":
        yield run_serial(args, settings, store, out)
    elif args.command == "create" and args.next_free:
        issued = yield next_free_token(args, settings, store)
        out.write(issued.access_url + "\n")
    elif args.command == "create":
        if args.host is None or args.port is None:
            raise CommandError("token create needs --host and --port (or, serial, --next-free)", 2)
        issued = yield store.authorize(
            console_type=args.console_type,
            host=args.host,
            port=args.port,
            instance_uuid=args.instance,
            access_url_base=settings.access_url_base(args.console_type),
            ttl=args.ttl or settings.token_ttl(args.console_type),
            internal_access_path=args.internal_access_path,
            tls_port=args.tls_port,
        )
        out.write(issued.access_url + "\n")
    elif args.command == "show":
        info = yield store.lookup(args.token)
        if info is None:
            raise CommandError("no such token")
        width = max(len(label) for label, _ in _describe(info, now))
        for label, value in _describe(info, now):
            out.write(f"{label:<{width}}  {value}\n")
    elif args.command == "list":
        rows = yield store.list_tokens(instance_uuid=args.instance, host=args.host)
        out.write(f"{'HASH':<8}  {'TYPE':<11}  {'INSTANCE':<36}  {'HOST:PORT':<24}  EXPIRES\n")
        for info in rows:
            where = f"{info.host}:{info.port}"
            out.write(
                f"{info.hash_prefix:<8}  {info.console_type:<11}  {info.instance_uuid:<36}  "
                f"{where:<24}  {_iso(info.expires)}{'' if info.expires > now else ' (expired)'}\n"
            )
    elif args.command == "revoke":
        count = yield store.revoke_instance(args.instance)
        out.write(f"revoked {count} token(s) of instance {args.instance}\n")
    elif args.command == "clean":
        count = yield store.clean_expired(settings.consoled.token_clean_batch)
        out.write(f"deleted {count} expired token(s)\n")


@defer.inlineCallbacks
def _session_command(args: argparse.Namespace, store: Store, now: float, out: Any) -> Any:
    if args.command == "list":
        rows = yield store.list_sessions(live=not args.all)
        out.write(
            f"{'ID':>6}  {'INSTANCE':<36}  {'TYPE':<11}  {'CONSOLE':<21}  {'CLIENT':<15}  "
            f"{'PROXY':<16}  {'SINCE':<20}  {'IDLE':>6}  {'TO CLIENT':>10}  {'TO CONSOLE':>10}"
            f"{'  ENDED' if args.all else ''}\n"
        )
        for row in rows:
            console = f"{row['host']}:{row['port']}"
            ended = f"  {row['end_reason'] or ''}" if args.all else ""
            out.write(
                f"{row['id']:>6}  {row['instance_uuid']:<36}  {row['console_type']:<11}  "
                f"{console:<21}  {row['client_address']:<15}  {row['proxy']:<16}  "
                f"{_iso(row['started_at']):<20}  {_seconds(now - row['touched_at']):>6}  "
                f"{row['bytes_to_client']:>10}  {row['bytes_to_server']:>10}{ended}\n"
            )
        return
    count = yield store.request_kick(
        session_id=args.id, instance_uuid=args.instance, reason=args.reason, takeover=args.takeover
    )
    if count == 0:
        raise CommandError("no live session matched")
    out.write(
        f"asked {count} session(s) to close; the proxy holding each closes it "
        "within one touch period\n"
    )


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config_file)
    except ConfigError as error:
        _fail(str(error), 2)

    if args.area == "api-key":
        _new_api_key(sys.stdout)
        raise SystemExit(0)

    def react_main(reactor: Any) -> defer.Deferred[None]:
        if args.area == "check":
            # Every failure is a finding of its own, the database's too.
            return run_check(settings, reactor, sys.stdout).addCallback(_exit_with)
        try:
            store, embedded = open_store(
                settings.database.connection,
                reactor,
                threads=1,
                state_path=settings.default.state_path,
                breaker=False,
            )
        except Exception as error:
            _fail(f"[database] connection: {error}", 2)
        store.start()
        d = run(args, settings, store, embedded, sys.stdout)

        def explain(failure: Any) -> None:
            error = failure.value
            if isinstance(error, (CommandError, SerialCommandError)):
                _report(str(error))
                raise SystemExit(error.status)
            elif isinstance(error, schema.SchemaBehind):
                _report(str(error))
            else:
                _report(describe_error(error, store.engine.url))
            raise SystemExit(1)

        d.addErrback(explain)
        return d.addBoth(lambda result: store.stop().addCallback(lambda _: result))

    task.react(react_main)


def _new_api_key(out: Any) -> None:
    """A random key, shown this once; consoled keeps only its SHA-256 digest."""
    key = secrets.token_urlsafe(32)
    digest = hashlib.sha256(key.encode()).hexdigest()
    out.write(
        f"key: {key}\n"
        f"digest: {digest}\n"
        "Give the key to the API's clients (X-Auth-Token); add the digest to\n"
        "[consoled] api_key_hashes (comma-separated). The key is not stored anywhere.\n"
    )


def _exit_with(status: int) -> None:
    if status:
        raise SystemExit(status)


def _report(message: str) -> None:
    sys.stderr.write(f"consoled-manage: {message}\n")


def _fail(message: str, status: int) -> NoReturn:
    _report(message)
    raise SystemExit(status)


if __name__ == "__main__":
    main()
