// Ember's dashboard: polls GET /admin/dashboard every 2 s with the key kept in sessionStorage.
// Charts are uPlot (vendored beside this file). Every text from the server goes in as textContent.
"use strict";
(function () {
  const KEY = "emberKey", POLL_MS = 2000;
  const $ = id => document.getElementById(id);
  const charts = new Map();  // model -> {traffic, latency}
  let timer = null, inFlight = false;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }
  const fmt = (x, digits = 1) => x == null ? "–" : x !== 0 && Math.abs(x) < Math.pow(10, -digits) ? Number(x).toExponential(1) : Number(x).toFixed(digits);
  const pct = x => x == null ? "–" : (100 * x).toFixed(1) + "%";
  const ago = at => { const s = Math.max(0, Date.now() / 1000 - at); return s < 90 ? s.toFixed(0) + " s ago" : (s / 60).toFixed(0) + " min ago"; };
  const bytes = b => b >= 1e9 ? (b / 1e9).toFixed(2) + " GB" : b >= 1e6 ? (b / 1e6).toFixed(1) + " MB" : (b / 1e3).toFixed(1) + " kB";

  // -- signing in ------------------------------------------------------------------------------
  function showSignIn(message) {
    stop();
    $("main").hidden = true; $("signout").hidden = true; $("signin").hidden = false;
    $("signin-error").textContent = message || "";
    $("who").textContent = "";
    $("key").focus();
  }
  $("signin-form").addEventListener("submit", event => {
    event.preventDefault();
    const key = $("key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY, key);
    $("key").value = "";
    start();
  });
  $("signout").addEventListener("click", () => { sessionStorage.removeItem(KEY); showSignIn("Signed out."); });
  $("window").addEventListener("change", () => refresh());

  function start() {
    $("signin").hidden = true;
    stop();
    refresh();
    timer = setInterval(refresh, POLL_MS);
  }
  function stop() { if (timer !== null) { clearInterval(timer); timer = null; } }

  async function refresh() {
    const key = sessionStorage.getItem(KEY);
    if (!key) { showSignIn(""); return; }
    if (inFlight) return;
    inFlight = true;
    try {
      const r = await fetch("/admin/dashboard?cost_s=" + $("window").value,
        {headers: {Authorization: "Bearer " + key}, cache: "no-store"});
      if (r.status === 401) { sessionStorage.removeItem(KEY); showSignIn("That key was not accepted: check it and sign in again."); return; }
      const body = await r.json();
      if (!r.ok) { notice(`The server answered ${r.status}: ${body.error || "no reason given"}`); return; }
      render(body);
    } catch (e) {
      notice("Cannot reach the server (" + e.message + "); retrying every 2 s.");
    } finally { inFlight = false; }
  }
  function notice(text) { $("notice").hidden = !text; $("notice").textContent = text || ""; }

  // -- rendering -------------------------------------------------------------------------------
  function render(d) {
    notice("");
    $("main").hidden = false; $("signout").hidden = false;
    $("who").textContent = d.tenant ? `tenant ${d.tenant} · ${d.role} key` : `${d.role} key · all tenants`;
    tiles(d);
    models(d);
    cost(d.usage);
    cluster(d.cluster);
    errors(d.errors);
  }

  function tiles(d) {
    const last = m => m.series.rps.slice(-3).reduce((a, b) => a + b, 0) / 3;
    const rps = d.models.reduce((a, m) => a + last(m), 0);
    const hot = d.models.filter(m => m.tier === "hot").length;
    const u = d.usage.total;
    const always = d.usage.models.reduce((a, m) => a + (m.always_on ? m.always_on.device_seconds : 0), 0);
    const saved = always > 0 ? 1 - u.device_seconds / always : null;
    const tile = (v, k, id) => el("div", {class: "tile", id}, el("div", {class: "v"}, v), el("div", {class: "k"}, k));
    $("tiles").replaceChildren(
      tile(String(d.models.length), `models · ${hot} hot`, "tile-models"),
      tile(fmt(rps, 1), "requests / s (last 15 s)", "tile-rps"),
      tile(fmt(u.device_seconds, 0), "device-seconds in the cost window", "tile-cost"),
      tile(saved == null ? "–" : pct(saved), "saved against always on", "tile-saved"),
      tile(String(d.errors.length), "recent errors", "tile-errors"));
  }

  function models(d) {
    const seen = new Set();
    const root = $("models");
    if (!d.models.length) {
      root.replaceChildren(el("p", {class: "muted"}, "No models to show" + (d.tenant ? ` for tenant ${d.tenant}` : "") +
        ": deploy one with `ember deploy SOURCE`."));
    } else if (root.querySelector("p")) root.replaceChildren();
    for (const m of d.models) {
      seen.add(m.name);
      let card = root.querySelector(`[data-model="${CSS.escape(m.name)}"]`);
      if (!card) { card = modelCard(m); root.append(card); }
      fillCard(card, m, d);
    }
    for (const card of [...root.querySelectorAll(".model")]) {
      if (!seen.has(card.dataset.model)) {
        const c = charts.get(card.dataset.model);
        if (c) { c.traffic.destroy(); c.latency.destroy(); charts.delete(card.dataset.model); }
        card.remove();
      }
    }
  }

  function modelCard(m) {
    const card = el("div", {class: "model", "data-model": m.name},
      el("div", {class: "head"}, el("span", {class: "name"}, m.name), el("span", {class: "badge tier-badge"}),
        el("span", {class: "small"}, "tenant " + m.tenant)),
      el("div", {class: "facts"}),
      el("div", {class: "traffic chart"}), el("div", {class: "latency chart"}),
      el("div", {class: "small"}, "tier over the last 5 minutes"), el("div", {class: "timeline"}),
      el("div", {class: "legend"}, ...["hot", "warm", "cool"].map(t => el("span", {}, el("i", {style: `background:var(--${t})`}), t))),
      el("div", {class: "small coldstarts"}), el("div", {class: "small refusals"}));
    const width = 400, height = 130;
    const axes = [{stroke: "#6b7385", grid: {stroke: "#eef0f4"}}, {stroke: "#6b7385", grid: {stroke: "#eef0f4"}, size: 46}];
    const spanGaps = false;
    const traffic = new uPlot({width, height, axes, legend: {live: false},
      series: [{}, {label: "req/s", stroke: "#4e6ef2", fill: "rgba(78,110,242,.12)", width: 2, spanGaps},
        {label: "refused/s", stroke: "#d64545", width: 2}]}, [[], [], []], card.querySelector(".traffic"));
    const latency = new uPlot({width, height, axes, legend: {live: false}, scales: {y: {distr: 3}},
      series: [{}, {label: "p50 ms", stroke: "#2e9e5b", width: 2, spanGaps: true, points: {show: true, size: 4}},
        {label: "p99 ms", stroke: "#e4572e", width: 2, spanGaps: true, points: {show: true, size: 4}},
        {label: "SLO", stroke: "#9aa0b0", dash: [6, 4], width: 1.5}]}, [[], [], [], []], card.querySelector(".latency"));
    charts.set(m.name, {traffic, latency});
    return card;
  }

  function fillCard(card, m, d) {
    const badge = card.querySelector(".tier-badge");
    badge.textContent = m.tier; badge.className = "badge tier-badge " + m.tier;
    card.dataset.tier = m.tier;
    const s = m.series;
    const answered = s.attainment.filter(x => x != null);
    const attained = answered.length ? answered.reduce((a, b) => a + b, 0) / answered.length : null;
    const fact = (k, v, cls) => el("span", {}, k + " ", el("b", cls ? {class: cls} : {}, v));
    card.querySelector(".facts").replaceChildren(
      fact("SLO", m.slo_ms + " ms"),
      fact("met (5 min)", pct(attained), attained == null ? "" : attained >= 0.99 ? "good" : "bad"),
      fact("instances", m.instances), fact("queued", m.queued), fact("requests", m.requests),
      fact("failed", m.failed));
    const c = charts.get(m.name);
    const slo = s.t.map(() => m.slo_ms);
    c.traffic.setData([s.t, s.rps, s.refused.map(n => n == null ? null : n / d.step_s)]);
    c.latency.setData([s.t, s.p50_ms, s.p99_ms, slo]);
    const points = s.rps.filter(x => x > 0).length;
    card.querySelector(".traffic").dataset.points = String(points);
    timeline(card.querySelector(".timeline"), m.tiers, d.now);
    const colds = m.cold_starts.slice(-4).reverse().map(c => `${c.tier} → hot in ${(c.seconds * 1000).toFixed(0)} ms (${ago(c.at)})`);
    card.querySelector(".coldstarts").textContent = "cold starts: " + (colds.length ? colds.join(" · ") :
      m.last_cold_start ? `none in 5 min; last from ${m.last_cold_start.tier}, ${(m.last_cold_start.seconds * 1000).toFixed(0)} ms` : "none");
    const reasons = Object.entries(s.refusals[0] || {});
    card.querySelector(".refusals").textContent = "refusals and errors: " +
      (reasons.length ? reasons.map(([k, v]) => `${k} ${v}`).join(" · ") : "none in 5 min");
  }

  function timeline(node, tiers, now) {
    const start = tiers[0][0], span = Math.max(1, now - start);
    node.replaceChildren(...tiers.map(([from, tier], i) => {
      const to = i + 1 < tiers.length ? tiers[i + 1][0] : now;
      return el("div", {class: tier, "data-tier": tier, title: `${tier} from ${new Date(from * 1000).toLocaleTimeString()}`,
        style: `width:${(100 * Math.max(0, to - from) / span).toFixed(2)}%`});
    }));
  }

  function cost(u) {
    const head = cols => el("tr", {}, ...cols.map((c, i) => el("th", i < 2 ? {class: "l"} : {}, c)));
    const rows = u.models.map(m => {
      const always = m.always_on ? m.always_on.device_seconds : null;
      const share = always ? Math.min(1, m.device_seconds / always) : null;
      const bar = el("span", {class: "bar back"}, el("span", {class: "bar", style: `width:${share == null ? 0 : (100 * share).toFixed(1)}%`}));
      return el("tr", {"data-model": m.model}, el("td", {}, m.model), el("td", {class: "l"}, m.tenant),
        el("td", {}, fmt(m.device_seconds)), el("td", {}, fmt(m.device_gb_seconds, 3)), el("td", {}, fmt(m.host_gb_seconds, 3)),
        el("td", {}, m.requests), el("td", {}, always == null ? "–" : fmt(always)),
        el("td", {}, bar, " ", share == null ? "" : pct(share)));
    });
    $("cost-models").replaceChildren(head(["model", "tenant", "device-s", "device GB-s", "host GB-s", "requests",
      "always-on device-s", "of always on"]), ...(rows.length ? rows : [el("tr", {}, el("td", {colspan: 8, class: "l muted"}, "nothing metered in this window"))]));
    $("cost-tenants").replaceChildren(head(["tenant", "", "device-s", "device GB-s", "host GB-s", "requests"]),
      ...u.tenants.map(t => el("tr", {}, el("td", {}, t.tenant), el("td", {}, ""), el("td", {}, fmt(t.device_seconds)),
        el("td", {}, fmt(t.device_gb_seconds, 3)), el("td", {}, fmt(t.host_gb_seconds, 3)), el("td", {}, t.requests))));
  }

  function cluster(c) {
    const root = $("cluster");
    if (!c) { root.replaceChildren(el("p", {class: "muted"}, "Workers and devices are shown to admin keys; this key sees its own tenant's models.")); return; }
    const table = el("table", {}, el("tr", {}, ...["worker", "pid", "device", "alive", "in flight", "weights held", "models resident"].map(
      (h, i) => el("th", i === 0 || i === 6 ? {class: "l"} : {}, h))),
      ...c.workers.map(w => el("tr", {}, el("td", {}, w.id), el("td", {}, w.pid), el("td", {}, w.device),
        el("td", {class: w.alive ? "good" : "bad"}, w.alive ? "yes" : "no"), el("td", {}, w.in_flight),
        el("td", {}, bytes(w.weights_bytes) + (c.device_memory_bytes ? " of " + bytes(c.device_memory_bytes) : "")),
        el("td", {class: "wrap"}, w.models.map(m => m.model).join(", ") || "–"))));
    const st = c.store;
    const open = new Set([...root.querySelectorAll("details[open]")].map(x => x.dataset.worker));
    const logs = c.workers.map(w => {
      const d = el("details", {"data-worker": w.id}, el("summary", {}, `end of worker ${w.id}'s log` + (w.models.length ? ` (${w.models.map(m => m.model).join(", ")})` : "")),
        el("pre", {class: "log"}, (w.log_tail || []).join("\n") || "(empty)"));
      if (open.has(w.id)) d.open = true;
      return d;
    });
    root.replaceChildren(el("p", {class: "small"}, `${c.ready}/${c.size} workers ready · warm tier ${st.warm.models} models, ${bytes(st.warm.bytes)} · cool tier ${st.cool.models} models, ${bytes(st.cool.bytes)}`), table, ...logs);
  }

  function errors(list) {
    $("errors").replaceChildren(el("tr", {}, ...["when", "model", "status", "request id", "error"].map((h, i) => el("th", i === 4 || i === 1 ? {class: "l"} : {}, h))),
      ...(list.length ? list.map(e => el("tr", {}, el("td", {}, ago(e.at)), el("td", {class: "l"}, e.model || "–"), el("td", {}, `${e.status} ${e.reason || ""}`),
        el("td", {}, e.id), el("td", {class: "wrap"}, e.error))) : [el("tr", {}, el("td", {colspan: 5, class: "l muted"}, "no errors recently"))]));
  }

  if (sessionStorage.getItem(KEY)) start(); else showSignIn("");
})();
