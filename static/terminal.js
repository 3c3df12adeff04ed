// The experiment page's terminal: xterm.js over a WebSocket to experiments/terminal.py.
// Keystrokes go out as binary frames (UTF-8), resizes as JSON text frames; the shell's output
// comes back as binary frames that xterm decodes itself (a character split across frames is
// still drawn whole).
// The card is in the page, or arrives later out of band in a live update (htmx:load) once a
// terminal becomes possible: it is set up when it appears, once.
(function () {
  "use strict";
  const assets = document.currentScript.dataset;
  let xtermLoaded = null;

  // xterm.js and its fit add-on, fetched the first time a terminal opens (once per page).
  function loadXterm() {
    if (!xtermLoaded) {
      // Its stylesheet too: the fit add-on measures the laid-out screen.
      const fetchTag = (tag) =>
        new Promise((resolve, reject) => {
          tag.onload = resolve;
          tag.onerror = () => reject(new Error("could not load the terminal"));
          document.head.append(tag);
        });
      const css = Object.assign(document.createElement("link"), { rel: "stylesheet", href: assets.xtermCss });
      // async: false runs them in insertion order, as the static tags they replace ran.
      const script = (src) => fetchTag(Object.assign(document.createElement("script"), { src, async: false }));
      xtermLoaded = Promise.all([fetchTag(css), script(assets.xterm), script(assets.xtermFit)]).catch((error) => {
        xtermLoaded = null; // a later click tries again
        throw error;
      });
    }
    return xtermLoaded;
  }

  function setupOnce(root) {
    const card = root.id === "terminal-card" ? root : root.querySelector && root.querySelector("#terminal-card");
    if (!card || card.dataset.ready) return;
    card.dataset.ready = "1";
    setup(card);
  }

  setupOnce(document);
  document.addEventListener("htmx:load", (event) => setupOnce(event.detail.elt));

  function setup(card) {
    const openButton = document.getElementById("terminal-open");
    const closeButton = document.getElementById("terminal-close");
    const fullButton = document.getElementById("terminal-fullscreen");
    const picker = document.getElementById("terminal-process");
    const screen = document.getElementById("terminal-screen");
    const state = document.getElementById("terminal-state");
    const encoder = new TextEncoder();

    // Why the server ended a session; the close frame's reason carries the details when it has them.
    const CLOSE_TEXT = {
      1000: "Session ended.",
      1006: "Connection lost.",
      1011: "The engine could not open a shell.",
      4400: "No such process in this experiment.",
      4401: "Log in to open a terminal.",
      4404: "No such experiment.",
      4408: "Closed after being idle.",
      4409: "The experiment is not running.",
      4410: "The session reached its time limit.",
      4429: "You have too many terminals open: close one first.",
    };

    let term = null;
    let fit = null;
    let socket = null;
    let observer = null;

    function say(text) {
      state.textContent = text;
    }

    function sendResize() {
      if (socket && socket.readyState === WebSocket.OPEN && term) {
        socket.send(JSON.stringify({ type: "resize", rows: term.rows, cols: term.cols }));
      }
    }

    function refit() {
      if (!fit || screen.hidden) return;
      try {
        fit.fit(); // fires term.onResize when the size changed, which tells the server
      } catch (e) {
        // The element is not laid out yet (display: none); the observer calls again once it is.
      }
    }

    function dispose() {
      if (observer) observer.disconnect();
      if (term) term.dispose();
      term = fit = socket = observer = null;
    }

    function randomToken() {
      const bytes = crypto.getRandomValues(new Uint8Array(16));
      return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    }

    async function open() {
      openButton.disabled = true;
      say("Loading the terminal…");
      try {
        await loadXterm();
      } catch (error) {
        say("The terminal could not be loaded: reload the page and try again.");
        openButton.disabled = false;
        return;
      }
      dispose();
      screen.hidden = false;
      term = new Terminal({
        cursorBlink: true,
        fontFamily: 'ui-monospace, "SFMono-Regular", "DejaVu Sans Mono", Menlo, Consolas, monospace',
        fontSize: 13,
        scrollback: 5000,
        theme: { background: "#0f1722" },
      });
      fit = new FitAddon.FitAddon();
      term.loadAddon(fit);
      term.open(screen);
      refit();
      term.onData((data) => {
        if (socket && socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
      });
      term.onBinary((data) => {
        if (socket && socket.readyState === WebSocket.OPEN) {
          socket.send(Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff));
        }
      });
      term.onResize(sendResize);
      // The card changes size with the window and in full screen: the terminal follows.
      observer = new ResizeObserver(() => window.requestAnimationFrame(refit));
      observer.observe(screen);
      // The server keeps a shell whose connection dropped for a short while; this token (never
      // shown, never stored) lets this page, and only it, re-attach to it.
      connect(picker.value, randomToken(), 0);
    }

    function connect(process, token, attempt) {
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      const query = `process=${encodeURIComponent(process)}&resume=${token}`;
      const ws = new WebSocket(`${scheme}//${location.host}${card.dataset.ws}?${query}`);
      ws.binaryType = "arraybuffer";
      socket = ws;
      say(attempt ? `Connection lost: reconnecting to ${process}…` : `Connecting to ${process}…`);
      openButton.disabled = true;
      let opened = false;

      ws.onopen = () => {
        opened = true;
        say(`Connected to ${process}.`);
        closeButton.hidden = fullButton.hidden = false;
        if (term) term.options.disableStdin = false;
        sendResize();
        if (term) term.focus();
      };
      ws.onmessage = (event) => {
        if (!term || socket !== ws) return;
        term.write(typeof event.data === "string" ? event.data : new Uint8Array(event.data));
      };
      ws.onclose = (event) => {
        if (socket !== ws) return; // an older session closing after a newer one opened
        if (event.code === 1006 && term && attempt < 3 && (opened || attempt > 0)) {
          // Dropped, not ended: the same shell is still there for a while.
          term.options.disableStdin = true;
          setTimeout(() => socket === ws && connect(process, token, attempt + 1), 500 * (attempt + 1));
          return;
        }
        const text = CLOSE_TEXT[event.code] || `Disconnected (${event.code}).`;
        say(event.reason && event.code !== 1006 ? `${text} ${event.reason}.` : text);
        if (term) term.options.disableStdin = true;
        openButton.disabled = false;
        openButton.textContent = "Open again";
        closeButton.hidden = true;
      };
    }

    openButton.addEventListener("click", open);
    // Leaving the page ends the session now: its token dies with the page, nothing could re-attach.
    window.addEventListener("pagehide", () => {
      if (socket) socket.close(1000);
    });
    closeButton.addEventListener("click", () => {
      if (socket) socket.close(1000);
    });
    fullButton.addEventListener("click", () => {
      const on = card.classList.toggle("fullscreen");
      fullButton.setAttribute("aria-pressed", String(on));
      fullButton.textContent = on ? "Exit full screen" : "Full screen";
      if (term) term.focus();
    });
    document.addEventListener("keydown", (event) => {
      // Escape belongs to the program in the terminal (vi); only Ctrl+Shift+F leaves full screen.
      if (event.ctrlKey && event.shiftKey && event.key.toLowerCase() === "f" && card.classList.contains("fullscreen")) {
        fullButton.click();
      }
    });
  }
})();
