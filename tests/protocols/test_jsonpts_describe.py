"""``protocol decode --protocol jsonpts``: a captured message explained, garbage refused."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forecourt.protocols.jsonpts.codec import JsonPtsMalformed
from forecourt.protocols.jsonpts.describe import describe

# An end-of-transaction status as a PTS-2 answers PumpGetStatus (field names as third-party
# clients read them; see ../shared/protocols.md section 2).
END_OF_TRANSACTION = (
    b'{"Protocol":"jsonPTS","Packets":[{"Id":1,"Type":"PumpEndOfTransactionStatus",'
    b'"Data":{"Pump":1,"Nozzle":2,"Volume":12.345,"Amount":95.06,"Price":7.70,'
    b'"Transaction":55}}]}'
)


def test_a_finished_transaction_is_shown_raw_and_in_our_units() -> None:
    found = describe(END_OF_TRANSACTION)
    assert found["direction"] == "from-device"
    (packet,) = found["packets"]
    assert packet["type"] == "PumpEndOfTransactionStatus"
    assert packet["data"]["Volume"] == "12.345"
    assert packet["scaled"]["Volume"] == {"raw": "12.345", "volume_ml": 12345, "exact": True}
    assert packet["scaled"]["Amount"] == {"raw": "95.06", "amount_minor": 9506, "exact": True}
    assert packet["scaled"]["Price"] == {"raw": "7.70", "unit_price_mmu": 770000, "exact": True}
    json.dumps(found)


def test_a_value_finer_than_our_units_is_shown_inexact_not_refused() -> None:
    body = END_OF_TRANSACTION.replace(b"12.345", b"12.3456")
    (packet,) = describe(body)["packets"]
    assert packet["scaled"]["Volume"] == {"raw": "12.3456", "volume_ml": 12346, "exact": False}


def test_a_request_is_told_from_a_reply_and_a_wrong_direction_is_refused() -> None:
    request = (
        b'{"Protocol":"jsonPTS","Packets":[{"Id":3,"Type":"PumpGetStatus","Data":{"Pump":1}}]}'
    )
    assert describe(request)["direction"] == "to-device"
    with pytest.raises(JsonPtsMalformed, match="to device message, not from device"):
        describe(request, "from-device")


def test_the_amounts_follow_the_currency_given() -> None:
    (packet,) = describe(END_OF_TRANSACTION, currency="JPY")["packets"]
    assert packet["scaled"]["Amount"] == {"raw": "95.06", "amount_minor": 95, "exact": False}


@given(st.binary(max_size=300))
def test_random_bytes_raise_the_malformed_error_and_nothing_else(body: bytes) -> None:
    try:
        describe(body)
    except JsonPtsMalformed:
        pass


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: (
            st.lists(c, max_size=3)
            | st.dictionaries(
                st.sampled_from(["Id", "Type", "Data", "Volume", "Packets", "Protocol"]),
                c,
                max_size=4,
            )
        ),
        max_leaves=12,
    )
)
def test_any_json_raises_the_malformed_error_or_decodes(value: object) -> None:
    try:
        json.dumps(describe(json.dumps({"Protocol": "jsonPTS", "Packets": [value]}).encode()))
    except JsonPtsMalformed:
        pass
