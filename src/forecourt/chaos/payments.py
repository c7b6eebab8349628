"""``forecourt chaos payments``: counter payments under faults, end to end, on real processes.

The WeChat Pay and Alipay simulators (``python -m forecourt.sim.wechatpay`` / ``.alipay``) and
HQ (``forecourt serve``, with the payments settings pointing at the simulators and its
recovery worker running) are separate processes on a PostgreSQL database of the run's own
(created, then dropped). The run uploads the sales first (each station with its own
credential, ``sales:batch``), signs in a cashier and a station manager per station, then:

1. turns the simulators' faults on: time-outs, 5xx (and Alipay's signed system errors), slow
   answers, "charged but never answered", notifications dropped, duplicated, delayed and
   reordered; the payers' codes mix paying at once, confirming later (USERPAYING / 10003),
   never confirming and declining;
2. takes N counter payments concurrently (code payments on both providers and cash), each
   retried by its client with the same ``Idempotency-Key`` on time-outs, 5xx and "in
   progress" answers, a 202 polled as the edge does, a declined or reversed code payment
   paid again in cash; some paid orders are then refunded (in full or in part) or voided;
3. meanwhile SIGKILLs HQ at named crash points (:data:`CRASH_POINTS`, chosen with the seed;
   the crash marker says where each life died) and starts it again;
4. turns the faults off and drains: waits until no order is in flight at HQ (the recovery
   worker settles them by querying, reversing and re-sending refunds);
5. compares HQ's orders and refunds with the simulators' trades (:func:`count_mismatches`).

See docs/chaos.md for the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from forecourt.chaos.processes import (
    ChaosError,
    Service,
    SimulatorProcess,
    first_failure,
    read_marker,
    reason,
)
from forecourt.infra.db import Database
from forecourt.infra.migrate import upgrade

__all__ = [
    "CRASH_POINTS",
    "HqOrder",
    "PaymentsOptions",
    "ProviderTrade",
    "count_mismatches",
    "run_payments",
    "verdict",
]

#: Where HQ is killed: the order committed before any call; the provider charged, nothing
#: recorded; paid committed, not answered; the recovery worker's query answered, not applied;
#: a reverse sent, not recorded; a refund sent, not recorded.
CRASH_POINTS = (
    "payments.after_order_insert",
    "payments.after_provider_charge",
    "payments.after_paid_commit",
    "payments.recovery.after_query",
    "payments.after_reverse",
    "payments.refund.after_provider",
)
CHARGE_PATH = CRASH_POINTS[:3]  # reached by every code payment: the first crashes come here
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
STATIONS = 2
MAX_UNEXPECTED_EXITS = 5
REQUEST_DEADLINE_S = 40.0  # a client gives up retrying one request after this
POLL_S = 12.0  # a 202 is polled this long (then the drain finishes the order)
IN_PROGRESS_S = 3.0  # a key held by a dead HQ is waited for this long, then looked up
HTTP_TIMEOUT_S = 10.0
SIM_STOP_S = 5.0  # a simulator ends within this once stopped, or it is killed

PAID_LIKE = frozenset({"paid", "partially_refunded", "refunded", "refunding"})
IN_FLIGHT = frozenset({"created", "pending", "unknown", "reversing", "refunding"})
CLOSED = frozenset({"cancelled", "failed", "reversing"})

WECHAT_MCHID = "1900000109"
WECHAT_APPID = "wxd678efh567hg6787"
WECHAT_SERIAL = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1"
ALIPAY_APP_ID = "2021000122600001"
ALIPAY_SELLER = "2088102146225135"

#: The faults while payments are taken (both simulators take the common ones).
FAULTS: dict[str, Any] = {
    "timeout_rate": 0.04,
    "timeout_hold_ms": 2500,
    "error_5xx_rate": 0.04,
    "charge_no_answer_rate": 0.06,
    "slow_ms": 40,
    "notify_drop_rate": 0.2,
    "notify_duplicate_rate": 0.3,
    "notify_delay_ms": 300,
    "notify_reorder": True,
}
ALIPAY_FAULTS: dict[str, Any] = {"system_error_rate": 0.03}

#: HQ's payments pacing for the run: short deadlines, so that the drain ends in seconds.
HQ_PACING = {
    "FORECOURT_PAYMENTS_CONFIRM_WAIT_S": "1.0",
    "FORECOURT_PAYMENTS_POLL_INTERVAL_S": "0.2",
    "FORECOURT_PAYMENTS_PENDING_DEADLINE_S": "5",
    "FORECOURT_PAYMENTS_UNKNOWN_DEADLINE_S": "8",
    "FORECOURT_PAYMENTS_RECHECK_S": "0.5",
    "FORECOURT_PAYMENTS_RECHECK_MAX_S": "2",
    "FORECOURT_PAYMENTS_RECOVERY_INTERVAL_S": "0.3",
    # Five times the providers' time-out below: nothing in flight can land later than that.
    "FORECOURT_PAYMENTS_NOT_FOUND_GRACE_S": "10",
    "FORECOURT_PAYMENTS_WECHAT_TIMEOUT_S": "2",
    "FORECOURT_PAYMENTS_ALIPAY_TIMEOUT_S": "2",
}

Progress = Callable[[str], None]


# --- options ------------------------------------------------------------------------------


@dataclass
class PaymentsOptions:
    orders: int = 200
    seed: int = 1
    concurrency: int = 16
    crashes: int | None = None  # None: 2 + orders // 100, at most 8
    drain_s: float = 150.0
    workdir: Path | None = None  # None: a temporary folder, removed at the end
    postgres_url: str = DEFAULT_POSTGRES_URL


# --- what is compared -----------------------------------------------------------------------


@dataclass(frozen=True)
class HqOrder:
    order_id: str
    sale_id: str
    tender: str  # wechat | alipay | cash
    state: str
    amount_fen: int
    refunded_fen: int
    out_trade_no: str | None


@dataclass(frozen=True)
class ProviderTrade:
    provider: str  # wechat | alipay
    out_trade_no: str
    amount_fen: int
    charged_times: int
    returned_fen: int
    refunded_fen: int

    @property
    def captured(self) -> bool:
        """The payer was charged and the money not given back by a reverse / cancel."""
        return self.charged_times > 0 and self.returned_fen < self.charged_times * self.amount_fen

    @property
    def kept(self) -> bool:
        """Captured and not refunded in full: the merchant still holds money of it."""
        return self.captured and self.refunded_fen < self.amount_fen


def count_mismatches(orders: Iterable[HqOrder], trades: Iterable[ProviderTrade]) -> dict[str, Any]:
    """HQ's orders against the providers' trades: every figure is 0 when they agree."""
    orders = list(orders)
    by_no = {o.out_trade_no: o for o in orders if o.out_trade_no}
    trade_by_no = {(t.out_trade_no): t for t in trades}
    examples: dict[str, list[str]] = {}

    def note(kind: str, what: str) -> None:
        examples.setdefault(kind, [])
        if len(examples[kind]) < 5:
            examples[kind].append(what)

    twice = 0
    kept_per_sale: dict[str, int] = {}
    for trade in trade_by_no.values():
        if trade.charged_times > 1:
            twice += 1
            note(
                "charged_twice",
                f"{trade.provider}:{trade.out_trade_no} charged {trade.charged_times} times",
            )
        order = by_no.get(trade.out_trade_no)
        if trade.kept and order is not None:
            kept_per_sale[order.sale_id] = kept_per_sale.get(order.sale_id, 0) + 1
    for order in orders:
        if order.tender == "cash" and order.state in ("paid", "partially_refunded"):
            kept_per_sale[order.sale_id] = kept_per_sale.get(order.sale_id, 0) + 1
    for sale_id, kept in kept_per_sale.items():
        if kept > 1:
            twice += 1
            note("charged_twice", f"sale {sale_id} holds {kept} payments")

    captured_without_sale = 0
    compensations = 0
    for trade in trade_by_no.values():
        order = by_no.get(trade.out_trade_no)
        if trade.captured and (order is None or order.state not in PAID_LIKE):
            captured_without_sale += 1
            note(
                "captured_without_sale",
                f"{trade.provider}:{trade.out_trade_no} paid, HQ "
                f"{order.state if order else 'no order'}",
            )
        if order is not None and order.state in CLOSED and trade.kept:
            compensations += 1
            note("compensations_incomplete", f"{trade.out_trade_no} {order.state} at HQ")

    sales_without_capture = 0
    refund_mismatch = 0
    not_terminal = 0
    for order in orders:
        if order.state in IN_FLIGHT:
            not_terminal += 1
            note("not_terminal", f"{order.order_id} {order.state}")
        if order.tender == "cash" or not order.out_trade_no:
            continue
        found = trade_by_no.get(order.out_trade_no)
        if order.state in PAID_LIKE and (found is None or not found.captured):
            sales_without_capture += 1
            note("sales_without_capture", f"{order.order_id} {order.state}, no capture")
        provider_refunded = found.refunded_fen if found is not None else 0
        if order.refunded_fen != provider_refunded:
            refund_mismatch += 1
            note(
                "refund_mismatch",
                f"{order.order_id}: HQ {order.refunded_fen}, provider {provider_refunded}",
            )
    return {
        "charged_twice": twice,
        "captured_without_sale": captured_without_sale,
        "sales_without_capture": sales_without_capture,
        "not_terminal": not_terminal,
        "compensations_incomplete": compensations,
        "refund_mismatch": refund_mismatch,
        "examples": examples,
    }


FIGURES = (
    "charged_twice",
    "captured_without_sale",
    "sales_without_capture",
    "not_terminal",
    "compensations_incomplete",
    "refund_mismatch",
)


def verdict(result: Mapping[str, Any]) -> list[str]:
    """What is wrong with a run's result (empty: the guarantees held)."""
    problems = [f"{result[k]} {k.replace('_', ' ')}" for k in FIGURES if result[k]]
    if not result.get("drained", True):
        problems.append("not drained")
    return problems


