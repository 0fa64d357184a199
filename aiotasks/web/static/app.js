// aiotasks dashboard: live updates over server-sent events, confirmed actions.
// No framework and no build step; every URL is relative to the page (data-root).
(() => {
  "use strict";
  const body = document.body;
  const root = body.dataset.root || "./";
  const view = body.dataset.view || "";
  const csrf = (document.querySelector('meta[name="csrf"]') || {}).content || "";

  // -- times ---------------------------------------------------------------------------
  function span(seconds) {
    if (seconds < 60) return Math.round(seconds) + " s";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h " + Math.floor((seconds % 3600) / 60) + " min";
    return Math.floor(seconds / 86400) + " d " + Math.floor((seconds % 86400) / 3600) + " h";
  }
  function ago(iso) {
    const t = Date.parse(iso);
    if (Number.isNaN(t)) return "—";
    const s = (Date.now() - t) / 1000;
    return s >= 0 ? span(s) + " ago" : "in " + span(-s);
  }
  function refreshTimes(scope) {
    scope.querySelectorAll("time[data-ago]").forEach((el) => {
      if (el.dateTime) el.textContent = ago(el.dateTime);
    });
  }
  setInterval(() => refreshTimes(document), 5000);

  // -- task tables: rows updated and added as tasks change ------------------------------
  const globs = new Map();
  function glob(pattern) {
    if (!globs.has(pattern)) {
      let re = "";
      for (const ch of pattern) {
        if (ch === "*") re += ".*";
        else if (ch === "?") re += ".";
        else re += ch.replace(/[.+^${}()|[\]\\]/g, "\\$&");
      }
      globs.set(pattern, new RegExp("^" + re + "$", "i"));
    }
    return globs.get(pattern);
  }
  // As the server's search (index.py, _searcher): part of a name or a glob, any case,
  // or the start of an id.
  function searched(text, c) {
    if (c.id && c.id.startsWith(text)) return true;
    const pattern = /[*?]/.test(text) ? text : "*" + text + "*";
    return !!(c.name && glob(pattern).test(c.name));
  }
  function matches(table, c) {
    const f = table.dataset;
    if (f.filterId && c.id !== f.filterId) return false;
    if (f.filterState && c.state !== f.filterState) return false;
    if (f.filterQueue && c.queue !== f.filterQueue) return false;
    if (f.filterSearch && !searched(f.filterSearch, c)) return false;
    return true;
  }
  function fill(row, c) {
    const state = row.querySelector("[data-state]");
    state.textContent = c.state;
    state.className = "state " + c.state;
    if (c.name) row.querySelector("[data-name]").textContent = c.name;
    if (c.queue) row.querySelector("[data-queue]").textContent = c.queue;
    const time = row.querySelector("time");
    time.dateTime = new Date(c.at).toISOString();
    time.textContent = ago(time.dateTime);
    // Restart the highlight by switching between two animations of the same look: reading
    // offsetWidth to restart one forced a layout per change (seconds of a frozen page
    // when thousands of tasks arrive).
    const again = row.classList.contains("fresh") ? "fresh2" : "fresh";
    row.classList.remove("fresh", "fresh2");
    row.classList.add(again);
  }
  // A task page's URL from the root, as filters.task_href makes it: a query for an id a
  // proxy might decode or a browser resolve as a path segment.
  function taskHref(id) {
    if (/^[A-Za-z0-9_~-][A-Za-z0-9_.~-]*$/.test(id)) return "tasks/" + id;
    return "tasks?id=" + encodeURIComponent(id);
  }
  function newRow(c) {
    const row = document.getElementById("task-row").content.querySelector("tr").cloneNode(true);
    row.dataset.id = c.id;
    const link = row.querySelector("[data-link]");
    link.textContent = c.id;
    link.href = root + taskHref(c.id);
    if (!c.name) row.querySelector("[data-name]").textContent = "?";
    if (!c.queue) row.querySelector("[data-queue]").textContent = "—";
    return row;
  }
  function applyChanges(changes) {
    document.querySelectorAll("table[data-live-tasks]").forEach((table) => {
      const rows = table.tBodies[0];
      const limit = Number(table.dataset.limit) || 50;
      for (const c of changes) {
        let row = rows.querySelector('tr[data-id="' + CSS.escape(c.id) + '"]');
        if (!row) {
          if (!matches(table, c)) continue;
          row = newRow(c);
          rows.prepend(row);
          while (rows.rows.length > limit) rows.deleteRow(-1);
        }
        fill(row, c);
      }
      const empty = table.parentElement.querySelector("[data-empty]");
      if (empty) empty.hidden = rows.rows.length > 0;
    });
  }

  // -- the live stream ------------------------------------------------------------------
  const status = document.querySelector("[data-live-status]");
  let redisDown = false;
  function live(on) {
    if (!status) return;
    status.classList.toggle("on", on && !redisDown);
    status.classList.toggle("down", on && redisDown);
    status.textContent = !on ? "reconnecting" : redisDown ? "Redis unreachable" : "live";
  }
  function swap(name, html) {
    const box = document.querySelector('[data-live="' + name + '"]');
    if (!box) return;
    box.innerHTML = html;
    refreshTimes(box);
  }
  function connect() {
    let url = null;
    if (body.dataset.stream) {
      url = root + body.dataset.stream;
    } else if (["overview", "tasks", "dead"].includes(view)) {
      url = root + "events?view=" + view;
      if (body.dataset.after) url += "&after=" + encodeURIComponent(body.dataset.after);
    }
    if (!url || !window.EventSource) {
      if (status) status.hidden = true; // a page without live updates: no badge to read
      return;
    }
    const source = new EventSource(url);
    source.onopen = () => { redisDown = false; live(true); }; // the server says if not
    source.onerror = () => live(false); // EventSource reconnects by itself
    source.addEventListener("tasks", (e) => applyChanges(JSON.parse(e.data)));
    // The server lost Redis (or has it back): what the page shows is not live meanwhile.
    source.addEventListener("redis", (e) => { redisDown = e.data === "down"; live(true); });
    for (const name of ["overview", "dead", "task"]) {
      source.addEventListener(name, (e) => swap(name, e.data));
    }
    window.addEventListener("pagehide", () => source.close());
  }

  // -- actions: confirmed in the page, then sent with the page's token -------------------
  const dialog = document.getElementById("confirm");
  const toastBox = document.getElementById("toast");
  let toastTimer = null;
  function toast(message, ok) {
    toastBox.textContent = message;
    toastBox.classList.toggle("bad", !ok);
    toastBox.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { toastBox.hidden = true; }, 6000);
  }
  function ask(question) {
    if (!dialog || !dialog.showModal) return Promise.resolve(window.confirm(question));
    dialog.querySelector("[data-confirm-text]").textContent = question;
    dialog.returnValue = "";
    dialog.showModal();
    // Cancel has the focus: Enter alone must not purge a queue.
    dialog.querySelector('button[value="cancel"]').focus();
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    });
  }
  async function send(form) {
    const data = new URLSearchParams(new FormData(form));
    data.set("csrf", csrf);
    const button = form.querySelector("button");
    button.disabled = true;
    try {
      const response = await fetch(form.action, {
        method: "POST",
        body: data,
        headers: { Accept: "application/json" },
        credentials: "same-origin",
      });
      const type = response.headers.get("Content-Type") || "";
      if (type.includes("application/json")) {
        const answer = await response.json();
        toast(answer.message, answer.ok);
      } else {
        toast("The request failed: HTTP " + response.status + " " + response.statusText, false);
      }
    } catch (err) {
      toast("The request failed: " + err, false);
    } finally {
      button.disabled = false;
    }
  }
  document.addEventListener("submit", (event) => {
    const form = event.target.closest("form.act");
    if (!form) return;
    event.preventDefault();
    ask(form.dataset.confirm).then((ok) => { if (ok) send(form); });
  });

  refreshTimes(document);
  connect();
})();
