"""Media work beyond muxing: thumbnails and audio levels (PyAV, numpy)."""