# --- keys and the simulators ------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    wx_merchant_private: str
    wx_merchant_public: str
    wx_platform_private: str
    wx_platform_certificate: str
    wx_apiv3: str
    ali_app_private: str
    ali_app_public: str
    ali_platform_private: str
    ali_platform_public: str


def make_keys() -> Keys:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from forecourt.sim.wechatpay import make_platform_certificate

    def private(key: rsa.RSAPrivateKey, fmt: serialization.PrivateFormat) -> str:
        encoding = serialization.Encoding.PEM
        return key.private_bytes(encoding, fmt, serialization.NoEncryption()).decode()

    def public(key: rsa.RSAPrivateKey) -> str:
        return (
            key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    pkcs8 = serialization.PrivateFormat.PKCS8
    made = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(4)]
    wx_merchant, wx_platform, ali_app, ali_platform = made
    return Keys(
        wx_merchant_private=private(wx_merchant, pkcs8),
        wx_merchant_public=public(wx_merchant),
        wx_platform_private=private(wx_platform, pkcs8),
        wx_platform_certificate=make_platform_certificate(wx_platform),
        wx_apiv3=secrets.token_hex(16),
        ali_app_private=private(ali_app, pkcs8),
        ali_app_public=public(ali_app),
        ali_platform_private=private(ali_platform, serialization.PrivateFormat.TraditionalOpenSSL),
        ali_platform_public=public(ali_platform),
    )


