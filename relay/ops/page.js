"use strict";
// The operator's page: renders each state the gateway streams. Every value
// from the gateway goes into the page as text (textContent), never as HTML.
(() => {
  const $ = (id) => document.getElementById(id);
  let skew = 0; // server clock minus this browser's, in ms
  let source = null;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function since(ms) {
    if (!ms) return "";
    let s = Math.max(0, Math.round((Date.now() + skew - ms) / 1000));
    if (s < 60) return s + "s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + "m " + (s % 60) + "s";
    return Math.floor(m / 60) + "h " + (m % 60) + "m";
  }
  function duration(sec) {
    sec = Math.round(sec || 0);
    if (sec < 60) return sec + "s";
    if (sec < 3600) return Math.floor(sec / 60) + "m" + (sec % 60 ? " " + (sec % 60) + "s" : "");
    return Math.floor(sec / 3600) + "h" + (sec % 3600 >= 60 ? " " + Math.floor((sec % 3600) / 60) + "m" : "");
  }
  function clock(ms) {
    return ms ? new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" }) : "";
  }
  // A cell: label shows in the phone layout; a number in sinceMs keeps
  // the text counting up.
  function cell(label, text, cls, sinceMs) {
    const td = el("td", cls, text);
    td.dataset.label = label;
    if (sinceMs) td.dataset.since = String(sinceMs);
    return td;
  }
  function table(id, items, makeRow) {
    const t = $(id);
    const rows = items.map(makeRow);
    t.tBodies[0].replaceChildren(...rows);
    t.hidden = rows.length === 0;
    $(id + "-empty").hidden = rows.length !== 0;
  }
  function count(id, n, more) {
    $(id).textContent = n + (more || 0) > 0 ? String(n + (more || 0)) : "";
  }
  function more(id, n) {
    $(id).textContent = n > 0 ? "and " + n + " more" : "";
    $(id).hidden = !(n > 0);
  }

  function renderPools(pools) {
    const cards = pools.map((p) => {
      const card = el("div", "pool");
      card.dataset.pool = p.name;
      const h = el("h3", null, p.name);
      h.appendChild(el("span", "muted", p.running + " running · " + p.waiting + " waiting · " + p.held + " held"));
      card.appendChild(h);
      for (const e of p.endpoints || []) {
        const row = el("div", "ep");
        row.dataset.endpoint = e.url;
        row.appendChild(el("span", "pill " + e.state, e.state));
        row.appendChild(el("span", "url", e.url));
        row.appendChild(el("span", null, "jobs " + e.jobs + "/" + (e.max_jobs > 0 ? e.max_jobs : "∞")));
        row.appendChild(el("span", "muted", "circuit " + e.circuit + (e.failures ? " · " + e.failures + " failures" : "")));
        row.appendChild(el("span", "muted", e.transport));
        card.appendChild(row);
      }
      return card;
    });
    $("pools").replaceChildren(...cards);
    $("pools-empty").hidden = cards.length !== 0;
  }

  // A used amount against its quota: "12m 5s / 30m" with a bar.
  function quotaCell(label, used, quota, text) {
    const td = cell(label, text(used) + (quota ? " / " + text(quota) : ""));
    if (quota) {
      const bar = el("div", "bar" + (used >= quota ? " over" : ""));
      const fill = el("span");
      fill.style.width = Math.min(100, (100 * used) / quota) + "%";
      bar.appendChild(fill);
      td.appendChild(bar);
    }
    return td;
  }

  function renderUsage(u) {
    if (!u || !Array.isArray(u.rows)) {
      $("usage").hidden = true;
      $("usage-empty").hidden = false;
      $("usage-day").textContent = "";
      more("usage-more", 0);
      return;
    }
    const left = u.resets ? (u.resets - (Date.now() + skew)) / 1000 : 0;
    $("usage-day").textContent = u.day + " (UTC)" + (left > 0 ? " · quotas start again in " + duration(left) : "");
    $("usage-empty").textContent = "Nobody used a pool today.";
    table("usage", u.rows, (r) => {
      const tr = el("tr");
      tr.dataset.user = r.user;
      tr.appendChild(cell("User", r.user));
      tr.appendChild(cell("Pool", r.pool));
      tr.appendChild(quotaCell("GPU time", r.gpu_seconds, r.quota_gpu_seconds, duration));
      tr.appendChild(quotaCell("Prompts", r.prompts, r.quota_prompts, String));
      tr.appendChild(cell("Jobs ended", r.jobs + (r.errors ? " (" + r.errors + " failed)" : "")));
      return tr;
    });
    more("usage-more", u.more);
  }

  function render(st) {
    if (typeof st.time === "number") skew = st.time - Date.now();
    renderPools(st.pools || []);

    const running = st.running || [];
    table("running", running, (j) => {
      const tr = el("tr");
      tr.dataset.job = j.id;
      tr.appendChild(cell("User", j.user));
      tr.appendChild(cell("Pool", j.pool));
      tr.appendChild(cell("Endpoint", j.endpoint, "mono"));
      tr.appendChild(cell("State", j.status === "in_progress" ? "running" : "sent"));
      tr.appendChild(cell("Since", since(j.started || j.created), null, j.started || j.created));
      return tr;
    });
    count("running-count", running.length, st.more_running);
    more("running-more", st.more_running);

    const waiting = st.waiting || [];
    table("queue", waiting, (j) => {
      const tr = el("tr");
      tr.dataset.job = j.id;
      tr.appendChild(cell("#", j.position ? String(j.position) : "–"));
      tr.appendChild(cell("User", j.user));
      tr.appendChild(cell("Pool", j.pool));
      tr.appendChild(cell("Waiting", since(j.created), null, j.created));
      tr.appendChild(cell("Why", j.why || ""));
      return tr;
    });
    count("queue-count", waiting.length, st.more_waiting);
    more("queue-more", st.more_waiting);

    renderUsage(st.usage);

    const failures = st.failures || [];
    table("failures", failures, (f) => {
      const tr = el("tr");
      tr.dataset.job = f.job_id;
      tr.appendChild(cell("When", clock(f.time), "time"));
      tr.appendChild(cell("User", f.user));
      tr.appendChild(cell("Pool", f.pool));
      tr.appendChild(cell("Endpoint", f.endpoint || "", "mono"));
      tr.appendChild(cell("Message", (f.node ? f.node + ": " : "") + f.message, "msg"));
      return tr;
    });
    count("failures-count", failures.length);

    const problems = st.problems || [];
    $("problems").replaceChildren(...problems.map((p) => el("div", null, p)));
    $("problems").hidden = problems.length === 0;
    $("updated").textContent = "updated " + clock(st.time || Date.now());
  }

  function tick() {
    for (const td of document.querySelectorAll("[data-since]")) {
      td.textContent = since(Number(td.dataset.since));
    }
  }

  function live(text, cls) {
    $("live").textContent = text;
    $("live").className = "pill " + cls;
  }

  function connect() {
    const base = location.pathname.replace(/\/+$/, "");
    source = new EventSource(base + "/events");
    source.onopen = () => live("live", "up");
    source.onmessage = (ev) => {
      let st;
      try {
        st = JSON.parse(ev.data);
      } catch (e) {
        return;
      }
      render(st);
      live("live", "up");
    };
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        // Refused (too many pages open, or signed out): try again later.
        live("offline", "down");
        source.close();
        setTimeout(connect, 10000);
      } else {
        live("reconnecting…", "wait");
      }
    };
  }

  setInterval(tick, 1000);
  connect();
})();
