// The devmesh dashboard: a small single-page app over the same /api/v2 the
// CLI uses. No build step and no framework: DOM built with `h()` (text is
// always text, never HTML), pages chosen by path, live workspace status
// from one server-sent event stream.

const main = document.getElementById("main");
let me = null;
// The user's preferences, kept by the server (the pinned region).
let prefs = { region: null };

// --- DOM ---------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

let navigated = false;

function page(title, ...children) {
  document.title = `${title} · devmesh`;
  main.replaceChildren(h("h1", {}, title), ...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  // After a navigation within the app, focus moves to the new content (as
  // a page load would put it at the top, where the skip link is).
  if (navigated) main.focus({ preventScroll: true });
}

function toast(text) {
  const t = h("div", {}, text);
  document.getElementById("toast").append(t);
  setTimeout(() => t.remove(), 6000);
}

function table(headers, rows, label) {
  return h("div", { class: "table-wrap" },
    h("table", { "aria-label": label },
      h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))),
      h("tbody", {}, rows)));
}

function when(t) {
  return t ? new Date(t).toLocaleString() : "—";
}

// --- API ---------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    const detail = body && body.detail ? ` (${body.detail})` : "";
    super((body && body.message ? body.message : `HTTP ${status}`) + detail);
    this.status = status;
    this.body = body;
  }
}

async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(`/api/v2${path}`, init);
  const text = await resp.text();
  const json = text ? JSON.parse(text) : null;
  if (resp.status === 401 && path !== "/users/login") {
    location.assign(`/login?redirect=${encodeURIComponent(location.pathname + location.search)}`);
    throw new ApiError(401, json);
  }
  if (!resp.ok) throw new ApiError(resp.status, json);
  return json;
}

// --- Regions: the nearest healthy one, stable, or the user's pin ------

const REGION_CACHE_MS = 10 * 60 * 1000;

async function probe(url) {
  let best = Infinity;
  for (let i = 0; i < 3; i++) {
    const t = performance.now();
    const r = await fetch(`${url.replace(/\/$/, "")}/latency-check`, { mode: "cors", cache: "no-store" });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    best = Math.min(best, performance.now() - t);
  }
  return best;
}

async function measuredRegions(fresh = false) {
  const key = "devmesh.regions";
  const cached = JSON.parse(sessionStorage.getItem(key) || "null");
  if (!fresh && cached && Date.now() - cached.at < REGION_CACHE_MS) return cached.regions;
  const { regions } = await api("GET", "/regions");
  await Promise.all(regions.map(async (r) => {
    r.rtt = null;
    if (!r.healthy || !r.access_url) return;
    const url = r.name === "primary" ? location.origin : r.access_url;
    try { r.rtt = await probe(url); } catch (e) { r.error = String(e); }
  }));
  sessionStorage.setItem(key, JSON.stringify({ at: Date.now(), regions }));
  return regions;
}

function pinKey() { return `devmesh.region.${me ? me.id : ""}`; }

// The region app links go through: the pinned one if it is healthy, else
// the nearest. The last choice is kept unless another is clearly nearer
// (20% and 5 ms), so close regions do not flap.
function chooseRegion(regions) {
  const usable = regions.filter((r) => r.healthy && r.wildcard_hostname && r.rtt !== null);
  const pin = usable.find((r) => r.name === prefs.region);
  if (pin) return pin;
  if (usable.length === 0) return regions.find((r) => r.name === "primary");
  usable.sort((a, b) => a.rtt - b.rtt);
  const last = usable.find((r) => r.name === localStorage.getItem(`${pinKey()}.last`));
  let choice = usable[0];
  if (last && !(choice.rtt < last.rtt * 0.8 && last.rtt - choice.rtt > 5)) choice = last;
  localStorage.setItem(`${pinKey()}.last`, choice.name);
  return choice;
}

function appUrl(region, ws, agent, app) {
  const base = region.name === "primary" ? location.origin : region.access_url;
  const u = new URL(base);
  let suffix = region.wildcard_hostname.replace(/^\*\./, "");
  if (!suffix.includes(":") && u.port) suffix += `:${u.port}`;
  return `${u.protocol}//${app.slug}--${agent.name}--${ws.name}--${ws.owner_name}.${suffix}/`;
}

// --- Live workspace status ---------------------------------------------

const watchers = new Set();
let events = null;

function watch(fn) {
  watchers.add(fn);
  if (!events) {
    events = new EventSource("/api/v2/workspaces/watch");
    events.addEventListener("workspace", (e) => {
      const ws = JSON.parse(e.data);
      for (const w of watchers) w({ workspace: ws });
    });
    events.addEventListener("deleted", (e) => {
      for (const w of watchers) w({ deleted: JSON.parse(e.data).id });
    });
    events.addEventListener("resync", () => {
      for (const w of watchers) w({ resync: true });
    });
  }
  return () => watchers.delete(fn);
}

