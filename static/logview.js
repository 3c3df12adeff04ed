// The experiment page's log viewer: the tail first over a WebSocket, then new lines as they
// are stored; earlier lines and the window around a search hit over HTTP on demand. The DOM
// never holds more than MAX_DOM_LINES while following, so a 100 000-line log stays smooth.
"use strict";

(() => {
  const root = document.getElementById("logviewer");
  if (!root) return;
  const logEl = document.getElementById("log");
  const select = document.getElementById("log-stream");
  const followBtn = document.getElementById("log-follow");
  const earlierBtn = document.getElementById("log-earlier");
  const download = document.getElementById("log-download");
  const searchForm = document.getElementById("log-search");
  const stateEl = document.getElementById("log-state");
  const MAX_DOM_LINES = 5000;
  const EARLIER_BATCH = 1000;
  const JUMP_CONTEXT = 200;

  let stream = root.dataset.stream;
  // Until the user picks a stream, the viewer moves on to the workload's output once it exists.
  let userPicked = new URLSearchParams(location.search).has("stream");
  let lo = 0; // first line number in the DOM
  let hi = 0; // one past the last
  let total = 0; // lines stored, as last reported
  let follow = true;
  let atTail = true; // false after jumping into the middle of the log
  let ended = false;
  let socket = null;
  let retries = 0;

  // --- ANSI SGR colours ---------------------------------------------------------------------
  const SGR = /\x1b\[([0-9;]*)m/g;
  const OTHER_ESCAPES = /\x1b\[[0-9;?]*[A-Za-ln-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]/g;

  function color256(n) {
    if (n < 16) return null;
    if (n >= 232) { const v = 8 + (n - 232) * 10; return `rgb(${v},${v},${v})`; }
    n -= 16;
    const c = (x) => (x === 0 ? 0 : 55 + x * 40);
    return `rgb(${c(Math.floor(n / 36))},${c(Math.floor(n / 6) % 6)},${c(n % 6)})`;
  }

  function applySgr(state, codes) {
    const parts = codes === "" ? [0] : codes.split(";").map(Number);
    for (let i = 0; i < parts.length; i++) {
      const p = parts[i];
      if (p === 0) { state.fg = state.bg = null; state.bold = state.italic = state.underline = false; }
      else if (p === 1) state.bold = true;
      else if (p === 3) state.italic = true;
      else if (p === 4) state.underline = true;
      else if (p === 22) state.bold = false;
      else if (p === 23) state.italic = false;
      else if (p === 24) state.underline = false;
      else if (p >= 30 && p <= 37) state.fg = { cls: `ansi-${p - 30}` };
      else if (p >= 90 && p <= 97) state.fg = { cls: `ansi-${p - 90 + 8}` };
      else if (p === 39) state.fg = null;
      else if (p >= 40 && p <= 47) state.bg = { cls: `ansi-bg-${p - 40}` };
      else if (p >= 100 && p <= 107) state.bg = { cls: `ansi-bg-${p - 100 + 8}` };
      else if (p === 49) state.bg = null;
      else if ((p === 38 || p === 48) && parts[i + 1] === 5) {
        const n = parts[i + 2];
        const rgb = color256(n);
        const value = rgb ? { css: rgb } : { cls: `ansi-${p === 48 ? "bg-" : ""}${n}` };
        if (p === 38) state.fg = value; else state.bg = value;
        i += 2;
      } else if ((p === 38 || p === 48) && parts[i + 1] === 2) {
        const value = { css: `rgb(${parts[i + 2]},${parts[i + 3]},${parts[i + 4]})` };
        if (p === 38) state.fg = value; else state.bg = value;
        i += 4;
      }
    }
  }

  function styled(text, state) {
    if (!state.fg && !state.bg && !state.bold && !state.italic && !state.underline) return document.createTextNode(text);
    const span = document.createElement("span");
    span.textContent = text;
    if (state.fg) { if (state.fg.cls) span.classList.add(state.fg.cls); else span.style.color = state.fg.css; }
    if (state.bg) { if (state.bg.cls) span.classList.add(state.bg.cls); else span.style.backgroundColor = state.bg.css; }
    if (state.bold) span.classList.add("ansi-bold");
    if (state.italic) span.classList.add("ansi-italic");
    if (state.underline) span.classList.add("ansi-underline");
    return span;
  }

  function renderLine(number, raw) {
    // A carriage return redraws the line (progress bars): keep what was drawn last.
    const cr = raw.lastIndexOf("\r", raw.length - 2);
    let text = cr >= 0 ? raw.slice(cr + 1) : raw;
    text = text.replace(/\r$/, "").replace(OTHER_ESCAPES, "");
    const row = document.createElement("div");
    row.className = "line";
    row.dataset.n = number;
    const no = document.createElement("span");
    no.className = "lineno";
    no.textContent = number + 1;
    row.append(no);
    const state = { fg: null, bg: null, bold: false, italic: false, underline: false };
    let last = 0;
    SGR.lastIndex = 0;
    for (let m = SGR.exec(text); m; m = SGR.exec(text)) {
      if (m.index > last) row.append(styled(text.slice(last, m.index), state));
      applySgr(state, m[1]);
      last = SGR.lastIndex;
    }
    if (last < text.length) row.append(styled(text.slice(last), state));
    return row;
  }

  function fragment(first, lines) {
    const frag = document.createDocumentFragment();
    lines.forEach((line, i) => frag.append(renderLine(first + i, line)));
    return frag;
  }

  // --- the view -----------------------------------------------------------------------------
  function setState(text) { stateEl.textContent = text; }

  function updateControls() {
    earlierBtn.hidden = lo === 0;
    followBtn.setAttribute("aria-pressed", String(follow && atTail));
    followBtn.textContent = !atTail ? "Back to live tail" : follow ? "Following" : "Paused: follow";
    if (!atTail) setState(`showing lines ${lo + 1}–${hi} of ${total}`);
    else if (ended) setState(`log complete: ${total} line${total === 1 ? "" : "s"}`);
    else if (hi === 0) setState("waiting for output…");
    else setState(follow ? "live" : "paused (scrolled up)");
  }

  function scrollToEnd() { logEl.scrollTop = logEl.scrollHeight; }

  function reset(first) {
    logEl.replaceChildren();
    lo = hi = first;
  }

  function appendLines(first, lines) {
    if (first > hi || hi === 0) reset(first); // a gap: earlier lines come on demand
    if (first < hi) { lines = lines.slice(hi - first); first = hi; }
    if (!lines.length) return;
    if (follow && lines.length >= MAX_DOM_LINES) {
      // A burst longer than the view holds: following shows only its last lines, so only those
      // are drawn (the rest come back with "Earlier lines").
      reset(first + lines.length - MAX_DOM_LINES);
      lines = lines.slice(-MAX_DOM_LINES);
      first = lo;
    }
    logEl.append(fragment(first, lines));
    hi = first + lines.length;
    if (follow) {
      const extra = hi - lo - MAX_DOM_LINES;
      for (let i = 0; i < extra; i++) logEl.firstChild.remove();
      if (extra > 0) lo += extra;
      scrollToEnd();
    }
  }

  logEl.addEventListener("scroll", () => {
    if (!atTail) return;
    const atBottom = logEl.scrollHeight - logEl.scrollTop - logEl.clientHeight < 24;
    if (atBottom !== follow) { follow = atBottom; updateControls(); }
  });

  followBtn.addEventListener("click", () => {
    if (!atTail) { connect(true); return; }
    follow = !follow;
    if (follow) scrollToEnd();
    updateControls();
  });

  async function fetchLines(start, end) {
    const url = new URL(root.dataset.linesUrl, location.href);
    url.searchParams.set("stream", stream);
    url.searchParams.set("start", start);
    url.searchParams.set("end", end);
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`log request failed: ${response.status}`);
    return response.json();
  }

  earlierBtn.addEventListener("click", async () => {
    const data = await fetchLines(Math.max(0, lo - EARLIER_BATCH), lo);
    const lines = data.lines.slice(0, lo - data.first);
    if (!lines.length) return;
    const before = logEl.scrollHeight;
    logEl.prepend(fragment(data.first, lines));
    lo = data.first;
    // Show where the loaded lines meet the ones already there; scrolling up pauses following.
    logEl.scrollTop = Math.max(0, logEl.scrollHeight - before - logEl.clientHeight / 2);
    follow = false;
    updateControls();
  });

  function highlight(number) {
    const row = logEl.querySelector(`.line[data-n="${number}"]`);
    if (!row) return;
    logEl.querySelectorAll(".line.hit").forEach((el) => el.classList.remove("hit"));
    row.classList.add("hit");
    row.scrollIntoView({ block: "center" });
  }

  async function jumpTo(number) {
    follow = false;
    if (number >= lo && number < hi) { highlight(number); updateControls(); return; }
    const data = await fetchLines(Math.max(0, number - JUMP_CONTEXT), number + JUMP_CONTEXT);
    total = data.total;
    reset(data.first);
    logEl.append(fragment(data.first, data.lines));
    hi = data.first + data.lines.length;
    atTail = hi >= total;
    if (!atTail && socket) { socket.onclose = null; socket.close(); socket = null; }
    highlight(number);
    updateControls();
  }

  // --- the WebSocket --------------------------------------------------------------------------
  // A workload printing thousands of lines a second sends many messages a second: they are
  // drawn together, at most every DRAW_MS, and while following only the last MAX_DOM_LINES of
  // them are kept (a hidden tab, whose timers slow down, holds no more than that either).
  const DRAW_MS = 50;
  let queued = null; // {first, lines} not drawn yet
  let drawTimer = null;

  function queueLines(first, lines) {
    if (queued && first !== queued.first + queued.lines.length) drawQueued(); // a gap: drawn apart
    if (!queued) queued = { first, lines: [] };
    for (const line of lines) queued.lines.push(line);
    if (follow && queued.lines.length > 2 * MAX_DOM_LINES) {
      const drop = queued.lines.length - MAX_DOM_LINES;
      queued.lines.splice(0, drop);
      queued.first += drop;
    }
    if (!drawTimer) drawTimer = setTimeout(drawQueued, DRAW_MS);
  }

  function drawQueued() {
    clearTimeout(drawTimer);
    drawTimer = null;
    const batch = queued;
    queued = null;
    if (batch && atTail) appendLines(batch.first, batch.lines);
    updateControls();
  }

  function connect(fresh) {
    if (socket) { socket.onclose = null; socket.close(); }
    if (fresh) { reset(0); atTail = true; follow = true; ended = false; }
    queued = null; // lines of the stream before: a new connection starts with its own tail
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(`${scheme}${location.host}${root.dataset.ws}?stream=${encodeURIComponent(stream)}`);
    socket.onopen = () => { retries = 0; };
    socket.onmessage = (event) => {
      const msg = JSON.parse(event.data);
      if (msg.type === "lines") {
        total = msg.total;
        if (atTail) queueLines(msg.first, msg.lines);
      } else if (msg.type === "streams") {
        updateStreams(msg.streams);
      } else if (msg.type === "end") {
        ended = true;
      }
      updateControls();
    };
    socket.onclose = (event) => {
      socket = null;
      if (ended || event.code === 4404) { updateControls(); return; }
      // The server restarted or the network blinked: come back, slower each time.
      retries += 1;
      setState("reconnecting…");
      setTimeout(() => { if (!socket && atTail) connect(false); }, Math.min(10000, 500 * 2 ** retries));
    };
  }

  function label(name) {
    const [kind, rest] = [name.slice(0, name.indexOf(":")), name.slice(name.indexOf(":") + 1)];
    return kind === "step" ? `${rest} step log` : rest;
  }

  function ensureOption(name) {
    if (![...select.options].some((o) => o.value === name)) select.append(new Option(label(name), name));
  }

  function updateStreams(names) {
    const processes = names.filter((n) => n.startsWith("process:"));
    processes.concat(names.filter((n) => n.startsWith("step:"))).forEach(ensureOption);
    if (!userPicked && processes.length && !stream.startsWith("process:")) switchTo(processes[0]);
  }

  function switchTo(name) {
    stream = name;
    ensureOption(name);
    select.value = name;
    const url = new URL(root.dataset.downloadUrl, location.href);
    url.searchParams.set("stream", name);
    download.href = url.pathname + url.search;
    searchForm.querySelector("input[name=stream]").value = name;
    document.getElementById("log-search-results").replaceChildren();
    connect(true);
  }

  select.addEventListener("change", () => { userPicked = true; switchTo(select.value); });

  document.addEventListener("click", (event) => {
    const stepButton = event.target.closest("[data-show-stream]");
    if (stepButton) {
      userPicked = true;
      switchTo(stepButton.dataset.showStream);
      root.scrollIntoView({ block: "start" });
      return;
    }
    const match = event.target.closest("button[data-line]");
    if (match) jumpTo(Number(match.dataset.line));
  });

  connect(true);
  updateControls();
})();
