"""mediaserver: live RTMP ingest to HLS, upgraded in place by relups."""

__version__ = "1.0.0"