function buildState(ws) {
  const b = ws.latest_build;
  if (b.status === "pending" || b.status === "running") {
    return { text: `${b.transition === "start" ? "starting" : b.transition === "stop" ? "stopping" : "deleting"}…`, cls: "busy" };
  }
  if (b.status === "failed") return { text: `${b.transition} failed`, cls: "bad" };
  if (b.status === "canceled") return { text: `${b.transition} canceled`, cls: "bad" };
  if (b.transition === "stop") return { text: "stopped", cls: "" };
  const agents = ws.agents || [];
  if (agents.length && agents.every((a) => a.status === "connected" && a.lifecycle_state === "ready")) {
    return { text: "running · ready", cls: "ok" };
  }
  if (agents.some((a) => a.status === "connected")) return { text: "running · starting", cls: "busy" };
  return { text: "running · waiting for agents", cls: "busy" };
}

// --- Pages ---------------------------------------------------------------

async function workspacesPage() {
  const all = new Map();
  const search = h("input", { type: "search", id: "ws-search", placeholder: "name, owner or template" });
  const body = h("tbody");
  const render = () => {
    const q = search.value.trim().toLowerCase();
    const rows = [...all.values()]
      .filter((w) => !q || `${w.owner_name}/${w.name} ${w.template_name}`.toLowerCase().includes(q))
      .sort((a, b) => `${a.owner_name}/${a.name}`.localeCompare(`${b.owner_name}/${b.name}`))
      .map((w) => {
        const s = buildState(w);
        return h("tr", { "data-workspace": w.name },
          h("td", {}, h("a", { href: `/workspaces/${w.id}` }, w.name)),
          h("td", { class: "optional" }, w.owner_name),
          h("td", { class: "optional" }, w.template_name),
          h("td", {}, h("span", { class: `status ${s.cls}`, "data-status": s.text }, s.text)),
          h("td", { class: "optional" }, when(w.updated_at)));
      });
    body.replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 5 }, all.size ? "No workspace matches." : "No workspaces yet."))]));
  };
  search.addEventListener("input", render);
  page("Workspaces",
    h("div", { class: "row" },
      h("a", { class: "button primary", href: "/workspaces/new" }, "Create workspace"),
      h("label", { for: "ws-search", class: "hint" }, "Filter"), search),
    h("div", { class: "table-wrap" }, h("table", { "aria-label": "Workspaces" },
      h("thead", {}, h("tr", {}, ["Name", "Owner", "Template", "Status", "Updated"].map((x, i) => h("th", { scope: "col", class: i === 0 || i === 3 ? null : "optional" }, x)))),
      body)));
  const load = async () => {
    const { workspaces } = await api("GET", "/workspaces");
    all.clear();
    for (const w of workspaces) all.set(w.id, w);
    render();
  };
  await load();
  return watch((m) => {
    if (m.workspace) { all.set(m.workspace.id, m.workspace); render(); }
    if (m.deleted) { all.delete(m.deleted); render(); }
    if (m.resync) load();
  });
}

function paramField(p, value, onchange) {
  const id = `param-${p.name}`;
  const err = h("div", { class: "field-error", id: `${id}-error`, "aria-live": "polite" });
  const check = (v) => {
    let msg = "";
    if (v === "" && (p.default === null || p.default === undefined)) msg = "Required.";
    else if (p.type === "number" && v !== "" && Number.isNaN(Number(v))) msg = "Must be a number.";
    else if (p.type === "number" && v !== "" && p.validation_min !== null && Number(v) < p.validation_min) msg = `At least ${p.validation_min}.`;
    else if (p.type === "number" && v !== "" && p.validation_max !== null && Number(v) > p.validation_max) msg = `At most ${p.validation_max}.`;
    else if (p.validation_regex && v !== "") {
      try { if (!new RegExp(p.validation_regex).test(v)) msg = `Must match ${p.validation_regex}.`; } catch (_) { /* the server checks */ }
    } else if (p.type === "bool" && v !== "" && v !== "true" && v !== "false") msg = "true or false.";
    err.textContent = msg;
    input.setAttribute("aria-invalid", msg ? "true" : "false");
    onchange(p.name, v, !msg);
  };
  let input;
  if (p.options && p.options.length) {
    input = h("select", { id, name: p.name, "aria-describedby": `${id}-error` },
      p.options.map((o) => h("option", { value: o, selected: o === value }, o)));
  } else {
    input = h("input", { id, name: p.name, value: value ?? "", placeholder: p.default ?? "", "aria-describedby": `${id}-error` });
  }
  input.addEventListener("input", () => check(input.value));
  setTimeout(() => check(input.value));
  return h("div", {},
    h("label", { for: id }, p.name, p.description ? h("span", { class: "hint" }, ` — ${p.description}`) : null), input, err);
}