class Simulator(SimulatorProcess):
    """One provider simulator as a child process on a port it picks: its config, port file
    and log are ``NAME-sim.json``, ``NAME-sim.port`` and ``NAME-sim.log`` in the work
    folder."""

    def __init__(self, name: str, module: str, config: Mapping[str, Any], workdir: Path) -> None:
        super().__init__(
            name,
            module,
            config,
            config_path=workdir / f"{name}-sim.json",
            port_file=workdir / f"{name}-sim.port",
            log=workdir / f"{name}-sim.log",
        )

    async def control(self, payload: Mapping[str, Any]) -> None:
        async with httpx.AsyncClient(timeout=10.0) as http:
            answer = await http.post(f"{self.base_url}/sim/control", json=dict(payload))
        if answer.status_code != 200:
            raise ChaosError(f"the {self.name} simulator refused {payload}: {answer.text[:200]}")

    async def faults_off(self) -> None:
        async with httpx.AsyncClient(timeout=10.0) as http:
            faults = (await http.get(self.health_url)).json()["faults"]
        await self.control({"faults": dict.fromkeys(faults)})

    async def trades(self) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=30.0) as http:
            answer = await http.get(f"{self.base_url}/sim/trades")
        found: list[dict[str, Any]] = answer.json()["trades"]
        return found

    async def stop(self, timeout_s: float = SIM_STOP_S) -> None:
        await super().stop(timeout_s)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- the plan of the orders -------------------------------------------------------------------


@dataclass
class PlannedOrder:
    index: int
    station: str
    sale: dict[str, Any]
    method: str  # wechat | alipay | cash
    behaviour: str  # pay | confirm | never | declined
    after: str  # none | refund_full | refund_part | void
    outcome: str = "open"  # what the client saw at the end


_SUFFIX = {"pay": "", "confirm": "0002", "never": "0003", "declined": "0001"}


def auth_code(method: str, behaviour: str, rng: random.Random) -> str:
    suffix = _SUFFIX[behaviour] or f"{rng.randint(7000, 9999)}"
    prefix = "13" if method == "wechat" else "28"
    middle = "".join(str(rng.randint(0, 9)) for _ in range(16 - len(suffix)))
    return f"{prefix}{middle}{suffix}"


