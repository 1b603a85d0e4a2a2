"""Effect opcodes, as the runtime's `mediaserver.wire` defines them.

Logic imports nothing outside its own package, so the opcodes are restated
here; a test checks that the two lists agree.
"""

CODEC = "codec"
SEGMENT_START = "segment_start"
PACKET = "packet"
SEGMENT_END = "segment_end"
STREAM_END = "stream_end"
LOG = "log"
THUMBNAIL = "thumbnail"
LEVELS_FRAME = "levels_frame"
LEVELS_END = "levels_end"
