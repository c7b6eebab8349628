"""The payment providers HQ's settings configure (``payments_*``): WeChat Pay when its
merchant number is set, Alipay when its app id is set; keys are read from PEM files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from forecourt.payments.providers.alipay import AlipayConfig, AlipayProvider
from forecourt.payments.providers.base import PaymentProvider
from forecourt.payments.providers.wechat import (
    WechatPayConfig,
    WechatPayProvider,
    certificate_serial,
)
from forecourt.settings import SettingsInvalid


class ProviderSettingsInvalid(SettingsInvalid):
    """A provider is half configured (a key file missing, a setting left out): a usage
    error at start, in one line (``forecourt serve`` and ``forecourt worker`` exit 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(
            f"payments settings: {message} (see docs/payments.md, configuration)",
            setting="FORECOURT_PAYMENTS_*",
        )


def _read(path: Path | None, setting: str) -> str:
    if path is None:
        raise ProviderSettingsInvalid(f"set {setting} (a PEM file)")
    try:
        return path.read_text(encoding="ascii")
    except OSError as exc:
        raise ProviderSettingsInvalid(f"{setting}: cannot read {path}: {exc}") from exc


def wechat_config(settings: Any) -> WechatPayConfig | None:
    if not settings.payments_wechat_mchid:
        return None
    if not settings.payments_wechat_appid or not settings.payments_wechat_merchant_serial_no:
        raise ProviderSettingsInvalid(
            "WeChat Pay needs payments_wechat_appid and payments_wechat_merchant_serial_no"
        )
    if settings.payments_wechat_apiv3_key is None:
        raise ProviderSettingsInvalid("WeChat Pay needs payments_wechat_apiv3_key")
    certificates: dict[str, str] = {}
    if settings.payments_wechat_platform_certificate_file is not None:
        pem = _read(
            settings.payments_wechat_platform_certificate_file,
            "payments_wechat_platform_certificate_file",
        )
        certificates[certificate_serial(pem)] = pem
    public_key = None
    if settings.payments_wechat_platform_public_key_id:
        public_key = _read(
            settings.payments_wechat_platform_public_key_file,
            "payments_wechat_platform_public_key_file",
        )
    try:
        return WechatPayConfig(
            mchid=settings.payments_wechat_mchid,
            appid=settings.payments_wechat_appid,
            merchant_serial_no=settings.payments_wechat_merchant_serial_no,
            merchant_private_key_pem=_read(
                settings.payments_wechat_merchant_key_file, "payments_wechat_merchant_key_file"
            ),
            apiv3_key=settings.payments_wechat_apiv3_key.get_secret_value(),
            platform_certificates=certificates,
            platform_public_key_id=settings.payments_wechat_platform_public_key_id,
            platform_public_key_pem=public_key,
            base_url=settings.payments_wechat_base_url,
            timeout_s=settings.payments_wechat_timeout_s,
            notify_url=settings.payments_wechat_notify_url,
        )
    except ValueError as exc:
        raise ProviderSettingsInvalid(f"WeChat Pay: {exc}") from exc


def alipay_config(settings: Any) -> AlipayConfig | None:
    if not settings.payments_alipay_app_id:
        return None
    try:
        return AlipayConfig(
            app_id=settings.payments_alipay_app_id,
            app_private_key_pem=_read(
                settings.payments_alipay_app_key_file, "payments_alipay_app_key_file"
            ),
            alipay_public_key_pem=_read(
                settings.payments_alipay_public_key_file, "payments_alipay_public_key_file"
            ),
            gateway_url=settings.payments_alipay_gateway_url,
            notify_url=settings.payments_alipay_notify_url,
            timeout_s=settings.payments_alipay_timeout_s,
            seller_id=settings.payments_alipay_seller_id,
        )
    except ValueError as exc:
        raise ProviderSettingsInvalid(f"Alipay: {exc}") from exc


def providers_from_settings(settings: Any) -> dict[str, PaymentProvider]:
    """The configured providers by tender name (``wechat``, ``alipay``)."""
    providers: dict[str, PaymentProvider] = {}
    wechat = wechat_config(settings)
    if wechat is not None:
        providers["wechat"] = WechatPayProvider(wechat)
    alipay = alipay_config(settings)
    if alipay is not None:
        providers["alipay"] = AlipayProvider(alipay)
    return providers
