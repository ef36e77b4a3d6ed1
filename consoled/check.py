"""``consoled-manage check``: would this configuration start, and what would an operator regret?

It asks the daemon's own start-up code, with the same configuration files,
without starting anything:

- the web directory of every enabled door (consoled.web_directories, as
  ``makeService`` does);
- the TLS certificate and key (``server_tls_from_settings``, as ``compose``
  does) and the VeNCrypt client material (``Backends.from_settings``, the
  same), and how long each certificate stays valid;
- every door's port: each door is built as ``compose`` builds it
  (``build_doors``), bound as twistd binds it (``privilegedStartService``,
  whose refusal is the daemon's own line), then closed again;
- the database (``open_store``; ``schema.check`` for a configured database,
  whose schema start-up refuses when behind; the embedded SQLite default
  upgrades itself, so its revision is only reported);
- a door on a wildcard address (0.0.0.0, ::) that serves no TLS.

Output: one line per finding, ``error: …`` for what makes start-up refuse and
``warning: …`` for what it lets pass; then one last line naming the database
it used (``ok: …`` when nothing was found).  The exit status is 1 when there
is an error, else 0.  A running consoled holds its own ports: check a
configuration before starting it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from cryptography import x509
from sqlalchemy.engine import make_url
from twisted.internet import defer

from consoled.backends import Backends
from consoled.config import Settings
from consoled.listeners import DoorRefused, DoorService
from consoled.service import build_doors, proxy_name, store_refusal
from consoled.store import open_store, schema
from consoled.store.engine import default_url, describe_error, safe_url
from consoled.tls import (
    ReloadableServerTLS,
    ServerTLSFactory,
    TLSError,
    TLSOrPlainFactory,
    server_tls_from_settings,
)
from consoled.web_directories import missing_web_directories

#: A certificate that ends within this many days is reported.
EXPIRY_WARNING_DAYS = 30


@dataclass(frozen=True)
class Finding:
    """One line of the report; ``fatal`` when start-up would refuse."""

    fatal: bool
    text: str

    def line(self) -> str:
        return f"{'error' if self.fatal else 'warning'}: {self.text}"


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    database: str = "?"
    doors: list[str] = field(default_factory=list)
    tls: str = "TLS off"

    def error(self, text: str) -> None:
        self.findings.append(Finding(True, text))

    def warning(self, text: str) -> None:
        self.findings.append(Finding(False, text))

    @property
    def fatal(self) -> bool:
        return any(finding.fatal for finding in self.findings)

    def summary(self) -> str:
        checked = f"database {self.database}; doors {', '.join(self.doors) or 'none'}; {self.tls}"
        if not self.findings:
            return f"ok: consoled would start: {checked}"
        errors = sum(finding.fatal for finding in self.findings)
        warnings = len(self.findings) - errors
        counted = f"{_count(errors, 'error')}, {_count(warnings, 'warning')}"
        verdict = "consoled would not start" if errors else "consoled would start"
        return f"{verdict} ({counted}): {checked}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def check_web(settings: Settings, report: Report) -> None:
    for directory in missing_web_directories(settings):
        report.error(directory.refusal())


def check_tls(
    settings: Settings, now: float, report: Report
) -> tuple[ReloadableServerTLS | None, bool]:
    """The doors' TLS as start-up loads it (and whether it loaded), the VeNCrypt
    client material as start-up loads it, and every certificate's remaining
    validity."""
    vnc = settings.vnc
    try:
        Backends.from_settings(settings)
    except TLSError as error:
        report.error(str(error))
    else:
        if "vencrypt" in vnc.auth_schemes and vnc.vencrypt_client_cert:
            with open(vnc.vencrypt_client_cert, "rb") as f:
                client = x509.load_pem_x509_certificates(f.read())
            what = f"[vnc] vencrypt_client_cert {vnc.vencrypt_client_cert}"
            _expiry(what, client, now, "replace it and restart consoled", report)
    try:
        tls = server_tls_from_settings(settings)
    except TLSError as error:
        report.error(str(error))
        report.tls = "TLS not loaded"
        return None, False
    if tls is None:
        return None, True
    report.tls = f"TLS from {tls.cert_path}"
    options = tls.options
    chain = [options.certificate, *(options.extraCertChain or ())]
    certificates = [certificate.to_cryptography() for certificate in chain]
    remedy = "replace it, then SIGHUP reloads it"
    _expiry(f"TLS certificate {tls.cert_path}", certificates, now, remedy, report)
    return tls, True


def _expiry(
    what: str, chain: list[x509.Certificate], now: float, remedy: str, report: Report
) -> None:
    """A warning for each certificate of ``chain`` that has ended or ends soon."""
    moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
    for position, certificate in enumerate(chain):
        ends = certificate.not_valid_after_utc
        left = ends - moment
        which = "" if position == 0 else f" (chain certificate {position})"
        where = f"{what}{which} {certificate.subject.rfc4514_string()}"
        when = ends.strftime("%Y-%m-%dT%H:%M:%SZ")
        if left <= datetime.timedelta(0):
            report.warning(f"{where} expired on {when}; every TLS peer will refuse it")
        elif left <= datetime.timedelta(days=EXPIRY_WARNING_DAYS):
            days = left.days
            report.warning(
                f"{where} expires on {when} (in {days} day{'' if days == 1 else 's'}); {remedy}"
            )


def _wildcard(host: str) -> bool:
    if host in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _offers_tls(door: DoorService) -> bool:
    return isinstance(door.factory, ServerTLSFactory | TLSOrPlainFactory)


@defer.inlineCallbacks
def check_doors(
    settings: Settings,
    reactor: Any,
    tls: ReloadableServerTLS | None,
    tls_known: bool,
    report: Report,
) -> Any:
    """Bind every door as twistd would, then close them all; a door on a
    wildcard address without TLS is a warning (unless the TLS itself is
    broken: start-up refuses that already)."""
    if not tls_known and settings.default.ssl_only:
        # Start-up refuses the TLS already; the ports are still worth binding,
        # and a door needs TLS to be built with ssl_only.
        settings = replace(settings, default=replace(settings.default, ssl_only=False))
    doors = build_doors(settings, None, reactor, tls, proxy_name(settings))
    bound: list[DoorService] = []
    try:
        for door in doors:
            host, port = door.place.read(settings)
            report.doors.append(f"{door.name} {host}:{port}")
            try:
                door.privilegedStartService()
            except DoorRefused as refusal:
                report.error(str(refusal.code).removeprefix("consoled: "))
            else:
                bound.append(door)
            if tls_known and _wildcard(host) and not _offers_tls(door):
                place = door.place
                remedy = (
                    "set [DEFAULT] ssl_only = true (this door is TLS only then)"
                    if tls is not None
                    else "set [DEFAULT] cert and key for TLS"
                )
                report.warning(
                    f"{door.name} door listens on {host or '*'}:{port} without TLS: tokens and "
                    f"console traffic cross the network in clear text; {remedy}, or set "
                    f"[{place.group}] {place.host_option} to an address only a TLS proxy reaches"
                )
    finally:
        yield defer.gatherResults([defer.maybeDeferred(door.stopService) for door in bound])


def _relative_to_cwd(settings: Settings, embedded: bool) -> bool:
    """Whether the SQLite file's place depends on the working directory."""
    if embedded:
        state_path = settings.default.state_path
        return not (state_path and os.path.isabs(state_path))
    try:
        url = make_url(settings.database.connection or "")
    except Exception:
        return False  # no URL at all: reported as the database's finding
    database = url.database or ""
    return (
        url.get_backend_name() == "sqlite"
        and database not in ("", ":memory:")
        and (not os.path.isabs(database))
    )


