"""1.0.0 <-> 1.1.0: the state gains a rate window (bitrate and fps).

On builtins only (msgspec.to_builtins form); the engine validates the result
against the new StreamState and proves down(up(s)) == s before switching.
"""


def up(state):
    new = dict(state)
    new["version"] = 2
    # An empty window: the figures appear after one second of the stream.
    new["rate"] = {
        "window_start_ms": -1,
        "window_bytes": 0,
        "window_video_frames": 0,
        "bitrate_bps": 0,
        "fps": 0.0,
    }
    return new


def down(state):
    old = dict(state)
    old.pop("rate", None)
    old["version"] = 1
    return old
