"""Counter-payments benchmark: edge POS → HQ → provider simulators on PostgreSQL, against pgbench.

One order is a cashier's ``POST /v1/pos/sales/{sale_id}/pay`` with a payment code at the
station's edge node, which sends it to HQ (``POST /v1/stations/{code}/payments`` with the
cashier's token), which charges WeChat Pay or Alipay (the simulators, requests signed and
answers verified with the production RSA-SHA256 code of the adapters), records the order paid
and answers; the edge records the attempt paid against its journaled sale and answers the
cashier. ``orders_per_s`` counts those answered 200 "paid" in the measured window.

Processes, all separate, on this machine:

* HQ: ``forecourt serve`` (``--workers``, 1 by default) on a fresh PostgreSQL database the
  benchmark creates (and drops unless ``--keep``), the in-memory bus (``memory://``: nothing on
  the payment path publishes to a broker or waits for a consumer; ``FORECOURT_CONSUMERS=none``),
  the payments context configured with both providers' merchant keys and base URLs;
* the WeChat Pay and Alipay simulators (``python -m forecourt.sim.wechatpay`` / ``.alipay``),
  no faults, every payer paying at once;
* the station's edge node (``forecourt edge``) with its POS API, its SQLite journal in the
  benchmark's work folder (a real disk: ``synchronous=FULL`` fsyncs as in a station), HQ's
  staff keys fetched from HQ. There is no forecourt controller: the sales are journaled
  beforehand (below); the edge's controller address is a bound port nobody listens on, polled
  once a second.

Set-up (not measured): the chain is imported and the station's credential issued; C cashiers
(role ``cashier`` over the station) are created and signed in through HQ's identity service.
The unpaid sales are written into the edge's journal with the journal's own API
(``Journal.record_sale``, then ``mark_settled`` as the pump closes them), before the edge
starts; the edge's sync agent uploads them to HQ over ``sales:batch`` (the real ingest path),
and the benchmark waits until HQ has answered ``created`` for every one. Nothing is written
into HQ's tables by hand. Then a warm-up (``--warmup-orders``, 3 per client by default): paid
like the rest, not timed.

The measured phase: C concurrent cashier clients (``httpx.AsyncClient`` each, closed loop),
each paying its own share of the sales, half by WeChat Pay codes (18 digits starting 13) and
half by Alipay codes (18 digits starting 28), each code unique and ending in none of the
simulators' special payer suffixes (0001-0006), for ``--orders`` orders or ``--seconds``.
Latency is the cashier's: the edge call, end to end (p50, p99); an answer 202 (not settled
yet) is asked again, as a cashier would, and the order's latency runs to its final answer.

The reference: ``pgbench -i -s SCALE`` on a database of its own, then ``pgbench -M prepared
-c C -j 2 -T SECONDS -n`` (tpcb-like) with a ``CHECKPOINT`` first, once before and once after
the payments; ``pgbench_tps`` is the mean and ``ratio`` = ``orders_per_s`` ÷ ``pgbench_tps``.
``goal_met``: ratio ≥ 0.08 and p99 < 200 ms, and the run verified.

Verification, after the run (exit status 1 when it fails): every client answer was 200 paid;
HQ holds exactly one paid order per order taken, each for a sale HQ knows (``sales.sale``),
of the sale's amount, with the edge's attempt for that sale paid under the same order id;
each simulator's captured trades (charged once, nothing returned) are exactly HQ's paid
orders of that provider (same ``out_trade_no``, same amount); nothing charged twice.

CPU: utime + stime from ``/proc/<pid>/stat`` of every process at the window's opening and
close, grouped as HQ (its process group), the edge, each simulator, PostgreSQL's backends of
the HQ database (named by ``pg_stat_activity``), PostgreSQL's own background processes,
other PostgreSQL backends (other databases: not ours), and this load generator; per order
(``cpu_ms_per_order``) and in cores (``cpu_cores``, 2 = the whole of a 2-core machine). The
split:

* ``cpu_signing_ms_per_order``: the production signing functions timed in this process after
  the run (``wechat.sign`` / ``wechat.verify`` and ``alipay.rsa2_sign`` / ``rsa2_verify``,
  2048-bit keys, a codepay-sized message; thread CPU time, the median of rounds), times the
  count per order: per provider call, one request signature and one answer verification at HQ,
  one request verification and one answer signature at the simulator (the same
  RSA PKCS#1 v1.5 SHA-256 operations); provider calls per order from HQ's
  ``forecourt_payment_provider_seconds_count`` before and after the window, weighted by each
  provider's share;
* ``cpu_postgres_ms_per_order``: the HQ database's backends plus PostgreSQL's background
  processes (WAL writer, checkpointer, …; shared with whatever else runs on the server);
* ``cpu_http_ms_per_order``: the rest of HQ + edge + simulators: HTTP, JSON, the application's
  own code, its database drivers and the edge's journal.

``bottleneck`` names the process group with the most CPU in cores (a single-process Python
server near 1.0 is saturated). ``--profile-hq FILE`` runs HQ under cProfile on CPU time (its
statistics in FILE: which code the HQ figure is); ``--journal-dir /dev/shm`` puts the edge's
journal on a tmpfs (what its fsyncs cost). Progress goes to stderr; ``--json`` prints one JSON
object as the last line.

    .venv/bin/python bench/payments.py --json
    .venv/bin/python bench/payments.py --clients 16 --seconds 30 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path, and bench/forecourt.py there
# would hide the package it measures (hence the imports below it, E402).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import asyncpg  # noqa: E402
import httpx  # noqa: E402

from forecourt.chaos.payments import (  # noqa: E402
    ALIPAY_APP_ID,
    ALIPAY_SELLER,
    WECHAT_APPID,
    WECHAT_MCHID,
    WECHAT_SERIAL,
    Keys,
    ProviderTrade,
    Simulator,
    make_keys,
)
from forecourt.demo import pick_stations  # noqa: E402
from forecourt.edge.journal import Journal, SaleDraft  # noqa: E402
from forecourt.infra.db import Database  # noqa: E402
from forecourt.infra.migrate import upgrade  # noqa: E402
from forecourt.kernel.clock import SystemClock  # noqa: E402
from forecourt.network.handlers import (  # noqa: E402
    SAMPLE_CHAIN,
    import_chain,
    issue_credential,
    load_chain_file,
)

PG_HOST = os.environ.get("BENCH_PG_HOST", "127.0.0.1")
PG_USER = os.environ.get("BENCH_PG_USER", "postgres")
CLK_TCK = os.sysconf("SC_CLK_TCK")
GOAL_RATIO = 0.08
GOAL_P99_MS = 200.0
HQ_DB = "forecourt_bench_pay"
REF_DB = "forecourt_pgbench_pay"
START_TIMEOUT_S = 60.0
UPLOAD_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 60.0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def pg(sql: str, database: str = "postgres", *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(host=PG_HOST, user=PG_USER, database=database, timeout=10)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout_s: float, what: str, interval: float = 0.1
) -> None:
    """Poll ``check`` until true; RuntimeError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout_s:g} s")
        await asyncio.sleep(interval)


