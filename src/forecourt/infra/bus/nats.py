"""NATS JetStream bus: the production backend of :class:`~forecourt.infra.bus.Bus`.

Stream
    One stream (``FORECOURT`` by default) captures ``forecourt.>`` on file storage with
    limits retention: events are kept for ``max_age`` (7 days) within ``max_bytes`` (1 GiB)
    and ``max_msgs`` (unlimited), ``replicas`` copies (1; 3 on a three-node cluster), 1 MiB
    per message at most. The discard policy is **new**: a full stream refuses a publish
    (:class:`~forecourt.infra.bus.BusFull`) instead of silently dropping events that
    consumers have not read yet. The duplicate window (2 minutes) makes publishing
    idempotent per event id: every message carries ``Nats-Msg-Id`` = the event id, so the
    outbox relay re-publishing after a crash within the window stores nothing new.
    ``connect()`` creates the stream when it is missing; when it exists with another
    retention, storage, discard policy, limits, replica count or duplicate window, it is
    updated to this configuration and ``bus.stream_updated`` logs the differences. A
    configuration the server cannot hold makes ``connect()`` fail with a message saying
    so: replicas above one on a server that is not a JetStream cluster (err_code 10074 at
    creation; an update is checked here first, as NATS 2.9 would accept it), another
    storage type or retention policy (10052), more storage than the server has (10047).

Publishing
    CloudEvents binary mode: the ``ce-*`` headers and the JSON body exactly as the outbox
    stored them. :meth:`NatsBus.publish_records` pipelines a batch (every message goes
    out, then every PubAck is awaited, on one reply subscription per connection) and sorts
    the answers record by record:

    * stored (a duplicate within the window counts as stored);
    * refused for good: the record can never be stored as it is, and the others of the
      batch were. Found before sending: a subject the stream does not capture, a message
      larger than the stream's ``max_msg_size`` or the server's ``max_payload`` (the server
      would close the connection on the latter). Answered by the server: err_code 10054
      (``message size exceeds maximum allowed``), 10060 (``expected stream does not
      match``: every message carries ``Nats-Expected-Stream``, so another stream capturing
      the subject cannot store it). Raised as :class:`~forecourt.infra.bus.PublishRefused`
      once every answer is in, and only when every other record was stored;
    * stream full: err_code 10077 (``stream store failed``) whose description is
      ``maximum messages exceeded``, ``maximum bytes exceeded`` or ``maximum messages per
      subject exceeded``, and 10023 (``insufficient resources``: the server's or account's
      storage is used up; 10028 and 10047, insufficient memory or storage resources, are
      taken the same way). Raised as :class:`~forecourt.infra.bus.BusFull`;
    * anything else: no answer within ``publish_timeout`` (:class:`TimeoutError`), status
      503 *no responders* (no stream listening: JetStream unavailable or the stream gone),
      an error code not listed above (:class:`RuntimeError`). Nothing of the batch then
      counts as stored.

    The error codes are those NATS Server 2.9 answers (checked against a server).
    ``transactional`` is False: ``publish_records(conn=...)`` ignores the connection, NATS
    not being part of the database's transaction.

Consuming
    Each ``subscribe(consumer, ...)`` binds a durable *pull* consumer named after
    ``consumer`` (sanitised to ``[A-Za-z0-9_-]``) with explicit acks, an ``ack_wait``
    (30 s) and **no** delivery limit (``max_deliver: -1``): the redelivery budget is the
    consumer host's, which dead-letters. An existing durable is updated to this
    configuration (one created with a delivery limit loses it). Several processes
    subscribing with the same name share the work.

    A background task fetches up to ``batch_size`` messages (with pull requests of its own:
    what is available at once or, when nothing is, a long poll for one message and then the
    rest, so that no request stays open on the server while a batch is handled) and calls
    the handler once with the whole batch as :class:`~forecourt.infra.bus.Delivery` values:
    ``ce-id`` (or ''), JetStream's delivery count as ``attempt``, the headers without the
    transport's ``Nats-*``, the body and the subject without the prefix. Nothing is parsed
    or terminated here: a malformed message is delivered like any other. Each verdict is
    then applied: ``None`` acks and waits for the server's confirmation (a lost ack is
    logged and only means a redelivery), a number of seconds naks with that delay. A handler
    that raises (or answers the wrong number of verdicts) gets the whole batch back later:
    each message is nak'd with the retry delay of its attempt (exponential within
    ``retry_backoff``) and the fetch loop backs off. While the handler runs longer than a
    third of ``ack_wait``, progress acks keep the batch from being redelivered. ``stop()``
    lets a running handler finish for ``stop_grace`` seconds and hands every message it has
    not settled back with a nak; a process that dies leaves its messages to come back after
    ``ack_wait`` with a higher ``attempt``. Delivery is at least once and unordered.

    :meth:`NatsBus.pending` is a durable's ``num_pending + num_ack_pending``;
    :meth:`NatsBus.stream_usage` gives the stream's figures and how full it is.

    Several subject filters on one consumer need NATS Server 2.10 (``filter_subjects``); on
    older servers a consumer with several subjects becomes one durable per subject (named
    ``<consumer>_<hash>``), so an event matching two overlapping filters arrives twice,
    which the inbox absorbs.

Subject prefix
    ``subject_prefix="t1"`` puts every subject of this bus under ``t1.``: the stream captures
    ``t1.forecourt.>``, events are published to ``t1.<bus_subject>`` and subscription filters
    are prefixed the same way; handlers see the bus subjects without it. It lets several
    environments (or tests) share one server, each on its own stream; by default there is
    no prefix and the subject is ``Envelope.bus_subject``
    (``forecourt.sales.sale.completed.v1``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import hashlib
import json
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.protocol import command as prot_command

from forecourt.infra.bus import BatchHandler, BusFull, Delivery, PublishRefused, Verdict
from forecourt.infra.logging import get_logger
from forecourt.kernel.events import Envelope, EventRecord

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

log = get_logger("forecourt.bus.nats")

MSG_ID_HEADER = "Nats-Msg-Id"
EXPECTED_STREAM_HEADER = "Nats-Expected-Stream"
MAX_ACK_PENDING = 1000  # messages one durable may have in flight (a batch is at most this)

#: PubAck error codes that can never succeed for that message.
REFUSED_CODES = {
    10054: "message size exceeds maximum allowed",
    10060: "expected stream does not match",
}
#: PubAck error codes of a full stream (``discard: new``) or a full server.
STREAM_STORE_FAILED = 10077  # description: "maximum messages|bytes|messages per subject exceeded"
FULL_CODES = {
    10023: "insufficient resources",
    10028: "insufficient memory resources available",
    10047: "insufficient storage resources available",
}

_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_PREFIX_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
_PULL_MARGIN = 0.5  # seconds past a pull request's end before it is taken as lost
_LIST_PAGE = 256  # consumers per page of a JetStream list answer
_HEADER_SLACK = 8192  # bodies this close to the size limit get their headers measured


_BYTES_WHITESPACE = " \t\n\r\x0b\x0c"  # what bytes.strip() strips


def _header_block(headers: dict[str, Any]) -> bytes:
    """The NATS header block for ``headers``, as the client library writes it: names
    stripped (empty ones skipped) and checked against the token syntax, values stripped
    with CR and LF turned into spaces."""
    lines = [b"NATS/1.0\r\n"]
    for k, v in headers.items():
        key = k.strip()
        if not key:
            continue
        if not _HEADER_KEY_RE.fullmatch(key):
            raise nats.errors.BadHeaderError(key)
        value = v.strip()
        if "\r" in value or "\n" in value:
            value = value.replace("\r", " ").replace("\n", " ")
        lines.append(f"{key}: {value}\r\n".encode())
    lines.append(b"\r\n")
    return b"".join(lines)


_HEADER_KEY_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class _Client(NatsClient):
    """The NATS client with leaner header handling.

    With ten CloudEvents and NATS headers per message, the library's header code was the
    largest cost per message on both ends: on receipt it checks every name for whitespace
    one character at a time in a generator, and on publish it maps every value through
    ``str.translate`` with a dict. These two give the same bytes and the same dict for any
    input (property tests compare them with the library's own code); the rest of the
    client is the library's.
    """

    async def _send_publish(
        self,
        subject: str,
        reply: str,
        payload: bytes,
        payload_size: int,
        headers: dict[str, Any] | None,
    ) -> None:
        if not headers:
            await super()._send_publish(subject, reply, payload, payload_size, headers)
            return
        if subject == "":
            raise nats.errors.BadSubjectError
        command = prot_command.hpub_cmd(subject, reply, _header_block(headers), payload)
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += payload_size
        await self._send_command(command)
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        # Decoding once, then splitting at ASCII delimiters, replaces the same ill-formed
        # sequences as decoding each value (an ASCII byte always ends one).
        out: dict[str, str] = {}
        for line in raw.decode("utf-8", "replace").split("\r\n"):
            name, sep, value = line.partition(":")
            if not sep:
                continue
            key = name.strip(_BYTES_WHITESPACE)
            if not key.isascii() or (key and key.split() != [key]):
                continue  # a name with bytes beyond ASCII or whitespace inside: skipped
            out[key] = value.strip(_BYTES_WHITESPACE)
        return out


def consumer_name(consumer: str) -> str:
    """A JetStream-safe durable name for ``consumer`` (no dots, wildcards or spaces)."""
    name = _NAME_UNSAFE.sub("_", consumer.strip())
    if not name:
        raise ValueError(f"consumer name {consumer!r} is empty once sanitised")
    return name


def _wire_headers(headers: dict[str, str] | None) -> dict[str, str]:
    """The event's headers as published: transport headers (``Nats-*``) removed."""
    return {k: v for k, v in (headers or {}).items() if not k.lower().startswith("nats-")}


def _header_size(headers: dict[str, str]) -> int:
    """Bytes of the NATS header block for ``headers`` (``NATS/1.0`` line, one line each)."""
    return 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def _plain(value: object) -> object:
    return value.value if isinstance(value, enum.Enum) else value


def _same(a: object, b: object) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, float | int) and isinstance(b, float | int):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-6)
    return a == b


