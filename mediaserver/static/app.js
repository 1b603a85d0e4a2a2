// mediaserver status page: polls /status.json and shows every live stream.
// Served on the public listener (read-only) and, with the code version,
// generations and relup history, on the admin listener (bearer token).
"use strict";

const FLOOR_DB = -60;
const cards = new Map();
const admin = document.documentElement.dataset.admin === "1" || location.search.includes("admin");

function pct(db) {
  return Math.max(0, Math.min(100, (db - FLOOR_DB) / -FLOOR_DB * 100));
}

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.appendChild(child);
  return node;
}

function makeCard(stream) {
  const video = el("video", { muted: "", autoplay: "", playsinline: "", "data-current-time": "0" });
  video.muted = true;
  const card = el("div", { class: "card", "data-stream": stream.name }, [
    el("h2", { text: stream.name }),
    el("img", { class: "thumbnail", alt: `thumbnail of ${stream.name}` }),
    el("div", { class: "figures" }, [
      el("span", { class: "protocol" }), el("span", { class: "bitrate" }), el("span", { class: "fps" }),
      el("span", { class: "uptime" }),
    ]),
    el("div", { class: "levels" }),
    video,
  ]);
  video.addEventListener("timeupdate", () => video.setAttribute("data-current-time", video.currentTime.toFixed(2)));
  const url = stream.playlist;
  if (window.Hls && Hls.isSupported()) {
    const hls = new Hls({ liveSyncDurationCount: 2 });
    hls.loadSource(url);
    hls.attachMedia(video);
    hls.on(Hls.Events.MANIFEST_PARSED, () => video.play().catch(() => {}));
    card.hls = hls;
  } else if (video.canPlayType("application/vnd.apple.mpegurl")) {
    video.src = url;
  }
  document.getElementById("streams").appendChild(card);
  return card;
}

function update(card, stream) {
  card.querySelector(".protocol").textContent = stream.protocol === "webrtc" ? "WHIP" : (stream.protocol || "").toUpperCase();
  card.querySelector(".bitrate").textContent = `${(stream.bitrate_bps / 1000).toFixed(0)} kbit/s`;
  card.querySelector(".fps").textContent = `${stream.fps.toFixed(1)} fps`;
  card.querySelector(".uptime").textContent = `up ${Math.round(stream.uptime)} s`;
  card.dataset.bitrate = stream.bitrate_bps;
  card.dataset.fps = stream.fps;
  const img = card.querySelector(".thumbnail");
  const now = Date.now();
  if (stream.thumbnail && (!img.dataset.loadedAt || now - img.dataset.loadedAt > 5000)) {
    img.src = `${stream.thumbnail}?t=${now}`;
    img.dataset.loadedAt = now;
  }
  const levels = card.querySelector(".levels");
  levels.replaceChildren(...stream.levels.map((level, channel) => {
    const meter = el("div", { class: "meter", "data-channel": channel,
                               "data-peak-db": level.peak_db, "data-rms-db": level.rms_db }, [
      el("div", { class: "rms", style: `width:${pct(level.rms_db)}%` }),
      el("div", { class: "peak", style: `left:${pct(level.peak_db)}%` }),
      el("span", { class: "db", text: `${level.peak_db.toFixed(1)} dBFS` }),
    ]);
    return meter;
  }));
}

async function refresh() {
  try {
    const response = await fetch("/status.json", { cache: "no-store" });
    const body = await response.json();
    const seen = new Set();
    for (const stream of body.streams) {
      seen.add(stream.name);
      const card = cards.get(stream.name) || makeCard(stream);
      cards.set(stream.name, card);
      update(card, stream);
    }
    for (const [name, card] of cards) {
      if (!seen.has(name)) {
        if (card.hls) card.hls.destroy();
        card.remove();
        cards.delete(name);
      }
    }
    document.getElementById("summary").textContent = `${body.streams.length} live stream(s)`;
  } catch (error) {
    document.getElementById("summary").textContent = `status unavailable: ${error}`;
  }
}

async function refreshAdmin() {
  const token = sessionStorage.getItem("mediaserver-token");
  const form = document.getElementById("token-form");
  if (!token) { form.hidden = false; return; }
  const response = await fetch("/api/v1/status", { headers: { Authorization: `Bearer ${token}` } });
  if (response.status === 401) {
    sessionStorage.removeItem("mediaserver-token");
    form.hidden = false;
    document.getElementById("token-error").textContent = "wrong token";
    return;
  }
  form.hidden = true;
  const status = await response.json();
  document.getElementById("summary").textContent =
    `admin: ${status.sessions.length} session(s), version ${status.version}`;
  const code = document.getElementById("code");
  code.replaceChildren(
    el("p", { id: "version", text: `code version ${status.version}` }),
    el("table", { id: "generations" }, [
      el("tr", {}, ["generation", "version", "state", "sessions", "role"].map(t => el("th", { text: t }))),
      ...status.generations.map(g => el("tr", {}, [
        `g${g.number}`, g.version, `v${g.state_version}`, `${g.sessions}`, g.current ? "current" : "kept for revert",
      ].map(t => el("td", { text: t })))),
    ]),
    el("table", { id: "history" }, [
      el("tr", {}, ["action", "from", "to", "outcome", "sessions", "switch ms"].map(t => el("th", { text: t }))),
      ...status.history.slice().reverse().map(r => el("tr", {}, [
        r.action, r.from_version, r.to_version, r.ok ? "ok" : `refused: ${r.error}`, `${r.sessions}`, `${r.switch_ms}`,
      ].map(t => el("td", { text: t })))),
    ]),
    el("table", { id: "sessions" }, [
      el("tr", {}, ["stream", "version", "state", "uptime s", "crashes"].map(t => el("th", { text: t }))),
      ...status.sessions.map(s => el("tr", {}, [
        s.name, s.version, `v${s.state_version}`, `${s.uptime}`, `${s.crashes}`,
      ].map(t => el("td", { text: t })))),
    ]),
  );
}

if (admin) {
  document.getElementById("admin").hidden = false;
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("mediaserver-token", document.getElementById("token").value);
    refreshAdmin();
  });
  refreshAdmin();
  setInterval(refreshAdmin, 2000);
} else {
  refresh();
  setInterval(refresh, 2000);
}
