"""Collector-level errors the sampler treats specially."""


class CollectorUnavailable(Exception):
    """The source cannot be read until an operator acts (e.g. permissions).

    The sampler reports the collector down and logs the message once; it is not counted as an
    error on every pass.
    """
