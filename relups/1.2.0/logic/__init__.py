"""Session behaviour of mediaserver, hot-reloadable as one generation.

The runtime reaches this package only through a loaded generation and uses
exactly these names: VERSION, STATE_VERSION, StreamState, init, handle,
describe. Modules here import each other relatively and nothing outside
msgspec, numpy and the standard library.
"""

from .state import STATE_VERSION, StreamState
from .stream import describe, handle, init

VERSION = "1.2.0"

__all__ = ["VERSION", "STATE_VERSION", "StreamState", "describe", "handle", "init"]