# --- pgbench reference ------------------------------------------------------------------------


def pgbench_init(scale: int) -> None:
    subprocess.run(["dropdb", "-h", PG_HOST, "-U", PG_USER, "--if-exists", REF_DB], check=True)
    subprocess.run(["createdb", "-h", PG_HOST, "-U", PG_USER, REF_DB], check=True)
    log(f"pgbench -i -s {scale}")
    subprocess.run(
        ["pgbench", "-h", PG_HOST, "-U", PG_USER, "-i", "-s", str(scale), "-q", REF_DB],
        check=True,
        capture_output=True,
    )


async def pgbench_run(clients: int, seconds: int) -> float:
    await pg("CHECKPOINT")
    log(f"pgbench -M prepared -c {clients} -j 2 -T {seconds} -n")
    out = await asyncio.to_thread(
        subprocess.run,
        ["pgbench", "-h", PG_HOST, "-U", PG_USER, "-M", "prepared", "-c", str(clients)]
        + ["-j", "2", "-T", str(seconds), "-n", REF_DB],
        check=True,
        capture_output=True,
        text=True,
    )
    match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out.stdout)
    match = match or re.search(r"tps = ([0-9.]+)", out.stdout)
    if not match:
        raise RuntimeError(f"cannot read pgbench output:\n{out.stdout}")
    return float(match.group(1))


# --- processes --------------------------------------------------------------------------------


@dataclass
class Proc:
    """A child process in a session (process group) of its own, announcing its port in a file."""

    name: str
    args: list[str]
    env: dict[str, str]
    workdir: Path
    port_file: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        if self.port_file is not None:
            self.port_file.unlink(missing_ok=True)
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                self.args,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    async def url(self, timeout_s: float = START_TIMEOUT_S) -> str:
        """The base URL once the process has written its port file."""
        assert self.port_file is not None
        assert self.process is not None
        port_file, process = self.port_file, self.process

        async def announced() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({process.returncode}):\n{self.tail()}")
            return port_file.exists() and bool(port_file.read_text().strip())

        await wait_for(announced, timeout_s, f"{self.name} to listen", 0.05)
        return f"http://127.0.0.1:{int(port_file.read_text().strip())}"

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


# ``forecourt`` under cProfile on CPU time (process_time: waits on sockets do not count), the
# statistics written when it stops.
PROFILED = (
    "import cProfile, runpy, sys, time\n"
    "profile = cProfile.Profile(time.process_time)\n"
    "out, sys.argv = sys.argv[1], ['forecourt', *sys.argv[2:]]\n"
    "try:\n"
    "    profile.runcall(runpy.run_module, 'forecourt.cli', run_name='__main__')\n"
    "except SystemExit:\n"
    "    pass\n"
    "finally:\n"
    "    profile.dump_stats(out)\n"
)


