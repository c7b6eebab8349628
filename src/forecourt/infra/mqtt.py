"""Where an MQTT broker is: one parser for the edge's publisher and HQ's subscriber.

``mqtt://host:port`` (1883 by default), ``mqtts://host:port`` (TLS, 8883 by default) or
``unix:///path/to.sock``. A login in the URL (``mqtt://user:secret@host``) is read only where
the caller allows it (HQ's ``devices_mqtt_url``); the edge keeps its credentials in settings of
their own. ``str()`` of an address never shows a password.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from forecourt.kernel.errors import InvalidValue

MQTT_PORT = 1883
MQTTS_PORT = 8883


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    transport: Literal["tcp", "unix"]
    host: str  # the host name, or the socket's path
    port: int = MQTT_PORT  # paho wants one for a unix socket too, and ignores it
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str, *, setting: str = "mqtt_url", login: bool = False) -> BrokerAddress:
        """The address in ``url``; :class:`InvalidValue` (naming ``setting``) when it is not a
        broker URL, or carries a login where ``login`` is False."""
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError:
            raise InvalidValue(
                f"{setting}: the broker port must be 1-65535", field=setting
            ) from None
        if parts.query or parts.fragment:
            raise InvalidValue(f"{setting}: a broker URL has no query or fragment", field=setting)
        if parts.scheme == "unix":
            if parts.netloc or not parts.path.startswith("/"):
                raise InvalidValue(
                    f"{setting}: a unix socket URL names an absolute path (unix:///path.sock)",
                    field=setting,
                )
            return cls("unix", parts.path)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise InvalidValue(
                f"{setting}: not a broker URL (mqtt://host:1883, mqtts://host:8883 or "
                "unix:///path.sock)",
                field=setting,
            )
        if parts.path not in ("", "/") or port == 0:
            raise InvalidValue(
                f"{setting}: not a broker URL ({parts.scheme}://host:port, nothing after it)",
                field=setting,
            )
        if not login and (parts.username is not None or parts.password is not None):
            raise InvalidValue(
                f"{setting}: put the broker credentials in their own settings, not in the URL",
                field=setting,
            )
        tls = parts.scheme == "mqtts"
        return cls(
            "tcp",
            parts.hostname,
            port or (MQTTS_PORT if tls else MQTT_PORT),
            tls,
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password is not None else None,
        )

    def __str__(self) -> str:
        if self.transport == "unix":
            return f"unix://{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


__all__ = ["MQTTS_PORT", "MQTT_PORT", "BrokerAddress"]
