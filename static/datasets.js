// Datasets tab uploads: each file goes up in parts (several in flight) with a progress bar.
// A part that fails is retried a few times; if it still fails the upload stops with a Retry
// button that resumes from the parts already stored, so a 20 GB upload never starts over.
(() => {
  "use strict";
  const PARALLEL_PARTS = 3;
  const PART_ATTEMPTS = 4;

  const form = document.getElementById("ds-upload-form");
  if (!form) return;
  const list = document.getElementById("ds-upload-list");

  function csrfToken() {
    try {
      return JSON.parse(document.body.getAttribute("hx-headers") || "{}")["X-CSRFToken"] || "";
    } catch (e) {
      return "";
    }
  }

  function humanBytes(n) {
    // Binary units, as the listing shows them (Django's filesizeformat).
    const units = ["bytes", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  }

  function post(url, fields) {
    const body = new URLSearchParams(fields);
    return fetch(url, {
      method: "POST",
      body,
      headers: { "X-CSRFToken": csrfToken() },
      credentials: "same-origin",
    }).then(async (r) => {
      const data = await r.json().catch(() => ({ error: `the server answered ${r.status}` }));
      if (!r.ok) throw new Error(data.error || `the server answered ${r.status}`);
      return data;
    });
  }

  function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

  class Upload {
    constructor(file, bucket, prefix) {
      this.file = file;
      this.bucket = bucket;
      this.prefix = prefix;
      this.key = prefix + file.name;
      this.done = new Map(); // part number -> bytes stored
      this.inflight = new Map(); // part number -> bytes sent so far
      this.xhrs = new Set();
      this.info = null;
      this.cancelled = false;
      this.started = 0;
      this.render();
    }

    render() {
      this.el = document.createElement("li");
      this.el.className = "ds-upload-item";
      this.el.dataset.key = this.key;
      const name = document.createElement("span");
      name.className = "ds-upload-name";
      name.textContent = `${this.bucket}/${this.key}`;
      this.bar = document.createElement("progress");
      this.bar.max = Math.max(this.file.size, 1);
      this.bar.value = 0;
      this.bar.setAttribute("aria-label", `Upload of ${this.file.name}`);
      this.status = document.createElement("span");
      this.status.className = "ds-upload-status";
      this.status.textContent = "waiting";
      this.action = document.createElement("button");
      this.action.type = "button";
      this.action.textContent = "Cancel";
      this.action.addEventListener("click", () => (this.failed ? this.run().catch(() => {}) : this.cancel()));
      this.el.append(name, this.bar, this.status, this.action);
      list.prepend(this.el);
    }

    loaded() {
      let n = 0;
      for (const v of this.done.values()) n += v;
      for (const v of this.inflight.values()) n += v;
      return n;
    }

    progress() {
      const loaded = this.loaded();
      this.bar.value = loaded;
      const pct = this.file.size ? Math.floor((100 * loaded) / this.file.size) : 100;
      const seconds = (performance.now() - this.started) / 1000;
      const rate = seconds > 0.5 ? ` · ${humanBytes(loaded / seconds)}/s` : "";
      this.status.textContent = `${pct}% · ${humanBytes(loaded)} of ${humanBytes(this.file.size)}${rate}`;
      this.el.dataset.percent = String(pct);
    }

    sendPart(number) {
      const size = this.info.part_size;
      const blob = this.file.slice((number - 1) * size, Math.min(number * size, this.file.size));
      const query = new URLSearchParams({
        bucket: this.bucket, key: this.key, upload_id: this.info.upload_id, part: String(number),
      });
      return new Promise((resolve, reject) => {
        const xhr = new XMLHttpRequest();
        this.xhrs.add(xhr);
        xhr.open("PUT", `${form.dataset.part}?${query}`);
        xhr.setRequestHeader("X-CSRFToken", csrfToken());
        xhr.setRequestHeader("Content-Type", "application/octet-stream");
        xhr.upload.onprogress = (e) => { this.inflight.set(number, e.loaded); this.progress(); };
        xhr.onload = () => {
          this.xhrs.delete(xhr);
          this.inflight.delete(number);
          if (xhr.status >= 200 && xhr.status < 300) {
            this.done.set(number, blob.size);
            this.progress();
            resolve();
          } else {
            let message = `the server answered ${xhr.status}`;
            try { message = JSON.parse(xhr.responseText).error || message; } catch (e) { /* not JSON */ }
            reject(Object.assign(new Error(message), { fatal: xhr.status === 400 || xhr.status === 404 }));
          }
        };
        xhr.onerror = () => { this.xhrs.delete(xhr); this.inflight.delete(number); reject(new Error("the connection was interrupted")); };
        xhr.onabort = () => { this.xhrs.delete(xhr); this.inflight.delete(number); reject(new Error("cancelled")); };
        xhr.send(blob);
      });
    }

    async partWithRetries(number) {
      for (let attempt = 1; ; attempt++) {
        try {
          return await this.sendPart(number);
        } catch (err) {
          if (this.cancelled || err.fatal || attempt >= PART_ATTEMPTS) throw err;
          this.status.textContent = `part ${number} failed (${err.message}); retrying…`;
          await sleep(500 * 2 ** attempt);
        }
      }
    }

    async run() {
      this.failed = false;
      this.el.classList.remove("failed");
      this.action.textContent = "Cancel";
      this.started = performance.now();
      try {
        if (!this.info) {
          this.status.textContent = "starting";
          this.info = await post(form.dataset.start, { bucket: this.bucket, key: this.key, size: String(this.file.size) });
        }
        const pending = [];
        for (let n = 1; n <= this.info.parts; n++) if (!this.done.has(n)) pending.push(n);
        const worker = async () => {
          while (pending.length && !this.cancelled) await this.partWithRetries(pending.shift());
        };
        await Promise.all(Array.from({ length: PARALLEL_PARTS }, worker));
        if (this.cancelled) return;
        this.status.textContent = "finishing";
        await post(form.dataset.complete, {
          bucket: this.bucket, key: this.key, upload_id: this.info.upload_id, size: String(this.file.size),
        });
        this.bar.value = this.bar.max;
        this.status.textContent = `uploaded · ${humanBytes(this.file.size)}`;
        this.el.classList.add("done");
        this.el.dataset.percent = "100";
        this.action.remove();
        refreshListing(this.bucket, this.prefix);
      } catch (err) {
        if (this.cancelled) return;
        for (const xhr of this.xhrs) xhr.abort();
        this.failed = true;
        this.el.classList.add("failed");
        const pct = this.file.size ? Math.floor((100 * this.loaded()) / this.file.size) : 0;
        this.status.textContent = `failed at ${pct}%: ${err.message}`;
        this.action.textContent = "Retry";
        if (/unknown upload/.test(err.message)) this.info = null, this.done.clear();
        throw err;
      }
    }

    cancel() {
      this.cancelled = true;
      for (const xhr of this.xhrs) xhr.abort();
      this.status.textContent = "cancelled";
      this.action.remove();
      if (this.info) {
        post(form.dataset.abort, { bucket: this.bucket, key: this.key, upload_id: this.info.upload_id }).catch(() => {});
      }
    }
  }

  function refreshListing(bucket, prefix) {
    const browser = document.getElementById("browser");
    if (!browser || browser.dataset.bucket !== bucket || browser.dataset.prefix !== prefix || !window.htmx) return;
    const query = new URLSearchParams({ bucket });
    if (prefix) query.set("prefix", prefix);
    window.htmx.ajax("GET", `${form.dataset.browse}?${query}`, { target: "#browser", swap: "outerHTML" });
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = form.querySelector("input[type=file]");
    const browser = document.getElementById("browser");
    const files = Array.from(input.files);
    const message = document.getElementById("ds-upload-message");
    if (message) message.hidden = true;
    if (!files.length) {
      if (message) {
        message.textContent = "No file chosen: choose one or more files, then Upload.";
        message.hidden = false;
      }
      input.focus();
      return;
    }
    input.value = "";
    // Files go one after the other (their parts in parallel), into the folder shown now.
    const uploads = files.map((f) => new Upload(f, browser.dataset.bucket, browser.dataset.prefix));
    for (const upload of uploads) {
      try { await upload.run(); } catch (e) { /* shown on the row, with Retry */ }
    }
  });
})();
