"""Payments: payment orders at the counter, their providers (WeChat Pay, Alipay) and recovery."""
