// GLB dashboard: renders what the server streams (/api/stream) and sends actions (/api/action).
// No inline script or style (the page's Content-Security-Policy forbids them); the DOM is built
// with createElement/textContent only, so no text from the deployment is ever parsed as HTML.
"use strict";

(function () {
  const CSRF = document.querySelector('meta[name="glb-csrf"]').content;
  const KEEP = 900; // samples: 15 minutes at one a second, as the server keeps them
  const TOKEN = "glb.token", WHO = "glb.who"; // sessionStorage keys: gone when the tab closes

  const CHARTS = [
    ["dns:", "DNS queries/s per dnsfront"],
    ["site_conns:", "Active connections per site"],
    ["site_pps:", "Packets/s per site"],
    ["server_conns:", "Active connections per real server"],
    ["server_pps:", "Packets/s per real server"],
    ["share:", "Answer share per name (0..1)"],
  ];
  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];

  let view = null;
  let streamOpen = false;
  const samples = { t: [], series: {} };
  const charts = {}; // prefix -> {plot, keys}
  const serverRows = {}; // key -> tr
  const siteCards = {}; // name -> div
  let shape = "";

  // ---------------------------------------------------------------- helpers

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k.startsWith("data-")) e.setAttribute(k, v);
      else e[k] = v;
    }
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  }
  const $ = (id) => document.getElementById(id);
  const fmt = (x, digits = 1) => (x === null || x === undefined ? "-" : Number(x).toFixed(digits).replace(/\.0+$/, ""));
  const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  const pct = (x) => Math.round(x * 100) + "%";
  const by = (ov) => (ov ? `by ${ov.who || "?"}` + (ov.why ? `: "${ov.why}"` : "") : "");

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }
  function badge(node, state) {
    setText(node, state);
    // Keep the element's own classes (how it is found), swap only the state's colour.
    for (const c of [...node.classList]) if (c.startsWith("state-")) node.classList.remove(c);
    node.classList.add("badge", "state-" + state.replace(/\s+/g, "-"));
  }

  // ---------------------------------------------------------------- sites and servers

  function shapeOf(v) {
    return JSON.stringify(v.sites.map((s) => [s.site, s.services.map((svc) => [svc.name, svc.real_servers.map((r) => r.key)])]));
  }

  function buildSites(v) {
    const root = $("sites");
    root.replaceChildren();
    for (const k of Object.keys(serverRows)) delete serverRows[k];
    for (const k of Object.keys(siteCards)) delete siteCards[k];
    for (const site of v.sites) {
      const card = el("div", { class: "site", id: "site-" + site.site, "data-site": site.site });
      const head = el("div", { class: "site-head" },
        el("h3", {}, site.site), el("span", { class: "badge site-state" }),
        el("span", { class: "spacer" }),
        el("button", { type: "button", class: "site-drain" }));
      head.querySelector(".site-drain").addEventListener("click", () => siteAction(site.site));
      card.append(head, el("dl", { class: "site-facts" }));
      for (const svc of site.services) {
        const table = el("table", { class: "servers" },
          el("thead", {}, el("tr", {}, ...["real server", "state", "weight", "active", "inactive", "new/s", "packets/s", "last check", ""].map((h) => el("th", {}, h)))),
          el("tbody"));
        for (const rs of svc.real_servers) {
          const tr = el("tr", { "data-server": rs.key },
            el("td", { class: "addr" }, rs.label), el("td", {}, el("span", { class: "badge state" })),
            el("td", { class: "weight" }), el("td", { class: "active" }), el("td", { class: "inactive" }),
            el("td", { class: "new" }), el("td", { class: "pps" }), el("td", { class: "check" }),
            el("td", { class: "actions" },
              el("button", { type: "button", class: "drain" }),
              el("button", { type: "button", class: "set-weight" }, "weight")));
          tr.querySelector(".drain").addEventListener("click", () => serverAction(rs.key, null));
          tr.querySelector(".set-weight").addEventListener("click", () => serverAction(rs.key, "weight"));
          table.tBodies[0].append(tr);
          serverRows[rs.key] = tr;
        }
        card.append(el("div", { class: "service", "data-service": svc.name },
          el("h4", {}, svc.name + " ", el("span", { class: "badge svc-state" }), " ", el("span", { class: "svc-facts" })),
          table));
      }
      root.append(card);
      siteCards[site.site] = card;
    }
  }

  function fillSites(v) {
    const s = shapeOf(v);
    if (s !== shape) {
      buildSites(v);
      shape = s;
    }
    for (const site of v.sites) {
      const card = siteCards[site.site];
      badge(card.querySelector(".site-state"), site.state);
      const drained = !!(site.override && site.override.drain);
      setText(card.querySelector(".site-drain"), drained ? "undrain site" : "drain site");
      const d = site.directors;
      const facts = [
        ["heartbeat age", site.age === null ? "-" : fmt(site.age) + " s"],
        ["active director", d.active || "-"],
        ["standby", d.standby.length ? d.standby.join(", ") : "-"],
        ["capacity", `${site.capacity.servers_up}/${site.capacity.servers} servers up, ${pct(site.capacity.healthy_fraction)} of weight`],
        ["load", `${site.load.active_conns} conns, ${fmt(site.load.new_conns_per_s)} new/s, ${fmt(site.load.packets_per_s)} packets/s`],
      ];
      if (site.override) facts.push(["override", (site.override.drain ? "drained " : "") + by(site.override)]);
      const dl = card.querySelector(".site-facts");
      const text = JSON.stringify(facts);
      if (dl.dataset.text !== text) {
        dl.dataset.text = text;
        dl.replaceChildren(...facts.flatMap(([k, val]) => [el("dt", {}, k), el("dd", {}, val)]));
      }
      for (const svc of site.services) {
        const box = card.querySelector(`.service[data-service="${CSS.escape(svc.name)}"]`);
        badge(box.querySelector(".svc-state"), svc.up ? "up" : "down");
        setText(box.querySelector(".svc-facts"), `${pct(svc.healthy_fraction)} healthy · ${svc.vips.join(", ")}`);
        for (const rs of svc.real_servers) fillServer(serverRows[rs.key], rs, v.now);
      }
    }
  }

  function fillServer(tr, rs, now) {
    badge(tr.querySelector(".state"), rs.state);
    const ov = rs.override;
    const w = tr.querySelector(".weight");
    setText(w, String(rs.weight) + (ov && ov.weight !== null ? "*" : ""));
    w.title = ov ? by(ov) : "";
    setText(tr.querySelector(".active"), String(rs.active_conns));
    setText(tr.querySelector(".inactive"), String(rs.inactive_conns));
    setText(tr.querySelector(".new"), fmt(rs.new_conns_per_s));
    setText(tr.querySelector(".pps"), fmt(rs.packets_per_s));
    const age = rs.last_check ? ` (${fmt(Math.max(0, now - rs.last_check))} s ago)` : "";
    setText(tr.querySelector(".check"), (rs.last_result || "-") + age);
    setText(tr.querySelector(".drain"), ov && ov.drain ? "undrain" : "drain");
    tr.title = ov ? `override ${by(ov)}` : "";
  }

  function fillNames(v) {
    const body = $("names").tBodies[0];
    body.replaceChildren(...v.names.map((n) => {
      const answers = n.kind === "servfail" ? "SERVFAIL" : n.members.map((m) =>
        m.live ? `${m.site} ${pct(m.share)} (${m.status})` : `${m.site} - (${m.status})`).join(", ");
      return el("tr", { "data-name": `${n.name} ${n.type}` },
        el("td", {}, n.name), el("td", {}, n.type), el("td", {}, n.policy), el("td", { class: "answers" }, answers),
        el("td", {}, n.ttls.join("/") || "-"), el("td", {}, n.reason));
    }));
  }

  function fillHeader(v) {
    const r = v.redis;
    const live = streamOpen && r.connected;
    badge($("live"), live ? "live" : "stale");
    setText($("version"), `state version ${v.version} · ${clock(v.now)}`);
    const stale = $("stale");
    if (!streamOpen) {
      stale.hidden = false;
      setText(stale, "The dashboard is unreachable: showing what it last sent; reconnecting.");
    } else if (!r.connected) {
      stale.hidden = false;
      const since = r.frozen_at ? ` as of ${clock(r.frozen_at)}` : "";
      setText(stale, r.synced
        ? `STALE: Redis is unreachable; showing the last state${since}. (${r.last_error || "no answer"})`
        : `No state yet: Redis is unreachable. (${r.last_error || "connecting"})`);
    } else {
      stale.hidden = true;
    }
  }

  function render(v) {
    view = v;
    fillHeader(v);
    fillSites(v);
    fillNames(v);
  }

  // ---------------------------------------------------------------- charts

  function addSample(s) {
    const n = samples.t.length;
    samples.t.push(s.t);
    for (const key of Object.keys(s.values)) if (!(key in samples.series)) samples.series[key] = new Array(n).fill(null);
    for (const [key, col] of Object.entries(samples.series)) col.push(key in s.values ? s.values[key] : null);
    if (samples.t.length > KEEP) {
      samples.t.splice(0, samples.t.length - KEEP);
      for (const col of Object.values(samples.series)) col.splice(0, col.length - KEEP);
    }
  }

  function drawCharts() {
    if (typeof uPlot === "undefined") return;
    const root = $("charts");
    for (const [prefix, title] of CHARTS) {
      const keys = Object.keys(samples.series).filter((k) => k.startsWith(prefix)).sort();
      const data = [samples.t, ...keys.map((k) => samples.series[k])];
      let c = charts[prefix];
      if (c && c.keys.join("\n") === keys.join("\n")) {
        c.plot.setData(data);
        continue;
      }
      if (c) c.plot.destroy();
      let box = root.querySelector(`[data-chart="${prefix}"]`);
      if (!box) {
        box = el("div", { class: "chart", "data-chart": prefix });
        root.append(box);
      }
      const plot = new uPlot({
        title, width: chartWidth(box), height: 180,
        scales: { x: { time: true } },
        series: [{}, ...keys.map((k, i) => ({ label: k.slice(prefix.length), stroke: PALETTE[i % PALETTE.length], width: 1.5 }))],
      }, data, box);
      charts[prefix] = { plot, keys };
    }
  }

  function chartWidth(box) {
    return Math.max(240, box.clientWidth - 10);
  }

  window.addEventListener("resize", () => {
    for (const [prefix, c] of Object.entries(charts)) {
      c.plot.setSize({ width: chartWidth($("charts").querySelector(`[data-chart="${prefix}"]`)), height: 180 });
    }
  });

  // ---------------------------------------------------------------- timeline

  function addEvents(events) {
    const ol = $("timeline");
    for (const e of events) {
      const who = e.who ? ` — by ${e.who}` + (e.why ? `: "${e.why}"` : "") : "";
      ol.prepend(el("li", { class: "event kind-" + e.kind, "data-kind": e.kind },
        el("time", {}, clock(e.t)), " ", el("span", { class: "badge" }, e.kind.replace(/_/g, " ")), " ",
        el("span", { class: "text" }, e.text + who)));
    }
    while (ol.children.length > 500) ol.lastChild.remove();
  }

  // ---------------------------------------------------------------- the stream

  function connect() {
    const es = new EventSource("/api/stream");
    es.addEventListener("open", () => { streamOpen = true; if (view) fillHeader(view); });
    es.addEventListener("error", () => { streamOpen = false; if (view) fillHeader(view); });
    es.addEventListener("init", (m) => {
      const d = JSON.parse(m.data);
      samples.t = d.samples.t;
      samples.series = d.samples.series;
      $("timeline").replaceChildren();
      addEvents(d.events);
      streamOpen = true;
      render(d.view);
      drawCharts();
    });
    es.addEventListener("view", (m) => render(JSON.parse(m.data)));
    es.addEventListener("sample", (m) => { addSample(JSON.parse(m.data)); drawCharts(); });
    es.addEventListener("events", (m) => addEvents(JSON.parse(m.data)));
  }

  // ---------------------------------------------------------------- actions

  function say(text, ok) {
    const m = $("message");
    m.hidden = false;
    m.className = "banner " + (ok ? "ok" : "error");
    setText(m, text);
  }

  function signedIn() {
    const who = sessionStorage.getItem(WHO), token = sessionStorage.getItem(TOKEN);
    $("sign-in").hidden = !!token;
    $("sign-out").hidden = !token;
    $("signed-in").hidden = !token;
    setText($("signed-in"), token ? `signed in as ${who}` : "");
    return token ? { who, token } : null;
  }

  let afterSignIn = null;
  function askSignIn(then) {
    afterSignIn = then;
    $("who").value = sessionStorage.getItem(WHO) || "";
    $("token").value = "";
    $("sign-in-dialog").showModal();
  }

  function withSignIn(fn) {
    if (signedIn()) fn();
    else askSignIn(fn);
  }

  let pending = null; // {title, weight: bool, body}
  function askAction(title, weightField, body) {
    pending = { body, weightField };
    setText($("action-title"), title);
    $("weight-row").hidden = !weightField;
    $("weight").value = "";
    $("why").value = "";
    $("action-dialog").showModal();
  }

  function serverAction(key, kind) {
    withSignIn(() => {
      const [site, service] = key.split("/");
      let rs = null;
      for (const s of view.sites) for (const svc of s.services) for (const r of svc.real_servers) if (r.key === key) rs = r;
      const body = { site, service, server: rs.label };
      if (kind === "weight") return askAction(`Set the weight of ${key}`, true, { ...body, action: "weight" });
      const draining = rs.override && rs.override.drain;
      askAction(`${draining ? "Undrain" : "Drain"} ${key}`, false, { ...body, action: draining ? "undrain" : "drain" });
    });
  }

  function siteAction(name) {
    withSignIn(() => {
      const site = view.sites.find((s) => s.site === name);
      const drained = !!(site.override && site.override.drain);
      askAction(`${drained ? "Undrain" : "Drain"} site ${name}`, false, { site: name, action: drained ? "undrain_site" : "drain_site" });
    });
  }

  async function send(body) {
    const auth = signedIn();
    if (!auth) return askSignIn(() => send(body));
    $("message").hidden = true; // the answer to this action replaces the last one
    let answer, status;
    try {
      const r = await fetch("/api/action", {
        method: "POST", credentials: "same-origin", cache: "no-store",
        headers: { "Content-Type": "application/json", "Authorization": "Bearer " + auth.token, "X-GLB-CSRF": CSRF },
        body: JSON.stringify({ ...body, who: auth.who }),
      });
      status = r.status;
      answer = await r.json();
    } catch (e) {
      return say(`The dashboard did not answer: ${e.message}`, false);
    }
    if (status === 200) return say(`Done: ${answer.message} (state version ${answer.version})`, true);
    if (status === 401 || / \(401\)/.test(answer.error || "")) {
      sessionStorage.removeItem(TOKEN); // a refused token is not kept
      signedIn();
      return say(`Token refused: ${answer.error}`, false);
    }
    say(`Refused: ${answer.error || "HTTP " + status}`, false);
  }

  function wireDialogs() {
    for (const d of document.querySelectorAll("dialog")) {
      d.querySelector(".cancel").addEventListener("click", () => d.close());
    }
    $("sign-in-form").addEventListener("submit", () => {
      sessionStorage.setItem(WHO, $("who").value.trim());
      sessionStorage.setItem(TOKEN, $("token").value.trim());
      $("token").value = "";
      signedIn();
      const then = afterSignIn;
      afterSignIn = null;
      if (then) then();
    });
    $("action-form").addEventListener("submit", () => {
      const body = { ...pending.body, why: $("why").value.trim() };
      if (pending.weightField) {
        const w = $("weight").value.trim();
        body.weight = w === "" ? null : Number(w);
        if (w !== "" && !(Number.isInteger(body.weight) && body.weight >= 0 && body.weight <= 65535)) {
          return say(`Weight must be a whole number 0..65535, or empty to clear the override (got "${w}")`, false);
        }
      }
      send(body);
    });
    $("sign-in").addEventListener("click", () => askSignIn(null));
    $("sign-out").addEventListener("click", () => { sessionStorage.removeItem(TOKEN); signedIn(); });
  }

  document.addEventListener("DOMContentLoaded", () => {
    wireDialogs();
    signedIn();
    connect();
  });
})();
