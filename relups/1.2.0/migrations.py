"""1.1.0 <-> 1.2.0: counters grouped, the rate window restructured, a keyframe clock.

- health.video_frames/audio_frames/keyframes -> health.frames.{video,audio,keyframes}
- rate{window_start_ms, window_bytes, window_video_frames, bitrate_bps, fps}
  -> throughput{window{start_ms, bytes, video_frames}, last{bitrate_bps, fps}}
- new keyframe_clock{last_dts, interval_ms}: starts empty; dropped going down.

On builtins only; down(up(s)) == s for every 1.1.0 state.
"""


def up(state):
    new = dict(state)
    health = dict(new["health"])
    health["frames"] = {
        "video": health.pop("video_frames"),
        "audio": health.pop("audio_frames"),
        "keyframes": health.pop("keyframes"),
    }
    new["health"] = health
    rate = new.pop("rate")
    new["throughput"] = {
        "window": {
            "start_ms": rate["window_start_ms"],
            "bytes": rate["window_bytes"],
            "video_frames": rate["window_video_frames"],
        },
        "last": {"bitrate_bps": rate["bitrate_bps"], "fps": rate["fps"]},
    }
    new["keyframe_clock"] = {"last_dts": -1, "interval_ms": 0}
    new["version"] = 3
    return new


def down(state):
    old = dict(state)
    health = dict(old["health"])
    frames = health.pop("frames")
    health["video_frames"] = frames["video"]
    health["audio_frames"] = frames["audio"]
    health["keyframes"] = frames["keyframes"]
    old["health"] = health
    throughput = old.pop("throughput")
    old["rate"] = {
        "window_start_ms": throughput["window"]["start_ms"],
        "window_bytes": throughput["window"]["bytes"],
        "window_video_frames": throughput["window"]["video_frames"],
        "bitrate_bps": throughput["last"]["bitrate_bps"],
        "fps": throughput["last"]["fps"],
    }
    old.pop("keyframe_clock", None)
    old["version"] = 2
    return old
