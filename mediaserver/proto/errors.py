"""One error family for peers that break the protocol."""


class ProtocolError(ValueError):
    """The peer sent something we cannot accept; the message says what and which value."""