def plan_orders(count: int, stations: list[str], rng: random.Random) -> list[PlannedOrder]:
    planned: list[PlannedOrder] = []
    for index in range(count):
        station = stations[index % len(stations)]
        method = rng.choices(("wechat", "alipay", "cash"), (45, 40, 15))[0]
        behaviour = (
            "pay"
            if method == "cash"
            else rng.choices(("pay", "confirm", "never", "declined"), (70, 15, 7, 8))[0]
        )
        after = rng.choices(("none", "refund_full", "refund_part", "void"), (70, 10, 12, 8))[0]
        planned.append(PlannedOrder(index, station, _sale(index, rng), method, behaviour, after))
    return planned


def _sale(index: int, rng: random.Random) -> dict[str, Any]:
    now = datetime.now(UTC)
    volume = rng.randint(500, 6000) * 10
    start = (index + 1) * 100_000
    return {
        "sale_id": str(uuid.uuid4()),
        "station_seq": index + 1,
        "fuelling_point": 1,
        "nozzle": 1,
        "grade": "92",
        "volume_ml": volume,
        "unit_price_mmu": 755_000,
        "amount_minor": (volume * 755_000 + 500_000) // 1_000_000,
        "currency": "CNY",
        "price_version": "chaos",
        "snapshot_version": 1,
        "totalizer_start_ml": start,
        "totalizer_end_ml": start + volume,
        "device_txn": index + 1,
        "dispense_type": "sale",
        "started_at": (now - timedelta(minutes=2)).isoformat(),
        "ended_at": now.isoformat(),
        "business_date": now.date().isoformat(),
        "shift_id": f"{now.date().isoformat()}/1",
    }


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Tokens:
    station: dict[str, str] = field(default_factory=dict)
    cashier: dict[str, str] = field(default_factory=dict)
    manager: dict[str, str] = field(default_factory=dict)


_RETRY_CODES = frozenset({"idempotency.in_progress", "idempotency.recovering"})