async function createPage() {
  const { templates } = await api("GET", "/templates");
  if (!templates.length) {
    page("Create workspace", h("p", {}, "There are no templates yet. Push one with ", h("code", {}, "devmesh templates push"), "."));
    return;
  }
  const values = {}; const valid = {};
  const name = h("input", { id: "ws-name", name: "name", required: true, autocomplete: "off", pattern: "[a-z0-9][a-z0-9\\-]*" });
  const nameErr = h("div", { class: "field-error", "aria-live": "polite" });
  const select = h("select", { id: "ws-template" }, templates.map((t) => h("option", { value: t.name }, t.name)));
  const params = h("div");
  const submit = h("button", { class: "primary", type: "submit" }, "Create");
  const refresh = () => {
    const ok = /^[a-z0-9][a-z0-9-]{0,31}$/.test(name.value) && Object.values(valid).every(Boolean);
    nameErr.textContent = name.value && !/^[a-z0-9][a-z0-9-]{0,31}$/.test(name.value) ? "Lowercase letters, digits and dashes." : "";
    submit.disabled = !ok;
  };
  const showParams = () => {
    const t = templates.find((x) => x.name === select.value);
    for (const k of Object.keys(values)) delete values[k];
    for (const k of Object.keys(valid)) delete valid[k];
    params.replaceChildren(...t.active_version.parameters.map((p) => paramField(p, p.default, (n, v, ok) => { values[n] = v; valid[n] = ok; refresh(); })));
    refresh();
  };
  name.addEventListener("input", refresh);
  select.addEventListener("change", showParams);
  const form = h("form", {
    onsubmit: async (e) => {
      e.preventDefault();
      submit.disabled = true;
      const parameters = {};
      for (const [k, v] of Object.entries(values)) if (v !== "") parameters[k] = v;
      try {
        const resp = await api("POST", "/workspaces", { name: name.value, template: select.value, parameters });
        if (resp.agent_tokens && resp.agent_tokens.length) sessionStorage.setItem(`devmesh.tokens.${resp.workspace.id}`, JSON.stringify(resp.agent_tokens));
        navigate(`/workspaces/${resp.workspace.id}`);
      } catch (err) { toast(err.message); submit.disabled = false; }
    },
  },
  h("label", { for: "ws-name" }, "Name"), name, nameErr,
  h("label", { for: "ws-template" }, "Template"), select,
  h("h2", {}, "Parameters"), params,
  h("div", { class: "row" }, submit));
  page("Create workspace", form);
  showParams();
}

