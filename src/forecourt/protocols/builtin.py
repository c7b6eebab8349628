"""The drivers that ship with Forecourt, registered under their protocol names."""

from __future__ import annotations

from forecourt.protocols.dart import driver as dart_driver
from forecourt.protocols.driver import register_gauge_driver, register_pump_driver
from forecourt.protocols.jsonpts import driver as jsonpts_driver
from forecourt.protocols.tls import driver as tls_driver

register_pump_driver("jsonpts", jsonpts_driver.create)
register_pump_driver("dart", dart_driver.create)
register_gauge_driver("tls", tls_driver.create)