class PaymentsRun:
    def __init__(self, opts: PaymentsOptions, progress: Progress) -> None:
        if opts.orders < 1:
            raise ChaosError("--orders must be at least 1")
        self.opts = opts
        self.say = progress
        self.rng = random.Random(opts.seed)
        self.run_id = uuid.uuid4().hex[:10]
        self.own_workdir = opts.workdir is None
        if opts.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="forecourt-chaos-pay-"))
        else:
            self.workdir = opts.workdir.resolve()
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.marker = self.workdir / f"crash-{self.run_id}.marker"
        self.admin_url = make_url(opts.postgres_url)
        if self.admin_url.get_backend_name() != "postgresql":
            raise ChaosError(
                f"--postgres-url must be a postgresql:// URL, not {opts.postgres_url!r}"
            )
        self.database = f"forecourt_chaos_pay_{self.run_id}"
        self.db_url = self.admin_url.set(drivername="postgresql", database=self.database)
        self.created = False
        self.db: Database | None = None
        self.hq: Service | None = None
        self.sims: dict[str, Simulator] = {}
        self.port = 0
        self.crashes: list[dict[str, Any]] = []
        self.statuses: dict[str, int] = {}
        self.retries = 0
        self.planned: list[PlannedOrder] = []
        self.restarted = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- setup --

    async def _admin(self, sql: str) -> None:
        import asyncpg

        url = self.admin_url
        conn = await asyncpg.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 5432,
            user=url.username or "postgres",
            password=url.password,
            database=url.database or "postgres",
            timeout=10,
        )
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def _db_url(self) -> str:
        return self.db_url.render_as_string(hide_password=False)

    async def _prepare(self) -> tuple[Tokens, list[str]]:
        from forecourt.demo import pick_stations
        from forecourt.identity.handlers import IdentityConfig, IdentityService
        from forecourt.kernel.access import Scope
        from forecourt.network.handlers import (
            SAMPLE_CHAIN,
            import_chain,
            issue_credential,
            load_chain_file,
        )
        from forecourt.settings import Settings

        self.created = True  # dropped at the end even if this is cut short
        try:
            await self._admin(f'CREATE DATABASE "{self.database}"')
        except Exception as exc:
            self.created = False
            raise ChaosError(
                f"cannot create a database on PostgreSQL at {self.admin_url.host}:"
                f"{self.admin_url.port or 5432}: {reason(exc)} (--postgres-url)"
            ) from exc
        db = self.db = Database(self._db_url(), application_name="forecourt-chaos")
        await db.connect()
        await upgrade(db)
        chain = pick_stations(load_chain_file(SAMPLE_CHAIN), STATIONS)
        await import_chain(db, chain, actor="chaos")
        tokens = Tokens()
        config = IdentityConfig.from_settings(
            Settings(database_url=self._db_url(), identity_access_token_s=3600)
        )
        identity = IdentityService(db, config)
        for station in chain.stations:
            code = station.code
            tokens.station[code] = (await issue_credential(db, code, actor="chaos"))[1]
            for role, where in (("cashier", tokens.cashier), ("station_manager", tokens.manager)):
                name = f"chaos-{role[:7]}-{code.lower()}-{secrets.token_hex(3)}"
                password = f"pw-{secrets.token_hex(16)}"
                await identity.create_user(
                    name,
                    password=password,
                    actor="chaos",
                    grants=[(role, Scope.parse(f"station:{code}"))],
                )
                pair = await identity.sign_in(name, password, source="127.0.0.1")
                where[code] = pair.access_token
        return tokens, [s.code for s in chain.stations]

    async def _start_sims(self, keys: Keys) -> None:
        common = {"seed": self.opts.seed, "bill_allow_today": True, "notify_retry_ms": [200, 500]}
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
            "notify_url": f"{self.url}/v1/payments/notify/wechat",
            "refund_delay_ms": 200,
            "faults": {},
        }
        alipay = {
            **common,
            "app_id": ALIPAY_APP_ID,
            "app_public_key_pem": keys.ali_app_public,
            "alipay_private_key_pem": keys.ali_platform_private,
            "seller_id": ALIPAY_SELLER,
            "payer": {"confirm_after_queries": 2},
            "faults": {},
        }
        self.sims = {
            "wechat": Simulator("wechat", "forecourt.sim.wechatpay", wechat, self.workdir),
            "alipay": Simulator("alipay", "forecourt.sim.alipay", alipay, self.workdir),
        }
        await asyncio.gather(*(sim.start() for sim in self.sims.values()))

    def _hq_env(self, keys: Keys) -> dict[str, str]:
        def write(name: str, text: str) -> str:
            path = self.workdir / name
            path.write_text(text, encoding="ascii")
            return str(path)

        env = {k: v for k, v in os.environ.items() if not k.startswith("FORECOURT_")}
        env.update(
            FORECOURT_DATABASE_URL=self._db_url(),
            FORECOURT_BUS_URL="memory://",
            FORECOURT_CONSUMERS="none",
            FORECOURT_LOG_LEVEL="WARNING",
            FORECOURT_LOG_JSON="true",
            FORECOURT_IDENTITY_ACCESS_TOKEN_S="3600",
            FORECOURT_PAYMENTS_WECHAT_MCHID=WECHAT_MCHID,
            FORECOURT_PAYMENTS_WECHAT_APPID=WECHAT_APPID,
            FORECOURT_PAYMENTS_WECHAT_BASE_URL=self.sims["wechat"].base_url,
            FORECOURT_PAYMENTS_WECHAT_MERCHANT_SERIAL_NO=WECHAT_SERIAL,
            FORECOURT_PAYMENTS_WECHAT_MERCHANT_KEY_FILE=write(
                "wx_key.pem", keys.wx_merchant_private
            ),
            FORECOURT_PAYMENTS_WECHAT_APIV3_KEY=keys.wx_apiv3,
            FORECOURT_PAYMENTS_WECHAT_PLATFORM_CERTIFICATE_FILE=write(
                "wx_platform.pem", keys.wx_platform_certificate
            ),
            FORECOURT_PAYMENTS_ALIPAY_APP_ID=ALIPAY_APP_ID,
            FORECOURT_PAYMENTS_ALIPAY_GATEWAY_URL=f"{self.sims['alipay'].base_url}/gateway.do",
            FORECOURT_PAYMENTS_ALIPAY_APP_KEY_FILE=write("ali_key.pem", keys.ali_app_private),
            FORECOURT_PAYMENTS_ALIPAY_PUBLIC_KEY_FILE=write(
                "ali_public.pem", keys.ali_platform_public
            ),
            FORECOURT_PAYMENTS_ALIPAY_SELLER_ID=ALIPAY_SELLER,
            FORECOURT_PAYMENTS_ALIPAY_NOTIFY_URL=f"{self.url}/v1/payments/notify/alipay",
            **HQ_PACING,
        )
        return env

    def _crash_stages(self) -> list[dict[str, str]]:
        count = self.opts.crashes
        if count is None:
            count = min(8, 2 + self.opts.orders // 100)
        per_life = max(1, self.opts.orders // (3 * max(1, count)))
        stages = []
        for life in range(count):
            point = self.rng.choice(CHARGE_PATH if life < 2 else CRASH_POINTS)
            nth = self.rng.randint(1, max(1, min(per_life, 6 if point in CHARGE_PATH else 3)))
            stages.append(
                {
                    "FORECOURT_CRASH_AT": point if nth == 1 else f"{point}:{nth}",
                    "FORECOURT_CRASH_MARKER": str(self.marker),
                }
            )
        return stages

    async def _start_hq(self, keys: Keys) -> None:
        port_file = self.workdir / "hq.port"
        self.hq = Service(
            "hq",
            ["serve", "--port", str(self.port), "--port-file", str(port_file)],
            self._hq_env(keys),
            self.workdir,
            stages=self._crash_stages(),
        )
        self.hq.start()
        await self._wait_hq()

    async def _wait_hq(self, timeout_s: float = 60.0) -> None:
        assert self.hq is not None
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2.0) as http:
            while True:
                if not self.hq.alive():
                    return  # the supervisor sees it
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{self.url}/health")).status_code < 500:
                        return
                if time.monotonic() > deadline:
                    raise ChaosError(f"HQ did not serve within {timeout_s:g} s")
                await asyncio.sleep(0.1)

    async def _upload_sales(self, tokens: Tokens) -> None:
        by_station: dict[str, list[dict[str, Any]]] = {}
        for order in self.planned:
            by_station.setdefault(order.station, []).append(order.sale)
        async with httpx.AsyncClient(base_url=self.url, timeout=60.0) as http:
            for station, sales in by_station.items():
                for start in range(0, len(sales), 200):
                    answer = await http.post(
                        f"/v1/stations/{station}/sales:batch",
                        json={"schema_version": 1, "sales": sales[start : start + 200]},
                        headers={"authorization": f"Bearer {tokens.station[station]}"},
                    )
                    if answer.status_code != 200:
                        raise ChaosError(
                            f"HQ refused the sales of {station} ({answer.status_code}): "
                            f"{answer.text[:200]}"
                        )

    # -- during the run --

    async def _supervise(self) -> None:
        hq = self.hq
        assert hq is not None
        while True:
            code = hq.poll()
            if code is not None:
                point = read_marker(self.marker).get(hq.pid)
                if code == -signal.SIGKILL and point is not None:
                    self.crashes.append({"point": point, "life": hq.lives})
                    hq.stage += 1
                    self.say(f"HQ was killed at {point}: restarting it")
                else:
                    hq.unexpected_exits.append(code)
                    if len(hq.unexpected_exits) > MAX_UNEXPECTED_EXITS:
                        raise ChaosError(f"HQ keeps exiting (status {code}): {hq.last_lines()}")
                    self.say(f"HQ exited (status {code}): restarting it")
                    await asyncio.sleep(1.0)
                hq.start()
                await self._wait_hq()
            await asyncio.sleep(0.05)

    def _count(self, status: str) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1

    async def _send(
        self,
        http: httpx.AsyncClient,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        body: Mapping[str, Any] | None = None,
        in_progress_s: float = REQUEST_DEADLINE_S,
    ) -> httpx.Response | None:
        """One request, sent again (the same key, the same body) until HQ gives an answer
        that is not "try again"; None if it never does within :data:`REQUEST_DEADLINE_S`.
        "In progress" (another life of HQ holds the key) is taken as the answer after
        ``in_progress_s``."""
        started = time.monotonic()
        deadline = started + REQUEST_DEADLINE_S
        while True:
            try:
                answer = await http.request(method, path, json=body, headers=dict(headers))
            except httpx.HTTPError:
                self._count("transport_error")
            else:
                code = ""
                if answer.status_code >= 400:
                    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                        code = str(answer.json()["error"]["code"])
                if answer.status_code < 500 and (
                    code not in _RETRY_CODES or time.monotonic() - started > in_progress_s
                ):
                    self._count(f"{answer.status_code}:{code}" if code else str(answer.status_code))
                    return answer
                self._count(f"{answer.status_code}:{code}" if code else str(answer.status_code))
            if time.monotonic() > deadline:
                return None
            self.retries += 1
            await asyncio.sleep(0.3 + self.rng.random() * 0.3)

    async def _poll(
        self, http: httpx.AsyncClient, station: str, order_id: str, headers: Mapping[str, str]
    ) -> dict[str, Any] | None:
        deadline = time.monotonic() + POLL_S
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            answer = await self._send(
                http, "GET", f"/v1/stations/{station}/payments/{order_id}", headers=headers
            )
            if answer is not None and answer.status_code == 200:
                last = answer.json()
                if last["state"] not in IN_FLIGHT:
                    return last
            await asyncio.sleep(0.5)
        return last

    async def _charge(
        self,
        http: httpx.AsyncClient,
        order: PlannedOrder,
        tokens: Tokens,
        method: str,
        attempt: int,
    ) -> dict[str, Any] | None:
        """One payment attempt; the order as HQ ended up saying (None: no answer)."""
        cashier = {
            "authorization": f"Bearer {tokens.cashier[order.station]}",
            "Idempotency-Key": f"chaos-{self.run_id}-{order.index}-{attempt}",
        }
        body: dict[str, Any] = {
            "sale_id": order.sale["sale_id"],
            "amount_fen": order.sale["amount_minor"],
            "currency": "CNY",
            "method": "cash" if method == "cash" else "code",
        }
        if method != "cash":
            body["auth_code"] = auth_code(method, order.behaviour, self.rng)
        answer = await self._send(
            http,
            "POST",
            f"/v1/stations/{order.station}/payments",
            headers=cashier,
            body=body,
            in_progress_s=IN_PROGRESS_S,
        )
        if answer is None:
            return None
        data = answer.json()
        found: dict[str, Any] | None
        if answer.status_code in (200, 201, 202):
            found = data
        elif answer.status_code == 409 and data["error"]["code"] in _RETRY_CODES:
            # The key is held by a dead life of HQ (its lease runs): the edge reads the
            # sale's orders instead, as a cashier would look the payment up.
            listed = await self._send(
                http,
                "GET",
                f"/v1/stations/{order.station}/payments?sale_id={order.sale['sale_id']}",
                headers=cashier,
            )
            items = listed.json()["items"] if listed is not None else []
            found = max(items, key=lambda o: str(o["created_at"])) if items else None
        else:
            found = (data.get("error", {}).get("details") or {}).get("order")
            if found is None:
                order_id = (data.get("error", {}).get("details") or {}).get("order_id")
                found = {"order_id": order_id, "state": "unknown"} if order_id else None
        if found is not None and found.get("state") in IN_FLIGHT:
            found = await self._poll(http, order.station, str(found["order_id"]), cashier)
        return found

    async def _after(
        self, http: httpx.AsyncClient, order: PlannedOrder, paid: dict[str, Any], tokens: Tokens
    ) -> None:
        manager = {"authorization": f"Bearer {tokens.manager[order.station]}"}
        base = f"/v1/stations/{order.station}/payments/{paid['order_id']}"
        if order.after == "void":
            await self._send(
                http, "POST", f"{base}/void", headers=manager, body={"reason": "chaos"}
            )
            return
        body: dict[str, Any] = {"reason": "chaos"}
        if order.after == "refund_part":
            body["amount_fen"] = max(1, int(paid["amount_fen"]) // 3)
        key = {**manager, "Idempotency-Key": f"chaos-{self.run_id}-{order.index}-refund"}
        await self._send(
            http, "POST", f"{base}/refunds", headers=key, body=body, in_progress_s=IN_PROGRESS_S
        )
        if order.after == "refund_part" and self.rng.random() < 0.5:
            # A second partial refund of the rest (409 while the first is in flight: fine).
            again = {**manager, "Idempotency-Key": f"chaos-{self.run_id}-{order.index}-refund2"}
            await asyncio.sleep(0.3)
            await self._send(http, "POST", f"{base}/refunds", headers=again, body={"reason": "x"})

    async def _one(self, http: httpx.AsyncClient, order: PlannedOrder, tokens: Tokens) -> None:
        found = await self._charge(http, order, tokens, order.method, 1)
        state = found.get("state") if found else None
        if order.method != "cash" and state in ("failed", "cancelled"):
            # Declined or reversed: the customer pays cash (a new attempt, a new key).
            found = await self._charge(http, order, tokens, "cash", 2)
            state = found.get("state") if found else None
        order.outcome = str(state or "no answer")
        if found is not None and state == "paid" and order.after != "none":
            await self._after(http, order, found, tokens)

    async def _orders(self, tokens: Tokens) -> None:
        queue: asyncio.Queue[PlannedOrder] = asyncio.Queue()
        for order in self.planned:
            queue.put_nowait(order)
        timeout = httpx.Timeout(HTTP_TIMEOUT_S, connect=3.0)

        async def worker() -> None:
            async with httpx.AsyncClient(base_url=self.url, timeout=timeout) as http:
                while True:
                    try:
                        order = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    await self._one(http, order, tokens)

        await asyncio.gather(*(worker() for _ in range(max(1, self.opts.concurrency))))

    async def _in_flight(self) -> int:
        from forecourt.payments.store import order_t

        assert self.db is not None
        async with self.db.connection() as conn:
            count = await conn.scalar(
                sa.select(sa.func.count())
                .select_from(order_t)
                .where(order_t.c.state.in_(sorted(IN_FLIGHT)))
            )
        return int(count or 0)

    async def _drain(self) -> bool:
        assert self.hq is not None
        deadline = time.monotonic() + self.opts.drain_s
        while True:
            if self.hq.alive() and await self._in_flight() == 0:
                await asyncio.sleep(1.0)  # late refunds, notifications
                if self.hq.alive() and await self._in_flight() == 0:
                    return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.5)

    # -- the result --

    async def _observe(self) -> tuple[list[HqOrder], list[ProviderTrade]]:
        from forecourt.payments.store import order_t

        assert self.db is not None
        async with self.db.connection() as conn:
            rows = (await conn.execute(sa.select(order_t))).all()
        orders = [
            HqOrder(
                order_id=str(r.order_id),
                sale_id=str(r.sale_id),
                tender=r.tender,
                state=r.state,
                amount_fen=int(r.amount_fen),
                refunded_fen=int(r.refunded_fen),
                out_trade_no=r.out_trade_no or None,
            )
            for r in rows
        ]
        trades: list[ProviderTrade] = []
        for name, sim in self.sims.items():
            for t in await sim.trades():
                trades.append(
                    ProviderTrade(
                        provider=name,
                        out_trade_no=str(t["out_trade_no"]),
                        amount_fen=int(t["total"] if name == "wechat" else t["amount_fen"]),
                        charged_times=int(t["charged_times"]),
                        returned_fen=int(t["returned_fen"]),
                        refunded_fen=int(t["refunded_fen"]),
                    )
                )
        return orders, trades

    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        opts = self.opts
        self.say(
            f"chaos payments: {opts.orders} orders, seed {opts.seed}, work folder {self.workdir}"
        )
        supervisor: asyncio.Task[None] | None = None
        try:
            making = asyncio.ensure_future(asyncio.to_thread(make_keys))
            try:
                tokens, stations = await self._prepare()
            finally:
                keys = await making
            self.planned = plan_orders(opts.orders, stations, self.rng)
            self.port = _free_port()
            await self._start_sims(keys)
            await self._start_hq(keys)
            await self._upload_sales(tokens)
            setup_s = time.monotonic() - started
            self.say(f"HQ at {self.url}, simulators running, {opts.orders} sales uploaded")
            for name, sim in self.sims.items():
                extra = ALIPAY_FAULTS if name == "alipay" else {}
                await sim.control({"faults": {**FAULTS, **extra}})
            supervisor = asyncio.create_task(self._supervise(), name="chaos-pay-supervisor")
            orders_started = time.monotonic()
            work = asyncio.create_task(self._orders(tokens), name="chaos-pay-orders")
            await first_failure(work, supervisor)
            orders_s = time.monotonic() - orders_started
            self.say(f"orders taken in {orders_s:.1f} s; faults off, draining")
            for sim in self.sims.values():
                await sim.faults_off()
            drain_started = time.monotonic()
            drain = asyncio.create_task(self._drain(), name="chaos-pay-drain")
            await first_failure(drain, supervisor)
            drained = drain.result()
            drain_s = time.monotonic() - drain_started
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
            hq_orders, trades = await self._observe()
            figures = count_mismatches(hq_orders, trades)
            assert self.hq is not None
            outcomes: dict[str, int] = {}
            for order in self.planned:
                outcomes[order.outcome] = outcomes.get(order.outcome, 0) + 1
            states: dict[str, int] = {}
            for o in hq_orders:
                states[o.state] = states.get(o.state, 0) + 1
            examples = figures.pop("examples")
            return {
                "run_id": self.run_id,
                "database": self.database,
                "orders": opts.orders,
                "hq_orders": len(hq_orders),
                "provider_trades": len(trades),
                **figures,
                "drained": drained,
                "crashes": [c["point"] for c in self.crashes],
                "crash_points": list(CRASH_POINTS),
                "hq_unexpected_exits": len(self.hq.unexpected_exits),
                "states": states,
                "client_outcomes": outcomes,
                "http_statuses": self.statuses,
                "client_retries": self.retries,
                "setup_s": round(setup_s, 1),
                "orders_s": round(orders_s, 1),
                "drain_s": round(drain_s, 1),
                "seconds": round(time.monotonic() - started, 1),
                "examples": examples,
            }
        finally:
            if supervisor is not None:
                supervisor.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await supervisor
            await self._stop()

    async def _stop(self) -> None:
        if self.hq is not None:
            await self.hq.stop()
        for sim in self.sims.values():
            with contextlib.suppress(Exception):
                await sim.stop()
        if self.db is not None:
            await self.db.dispose()
        if self.created:
            with contextlib.suppress(Exception):
                await self._admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        if self.own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


async def run_payments(opts: PaymentsOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Run the whole chaos run; its result (see :func:`verdict` for what must hold)."""
    run = PaymentsRun(opts, progress or (lambda _line: None))
    return await run.run()