async function workspacePage(id) {
  let ws = await api("GET", `/workspaces/${id}`);
  const regions = await measuredRegions().catch(() => []);
  const region = chooseRegion(regions);
  const status = h("span", { class: "status", id: "ws-status" });
  const agents = h("div");
  const log = h("pre", { class: "log", id: "build-log", "aria-label": "Build log" });
  const actions = h("div", { class: "row" });
  let following = null;
  // A restart is a stop, then a start once the stop has succeeded.
  let restarting = false;
  const transition = async (t, update = false) => {
    try {
      await api("POST", `/workspaces/${id}/builds`, { transition: t, update });
      toast(`${update ? "update" : t} requested`);
    } catch (e) { toast(e.message); }
  };
  const history = h("div");
  const showHistory = async () => {
    const builds = await api("GET", `/workspaces/${id}/builds`).catch(() => []);
    history.replaceChildren(table(["Build", "Transition", "Status", "Parameters", "Started", "Ended", ""], builds.map((b) => h("tr", { "data-build": b.build_number },
      h("td", {}, String(b.build_number)), h("td", {}, b.transition), h("td", {}, b.status + (b.error ? `: ${b.error}` : "")),
      h("td", { class: "optional" }, Object.entries(b.parameters || {}).map(([k, v]) => `${k}=${v}`).join(", ") || "—"),
      h("td", {}, when(b.created_at)), h("td", { class: "optional" }, when(b.completed_at)),
      h("td", {}, b.job_id ? h("button", { type: "button", onclick: () => { following = null; logTitle.textContent = `Build ${b.build_number}: ${b.transition}`; followLogs(b.job_id); } }, "Log") : ""))), "Builds"));
  };
  const logTitle = h("h2", {}, `Build ${ws.latest_build.build_number}: ${ws.latest_build.transition}`);
  // Each agent's startup-script output, fetched while its scripts run.
  const scriptLogs = new Map();
  const followScripts = async (agent, pre) => {
    let after = 0;
    for (;;) {
      if (!document.body.contains(pre)) return;
      let r;
      try { r = await api("GET", `/workspaceagents/${agent.id}/logs?after=${after}`); } catch (_) { return; }
      for (const l of r.logs) { pre.textContent += `${l.output}\n`; after = l.id; }
      if (!["created", "starting"].includes(r.lifecycle_state)) return;
      await new Promise((res) => setTimeout(res, 1000));
    }
  };
  const followLogs = async (job) => {
    if (following === job) return;
    following = job;
    log.textContent = "";
    let after = 0;
    // While the build runs, fetch new lines each second; then stop.
    for (;;) {
      if (following !== job) return;
      let r;
      try { r = await api("GET", `/jobs/${job}/logs?after=${after}`); } catch (_) { return; }
      for (const l of r.logs) { log.textContent += `${l.line}\n`; after = l.id; }
      if (r.waiting) log.textContent += `(${r.waiting})\n`;
      log.scrollTop = log.scrollHeight;
      if (!["pending", "running", "canceling"].includes(r.status)) return;
      await new Promise((res) => setTimeout(res, 1000));
    }
  };
  const render = () => {
    if (restarting && ws.latest_build.transition === "stop" && ws.latest_build.status === "succeeded") {
      restarting = false;
      transition("start");
    }
    const s = buildState(ws);
    status.className = `status ${s.cls}`;
    status.textContent = s.text;
    const busy = ["pending", "running"].includes(ws.latest_build.status);
    const stopped = ws.latest_build.transition === "stop";
    actions.replaceChildren(
      h("button", { type: "button", disabled: busy || !stopped, onclick: () => transition("start") }, "Start"),
      h("button", { type: "button", disabled: busy || stopped, onclick: () => transition("stop") }, "Stop"),
      h("button", { type: "button", disabled: busy || stopped, onclick: () => { restarting = true; transition("stop"); } }, "Restart"),
      h("button", { type: "button", disabled: busy || stopped, onclick: () => transition("start", true) }, "Update"),
      h("button", { type: "button", class: "danger", disabled: busy, onclick: () => { if (confirm(`Delete workspace ${ws.name}? Its files go with it.`)) transition("delete"); } }, "Delete"));
    showHistory();
    const tokens = JSON.parse(sessionStorage.getItem(`devmesh.tokens.${id}`) || "[]");
    agents.replaceChildren(...(ws.agents.length ? ws.agents.map((a) => h("section", { "aria-label": `Agent ${a.name}` },
      h("h2", {}, `Agent ${a.name}`),
      h("dl", { class: "facts" },
        h("dt", {}, "Status"), h("dd", { "data-agent-status": a.name }, `${a.status} · ${a.lifecycle_state}`),
        h("dt", {}, "Region"), h("dd", {}, a.relay_region || "—"),
        h("dt", {}, "Connected"), h("dd", {}, when(a.last_connected_at))),
      a.status === "connected" ? h("p", {}, h("a", { class: "button", href: `/workspaces/${id}/terminal/${a.id}` }, "Open terminal")) : null,
      tokens.find((t) => t.agent_id === a.id) && a.status !== "connected"
        ? h("p", {}, "Run the agent where the workspace lives: ", h("code", { class: "secret" }, `DEVMESH_URL=${location.origin} DEVMESH_AGENT_TOKEN=${tokens.find((t) => t.agent_id === a.id).token} devmesh agent`))
        : null,
      a.apps.length ? h("ul", { "aria-label": "Apps" }, a.apps.map((app) => h("li", {},
        app.subdomain && region && region.wildcard_hostname
          ? h("a", { href: appUrl(region, ws, a, app), target: "_blank", rel: "noopener", "data-app": app.slug }, app.display_name || app.slug)
          : /^https?:\/\//.test(app.url) ? h("a", { href: app.url, target: "_blank", rel: "noopener", "data-app": app.slug }, app.display_name || app.slug) : app.display_name || app.slug,
        app.health && app.health !== "disabled" ? ` (${app.health})` : ""))) : null,
      (() => {
        if (!scriptLogs.has(a.id)) {
          const pre = h("pre", { class: "log", "aria-label": `Startup script output of ${a.name}` });
          scriptLogs.set(a.id, pre);
          setTimeout(() => followScripts(a, pre));
        }
        return h("details", {}, h("summary", {}, "Startup scripts' output"), scriptLogs.get(a.id));
      })()))
      : [h("p", {}, ws.latest_build.transition === "stop" ? "Stopped: no agents." : "No agents yet.")]));
    if (ws.latest_build.job_id && following !== ws.latest_build.job_id) {
      logTitle.textContent = `Build ${ws.latest_build.build_number}: ${ws.latest_build.transition}`;
      followLogs(ws.latest_build.job_id);
    }
  };
  page(`${ws.owner_name}/${ws.name}`,
    h("dl", { class: "facts" },
      h("dt", {}, "Status"), h("dd", {}, status),
      h("dt", {}, "Template"), h("dd", {}, ws.template_name),
      h("dt", {}, "Apps through"), h("dd", {}, region ? `${region.name}${region.rtt ? ` (${region.rtt.toFixed(1)} ms)` : ""} — `
        : "", h("a", { href: "/regions" }, "change"))),
    actions, agents,
    logTitle, log,
    h("h2", {}, "Builds"), history);
  render();
  return watch((m) => {
    if (m.workspace && m.workspace.id === id) { ws = m.workspace; render(); }
    if (m.deleted === id) { toast("Deleted."); navigate("/workspaces"); }
    if (m.resync) api("GET", `/workspaces/${id}`).then((w) => { ws = w; render(); }).catch(() => {});
  });
}