@defer.inlineCallbacks
def check_database(settings: Settings, reactor: Any, report: Report) -> Any:
    """Reach the database as start-up does; its schema must be at head (but
    for the embedded default, which start-up creates and upgrades)."""
    embedded = settings.database.connection is None
    notes = ["embedded"] if embedded else []
    if _relative_to_cwd(settings, embedded):
        notes.append(f"relative to the working directory {os.getcwd()}")
    head = schema.head_revision()
    if embedded:
        # Not opened when it is not there: opening would create it (and its directory).
        url = make_url(default_url(settings.default.state_path))
        if not os.path.exists(url.database or ""):
            notes.append(f"not there yet: start-up creates it at schema {head}")
            report.database = f"{safe_url(url)} ({', '.join(notes)})"
            return
    try:
        store, embedded = open_store(
            settings.database.connection,
            reactor,
            threads=1,
            state_path=settings.default.state_path,
            breaker=False,
        )
    except Exception as error:
        report.error(store_refusal(error, settings))
        report.database = "(none)"
        return
    url = store.engine.url
    store.start()
    try:
        if embedded:
            current = yield store.schema_revision()
            if current == head:
                notes.append(f"schema {head}")
            else:
                notes.append(f"schema {current or 'none'}: start-up upgrades it to {head}")
        else:
            yield store.check_schema()
            notes.append(f"schema {head}")
    except schema.SchemaBehind as behind:
        report.error(str(behind))
    except Exception as error:
        report.error(describe_error(error, url))
    finally:
        yield store.stop()
    report.database = f"{safe_url(url)} ({', '.join(notes)})" if notes else safe_url(url)


@defer.inlineCallbacks
def run_check(settings: Settings, reactor: Any, out: TextIO, now: float | None = None) -> Any:
    """Check everything, write the report to ``out``; fire with the exit status."""
    report = Report()
    now = reactor.seconds() if now is None else now
    check_web(settings, report)
    tls, tls_known = check_tls(settings, now, report)
    yield check_doors(settings, reactor, tls, tls_known, report)
    yield check_database(settings, reactor, report)
    for finding in report.findings:
        out.write(finding.line() + "\n")
    out.write(report.summary() + "\n")
    return 1 if report.fatal else 0