def classify_puback(data: bytes, headers: dict[str, str] | None, stream: str) -> tuple[str, str]:
    """``(outcome, reason)`` for one PubAck: ``stored``, ``refused`` (for good), ``full``
    (the stream or server refuses new messages for now) or ``failed`` (unknown outcome)."""
    if not data:
        status = (headers or {}).get("Status", "?")
        return "failed", f"no stream answered (status {status})"
    try:
        ack = json.loads(data)
    except ValueError:
        return "failed", f"unreadable PubAck {data[:200]!r}"
    if not isinstance(ack, dict):
        return "failed", f"unreadable PubAck {data[:200]!r}"
    error = ack.get("error")
    if error is None:
        if ack.get("stream") != stream:
            return "refused", f"stored in {ack.get('stream')!r}, not {stream!r}"
        return "stored", ""
    if not isinstance(error, dict):
        return "failed", str(error)
    code = error.get("err_code")
    description = str(error.get("description", error))
    reason = f"{description} (err_code {code})"
    if code in REFUSED_CODES:
        return "refused", reason
    if code in FULL_CODES or (code == STREAM_STORE_FAILED and "exceeded" in description):
        return "full", reason
    return "failed", reason


async def _settle(op: Callable[[], Awaitable[Any]], durable: str, what: str) -> bool:
    """Send an ack/nak/progress (``op`` starts it); a lost one only means a redelivery."""
    try:
        await op()
    except Exception as exc:  # noqa: BLE001
        log.warning("bus.ack_failed", consumer=durable, op=what, error=repr(exc))
        return False
    return True