async function terminalPage(id, agentId) {
  const ws = await api("GET", `/workspaces/${id}`);
  const agent = ws.agents.find((a) => a.id === agentId);
  // The session id lives in the URL: a reload gets the same shell back.
  const params = new URLSearchParams(location.search);
  if (!params.get("session")) {
    params.set("session", crypto.randomUUID());
    history.replaceState(null, "", `${location.pathname}?${params}`);
  }
  const session = params.get("session");
  const box = h("div", { id: "terminal", role: "application", "aria-label": "Terminal" });
  const state = h("p", { class: "hint", "aria-live": "polite" }, "Connecting…");
  page(`Terminal: ${ws.name}${agent ? `.${agent.name}` : ""}`, state, box);
  const { Terminal } = await import("/assets/vendor/xterm.mjs");
  const term = new Terminal({ cursorBlink: true, fontSize: 14, screenReaderMode: true });
  term.open(box);
  const fit = () => {
    const cell = term._core?._renderService?.dimensions?.css?.cell;
    if (!cell || !cell.width) return;
    term.resize(Math.max(20, Math.floor(box.clientWidth / cell.width)), Math.max(5, Math.floor(box.clientHeight / cell.height)));
  };
  fit();
  let socket = null;
  let closed = false;
  let retry = 1000;
  const connect = () => {
    const q = new URLSearchParams({ session, cols: term.cols, rows: term.rows });
    socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/v2/workspaceagents/${agentId}/pty?${q}`);
    socket.binaryType = "arraybuffer";
    socket.onmessage = (e) => term.write(new Uint8Array(e.data));
    socket.onopen = () => { retry = 1000; state.textContent = "Connected. A reload resumes this shell."; term.focus(); };
    socket.onclose = (e) => {
      if (closed) return;
      if (e.code === 1000) { state.textContent = "The terminal ended."; return; }
      // Back off: a revoked session, a stopped workspace or a server
      // restart should not be hammered.
      state.textContent = `Disconnected; reconnecting in ${Math.round(retry / 1000)} s…`;
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 30000);
    };
  };
  term.onData((d) => { if (socket && socket.readyState === 1) socket.send(JSON.stringify({ data: d })); });
  term.onResize(({ cols, rows }) => { if (socket && socket.readyState === 1) socket.send(JSON.stringify({ cols, rows })); });
  const onResize = () => fit();
  window.addEventListener("resize", onResize);
  connect();
  return () => { closed = true; window.removeEventListener("resize", onResize); if (socket) socket.close(); term.dispose(); };
}

async function templatesPage() {
  const { templates } = await api("GET", "/templates");
  const versions = Object.fromEntries(await Promise.all(templates.map(async (t) =>
    [t.name, await api("GET", `/templates/${t.name}/versions`).catch(() => null)])));
  page("Templates",
    h("p", {}, "Push a new version from a directory with ", h("code", {}, "devmesh templates push NAME -d DIR"), "."),
    templates.length ? templates.map((t) => h("section", { "aria-label": `Template ${t.name}` },
      h("h2", {}, t.name, h("span", { class: "hint" }, ` — version ${t.active_version.number}, ${t.active_version.kind}`)),
      t.description ? h("p", {}, t.description) : null,
      t.active_version.parameters.length ? table(["Parameter", "Type", "Default", "Description"], t.active_version.parameters.map((p) =>
        h("tr", {}, h("td", {}, p.name), h("td", {}, p.type), h("td", {}, p.default ?? "—"), h("td", {}, p.description ?? ""))), `Parameters of ${t.name}`) : h("p", { class: "hint" }, "No parameters."),
      t.active_version.resources.length ? h("p", {}, "Resources: ", t.active_version.resources.map((r) => `${r.type}.${r.name}`).join(", ")) : null,
      versionsTable(t, versions[t.name])))
      : h("p", {}, "No templates yet."));
}

function versionsTable(t, resp) {
  const list = resp ? (resp.versions || resp) : [];
  if (!Array.isArray(list) || !list.length) return null;
  return h("details", {}, h("summary", {}, `Versions (${list.length})`),
    table(["Version", "State", "Parameters", "Created"], list.map((v) => h("tr", { "data-version": v.number },
      h("td", {}, String(v.number)),
      h("td", {}, v.id === t.active_version.id ? "active" : v.archived ? "archived" : v.import && v.import.status !== "succeeded" ? `import ${v.import.status}` : "—"),
      h("td", {}, (v.parameters || []).map((p) => p.name).join(", ") || "—"),
      h("td", {}, when(v.created_at)))), `Versions of ${t.name}`));
}

async function regionsPage() {
  const regions = await measuredRegions(true);
  const choice = chooseRegion(regions);
  const pinned = prefs.region || "";
  const select = h("select", { id: "region-pin" },
    h("option", { value: "" }, "The nearest healthy region"),
    regions.filter((r) => r.healthy).map((r) => h("option", { value: r.name, selected: r.name === pinned }, r.display_name || r.name)));
  select.addEventListener("change", async () => {
    try {
      prefs = await api("PUT", "/users/me/preferences", { region: select.value || null });
      toast(select.value ? `App links go through ${select.value}.` : "App links go through the nearest region.");
    } catch (e) { toast(e.message); }
    regionsPage();
  });
  page("Regions",
    table(["Region", "Health", "Latency from this browser", ""], regions.map((r) => h("tr", { "data-region": r.name },
      h("td", {}, r.display_name || r.name),
      h("td", {}, h("span", { class: `status ${r.healthy ? "ok" : "bad"}` }, r.healthy ? "healthy" : String(r.status))),
      h("td", { "data-latency": r.name }, r.rtt !== null ? `${r.rtt.toFixed(1)} ms` : r.error ? "unreachable" : "—"),
      h("td", {}, choice && r.name === choice.name ? "← app links" : ""))), "Regions"),
    h("label", { for: "region-pin" }, "App links go through"), select);
}

async function accountPage() {
  const { keys } = await api("GET", "/users/me/keys");
  const name = h("input", { id: "key-name", required: true, autocomplete: "off" });
  const shown = h("div", { "aria-live": "polite" });
  page("Account",
    h("dl", { class: "facts" }, h("dt", {}, "User"), h("dd", {}, me.username), h("dt", {}, "Email"), h("dd", {}, me.email), h("dt", {}, "Roles"), h("dd", {}, me.roles.join(", ") || "member")),
    h("h2", {}, "API keys"),
    h("form", {
      onsubmit: async (e) => {
        e.preventDefault();
        try {
          const k = await api("POST", "/users/me/keys", { name: name.value });
          shown.replaceChildren(h("p", {}, "Your new key, shown this once:"), h("p", { class: "secret", id: "new-key" }, k.key));
          accountKeys(await api("GET", "/users/me/keys"));
        } catch (err) { toast(err.message); }
      },
    }, h("label", { for: "key-name" }, "New key's name"), name, h("div", { class: "row" }, h("button", { type: "submit", class: "primary" }, "Create key"))),
    shown, h("div", { id: "keys" }));
  accountKeys({ keys });
}

function accountKeys({ keys }) {
  document.getElementById("keys")?.replaceChildren(table(["Name", "Id", "Created", "Last used", ""], keys.map((k) => h("tr", { "data-key": k.name },
    h("td", {}, k.name), h("td", {}, k.id), h("td", {}, when(k.created_at)), h("td", {}, when(k.last_used_at)),
    h("td", {}, h("button", { type: "button", class: "danger", onclick: async () => {
      if (!confirm(`Revoke key ${k.name}?`)) return;
      await api("DELETE", `/users/me/keys/${k.id}`).catch((e) => toast(e.message));
      accountKeys(await api("GET", "/users/me/keys"));
    } }, "Revoke")))), "API keys"));
}

async function usersPage() {
  const { users } = await api("GET", "/users");
  const form = {
    username: h("input", { id: "u-name", required: true, autocomplete: "off" }),
    email: h("input", { id: "u-email", type: "email", required: true, autocomplete: "off" }),
    password: h("input", { id: "u-pass", type: "password", required: true, autocomplete: "new-password" }),
  };
  page("Users",
    table(["User", "Email", "Roles", "Status", "", ""], users.map((u) => h("tr", { "data-user": u.username },
      h("td", {}, u.username), h("td", {}, u.email), h("td", {}, u.roles.join(", ") || "member"),
      h("td", {}, u.status),
      h("td", {}, u.id === me.id ? "" : h("button", { type: "button", onclick: async () => {
        const owner = u.roles.includes("owner");
        try {
          await api("PUT", `/users/${u.id}/roles`, { roles: owner ? [] : ["owner"] });
          toast(`${u.username} is ${owner ? "a member" : "an owner"} now.`);
        } catch (e) { toast(e.message); }
        usersPage();
      } }, u.roles.includes("owner") ? "Make member" : "Make owner")),
      h("td", {}, u.id === me.id ? "" : h("button", { type: "button", onclick: async () => {
        const to = u.status === "active" ? "suspend" : "activate";
        if (to === "suspend" && !confirm(`Suspend ${u.username}? Their sessions end at once.`)) return;
        try { await api("PUT", `/users/${u.id}/status/${to}`); toast(`${u.username}: ${to === "suspend" ? "suspended" : "active again"}.`); } catch (e) { toast(e.message); }
        usersPage();
      } }, u.status === "active" ? "Suspend" : "Activate")))), "Users"),
    h("h2", {}, "Create a user"),
    h("form", {
      onsubmit: async (e) => {
        e.preventDefault();
        try {
          await api("POST", "/users", { username: form.username.value, email: form.email.value, password: form.password.value });
          toast(`Created ${form.username.value}.`);
          usersPage();
        } catch (err) { toast(err.message); }
      },
    }, h("label", { for: "u-name" }, "Username"), form.username, h("label", { for: "u-email" }, "Email"), form.email,
    h("label", { for: "u-pass" }, "Password"), form.password, h("div", { class: "row" }, h("button", { type: "submit", class: "primary" }, "Create user"))));
}

async function edgesPage(created = null) {
  const { edges } = await api("GET", "/edges");
  const shown = h("div", { "aria-live": "polite" });
  const tokenShown = (name, token) => shown.replaceChildren(
    h("p", {}, `The token of edge ${name}, shown this once (give it to the edge as DEVMESH_EDGE_TOKEN):`),
    h("p", { class: "secret", id: "edge-token" }, token));
  const f = {
    name: h("input", { id: "e-name", required: true, autocomplete: "off" }),
    access: h("input", { id: "e-url", type: "url", placeholder: "https://sydney.example.com", autocomplete: "off" }),
    wildcard: h("input", { id: "e-wild", placeholder: "*.sydney.apps.example.com", autocomplete: "off" }),
  };
  page("Edges",
    table(["Region", "Status", "Access URL", "Apps", "", ""], edges.map((e) => h("tr", { "data-edge": e.name },
      h("td", {}, e.display_name || e.name),
      h("td", {}, h("span", { class: `status ${e.healthy ? "ok" : "bad"}` }, String(e.status))),
      h("td", { class: "optional" }, e.access_url || "—"), h("td", { class: "optional" }, e.wildcard_hostname || "—"),
      h("td", {}, h("button", { type: "button", onclick: async () => {
        if (!confirm(`Regenerate ${e.name}'s token? The edge stops until it gets the new one.`)) return;
        try { const r = await api("POST", `/edges/${e.id}/token`); tokenShown(e.name, r.edge_token); } catch (err) { toast(err.message); }
      } }, "Regenerate token")),
      h("td", {}, h("button", { type: "button", class: "danger", onclick: async () => {
        if (!confirm(`Delete edge ${e.name}? Its region stops serving.`)) return;
        try { await api("DELETE", `/edges/${e.id}`); toast(`Deleted ${e.name}.`); edgesPage(); } catch (err) { toast(err.message); }
      } }, "Delete")))), "Edges"),
    shown,
    h("h2", {}, "Add an edge"),
    h("form", {
      onsubmit: async (e) => {
        e.preventDefault();
        try {
          const r = await api("POST", "/edges", {
            name: f.name.value, access_url: f.access.value || null, wildcard_hostname: f.wildcard.value || null, relay_hosts: [],
          });
          await edgesPage({ name: r.edge.name, token: r.edge_token });
        } catch (err) { toast(err.message); }
      },
    }, h("label", { for: "e-name" }, "Region name"), f.name, h("label", { for: "e-url" }, "Access URL"), f.access,
    h("label", { for: "e-wild" }, "App wildcard"), f.wildcard,
    h("div", { class: "row" }, h("button", { type: "submit", class: "primary" }, "Add edge"))));
  if (created) tokenShown(created.name, created.token);
}

