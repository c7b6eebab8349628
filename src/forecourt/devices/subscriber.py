"""HQ's MQTT subscriber: receives station telemetry and hands what arrived together to
:class:`~forecourt.devices.handlers.DevicesService` as one batch.

One fixed client id with a persistent session (``clean_session`` false, QoS 1): the broker
keeps HQ's subscription and queues what stations publish while HQ is away, and delivers it
when HQ is back. Messages are acknowledged only after the batch they came in is committed
(a crash in between gets them delivered again; applying one twice changes nothing). A lost
connection is retried with a doubling delay capped at ``backoff_max_s``; no payload can end
the loop (a bad one is discarded and counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Any

import aiomqtt
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.exc import DBAPIError, OperationalError

from forecourt.devices.handlers import DevicesService, Received
from forecourt.infra.background import BackgroundService, cancel_and_wait
from forecourt.infra.logging import get_logger
from forecourt.infra.mqtt import BrokerAddress
from forecourt.kernel.telemetry import subscription

log = get_logger("forecourt.devices")

BATCH_MAX = 500  # messages applied in one transaction at most


class DevicesMetrics:
    """The subscriber's figures, registered in HQ's registry."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.discarded = Counter(
            "forecourt_devices_telemetry_discarded",
            "Telemetry messages discarded by HQ, by reason",
            ["reason"],
            registry=registry,
        )
        self.applied = Counter(
            "forecourt_devices_telemetry_applied",
            "Valid telemetry messages: accepted as newest, or ignored as older or repeated",
            ["outcome"],
            registry=registry,
        )
        self.connected = Gauge(
            "forecourt_devices_broker_connected",
            "1 while HQ's telemetry subscriber is connected to the broker",
            registry=registry,
        )
        self.connects = Counter(
            "forecourt_devices_broker_connects",
            "Connections of HQ's telemetry subscriber to the broker",
            registry=registry,
        )

    def on_discard(self, reason: str) -> None:
        self.discarded.labels(reason).inc()

    def on_applied(self, outcome: str, n: int) -> None:
        if n:
            self.applied.labels(outcome).inc(n)


class TelemetrySubscriber(BackgroundService):
    task_name = "devices.telemetry"

    def __init__(
        self,
        service: DevicesService,
        url: str,
        *,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        metrics: DevicesMetrics | None = None,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 10.0,
        sweep_every_s: float | None = None,
        keepalive_s: int = 30,
    ) -> None:
        self.service = service
        self.address = BrokerAddress.parse(url, setting="devices_mqtt_url", login=True)
        self.client_id = client_id
        self.username = username if username is not None else self.address.username
        self.password = password if password is not None else self.address.password
        self.metrics = metrics
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        stale_s = service.stale_after.total_seconds()
        self.sweep_every_s = sweep_every_s or min(max(stale_s / 4, 0.05), 5.0)
        self.keepalive_s = keepalive_s
        self.connected = asyncio.Event()
        self.connects = 0
        self.broker_error: str | None = None
        self._client: aiomqtt.Client | None = None

    def health(self) -> dict[str, Any]:
        return {
            **super().health(),
            "connected": self.connected.is_set(),
            "broker_error": self.broker_error,
        }

    async def run(self) -> None:
        sweeper = asyncio.create_task(self._sweep_forever(), name="devices.stale_sweep")
        delay = self.backoff_initial_s
        try:
            while True:
                self._subscribed = False
                try:
                    await self._session()
                except aiomqtt.MqttError as exc:
                    self.broker_error = str(exc) or type(exc).__name__
                    log.warning(
                        "devices.broker_lost",
                        error=self.broker_error,
                        host=self.address.host,
                        retry_in_s=delay,
                    )
                finally:
                    self._disconnected()
                if self._subscribed:  # it was up: the first retry comes quickly again
                    delay = self.backoff_initial_s
                await asyncio.sleep(delay)
                delay = min(self.backoff_max_s, delay * 2)
        finally:
            self._disconnected()
            await cancel_and_wait(sweeper)

    _subscribed = False

    def _disconnected(self) -> None:
        self.connected.clear()
        self._client = None
        if self.metrics is not None:
            self.metrics.connected.set(0)

    def _new_client(self) -> aiomqtt.Client:
        client = aiomqtt.Client(
            self.address.host,
            self.address.port,
            username=self.username,
            password=self.password,
            identifier=self.client_id,
            clean_session=False,
            transport="unix" if self.address.transport == "unix" else "tcp",
            tls_context=ssl.create_default_context() if self.address.tls else None,
            keepalive=self.keepalive_s,
            timeout=10,
        )
        # Acknowledge after the commit, not on receipt (aiomqtt has no option for it).
        client._client.manual_ack_set(True)  # noqa: SLF001
        return client

    async def _session(self) -> None:
        client = self._new_client()
        async with client:
            self._client = client
            await client.subscribe(subscription(self._prefix), qos=1)
            self._subscribed = True
            self.connects += 1
            self.broker_error = None
            self.connected.set()
            if self.metrics is not None:
                self.metrics.connected.set(1)
                self.metrics.connects.inc()
            log.info("devices.broker_connected", host=self.address.host, client=self.client_id)
            messages = client.messages
            async for first in messages:
                batch = [first]
                while len(messages) and len(batch) < BATCH_MAX:
                    batch.append(await anext(messages))
                await self._apply(batch)
                for message in batch:
                    if message.qos > 0:
                        client._client.ack(message.mid, message.qos)  # noqa: SLF001

    @property
    def _prefix(self) -> str:
        return self.service.prefix

    async def _apply(self, batch: list[aiomqtt.Message]) -> None:
        received = [_received(m) for m in batch]
        try:
            await self.service.ingest(received)
        except (DBAPIError, OperationalError, OSError):
            raise  # the database: not acknowledged, delivered again after the reconnect
        except Exception:  # noqa: BLE001 - one message must not stop the others
            log.exception("devices.batch_failed", messages=len(received))
            for item in received:
                try:
                    await self.service.ingest([item])
                except (DBAPIError, OperationalError, OSError):
                    raise
                except Exception:  # noqa: BLE001 - that message is discarded, counted
                    log.exception("devices.message_failed", topic=item.topic)
                    if self.metrics is not None:
                        self.metrics.on_discard("error")

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_every_s)
            try:
                await self.service.sweep()
            except Exception:  # noqa: BLE001 - retried at the next sweep
                log.exception("devices.sweep_failed")

    async def drop_connection(self) -> None:
        """Close the broker connection's socket under the client (a network fault): the
        subscriber notices, reconnects and goes on."""
        client = self._client
        if client is None:
            return
        shutdown = getattr(client._client.socket(), "shutdown", None)  # noqa: SLF001
        if shutdown is not None:
            with contextlib.suppress(OSError):
                shutdown(socket.SHUT_RDWR)


def _received(message: aiomqtt.Message) -> Received:
    payload = message.payload
    if isinstance(payload, str):
        data = payload.encode()
    elif isinstance(payload, bytes | bytearray):
        data = bytes(payload)
    else:
        data = b"" if payload is None else str(payload).encode()
    return Received(topic=message.topic.value, payload=data, retained=bool(message.retain))