class _Puller:
    """The fetch loop of one durable pull consumer.

    It pulls with requests of its own rather than the client library's ``fetch``, so that
    no pull request stays open on the server while a batch is being handled (a message
    the server sent for it would wait in the client's queue, without progress acks, and
    come back after ``ack_wait``): a ``no_wait`` request for what is available now and,
    when there is nothing, a long poll for *one* message followed by a ``no_wait`` request
    for the rest of the batch. Every message received is in hand until settled (and handed
    back if the loop stops first)."""

    def __init__(self, bus: NatsBus, durable: str, handler: BatchHandler, batch_size: int) -> None:
        self.bus = bus
        self.durable = durable
        self.handler = handler
        self.batch_size = batch_size
        self.stopping = False
        self.idle = False
        self.unsettled: list[Msg] = []  # messages in hand, until their verdicts are sent
        self.queue: asyncio.Queue[Msg] = asyncio.Queue()
        self.next_subject = f"{api.DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{bus.stream}.{durable}"
        self.inbox = ""
        self.requests = 0
        self.sub: Any = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        nc = self.bus.nc
        self.inbox = nc.new_inbox()
        self.sub = await nc.subscribe(f"{self.inbox}.*", cb=self._received)
        self.task = asyncio.create_task(self._run(), name=f"nats-bus:{self.durable}")

    async def _received(self, msg: Msg) -> None:
        self.queue.put_nowait(msg)

    async def _run(self) -> None:
        bus = self.bus
        failures = 0
        try:
            while not self.stopping:
                self.idle = True  # waiting for messages (or backing off): safe to cancel
                try:
                    msgs = await self._fetch()
                except Exception as exc:  # noqa: BLE001 - reconnecting, consumer gone, ...: retry
                    failures += 1
                    log.warning("bus.fetch_failed", consumer=self.durable, error=repr(exc))
                    await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                    continue
                finally:
                    self.idle = False
                if not msgs:
                    continue
                if self.stopping:
                    break  # handed back below
                if await self._handle(msgs):
                    failures = 0
                else:
                    failures += 1
                    self.idle = True
                    await asyncio.sleep(bus.retry_delay(failures))
        finally:
            if self.unsettled:  # stopping (or cancelled): hand them back at once
                rest, self.unsettled = self.unsettled, []
                await asyncio.shield(self._nak_all(rest, 0.0))

    async def _fetch(self) -> list[Msg]:
        """Up to ``batch_size`` messages; [] after ``fetch_timeout`` without any."""
        msgs = await self._pull(self.batch_size, expires=None)
        if not msgs:
            msgs = await self._pull(1, expires=self.bus.fetch_timeout)
            if msgs and self.batch_size > 1:
                msgs += await self._pull(self.batch_size - 1, expires=None)
        return msgs

    async def _pull(self, batch: int, *, expires: float | None) -> list[Msg]:
        """One pull request: ``no_wait`` (what is there now) or a long poll of ``expires``
        seconds; returns when the server says it is complete or, failing that,
        ``_PULL_MARGIN`` after it should have (NATS 2.9 can drop a waiting request without
        an answer when a delayed redelivery falls due as it expires)."""
        self.requests += 1
        reply = f"{self.inbox}.{self.requests}"
        request: dict[str, Any] = {"batch": batch}
        if expires is None:
            request["no_wait"] = True
        else:
            request["expires"] = int(expires * 1e9)
        await self.bus.nc.publish(self.next_subject, json.dumps(request).encode(), reply=reply)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (expires or 0.0) + _PULL_MARGIN
        got: list[Msg] = []
        while len(got) < batch:
            if self.queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    msg = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                msg = self.queue.get_nowait()
            if msg.reply:  # a message (the reply subject acknowledges it)
                got.append(msg)
                self.unsettled.append(msg)
                continue
            if msg.subject != reply:
                continue  # the end of an earlier request
            status = (msg.headers or {}).get("Status", "")
            if status in ("404", "408"):  # nothing (more) now / the long poll expired
                break
            if status == "100":  # heartbeat
                continue
            if got:
                break
            description = (msg.headers or {}).get("Description", "")
            raise RuntimeError(f"pull request refused: {status} {description}".strip())
        return got

    def _delivery(self, msg: Msg) -> Delivery:
        headers = _wire_headers(msg.headers)
        return Delivery(
            event_id=headers.get("ce-id", ""),
            attempt=msg.metadata.num_delivered or 1,
            headers=headers,
            body=msg.data,
            subject=self.bus.bus_subject(msg.subject),
        )

    async def _handle(self, msgs: list[Msg]) -> bool:
        """Run the handler on one batch and apply its verdicts; False if it failed."""
        keepalive = asyncio.create_task(self._keep_alive(msgs))
        try:
            deliveries = [self._delivery(m) for m in msgs]
            verdicts: Sequence[Verdict] = await self.handler(deliveries)
            if len(verdicts) != len(msgs):
                raise RuntimeError(f"{len(verdicts)} verdicts for a batch of {len(msgs)}")
        except asyncio.CancelledError:
            raise  # the loop hands the batch back
        except Exception as exc:  # noqa: BLE001 - a failing handler means redeliver, never lose
            log.warning(
                "bus.handler_failed",
                consumer=self.durable,
                batch=len(msgs),
                event_ids=[m.headers.get("ce-id", "") for m in msgs[:10] if m.headers],
                error=repr(exc),
            )
            self.unsettled = []
            await self._nak_all(msgs, None)
            return False
        finally:
            keepalive.cancel()
        self.unsettled = []
        # In turn, not one task each: an ack only queues a few bytes for the flush below.
        for msg, verdict in zip(msgs, verdicts, strict=True):
            await self._apply(msg, verdict)
        # One round trip for the whole batch's acks (a lost ack only means a redelivery,
        # which the consumer's inbox absorbs).
        timeout = max(1, int(self.bus.publish_timeout))
        await _settle(lambda: self.bus.nc.flush(timeout=timeout), self.durable, "flush")
        return True

    async def _apply(self, msg: Msg, verdict: Verdict) -> None:
        if verdict is None:
            await _settle(msg.ack, self.durable, "ack")
        else:
            delay = max(0.0, float(verdict))
            await _settle(lambda: msg.nak(delay=delay), self.durable, "nak")

    async def _nak_all(self, msgs: Sequence[Msg], delay: float | None) -> None:
        """Hand messages back: after ``delay``, or the retry delay of each one's attempt."""

        async def nak(msg: Msg) -> None:
            wait = delay
            if wait is None:
                try:
                    wait = self.bus.retry_delay(msg.metadata.num_delivered or 1)
                except Exception:  # noqa: BLE001 - no metadata: the first retry delay
                    wait = self.bus.retry_delay(1)
            await _settle(lambda: msg.nak(delay=wait), self.durable, "nak")

        await asyncio.gather(*(nak(m) for m in msgs))

    async def _keep_alive(self, msgs: list[Msg]) -> None:
        """Progress acks for the whole batch while a handler runs past ``ack_wait / 3``."""
        while True:
            await asyncio.sleep(self.bus.ack_wait / 3)
            await asyncio.gather(
                *(_settle(m.in_progress, self.durable, "in_progress") for m in msgs)
            )

    async def stop(self, grace: float) -> None:
        self.stopping = True
        if self.task is not None:
            if self.idle:
                self.task.cancel()
            done, _ = await asyncio.wait({self.task}, timeout=grace)
            if not done:
                self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
        # Messages that came in for a pull the loop no longer waited for.
        late = [m for m in _drain(self.queue) if m.reply]
        if late:
            await self._nak_all(late, 0.0)