async function auditPage() {
  const action = new URLSearchParams(location.search).get("action") || "";
  const { entries } = await api("GET", `/audit?limit=200${action ? `&action=${encodeURIComponent(action)}` : ""}`);
  const filter = h("input", { id: "audit-action", value: action, placeholder: "e.g. ssh, user_status, login" });
  page("Audit log",
    h("form", { onsubmit: (e) => { e.preventDefault(); navigate(`/audit${filter.value ? `?action=${encodeURIComponent(filter.value)}` : ""}`); } },
      h("label", { for: "audit-action" }, "Action"), filter, h("div", { class: "row" }, h("button", { type: "submit" }, "Filter"))),
    table(["Time", "User", "Action", "Resource", "Details"], entries.map((e) => h("tr", { "data-action": e.action },
      h("td", {}, when(e.time)), h("td", {}, e.username || "—"), h("td", {}, e.action),
      h("td", {}, `${e.resource_type} ${e.resource_name}`), h("td", { class: "optional" }, JSON.stringify(e.details)))), "Audit log"));
}

async function setupPage() {
  const f = {
    username: h("input", { id: "s-name", required: true, autocomplete: "username" }),
    email: h("input", { id: "s-email", type: "email", required: true, autocomplete: "email" }),
    password: h("input", { id: "s-pass", type: "password", required: true, minlength: 8, autocomplete: "new-password" }),
  };
  page("Set up devmesh",
    h("p", {}, "Create the first user: the deployment's owner."),
    h("form", {
      onsubmit: async (e) => {
        e.preventDefault();
        try {
          await api("POST", "/users/first", { username: f.username.value, email: f.email.value, password: f.password.value });
          location.assign("/login?redirect=/workspaces");
        } catch (err) { toast(err.message); }
      },
    }, h("label", { for: "s-name" }, "Username"), f.username, h("label", { for: "s-email" }, "Email"), f.email,
    h("label", { for: "s-pass" }, "Password ", h("span", { class: "hint" }, "(8 characters or more)")), f.password,
    h("div", { class: "row" }, h("button", { type: "submit", class: "primary" }, "Create owner"))));
}

