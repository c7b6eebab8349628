"""``forecourt protocol decode``, ``forecourt simulate`` and ``forecourt device poll``: the
technician's and integrator's tools for every device protocol (see docs/devices.md).

Each fails in one line with a non-zero exit status (the main group's error handling): a frame
that does not decode names why (bad checksum, truncated, unknown command…).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
from collections.abc import Awaitable, Callable
from importlib import import_module
from importlib.resources import files
from typing import Any

import click

from forecourt.kernel.errors import InvalidValue

PROTOCOLS = ("tls", "dart", "jsonpts")

# protocol → "module:function" of its decoder: (frame bytes, direction or None) → dict
_DECODERS = {
    "jsonpts": "forecourt.protocols.jsonpts.describe:describe",
    "dart": "forecourt.protocols.dart.application:describe",
    "tls": "forecourt.protocols.tls.codec:describe",
}
# protocol → "module:function" of its one-shot poll: (endpoint, options) → awaitable dict
_POLLERS = {
    "jsonpts": "forecourt.protocols.jsonpts.driver:poll_once",
    "dart": "forecourt.protocols.dart.driver:poll_once",
    "tls": "forecourt.protocols.tls.driver:poll_once",
}


def _function(path: str) -> Callable[..., Any]:
    module, name = path.split(":")
    found: Callable[..., Any] = getattr(import_module(module), name)
    return found


class FrameInputError(InvalidValue):
    code = "protocols.frame_input"


def parse_hex(text: str) -> bytes:
    """Hex digits, with or without spaces, colons, dashes or ``0x`` prefixes."""
    cleaned = re.sub(r"0x|[\s:,\-]", "", text, flags=re.IGNORECASE)
    if not cleaned:
        raise FrameInputError("no hex digits given", hint="--hex '50 20 FA'")
    if len(cleaned) % 2 or not re.fullmatch(r"[0-9A-Fa-f]+", cleaned):
        raise FrameInputError(
            "not hex: give pairs of hex digits (spaces and colons are fine)",
            hint="--hex '50 20 FA'",
        )
    return bytes.fromhex(cleaned)


_NAMED = {"SOH": 0x01, "STX": 0x02, "ETX": 0x03, "EOT": 0x04, "CR": 0x0D, "LF": 0x0A}


def parse_text(text: str) -> bytes:
    """Text as captured: ``\\x01``-style escapes, ``<SOH>``-style names, ``^A`` control
    characters, ``\\r``/``\\n``; anything else as itself (UTF-8)."""
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "x" and re.fullmatch(r"[0-9A-Fa-f]{2}", text[i + 2 : i + 4]):
                out.append(int(text[i + 2 : i + 4], 16))
                i += 4
                continue
            simple = {"r": 0x0D, "n": 0x0A, "t": 0x09, "\\": 0x5C}
            if nxt in simple:
                out.append(simple[nxt])
                i += 2
                continue
        if char == "<":
            match = re.match(r"<([A-Z]{2,3})>", text[i:])
            if match and match.group(1) in _NAMED:
                out.append(_NAMED[match.group(1)])
                i += len(match.group(0))
                continue
        if char == "^" and i + 1 < len(text) and "@" <= text[i + 1] <= "_":
            out.append(ord(text[i + 1]) - 0x40)
            i += 2
            continue
        out.extend(char.encode("utf-8"))
        i += 1
    return bytes(out)


def _print(result: dict[str, Any]) -> None:
    click.echo(json.dumps(result, indent=2, sort_keys=False, ensure_ascii=False))


# --- protocol decode ------------------------------------------------------------------------


@click.group()
def protocol() -> None:
    """Work with device wire protocols (decode a captured frame)."""


@protocol.command()
@click.option("--protocol", "name", type=click.Choice(PROTOCOLS), required=True)
@click.option("--hex", "hex_text", default=None, help="The frame as hex digits.")
@click.option(
    "--text",
    default=None,
    help=r"The frame as text (\x01-style escapes, <SOH>, ^A); jsonPTS: the JSON body.",
)
@click.option(
    "--direction",
    type=click.Choice(["to-device", "from-device"]),
    default=None,
    help="Who sent it (default: told from the frame where the protocol shows it).",
)
@click.option(
    "--decimals",
    default=None,
    metavar="VOLUME,AMOUNT,PRICE",
    help="DART: the pump's decimals (e.g. 2,2,3), to show scaled values; default unknown.",
)
@click.option("--currency", default="CNY", show_default=True, help="The currency amounts are in.")
def decode(
    name: str,
    hex_text: str | None,
    text: str | None,
    direction: str | None,
    decimals: str | None,
    currency: str,
) -> None:
    """Decode one captured frame or message into the standard model, as JSON.

    A frame that does not decode exits 1 with the reason (bad checksum, truncated…)."""
    if (hex_text is None) == (text is None):
        raise click.UsageError("give the frame once: --hex HEX or --text TEXT")
    if decimals is not None and name != "dart":
        raise click.UsageError("--decimals is for DART frames (the others carry their scale)")
    frame = parse_hex(hex_text) if hex_text is not None else parse_text(text or "")
    if name == "dart":
        from forecourt.protocols.dart.application import Decimals

        scale = None
        if decimals is not None:
            parts = decimals.split(",")
            if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
                raise click.BadParameter("three integers, e.g. 2,2,3", param_hint="--decimals")
            volume, amount, price = (int(p) for p in parts)
            scale = Decimals(volume, amount, price, currency)
        _print(_function(_DECODERS[name])(frame, direction, scale))
    elif name == "jsonpts":
        _print(_function(_DECODERS[name])(frame, direction, currency=currency))
    else:
        _print(_function(_DECODERS[name])(frame, direction))


# --- simulate -------------------------------------------------------------------------------


def serve_until_stopped(main: Callable[[], Awaitable[None]]) -> None:
    """Run a simulator until SIGINT or SIGTERM, then stop it in order (exit status 0).

    The signals cancel the serving task from inside the event loop, so a client connected at
    that moment never sees a half-torn loop (and nothing prints a traceback)."""

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(main())
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, task.cancel)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(runner())


def _listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter("HOST:PORT, e.g. 127.0.0.1:10001", param_hint="--listen")
    return host.strip("[]") or "127.0.0.1", int(port)


@click.group()
def simulate() -> None:
    """Run one device simulator alone (it speaks the real protocol on a real socket)."""


@simulate.command("jsonpts")
@click.option("--listen", required=True, help="HOST:PORT to listen on (PORT 0: any free one).")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Simulator configuration (default: the sample station's).",
)
@click.option("--port-file", default=None, help="Write the bound port to this file.")
def simulate_jsonpts(listen: str, config_path: str | None, port_file: str | None) -> None:
    """A Technotrade PTS-2 controller speaking jsonPTS over HTTP (Ctrl-C stops it)."""
    from forecourt.sim import pts_controller

    host, port = _listen_address(listen)
    config = config_path or str(files("forecourt.sim") / "sample_pts.json")
    argv = ["--config", config, "--host", host, "--port", str(port)]
    if port_file:
        argv += ["--port-file", port_file]
    raise SystemExit(pts_controller.main(argv))


def _fault_help(module: str) -> str:
    faults: dict[str, str] = getattr(import_module(module), "FAULTS", {})
    return "; ".join(f"{name}: {text}" for name, text in faults.items())


@simulate.command("tls")
@click.option(
    "--listen",
    default="127.0.0.1:10001",
    show_default=True,
    help="HOST:PORT to listen on (PORT 0: any free one), or 'pty' for a pseudo-terminal.",
)
@click.option("--tanks", type=click.IntRange(1, 99), default=None, help="Tanks (default 3).")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Tank configuration JSON (see docs/devices.md).",
)
@click.option(
    "--fault",
    "faults",
    multiple=True,
    metavar="NAME[=VALUE]",
    help="Inject a fault (repeatable); see docs/devices.md for the list.",
)
def simulate_tls(
    listen: str, tanks: int | None, config_path: str | None, faults: tuple[str, ...]
) -> None:
    """A Veeder-Root TLS-3xx/4xx tank gauge, computer format (Ctrl-C stops it)."""
    from forecourt.protocols.tls import simulator

    if listen != "pty":
        _listen_address(listen)
    serve_until_stopped(
        lambda: simulator.run(
            listen, faults, tanks=tanks, config_path=config_path, announce=click.echo
        )
    )


@simulate.command("dart")
@click.option(
    "--listen",
    default="127.0.0.1:0",
    show_default=True,
    help="HOST:PORT to listen on (PORT 0: any free one), or 'pty' for a pseudo-terminal.",
)
@click.option("--pumps", type=click.IntRange(1, 32), default=1, show_default=True)
@click.option("--nozzles", type=click.IntRange(1, 8), default=2, show_default=True)
@click.option(
    "--fault",
    "faults",
    multiple=True,
    metavar="NAME[=VALUE]",
    help="Inject a fault (repeatable); see docs/devices.md for the list.",
)
@click.option(
    "--record",
    type=click.Path(dir_okay=False),
    default=None,
    help="Append every completed filling to this JSON-lines file.",
)
@click.option(
    "--control",
    default=None,
    metavar="HOST:PORT",
    help="Serve the JSON-lines control port here (lift/hang nozzles, faults, state).",
)
@click.option(
    "--customers-per-hour",
    type=click.FloatRange(0, 10_000),
    default=0.0,
    help="Simulated customers arriving per pump per hour (0: none).",
)
@click.option(
    "--speed",
    type=click.FloatRange(0.01, 10_000),
    default=1.0,
    show_default=True,
    help="Simulated seconds per wall second (meters and customers).",
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--port-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the bound TCP port to this file once the line serves.",
)
@click.option(
    "--control-port-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the bound control port to this file once it serves (needs --control).",
)
def simulate_dart(
    listen: str,
    pumps: int,
    nozzles: int,
    faults: tuple[str, ...],
    record: str | None,
    control: str | None,
    customers_per_hour: float,
    speed: float,
    seed: int,
    port_file: str | None,
    control_port_file: str | None,
) -> None:
    """A line of Wayne DART pumps (addresses 0x50 up), strict like the pumps (Ctrl-C stops)."""
    import os
    from pathlib import Path

    from forecourt.protocols.dart import simulator

    pty = listen == "pty"
    if not pty:
        _listen_address(listen)
    elif port_file is not None:
        raise click.UsageError("--port-file needs a TCP --listen HOST:PORT, not pty")
    if control is not None:
        _listen_address(control)
    elif control_port_file is not None:
        raise click.UsageError("--control-port-file needs --control HOST:PORT")

    def announce(path: str, address: str) -> None:
        # Written whole under another name and renamed: a reader never sees half a number.
        target = Path(path)
        partial = target.with_name(f".{target.name}.partial")
        partial.write_text(address.rpartition(":")[2] + "\n", encoding="ascii")
        os.replace(partial, target)

    def ready(endpoints: dict[str, str]) -> None:
        # The control port first: whoever waits for the line's port finds both in place.
        if control_port_file is not None:
            announce(control_port_file, endpoints["control"])
        if port_file is not None:
            announce(port_file, endpoints["tcp"])
        for kind, where in endpoints.items():
            click.echo(f"DART simulator {kind} on {where}")

    serve_until_stopped(
        lambda: simulator.serve(
            None if pty else listen,
            pumps=pumps,
            nozzles=nozzles,
            faults=faults,
            record=record,
            pty=pty,
            control=control,
            speed=speed,
            customers_per_hour=customers_per_hour,
            seed=seed,
            ready=ready,
        )
    )


# --- device poll ----------------------------------------------------------------------------


@click.group()
def device() -> None:
    """Talk to one real or simulated device."""


def _options(pairs: tuple[str, ...]) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--option")
        options[key.strip()] = value
    return options


@device.command()
@click.option("--protocol", "name", type=click.Choice(PROTOCOLS), required=True)
@click.option(
    "--connect",
    required=True,
    help="HOST:PORT (tcp), serial:///dev/ttyUSB0?baudrate=9600 (dart, tls) or a URL (jsonpts).",
)
@click.option(
    "--option",
    "pairs",
    multiple=True,
    help="Driver option KEY=VALUE (repeatable), e.g. password=…, pumps=1-4, address=0x50.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the default).")
def poll(name: str, connect: str, pairs: tuple[str, ...], as_json: bool) -> None:
    """Poll one device once: who it is and its state, as JSON."""
    del as_json  # JSON is the only output
    # One device, once: what went wrong is the one error line (or in the JSON), not a
    # driver's log lines about its retries.
    logging.disable(logging.CRITICAL)
    try:
        result = asyncio.run(_function(_POLLERS[name])(connect, _options(pairs)))
    finally:
        logging.disable(logging.NOTSET)
    _print(result)
