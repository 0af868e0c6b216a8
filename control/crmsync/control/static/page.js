// The Workflows page's behaviour: live rows, Start/Stop without a reload, mapping rows, focus.
"use strict";

(function () {
  const table = document.querySelector("table.workflows[data-poll]");
  if (table) workflowsPage(table);
  const form = document.querySelector("form.config");
  if (form) editPage(form);

  function workflowsPage(table) {
    const live = document.getElementById("live");
    const freshness = document.getElementById("freshness");
    const slow = Number(table.dataset.poll || 2000);
    const rows = new Map();
    table.querySelectorAll("tbody tr[data-name]").forEach((tr) => rows.set(tr.dataset.name, tr));
    let timer = null;

    const field = (tr, name) => tr.querySelector(`[data-field="${name}"]`);
    const show = (element, text) => {
      if (!element) return;
      element.textContent = text || "";
      element.hidden = !text;
    };

    function render(w) {
      const tr = rows.get(w.name);
      if (!tr) return null;
      const before = tr.dataset.status;
      tr.dataset.status = w.status;
      field(tr, "status").className = "status status-" + w.status.toLowerCase();
      field(tr, "status-text").textContent = w.status;
      show(field(tr, "reason"), w.reason);
      show(field(tr, "note"), w.note);
      if (w.drift !== undefined) renderDrift(field(tr, "drift"), w.drift);
      const previewLink = field(tr, "preview-link");
      if (previewLink) previewLink.hidden = !w.pending_changes;
      field(tr, "backlog").textContent = w.backlog_text;
      const trend = field(tr, "trend");
      trend.textContent = w.trend_text;
      trend.className = "trend trend-" + w.trend;
      const toggle = tr.querySelector("form.toggle");
      if (toggle) {
        const button = field(tr, "toggle");
        toggle.action = `/workflows/${encodeURIComponent(w.name)}/${w.action}`;
        field(tr, "toggle-text").textContent = w.action === "start" ? "Start" : "Stop";
        button.className = "toggle-" + w.action;
        if (w.busy) button.setAttribute("aria-disabled", "true");
        else button.removeAttribute("aria-disabled");
        const pending = Boolean(w.pending_changes) && w.action === "stop";
        toggle.classList.toggle("pending", pending);
        field(tr, "mark").hidden = !pending;
        if (pending) button.setAttribute("aria-describedby", "tip-" + w.name);
        else button.removeAttribute("aria-describedby");
      }
      if (before === w.status) return null;
      return `${tr.dataset.title}: ${w.status}` + (w.reason ? ` (${w.reason})` : "");
    }

    // The drift list as a small diff: piece, what it was at Start → what it is now.
    function renderDrift(drift, changes) {
      if (!drift) return;
      drift.querySelector("ul").replaceChildren(...changes.map((d) => {
        const li = document.createElement("li");
        li.className = d.breaking ? "breaking" : "additive";
        const code = document.createElement("code");
        code.textContent = d.name;
        const was = document.createElement("del");
        was.textContent = d.was;
        const now = document.createElement("ins");
        now.textContent = d.now;
        li.append(code, ": ", was, " → ", now, d.breaking ? "" : " (additive)");
        return li;
      }));
      drift.hidden = changes.length === 0;
    }

    // The last hour's chart of one row, and the source rows (issue 20).
    function renderHistory(w) {
      const tr = rows.get(w.name);
      const h = w.history;
      if (!tr || !h) return;
      field(tr, "backlog-line").setAttribute("points", h.backlog_points);
      field(tr, "rate-line").setAttribute("points", h.rate_points);
      field(tr, "chart").setAttribute("aria-label", h.label);
      field(tr, "chart-title").textContent = h.label;
      const eta = field(tr, "eta");
      eta.textContent = h.eta_text;
      eta.className = "eta eta-" + h.eta_trend;
      field(tr, "peak").textContent = h.peak_text;
      field(tr, "rate").textContent = h.rate_text;
      field(tr, "history").dataset.samples = String(h.samples);
    }

    function renderSources(sources) {
      sources.forEach((s) => {
        const tr = document.querySelector(`tr[data-source="${s.name}"]`);
        if (!tr) return;
        tr.dataset.status = s.status;
        field(tr, "status").className = "status status-" + s.status.toLowerCase();
        field(tr, "status-text").textContent = s.status_text;
        show(field(tr, "reason"), s.error);
        field(tr, "lag").textContent = s.lag_text;
        field(tr, "published").textContent = s.published_text;
        field(tr, "entities").textContent = s.entities_text;
      });
    }

    function announce(messages) {
      if (messages.length) live.textContent = messages.join(". ");
    }

    function schedule() {
      clearTimeout(timer);
      const busy = [...rows.values()].some((tr) => tr.dataset.status === "STARTING");
      timer = setTimeout(refresh, busy ? Math.min(slow, 700) : slow);
    }

    async function refresh() {
      if (document.hidden) return schedule();
      try {
        const response = await fetch("/workflows.json", {
          headers: { Accept: "application/json" },
          cache: "no-store",
          credentials: "same-origin",
        });
        if (response.status === 401) {
          window.location.assign("/login");
          return;
        }
        const body = await response.json();
        if (!response.ok) throw new Error(body.error || response.statusText);
        announce(body.workflows.map(render).filter(Boolean));
        body.workflows.forEach(renderHistory);
        renderSources(body.sources || []);
        freshness.textContent = "";
      } catch (error) {
        freshness.textContent = `Live updates paused: ${error.message}. Retrying…`;
      }
      schedule();
    }

    table.addEventListener("submit", async (event) => {
      const toggle = event.target.closest("form.toggle");
      if (!toggle) return;
      event.preventDefault();
      const button = toggle.querySelector("button");
      if (button.getAttribute("aria-disabled") === "true") return;
      button.setAttribute("aria-disabled", "true");
      const tr = toggle.closest("tr");
      try {
        const response = await fetch(toggle.action, {
          method: "POST",
          body: new FormData(toggle),
          headers: { Accept: "application/json" },
          credentials: "same-origin",
        });
        const body = await response.json();
        if (!response.ok) {
          announce([`${tr.dataset.title}: ${body.error}`]);
          freshness.textContent = body.error;
        } else {
          const stopped = body.status === "STOPPED";
          announce([render({
            name: tr.dataset.name,
            status: body.status,
            reason: null,
            note: null,
            backlog_text: field(tr, "backlog").textContent,
            trend: (field(tr, "trend").className.match(/trend-(\w+)/) || [])[1] || "steady",
            trend_text: field(tr, "trend").textContent,
            action: stopped ? "start" : "stop",
            busy: body.status === "STARTING",
            pending_changes: toggle.classList.contains("pending"),
          })].filter(Boolean));
        }
      } catch (error) {
        freshness.textContent = `The request failed: ${error.message}`;
      }
      refresh();
    });

    document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
    schedule();
  }

  function editPage(form) {
    const rows = form.querySelector("tbody[data-rows]");
    const template = document.getElementById("mapping-template");
    const add = form.querySelector("[data-add-row]");
    if (rows && template && add) {
      let next = rows.querySelectorAll("tr").length;
      add.addEventListener("click", () => {
        const html = template.innerHTML.replaceAll("__i__", String(next)).replaceAll("__n__", String(next + 1));
        next += 1;
        rows.insertAdjacentHTML("beforeend", html);
        rows.lastElementChild.querySelector("input").focus();
      });
      rows.addEventListener("click", (event) => {
        const remove = event.target.closest("[data-remove-row]");
        if (!remove) return;
        const tr = remove.closest("tr");
        const after = tr.nextElementSibling || tr.previousElementSibling;
        tr.remove();
        const focus = after ? after.querySelector("[data-remove-row]") : add;
        (focus || add).focus();
      });
    }
    const target = document.getElementById("error-summary") || document.getElementById("preview-title")
      || document.getElementById("review-title");
    if (target) target.focus();
  }
})();