// --- Routing ----------------------------------------------------------

const routes = [
  [/^\/(workspaces)?$/, () => workspacesPage()],
  [/^\/workspaces\/new$/, () => createPage()],
  [/^\/workspaces\/([0-9a-f-]{36})$/, (m) => workspacePage(m[1])],
  [/^\/workspaces\/([0-9a-f-]{36})\/terminal\/([0-9a-f-]{36})$/, (m) => terminalPage(m[1], m[2])],
  [/^\/templates$/, () => templatesPage()],
  [/^\/regions$/, () => regionsPage()],
  [/^\/account$/, () => accountPage()],
  [/^\/users$/, () => usersPage()],
  [/^\/audit$/, () => auditPage()],
  [/^\/edges$/, () => edgesPage()],
];

let leave = null;

async function render() {
  if (leave) { leave(); leave = null; }
  const path = location.pathname;
  for (const a of document.querySelectorAll("header nav a")) {
    if (path.startsWith(a.getAttribute("href"))) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  for (const [re, show] of routes) {
    const m = path.match(re);
    if (m) {
      try { leave = (await show(m)) || null; } catch (e) {
        if (e.status !== 401) page("Something went wrong", h("p", {}, e.message));
      }
      return;
    }
  }
  page("Not found", h("p", {}, "No such page. ", h("a", { href: "/workspaces" }, "Workspaces")));
}

function navigate(path) {
  navigated = true;
  history.pushState(null, "", path);
  render();
}

document.addEventListener("click", (e) => {
  const a = e.target.closest("a");
  if (!a || a.target || e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;
  if ((a.getAttribute("href") || "").startsWith("#")) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin || url.pathname.startsWith("/api/") || url.pathname === "/login") return;
  e.preventDefault();
  navigate(url.pathname + url.search);
});
window.addEventListener("popstate", render);

async function start() {
  if (location.pathname === "/setup") {
    await setupPage();
    return;
  }
  try {
    me = await api("GET", "/users/me");
  } catch (_) {
    return;
  }
  prefs = await api("GET", "/users/me/preferences").catch(() => prefs);
  document.getElementById("me").textContent = me.username;
  if (me.roles.includes("owner")) for (const a of document.querySelectorAll("[data-admin]")) a.hidden = false;
  const out = document.getElementById("signout");
  out.hidden = false;
  out.addEventListener("click", async () => {
    await api("POST", "/users/logout", {}).catch(() => {});
    location.assign("/login");
  });
  await render();
}

start();
