"""trust-poller: the trust-side agent of the FLIP hub. Every call it makes is outbound."""

__version__ = "0.1.0"
