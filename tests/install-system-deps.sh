#!/usr/bin/env bash
# Installs the Debian packages the tests drive as real clients (ffmpeg CLI, ffprobe).
set -euo pipefail
need=()
command -v ffmpeg >/dev/null 2>&1 || need+=(ffmpeg)
command -v ffprobe >/dev/null 2>&1 || need+=(ffmpeg)
# `ss` shows that a publisher keeps its one TCP connection across upgrades.
command -v ss >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Headless Chromium for the status page test (Debian's: test tools must not download browsers).
if ! command -v chromium >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
# GStreamer as a real publisher (rtmp2sink, x264enc, avenc_aac, flvmux) and HLS
# player (hlsdemux, souphttpsrc) for tests/test_gstreamer.py.
gst_need=()
command -v gst-launch-1.0 >/dev/null 2>&1 || gst_need+=(gstreamer1.0-tools)
for element in rtmp2sink:gstreamer1.0-plugins-bad hlsdemux:gstreamer1.0-plugins-bad \
    flvmux:gstreamer1.0-plugins-good souphttpsrc:gstreamer1.0-plugins-good \
    x264enc:gstreamer1.0-plugins-ugly avenc_aac:gstreamer1.0-libav \
    videotestsrc:gstreamer1.0-plugins-base; do
    if ! command -v gst-inspect-1.0 >/dev/null 2>&1 || ! gst-inspect-1.0 "${element%%:*}" >/dev/null 2>&1; then
        gst_need+=("${element#*:}")
    fi
done
if [ ${#gst_need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $(printf '%s\n' "${gst_need[@]}" | sort -u) >/dev/null
fi