def forecourt_cmd(*args: str, profile: str | None = None) -> list[str]:
    """``forecourt ARGS`` as this Python runs it (under cProfile, writing ``profile``)."""
    if profile:
        return [sys.executable, "-c", PROFILED, profile, *args]
    return [sys.executable, "-m", "forecourt.cli", *args]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FORECOURT_")}


async def wait_http(url: str, path: str, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    async with httpx.AsyncClient(timeout=2.0) as http:

        async def up() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return (await http.get(f"{url}{path}")).status_code == 200
            return False

        await wait_for(up, timeout_s, what, 0.1)


# --- set-up at HQ -----------------------------------------------------------------------------


@dataclass
class Setup:
    station: str
    credential: str
    cashiers: list[str]  # access tokens, one per client


async def prepare_hq(db_url: str, clients: int) -> Setup:
    from forecourt.identity.handlers import IdentityConfig, IdentityService
    from forecourt.kernel.access import Scope
    from forecourt.settings import Settings

    await pg(f'DROP DATABASE IF EXISTS "{HQ_DB}" WITH (FORCE)')
    await pg(f'CREATE DATABASE "{HQ_DB}"')
    db = Database(db_url, application_name="forecourt-bench")
    await db.connect()
    try:
        await upgrade(db)
        chain = pick_stations(load_chain_file(SAMPLE_CHAIN), 1)
        await import_chain(db, chain, actor="bench")
        code = chain.stations[0].code
        credential = (await issue_credential(db, code, actor="bench"))[1]
        settings = Settings(database_url=db_url, identity_access_token_s=3600)
        identity = IdentityService(db, IdentityConfig.from_settings(settings))
        tokens = []
        for i in range(clients):
            name = f"bench-cashier-{i + 1}-{secrets.token_hex(3)}"
            password = f"pw-{secrets.token_hex(16)}"
            await identity.create_user(
                name,
                password=password,
                actor="bench",
                grants=[("cashier", Scope.parse(f"station:{code}"))],
            )
            pair = await identity.sign_in(name, password, source="127.0.0.1")
            tokens.append(pair.access_token)
        return Setup(code, credential, tokens)
    finally:
        await db.dispose()


def write(workdir: Path, name: str, text: str) -> str:
    path = workdir / name
    path.write_text(text, encoding="ascii")
    return str(path)


def sim_configs(keys: Keys) -> tuple[dict[str, Any], dict[str, Any]]:
    common = {"seed": 1, "bill_allow_today": True, "faults": {}}
    wechat = {
        **common,
        "mchid": WECHAT_MCHID,
        "appid": WECHAT_APPID,
        "merchant": {"serial_no": WECHAT_SERIAL, "public_key_pem": keys.wx_merchant_public},
        "platform": {
            "private_key_pem": keys.wx_platform_private,
            "certificate_pem": keys.wx_platform_certificate,
            "mode": "certificate",
        },
        "apiv3_key": keys.wx_apiv3,
    }
    alipay = {
        **common,
        "app_id": ALIPAY_APP_ID,
        "app_public_key_pem": keys.ali_app_public,
        "alipay_private_key_pem": keys.ali_platform_private,
        "seller_id": ALIPAY_SELLER,
    }
    return wechat, alipay


def hq_env(db_url: str, keys: Keys, sims: dict[str, Simulator], workdir: Path) -> dict[str, str]:
    return clean_env() | {
        "FORECOURT_DATABASE_URL": db_url,
        "FORECOURT_BUS_URL": "memory://",
        "FORECOURT_CONSUMERS": "none",
        "FORECOURT_LOG_LEVEL": "WARNING",
        "FORECOURT_LOG_JSON": "true",
        "FORECOURT_METRICS_OPEN": "true",  # provider calls per order, read from /metrics
        "FORECOURT_IDENTITY_ACCESS_TOKEN_S": "3600",
        "FORECOURT_PAYMENTS_WECHAT_MCHID": WECHAT_MCHID,
        "FORECOURT_PAYMENTS_WECHAT_APPID": WECHAT_APPID,
        "FORECOURT_PAYMENTS_WECHAT_BASE_URL": sims["wechat"].base_url,
        "FORECOURT_PAYMENTS_WECHAT_MERCHANT_SERIAL_NO": WECHAT_SERIAL,
        "FORECOURT_PAYMENTS_WECHAT_MERCHANT_KEY_FILE": write(
            workdir, "wx_key.pem", keys.wx_merchant_private
        ),
        "FORECOURT_PAYMENTS_WECHAT_APIV3_KEY": keys.wx_apiv3,
        "FORECOURT_PAYMENTS_WECHAT_PLATFORM_CERTIFICATE_FILE": write(
            workdir, "wx_platform.pem", keys.wx_platform_certificate
        ),
        "FORECOURT_PAYMENTS_ALIPAY_APP_ID": ALIPAY_APP_ID,
        "FORECOURT_PAYMENTS_ALIPAY_GATEWAY_URL": f"{sims['alipay'].base_url}/gateway.do",
        "FORECOURT_PAYMENTS_ALIPAY_APP_KEY_FILE": write(
            workdir, "ali_key.pem", keys.ali_app_private
        ),
        "FORECOURT_PAYMENTS_ALIPAY_PUBLIC_KEY_FILE": write(
            workdir, "ali_public.pem", keys.ali_platform_public
        ),
        "FORECOURT_PAYMENTS_ALIPAY_SELLER_ID": ALIPAY_SELLER,
    }


def edge_env(setup: Setup) -> dict[str, str]:
    return clean_env() | {
        "FORECOURT_EDGE_CREDENTIAL": setup.credential,
        "FORECOURT_EDGE_LOG_LEVEL": "WARNING",
        "FORECOURT_EDGE_LOG_JSON": "true",
        "FORECOURT_EDGE_POLL_INTERVAL_S": "1.0",  # no controller answers
        "FORECOURT_EDGE_SYNC_BATCH_SIZE": "500",
        "FORECOURT_EDGE_SYNC_BACKOFF_MAX_S": "1.0",
        "FORECOURT_EDGE_SNAPSHOT_REFRESH_S": "600",
        # A slow HQ under load is waited for: an unanswered charge would be an error here.
        "FORECOURT_EDGE_POS_HQ_TIMEOUT_S": "30",
    }


# --- the sales, journaled at the edge ---------------------------------------------------------


@dataclass(frozen=True)
class Sale:
    sale_id: str
    amount_fen: int


async def journal_sales(path: Path, count: int, rng: random.Random) -> list[Sale]:
    """Finished sales written with the journal's own API, each closed at the pump."""
    journal = Journal(path, SystemClock())
    await journal.open()
    sales: list[Sale] = []
    try:
        now = datetime.now(UTC)
        day = now.date()
        for i in range(count):
            volume = rng.randint(500, 6000) * 10
            amount = (volume * 755_000 + 500_000) // 1_000_000
            start = (i + 1) * 100_000
            ended = now - timedelta(seconds=count - i)
            draft = SaleDraft(
                fuelling_point=1,
                nozzle=1,
                grade="92",
                volume_ml=volume,
                unit_price_mmu=755_000,
                amount_minor=amount,
                currency="CNY",
                price_version="bench",
                snapshot_version=1,
                totalizer_start_ml=start,
                totalizer_end_ml=start + volume,
                device_txn=i + 1,
                dispense_type="sale",
                started_at=ended - timedelta(minutes=2),
                ended_at=ended,
                business_date=day,
                shift_id=f"{day.isoformat()}/1",
                device_id="bench-pts",
            )
            journaled = await journal.record_sale(draft)
            await journal.mark_settled(journaled.sale_id)
            sales.append(Sale(journaled.sale_id, amount))
    finally:
        await journal.close()
    return sales


def journal_query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
        return db.execute(sql).fetchall()


# --- payment codes ----------------------------------------------------------------------------


def payment_code(provider: str, index: int, rng: random.Random) -> str:
    """A unique code the simulator pays at once: 18 digits, WeChat 13…, Alipay 28…; the last
    four digits 7000-9999 (0001-0006 are the simulators' special payers)."""
    prefix = "13" if provider == "wechat" else "28"
    return f"{prefix}{rng.randint(0, 9999):04d}{index:08d}{rng.randint(7000, 9999)}"


# --- the load ---------------------------------------------------------------------------------


@dataclass
class Taken:
    sale_id: str
    provider: str
    amount_fen: int
    order_id: str | None
    timed: bool


@dataclass
class Load:
    taken: list[Taken] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    asked_again: int = 0  # pay requests repeated after a 202


async def pay_all(
    edge_url: str,
    tokens: list[str],
    queues: list[list[tuple[Sale, str, str]]],
    load: Load,
    timed: bool,
    stop_at: float | None,
) -> None:
    """Each client pays its own queue of (sale, provider, code) in a closed loop."""

    async def client(token: str, queue: list[tuple[Sale, str, str]]) -> None:
        async with httpx.AsyncClient(
            base_url=edge_url,
            timeout=REQUEST_TIMEOUT_S,
            transport=httpx.AsyncHTTPTransport(
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
            ),
            headers={"authorization": f"Bearer {token}"},
        ) as http:
            while queue:
                if stop_at is not None and time.monotonic() >= stop_at:
                    return
                sale, provider, code = queue.pop()
                body = {"method": "code", "auth_code": code}
                started = time.monotonic()
                # 202: not settled yet (the payer confirming, or no answer from the provider
                # yet): the cashier asks again, and the edge polls the same attempt.
                deadline = started + REQUEST_TIMEOUT_S
                try:
                    answer = await http.post(f"/v1/pos/sales/{sale.sale_id}/pay", json=body)
                    while answer.status_code == 202 and time.monotonic() < deadline:
                        load.asked_again += 1
                        await asyncio.sleep(0.2)  # the pace of asking again
                        answer = await http.post(f"/v1/pos/sales/{sale.sale_id}/pay", json=body)
                except httpx.HTTPError as exc:
                    load.errors.append(f"{sale.sale_id}: {type(exc).__name__}")
                    continue
                elapsed = (time.monotonic() - started) * 1000
                payment = {}
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    payment = answer.json()["payment"]
                if answer.status_code != 200 or payment.get("status") != "paid":
                    load.errors.append(f"{sale.sale_id}: {answer.status_code} {answer.text[:200]}")
                    continue
                if timed:
                    load.latencies_ms.append(elapsed)
                load.taken.append(
                    Taken(sale.sale_id, provider, sale.amount_fen, payment.get("order_id"), timed)
                )

    await asyncio.gather(*(client(t, q) for t, q in zip(tokens, queues, strict=True)))


def pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


# --- CPU --------------------------------------------------------------------------------------


def proc_ticks() -> dict[int, tuple[int, int, str, int]]:
    """pid → (utime + stime in ticks, process group, comm, start time) of every process."""
    table: dict[int, tuple[int, int, str, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        rest = raw[raw.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(rest[11]) + int(rest[12]), int(rest[2]), comm, int(rest[19]))
    return table


def busy_ticks() -> int:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[0] + fields[1] + fields[2] + sum(fields[5:8])


class CpuWindow:
    """CPU ticks per group between ``open()`` and ``close()``."""

    def __init__(self, groups: dict[int, str]) -> None:
        self.groups = groups  # process group id → label
        self.start: tuple[float, int, dict[int, tuple[int, int, str, int]]] | None = None

    def open(self) -> None:
        self.start = (time.monotonic(), busy_ticks(), proc_ticks())

    async def close(self) -> tuple[float, dict[str, int], int]:
        """(seconds, ticks per label, machine busy ticks)."""
        assert self.start is not None
        rows = await pg("SELECT pid, datname, backend_type FROM pg_stat_activity")
        after, busy, t1 = proc_ticks(), busy_ticks(), time.monotonic()
        t0, busy0, before = self.start
        pg_label: dict[int, str] = {}
        for r in rows:
            if r["datname"] == HQ_DB:
                pg_label[r["pid"]] = "postgres hq backends"
            elif r["backend_type"] == "client backend":
                pg_label[r["pid"]] = "postgres other databases"
        ticks: dict[str, int] = {}
        for pid, (total, pgrp, comm, started) in after.items():
            if pid == os.getpid():
                label: str | None = "load generator"
            elif pgrp in self.groups:
                label = self.groups[pgrp]
            elif comm == "postgres":
                label = pg_label.get(pid, "postgres background")
            else:
                label = None
            if label is None:
                continue
            prior = before.get(pid)
            spent = total - (prior[0] if prior is not None and prior[3] == started else 0)
            ticks[label] = ticks.get(label, 0) + spent
        return t1 - t0, ticks, busy - busy0


# --- signing ----------------------------------------------------------------------------------


def time_signing(keys: Keys, rounds: int = 5, per_round: int = 40) -> dict[str, float]:
    """Thread CPU ms of one call of each production signing function (median of rounds)."""
    from forecourt.payments.providers import alipay, wechat

    wx_private = wechat.load_private_key(keys.wx_merchant_private)
    wx_public = wechat.load_public_key(keys.wx_merchant_public)
    ali_private = alipay.load_private_key(keys.ali_app_private)
    ali_public = alipay.load_public_key(keys.ali_app_public)
    body = json.dumps(
        {
            "appid": WECHAT_APPID,
            "mchid": WECHAT_MCHID,
            "description": "92# 45.20 L",
            "out_trade_no": uuid.uuid4().hex,
            "payer": {"auth_code": "134512000000127777"},
            "amount": {"total": 34126, "currency": "CNY"},
            "scene_info": {"store_info": {"out_id": "S001"}, "device_ip": "127.0.0.1"},
        }
    ).encode()
    message = wechat.request_message("POST", "/v3/pay/transactions/codepay", "1", "n" * 32, body)
    wx_sig = wechat.sign(wx_private, message)
    content = alipay.sign_content({"biz_content": body.decode(), "app_id": ALIPAY_APP_ID})
    ali_sig = alipay.rsa2_sign(ali_private, content)
    calls: dict[str, Callable[[], object]] = {
        "wechat_sign": lambda: wechat.sign(wx_private, message),
        "wechat_verify": lambda: wechat.verify(wx_public, message, wx_sig),
        "alipay_sign": lambda: alipay.rsa2_sign(ali_private, content),
        "alipay_verify": lambda: alipay.rsa2_verify(ali_public, content, ali_sig),
    }
    out: dict[str, float] = {}
    for name, call in calls.items():
        samples = []
        for _ in range(rounds):
            t0 = time.thread_time()
            for _ in range(per_round):
                call()
            samples.append((time.thread_time() - t0) * 1000 / per_round)
        out[name] = round(statistics.median(samples), 4)
    return out


# --- HQ metrics -------------------------------------------------------------------------------


async def provider_calls(hq_url: str) -> dict[str, float]:
    """``provider/operation`` → calls so far (HQ's provider latency histogram's count)."""
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"{hq_url}/metrics")).text
    calls: dict[str, float] = {}
    pattern = re.compile(r"^forecourt_payment_provider_seconds_count\{([^}]*)\}\s+([0-9.eE+]+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            key = f"{labels.get('provider')}/{labels.get('operation')}"
            calls[key] = calls.get(key, 0.0) + float(match.group(2))
    return calls


# --- verification -----------------------------------------------------------------------------


async def verify(
    setup: Setup,
    sales: list[Sale],
    load: Load,
    journal: Path,
    sims: dict[str, Simulator],
) -> dict[str, Any]:
    """What must hold after the run; ``passed`` when every figure is as it should be."""
    problems: list[str] = []
    if load.errors:
        problems.append(f"{len(load.errors)} payments not answered paid: {load.errors[:3]}")
    rows = await pg(
        "SELECT o.order_id::text AS order_id, o.sale_id::text AS sale_id, o.tender, o.state,"
        " o.amount_fen, o.out_trade_no, s.sale_id IS NOT NULL AS sale_known"
        " FROM payments.payment_order o LEFT JOIN sales.sale s ON s.sale_id = o.sale_id"
        " WHERE o.station_code = $1",
        HQ_DB,
        setup.station,
    )
    amounts = {s.sale_id: s.amount_fen for s in sales}
    paid = [r for r in rows if r["state"] == "paid"]
    if len(rows) != len(paid):
        problems.append(f"{len(rows) - len(paid)} HQ orders not paid")
    if len(paid) != len(load.taken):
        problems.append(f"HQ holds {len(paid)} paid orders, the cashiers took {len(load.taken)}")
    by_sale: dict[str, asyncpg.Record] = {}
    for r in paid:
        if r["sale_id"] in by_sale:
            problems.append(f"sale {r['sale_id']} paid twice at HQ")
        by_sale[r["sale_id"]] = r
        if not r["sale_known"]:
            problems.append(f"order {r['order_id']}: sale {r['sale_id']} unknown to HQ")
        if amounts.get(r["sale_id"]) != r["amount_fen"]:
            problems.append(f"order {r['order_id']}: {r['amount_fen']} fen, not the sale's")
    edge_paid = {
        str(sale_id): str(order_id)
        for sale_id, order_id in journal_query(
            journal, "SELECT sale_id, order_id FROM pos_payment WHERE status = 'paid'"
        )
    }
    unlinked = 0
    for t in load.taken:
        order = by_sale.get(t.sale_id)
        if (
            order is None
            or order["order_id"] != t.order_id
            or edge_paid.get(t.sale_id) != t.order_id
            or order["tender"] != t.provider
        ):
            unlinked += 1
    if unlinked:
        problems.append(f"{unlinked} orders not linked to their sale at HQ and the edge")
    captures: dict[str, int] = {}
    for name, sim in sims.items():
        trades = [
            ProviderTrade(
                provider=name,
                out_trade_no=str(t["out_trade_no"]),
                amount_fen=int(t["total"] if name == "wechat" else t["amount_fen"]),
                charged_times=int(t["charged_times"]),
                returned_fen=int(t["returned_fen"]),
                refunded_fen=int(t["refunded_fen"]),
            )
            for t in await sim.trades()
        ]
        captured = {t.out_trade_no: t for t in trades if t.captured}
        captures[name] = len(captured)
        if any(t.charged_times > 1 for t in trades):
            problems.append(f"{name}: a trade charged more than once")
        ours = {r["out_trade_no"]: r for r in paid if r["tender"] == name}
        if set(captured) != set(ours):
            problems.append(
                f"{name}: {len(captured)} captured trades, {len(ours)} paid orders, "
                f"{len(set(captured) ^ set(ours))} differ"
            )
        elif any(captured[no].amount_fen != ours[no]["amount_fen"] for no in ours):
            problems.append(f"{name}: captured amounts differ from the orders'")
    return {
        "passed": not problems,
        "problems": problems[:10],
        "hq_paid_orders": len(paid),
        "client_paid": len(load.taken),
        "edge_paid_attempts": len(edge_paid),
        "captures": captures,
        "errors": len(load.errors),
        "asked_again_after_202": load.asked_again,
    }


# --- the run ----------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="forecourt-bench-pay-"))
    args.journal_dir = args.journal_dir or str(workdir)
    db_url = f"postgresql://{PG_USER}@{PG_HOST}/{HQ_DB}"
    journal_dir = Path(tempfile.mkdtemp(prefix="forecourt-bench-edge-", dir=args.journal_dir))
    args.journal_path = journal_dir / "edge.db"
    log(f"work folder {workdir}, the edge's journal {args.journal_path}")
    try:
        return await run(args, rng, workdir, db_url)
    finally:
        if not args.keep:
            await pg(f'DROP DATABASE IF EXISTS "{HQ_DB}" WITH (FORCE)')
            await pg(f'DROP DATABASE IF EXISTS "{REF_DB}" WITH (FORCE)')
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.rmtree(journal_dir, ignore_errors=True)
        else:
            log(f"kept: databases {HQ_DB}, {REF_DB}; {workdir}, {journal_dir}")


async def run(
    args: argparse.Namespace, rng: random.Random, workdir: Path, db_url: str
) -> dict[str, Any]:
    await asyncio.to_thread(pgbench_init, args.scale)
    tps_before = await pgbench_run(args.clients, args.pgbench_seconds)
    log(f"pgbench before: {tps_before:.0f} tps")

    keys_future = asyncio.ensure_future(asyncio.to_thread(make_keys))
    setup = await prepare_hq(db_url, args.clients)
    keys = await keys_future
    warmup = args.warmup_orders if args.warmup_orders is not None else 3 * args.clients
    journal = args.journal_path
    wechat_cfg, alipay_cfg = sim_configs(keys)
    sims = {
        "wechat": Simulator("wechat", "forecourt.sim.wechatpay", wechat_cfg, workdir),
        "alipay": Simulator("alipay", "forecourt.sim.alipay", alipay_cfg, workdir),
    }
    # The edge's controller address: bound, never listening (connections are refused).
    no_controller = socket.socket()
    no_controller.bind(("127.0.0.1", 0))
    hq = Proc(
        "hq",
        forecourt_cmd(
            "serve",
            "--port",
            "0",
            "--port-file",
            str(workdir / "hq.port"),
            *(["--workers", str(args.workers)] if args.workers > 1 else []),
            profile=args.profile_hq,
        ),
        {},
        workdir,
        workdir / "hq.port",
    )
    edge: Proc | None = None
    try:

        async def boot() -> str:
            await asyncio.gather(*(s.start() for s in sims.values()))
            hq.env = hq_env(db_url, keys, sims, workdir)
            hq.start()
            url = await hq.url()
            await wait_http(url, "/ready", "HQ to be ready")
            return url

        # The simulators and HQ start while the sales are journaled (the edge is not up yet).
        log(f"starting HQ and the simulators; journaling {args.orders + warmup} sales")
        hq_url, sales = await asyncio.gather(
            boot(), journal_sales(journal, args.orders + warmup, rng)
        )
        edge = Proc(
            "edge",
            forecourt_cmd(
                "edge",
                "--station",
                setup.station,
                "--hq-url",
                hq_url,
                "--journal",
                str(journal),
                "--controller-url",
                f"http://127.0.0.1:{no_controller.getsockname()[1]}",
                "--port",
                "0",
                "--port-file",
                str(workdir / "edge.port"),
            ),
            edge_env(setup),
            workdir,
            workdir / "edge.port",
        )
        edge.start()
        edge_url = await edge.url()
        log(f"HQ {hq_url}, edge {edge_url}, simulators up; the edge uploads the sales")

        async def uploaded() -> bool:
            left = journal_query(journal, "SELECT count(*) FROM journal WHERE hq_status IS NULL")
            return int(left[0][0]) == 0

        await wait_for(uploaded, UPLOAD_TIMEOUT_S, "the sales' upload to HQ", 0.2)
        verdicts = dict(
            journal_query(journal, "SELECT hq_status, count(*) FROM journal GROUP BY 1")
        )
        if verdicts != {"created": len(sales)}:
            raise RuntimeError(f"HQ's verdicts on the sales: {verdicts}")

        async def cashiers_known() -> bool:
            async with httpx.AsyncClient(base_url=edge_url, timeout=5) as http:
                for token in setup.cashiers:
                    answer = await http.get(
                        "/v1/pos/sales?limit=1", headers={"authorization": f"Bearer {token}"}
                    )
                    if answer.status_code != 200:
                        return False
            return True

        await wait_for(cashiers_known, START_TIMEOUT_S, "the edge to accept the cashiers", 0.5)

        plan = [
            (sale, provider, payment_code(provider, i, rng))
            for i, sale in enumerate(sales)
            for provider in ["wechat" if rng.random() >= args.alipay_share else "alipay"]
        ]
        warm, timed = plan[:warmup], plan[warmup:]

        def share(items: list[tuple[Sale, str, str]]) -> list[list[tuple[Sale, str, str]]]:
            return [items[c :: args.clients][::-1] for c in range(args.clients)]

        load = Load()
        log(f"warm-up: {len(warm)} orders")
        await pay_all(edge_url, setup.cashiers, share(warm), load, False, None)

        log(
            f"measuring: {args.clients} cashiers, "
            + (f"{args.seconds} s" if args.seconds else f"{len(timed)} orders")
        )
        cpu = CpuWindow(
            {hq.pid: "hq", edge.pid: "edge"}
            | {
                sim.process.pid: f"{name} simulator"
                for name, sim in sims.items()
                if sim.process is not None
            }
        )
        calls_before = await provider_calls(hq_url)
        cpu.open()
        t0 = time.monotonic()
        stop_at = t0 + args.seconds if args.seconds else None
        await pay_all(edge_url, setup.cashiers, share(timed), load, True, stop_at)
        window_s = time.monotonic() - t0
        seconds, ticks, busy = await cpu.close()
        calls_after = await provider_calls(hq_url)
        log(f"window {window_s:.1f} s; verifying")
        verification = await verify(setup, sales, load, journal, sims)
        signing = await asyncio.to_thread(time_signing, keys)
    finally:
        # Stopped together: each waits for its process to exit.
        await asyncio.gather(
            *(asyncio.to_thread(p.stop) for p in (edge, hq) if p is not None),
            *(sim.stop() for sim in sims.values()),
            return_exceptions=True,
        )
        no_controller.close()

    tps_after = await pgbench_run(args.clients, args.pgbench_seconds)
    log(f"pgbench after: {tps_after:.0f} tps")

    timed_taken = [t for t in load.taken if t.timed]
    orders = len(timed_taken)
    per_order = max(1, orders)
    ms = {k: v * 1000 / CLK_TCK / per_order for k, v in ticks.items()}
    cores = {k: round(v / CLK_TCK / seconds, 2) for k, v in ticks.items()}
    cores["machine busy"] = round(busy / CLK_TCK / seconds, 2)
    calls = {k: calls_after.get(k, 0.0) - calls_before.get(k, 0.0) for k in calls_after}
    calls_per_order = {k: round(v / per_order, 3) for k, v in calls.items() if v}
    signing_ms = 0.0
    for provider in ("wechat", "alipay"):
        n = sum(v for k, v in calls.items() if k.startswith(f"{provider}/"))
        # HQ signs the request and verifies the answer; the simulator the other way round.
        signing_ms += n * 2 * (signing[f"{provider}_sign"] + signing[f"{provider}_verify"])
    signing_ms /= per_order
    app_ms = sum(v for k, v in ms.items() if k in ("hq", "edge") or k.endswith("simulator"))
    postgres_ms = ms.get("postgres hq backends", 0.0) + ms.get("postgres background", 0.0)
    orders_per_s = orders / window_s if window_s > 0 else 0.0
    pgbench_tps = (tps_before + tps_after) / 2
    ratio = orders_per_s / pgbench_tps if pgbench_tps else 0.0
    p99 = pct(load.latencies_ms, 99)
    ours = {k: v for k, v in cores.items() if k not in ("machine busy", "load generator")}
    return {
        "orders_per_s": round(orders_per_s, 1),
        "pgbench_tps": round(pgbench_tps, 1),
        "pgbench_tps_before": round(tps_before, 1),
        "pgbench_tps_after": round(tps_after, 1),
        "ratio": round(ratio, 4),
        "p50_ms": round(pct(load.latencies_ms, 50), 1),
        "p99_ms": round(p99, 1),
        "clients": args.clients,
        "orders": orders,
        "warmup_orders": len(load.taken) - orders,
        "window_s": round(window_s, 2),
        "by_provider": {
            p: sum(1 for t in timed_taken if t.provider == p) for p in ("wechat", "alipay")
        },
        "bus": "memory",
        "edge_journal_dir": args.journal_dir,
        "hq_workers": args.workers,
        "cpu_signing_ms_per_order": round(signing_ms, 3),
        "cpu_http_ms_per_order": round(max(0.0, app_ms - signing_ms), 3),
        "cpu_postgres_ms_per_order": round(postgres_ms, 3),
        "cpu_ms_per_order": {k: round(v, 3) for k, v in sorted(ms.items(), key=lambda kv: -kv[1])},
        "cpu_cores": dict(sorted(cores.items(), key=lambda kv: -kv[1])),
        "bottleneck": max(ours, key=lambda k: ours[k]) if ours else None,
        "provider_calls_per_order": calls_per_order,
        "signing_ms_per_call": signing,
        "verified": verification["passed"],
        "verification": verification,
        "goal_met": bool(verification["passed"] and ratio >= GOAL_RATIO and p99 < GOAL_P99_MS),
    }


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--clients", type=int, default=16, help="concurrent cashiers (and pgbench -c)")
    p.add_argument(
        "--orders",
        type=int,
        default=3000,
        help="orders measured; with --seconds, the most that may be taken in that time",
    )
    p.add_argument("--seconds", type=float, default=None, help="measure for this long instead")
    p.add_argument("--warmup-orders", type=int, default=None, help="default: 3 per client")
    p.add_argument("--alipay-share", type=float, default=0.5, help="share of Alipay codes")
    p.add_argument("--pgbench-seconds", type=int, default=30)
    p.add_argument("--scale", type=int, default=50, help="pgbench scale")
    p.add_argument("--workers", type=int, default=1, help="HQ HTTP worker processes")
    p.add_argument(
        "--journal-dir",
        default=None,
        help="where the edge's journal goes (default: the work folder, on disk; a tmpfs such "
        "as /dev/shm shows what the journal's fsyncs cost)",
    )
    p.add_argument(
        "--profile-hq",
        default=None,
        metavar="FILE",
        help="run HQ under cProfile, its statistics written to FILE when it stops (slower)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the databases and the work folder")
    args = p.parse_args()
    if args.clients < 1 or args.orders < 1:
        p.error("--clients and --orders must be at least 1")
    return args


if __name__ == "__main__":
    arguments = parse()
    result = asyncio.run(main(arguments))
    if arguments.json:
        print(json.dumps(result, separators=(",", ":")))
    else:
        print(json.dumps(result, indent=2))
    sys.exit(0 if result["verified"] else 1)