def _drain(queue: asyncio.Queue[Msg]) -> list[Msg]:
    """Everything waiting in ``queue``, taken out."""
    items: list[Msg] = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


class NatsSubscription:
    def __init__(self, bus: NatsBus, pullers: list[_Puller]) -> None:
        self.bus = bus
        self.pullers = pullers

    @property
    def durables(self) -> list[str]:
        return [p.durable for p in self.pullers]

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop(self.bus.stop_grace) for p in self.pullers))
        self.bus._subs.discard(self)


class _PendingAcks:
    """The answers one pipelined publish still waits for (complete once ``seal()`` was
    called, every message being out, and every answer is in)."""

    def __init__(self) -> None:
        self.waiting: set[int] = set()
        self.outcomes: dict[str, dict[int, str]] = {"refused": {}, "full": {}, "failed": {}}
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sealed = False

    def seal(self) -> None:
        self.sealed = True
        self._check()

    def answer(self, index: int, outcome: str, reason: str) -> None:
        if index not in self.waiting:
            return
        self.waiting.discard(index)
        if outcome != "stored":
            self.outcomes[outcome][index] = reason
        self._check()

    def _check(self) -> None:
        if self.sealed and not self.waiting and not self.done.done():
            self.done.set_result(None)


class NatsBus:
    """The :class:`~forecourt.infra.bus.Bus` on NATS JetStream (see the module docstring)."""

    transactional = False

    def __init__(
        self,
        url: str,
        *,
        stream: str = "FORECOURT",
        subject_prefix: str = "",
        duplicate_window: float = 120.0,
        max_age: float = 7 * 24 * 3600.0,
        max_bytes: int = 1024**3,
        max_msgs: int = -1,
        replicas: int = 1,
        max_msg_size: int = 1024**2,
        ack_wait: float = 30.0,
        retry_backoff: tuple[float, float] = (0.5, 30.0),
        fetch_timeout: float = 2.0,
        publish_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        stop_grace: float = 10.0,
        name: str = "forecourt",
        manage_stream: bool = True,
    ) -> None:
        if subject_prefix and not all(_PREFIX_TOKEN.match(t) for t in subject_prefix.split(".")):
            raise ValueError(
                f"subject prefix {subject_prefix!r} must be plain dot-separated tokens"
            )
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        if ack_wait <= 0:
            raise ValueError("ack_wait must be positive")
        self.url = url
        self.stream = stream
        self.subject_prefix = subject_prefix
        self.duplicate_window = duplicate_window
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.max_msgs = max_msgs
        self.replicas = replicas
        self.max_msg_size = max_msg_size
        self.ack_wait = ack_wait
        self.retry_backoff = retry_backoff
        self.fetch_timeout = fetch_timeout
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self.stop_grace = stop_grace
        # False: connect() only looks for the stream and never creates or changes it (a
        # process that reads figures, such as ``forecourt events status``).
        self.manage_stream = manage_stream
        self.name = name
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._subs: set[NatsSubscription] = set()
        self._durables: dict[str, list[str]] = {}
        self._closing = False
        self._ack_prefix: str | None = None
        self._pending: dict[str, _PendingAcks] = {}
        self._batch_no = 0
        self._captured = self.wire_subject("forecourt.")

    # --- subjects -------------------------------------------------------------------

    def wire_subject(self, subject: str) -> str:
        """The NATS subject for a bus subject or filter (with the prefix, if any)."""
        return f"{self.subject_prefix}.{subject}" if self.subject_prefix else subject

    def bus_subject(self, wire_subject: str) -> str:
        """The bus subject of a NATS subject (the prefix removed)."""
        if self.subject_prefix and wire_subject.startswith(f"{self.subject_prefix}."):
            return wire_subject[len(self.subject_prefix) + 1 :]
        return wire_subject

    @property
    def stream_subjects(self) -> list[str]:
        return [self.wire_subject("forecourt.>")]

    def retry_delay(self, attempt: int) -> float:
        base, cap = self.retry_backoff
        return float(min(base * 2 ** (max(attempt, 1) - 1), cap))

    def stream_config(self) -> api.StreamConfig:
        """The stream as this bus wants it."""
        return api.StreamConfig(
            name=self.stream,
            description="Forecourt domain events (CloudEvents, binary mode)",
            subjects=self.stream_subjects,
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.NEW,
            max_age=self.max_age,
            max_bytes=self.max_bytes,
            max_msgs=self.max_msgs,
            max_msg_size=self.max_msg_size,
            duplicate_window=self.duplicate_window,
            num_replicas=self.replicas,
        )

    # --- lifecycle ------------------------------------------------------------------

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise RuntimeError("NatsBus.connect() has not been called")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("NatsBus.connect() has not been called")
        return self._js

    async def connect(self) -> None:
        if self._nc is not None:
            return
        self._closing = False
        nc = _Client()

        async def on_error(exc: Exception) -> None:
            log.warning("bus.nats_error", error=repr(exc))

        async def on_disconnected() -> None:
            if not self._closing:
                log.warning("bus.nats_disconnected", url=self.url)

        async def on_reconnected() -> None:
            log.info("bus.nats_reconnected", url=nc.connected_url)

        try:
            # Reconnect forever once connected; the first connection is bounded here.
            await asyncio.wait_for(
                nc.connect(
                    self.url,
                    name=self.name,
                    connect_timeout=max(1, int(self.connect_timeout)),
                    reconnect_time_wait=1,
                    max_reconnect_attempts=-1,
                    error_cb=on_error,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=on_reconnected,
                ),
                timeout=self.connect_timeout,
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        self._nc = nc
        self._js = nc.jetstream(timeout=self.publish_timeout)
        try:
            if self.manage_stream:
                await self._ensure_stream()
            else:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await self.js.stream_info(self.stream)
        except BaseException:
            await self.close()
            raise

    async def _ensure_stream(self) -> None:
        """Create the stream, or update it to this bus's policy."""
        wanted = self.stream_config()
        try:
            info = await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            try:
                info = await self.js.add_stream(wanted)
            except nats.js.errors.BadRequestError:
                info = await self.js.stream_info(self.stream)  # another process won the race
            except nats.js.errors.APIError as exc:
                raise RuntimeError(
                    f"NATS refused to create stream {self.stream!r} (replicas={self.replicas}, "
                    f"max_bytes={self.max_bytes}): {exc.description} (err_code {exc.err_code})"
                ) from exc
            else:
                log.info(
                    "bus.stream_created",
                    stream=self.stream,
                    subjects=wanted.subjects,
                    replicas=self.replicas,
                )
        differences = self._differences(info.config, wanted)
        if differences:
            clustered = info.cluster is not None and bool(info.cluster.name)
            if self.replicas > 1 and not clustered:
                raise RuntimeError(
                    f"stream {self.stream!r}: replicas={self.replicas} needs a JetStream "
                    "cluster, and this NATS server is not one (use replicas=1)"
                )
            changes = {field: getattr(wanted, field) for field in differences}
            try:
                info = await self.js.update_stream(dataclasses.replace(info.config, **changes))
            except nats.js.errors.APIError as exc:
                raise RuntimeError(
                    f"NATS refused to update stream {self.stream!r} to "
                    f"{ {k: _plain(v) for k, v in changes.items()} }: {exc.description} "
                    f"(err_code {exc.err_code})"
                ) from exc
            log.warning("bus.stream_updated", stream=self.stream, differences=differences)
            left = self._differences(info.config, wanted)
            if left:
                raise RuntimeError(f"stream {self.stream!r} kept {left} after an update")
        missing = set(self.stream_subjects) - set(info.config.subjects or [])
        if missing:
            log.warning("bus.stream_subjects_differ", stream=self.stream, missing=sorted(missing))

    _POLICY_FIELDS = (
        "retention",
        "storage",
        "discard",
        "max_age",
        "max_bytes",
        "max_msgs",
        "max_msg_size",
        "num_replicas",
        "duplicate_window",
    )

    def _differences(
        self, have: api.StreamConfig, want: api.StreamConfig
    ) -> dict[str, dict[str, object]]:
        return {
            field: {"from": _plain(getattr(have, field)), "to": _plain(getattr(want, field))}
            for field in self._POLICY_FIELDS
            if not _same(getattr(have, field), getattr(want, field))
        }

    async def ready(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def close(self) -> None:
        self._closing = True
        await asyncio.gather(*(sub.stop() for sub in list(self._subs)))
        nc, self._nc, self._js = self._nc, None, None
        self._ack_prefix = None
        if nc is not None and not nc.is_closed:
            try:
                await nc.drain()
            except Exception as exc:  # noqa: BLE001 - closing anyway
                log.warning("bus.drain_failed", error=repr(exc))
                with contextlib.suppress(Exception):
                    await nc.close()

    # --- publishing -----------------------------------------------------------------

    async def publish(self, envelope: Envelope) -> None:
        await self.publish_records([envelope.record()])

    async def publish_records(
        self,
        records: Sequence[EventRecord],
        *,
        conn: AsyncConnection | None = None,  # noqa: ARG002 - not transactional
    ) -> None:
        """Pipelined publish: every message goes out at once, then every PubAck is awaited
        and sorted (see the module docstring). ``conn`` is ignored (not transactional).

        The relay's hot path, so it stays lean: headers straight from the stored record,
        no body decoding, and one reply subscription for all acknowledgements instead of
        the client library's per-message future, semaphore and timeout task. Each message
        carries ``Nats-Msg-Id`` (de-duplication) and ``Nats-Expected-Stream`` (the server
        refuses to store it anywhere else).
        """
        if not records:
            return
        if self._nc is None:
            raise RuntimeError("NatsBus.connect() has not been called")
        nc = self._nc
        prefix = await self._ack_inbox()
        limit = min(self.max_msg_size, nc.max_payload)
        self._batch_no += 1
        token = str(self._batch_no)
        refused: dict[int, str] = {}
        pending = _PendingAcks()
        self._pending[token] = pending
        reply = f"{prefix}.{token}."
        try:
            for i, record in enumerate(records):
                subject = self.wire_subject(record.bus_subject)
                if not subject.startswith(self._captured) or len(subject) == len(self._captured):
                    refused[i] = (
                        f"event {record.id}: subject {subject!r} is not captured by stream "
                        f"{self.stream!r} ({self.stream_subjects[0]})"
                    )
                    continue
                data = record.data.encode()
                headers = record.headers()
                headers[MSG_ID_HEADER] = record.id
                headers[EXPECTED_STREAM_HEADER] = self.stream
                if len(data) + _HEADER_SLACK > limit:
                    size = len(data) + _header_size(headers)
                    if size > limit:
                        refused[i] = (
                            f"event {record.id}: message of {size} bytes exceeds the "
                            f"maximum of {limit} bytes"
                        )
                        continue
                pending.waiting.add(i)
                await nc.publish(subject, data, reply=f"{reply}{i}", headers=headers)
            pending.seal()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(pending.done), timeout=self.publish_timeout)
        finally:
            del self._pending[token]
        self._verdict(records, pending, refused)

    def _verdict(
        self, records: Sequence[EventRecord], pending: _PendingAcks, refused: dict[int, str]
    ) -> None:
        """Raise what the answers of one publish amount to (nothing when all were stored)."""
        full = pending.outcomes["full"]
        failed = pending.outcomes["failed"]
        refused.update(
            (i, f"event {records[i].id}: {why}") for i, why in pending.outcomes["refused"].items()
        )
        total = len(records)
        if full:
            first = min(full)
            raise BusFull(
                f"stream {self.stream!r} is full: {len(full)} of {total} event(s) refused, "
                f"first {records[first].id}: {full[first]}"
            )
        if pending.waiting:
            first = min(pending.waiting)
            raise TimeoutError(
                f"{len(pending.waiting)} of {total} event(s) not acknowledged within "
                f"{self.publish_timeout} s (first {records[first].id})"
            )
        if failed:
            first = min(failed)
            raise RuntimeError(
                f"{len(failed)} of {total} event(s) not stored: event {records[first].id}: "
                f"{failed[first]}"
            )
        if refused:
            log.error(
                "bus.publish_refused",
                stream=self.stream,
                refused=len(refused),
                of=total,
                first=refused[min(refused)],
            )
            raise PublishRefused(refused)

    async def _ack_inbox(self) -> str:
        """The reply subject prefix for PubAcks, subscribed once per connection."""
        if self._ack_prefix is None:
            assert self._nc is not None
            prefix = self._nc.new_inbox()
            await self._nc.subscribe(f"{prefix}.*.*", cb=self._on_ack)
            self._ack_prefix = prefix
        return self._ack_prefix

    async def _on_ack(self, msg: Msg) -> None:
        _, token, index = msg.subject.rsplit(".", 2)
        pending = self._pending.get(token)
        if pending is None:
            return  # an answer after its batch timed out: the relay retries that batch
        outcome, reason = classify_puback(msg.data, msg.headers, self.stream)
        pending.answer(int(index), outcome, reason)

    # --- consuming ------------------------------------------------------------------

    async def subscribe(
        self,
        consumer: str,
        subjects: list[str],
        handler: BatchHandler,
        *,
        batch_size: int = 100,
    ) -> NatsSubscription:
        if not subjects:
            raise ValueError("subscribe needs at least one subject")
        if not 1 <= batch_size <= MAX_ACK_PENDING:
            raise ValueError(f"batch_size must be between 1 and {MAX_ACK_PENDING}")
        groups = self._groups(consumer, subjects)
        pullers: list[_Puller] = []
        try:
            for durable, group in groups:
                await self._ensure_consumer(durable, group)
                puller = _Puller(self, durable, handler, batch_size)
                await puller.start()
                pullers.append(puller)
        except BaseException:
            for p in pullers:
                await p.stop(0)
            raise
        self._durables[consumer_name(consumer)] = [durable for durable, _ in groups]
        sub = NatsSubscription(self, pullers)
        self._subs.add(sub)
        return sub

    def _groups(self, consumer: str, subjects: list[str]) -> list[tuple[str, list[str]]]:
        """The durables of ``consumer`` and the filters of each."""
        base = consumer_name(consumer)
        filters = sorted({self.wire_subject(s) for s in subjects})
        if len(filters) == 1 or self._supports_filter_subjects():
            return [(base, filters)]
        return [(f"{base}_{hashlib.sha1(f.encode()).hexdigest()[:8]}", [f]) for f in filters]

    def _supports_filter_subjects(self) -> bool:
        if self._nc is None:
            return False
        version = self._nc.connected_server_version
        return (version.major, version.minor) >= (2, 10)

    async def _ensure_consumer(self, durable: str, filters: list[str]) -> None:
        """Create the durable consumer, or update it to this configuration."""
        config = api.ConsumerConfig(
            name=durable,
            durable_name=durable,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=-1,  # no broker-side limit: the consumer host owns the budget
            max_ack_pending=MAX_ACK_PENDING,
            replay_policy=api.ReplayPolicy.INSTANT,
        )
        if len(filters) == 1:
            config.filter_subject = filters[0]
        else:
            config.filter_subjects = filters
        try:
            info = await self.js.add_consumer(self.stream, config)
        except nats.js.errors.APIError as exc:
            raise RuntimeError(
                f"NATS refused consumer {durable!r} on {self.stream!r} (filters {filters}): "
                f"{exc.description} (err_code {exc.err_code})"
            ) from exc
        applied = info.config.filter_subjects or (
            [info.config.filter_subject] if info.config.filter_subject else []
        )
        if sorted(applied) != filters:  # e.g. a server that ignores ``filter_subjects``
            raise RuntimeError(
                f"consumer {durable!r} on {self.stream!r} filters {applied}, wanted {filters}"
            )
        if (info.config.max_deliver or -1) > 0:
            raise RuntimeError(
                f"consumer {durable!r} on {self.stream!r} kept max_deliver="
                f"{info.config.max_deliver}; it must have no limit"
            )

    async def pending(self, consumer: str) -> int | None:
        """``num_pending + num_ack_pending`` of ``consumer``'s durable(s); None if none
        exists."""
        base = consumer_name(consumer)
        durables = self._durables.get(base)
        infos: list[api.ConsumerInfo] = []
        if durables is None and not self._supports_filter_subjects():
            # Maybe one durable per subject, made by another process: look them up.
            hashed = re.compile(rf"^{re.escape(base)}(_[0-9a-f]{{8}})?$")
            offset = 0
            while True:
                try:
                    page = await self.js.consumers_info(self.stream, offset=offset)
                except nats.js.errors.NotFoundError:
                    return None
                infos += [c for c in page if c.name and hashed.match(c.name)]
                offset += len(page)
                if len(page) < _LIST_PAGE:
                    break
        else:
            for durable in durables or [base]:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    infos.append(await self.js.consumer_info(self.stream, durable))
        if not infos:
            return None
        return sum((c.num_pending or 0) + (c.num_ack_pending or 0) for c in infos)

    async def stream_usage(self) -> dict[str, Any]:
        """The stream's ``messages`` and ``bytes``, its limits, and ``usage``: the fraction
        of the tightest of ``max_bytes`` / ``max_msgs`` in use (0.0 when unlimited)."""
        info = await self.js.stream_info(self.stream)
        messages = info.state.messages or 0
        size = info.state.bytes or 0
        max_bytes = info.config.max_bytes if info.config.max_bytes is not None else -1
        max_msgs = info.config.max_msgs if info.config.max_msgs is not None else -1
        fractions = [0.0]
        if max_bytes > 0:
            fractions.append(size / max_bytes)
        if max_msgs > 0:
            fractions.append(messages / max_msgs)
        return {
            "stream": self.stream,
            "messages": messages,
            "bytes": size,
            "max_bytes": max_bytes,
            "max_msgs": max_msgs,
            "max_age": info.config.max_age or 0.0,
            "usage": max(fractions),
        }
