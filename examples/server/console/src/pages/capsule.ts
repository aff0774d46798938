import { ApiError, Capsule, CapsuleUsage, Event, LedgerEntry, call, enc, get, post, raw } from "../api";
import { series, usageChart } from "../chart";
import { facts, h, replace, section } from "../dom";
import { bytesText, credits, duration, when } from "../format";
import { costBar, stateBadge } from "./widgets";

export async function capsulePage(view: HTMLElement, name: string): Promise<() => void> {
  const path = `/v1/capsules/${enc(name)}`;
  const head = h("div", { class: "page-head" });
  const status = h("div", { id: "status" });
  const limits = h("div", { id: "limits" });
  const url = h("div", { id: "url" });
  const usage = h("div", { id: "usage" });
  const runOut = h("div", { id: "exec-box" });
  const history = h("div", { id: "exec-history" });
  const events = h("div", { id: "events" });
  const logs = h("pre", { id: "boot-log", class: "log" }, "Loading…");
  const flash = h("p", { id: "flash", role: "status", class: "flash" });
  view.append(
    h("p", {}, h("a", { href: "#/capsules" }, "← Capsules")),
    head,
    flash,
    h("div", { class: "columns" }, section("Status", status), section("Limits", limits)),
    section("Usage", usage),
    h("div", { class: "columns" }, section("Public URL", url), section("Run a command", runOut)),
    section("Exec history", history),
    section("Audit trail", events),
    section("Boot log", logs),
  );

  const say = (text: string, error = false) => {
    flash.textContent = text;
    flash.classList.toggle("error", error);
  };
  const act = async (label: string, f: () => Promise<unknown>) => {
    say(`${label}…`);
    try {
      await f();
      say(`${label}: done.`);
    } catch (e) {
      say(`${label}: ${(e as Error).message}`, true);
    }
    await refresh();
  };

  let cap: Capsule | null = null;
  const refresh = async () => {
    let u: CapsuleUsage;
    try {
      u = await get<CapsuleUsage>(`${path}/usage`);
    } catch (e) {
      replace(head, h("h1", {}, name));
      say((e as ApiError).message, true);
      return;
    }
    cap = u.capsule;
    renderHead(head, cap, act, path);
    renderStatus(status, cap);
    renderLimits(limits, cap, path, act);
    renderUrl(url, cap, path, act, say);
    renderUsage(usage, u.entries);
    renderHistory(history, u.events);
    renderEvents(events, u.events);
  };
  await refresh();
  renderRun(runOut, path, () => void refresh());
  raw("GET", `${path}/logs`)
    .then((r) => r.text())
    .then((t) => replace(logs, t || "(empty)"))
    .catch((e) => replace(logs, (e as Error).message));
  const timer = window.setInterval(() => void refresh(), 5000);
  return () => window.clearInterval(timer);
}

/** Whether a field inside `el` has the focus (a refresh would throw away what is being typed). */
function editing(el: HTMLElement): boolean {
  const a = document.activeElement;
  return !!a && el.contains(a) && (a instanceof HTMLInputElement || a instanceof HTMLSelectElement);
}

type Act = (label: string, f: () => Promise<unknown>) => Promise<void>;

function renderHead(head: HTMLElement, c: Capsule, act: Act, path: string): void {
  const live = c.state !== "terminated" && c.state !== "terminating";
  const btn = (label: string, id: string, f: () => Promise<unknown>, cls = "") =>
    h("button", { type: "button", id, class: cls, disabled: !live, onclick: () => void act(label, f) }, label);
  replace(
    head,
    h("h1", { id: "capsule-name" }, c.name),
    stateBadge(c.state, c.state_reason),
    h(
      "div",
      { class: "toolbar" },
      live ? h("a", { class: "button", id: "open-terminal", href: `#/capsules/${enc(c.name)}/terminal` }, "Terminal") : null,
      btn("Sleep", "do-sleep", () => post(`${path}/sleep`)),
      btn("Wake", "do-wake", () => post(`${path}/wake`)),
      btn("Restart", "do-restart", () => post(`${path}/restart`)),
      btn(
        "Terminate",
        "do-terminate",
        async () => {
          if (!window.confirm(`Terminate ${c.name}? Its disk is deleted.`)) throw new Error("cancelled");
          await call("DELETE", path);
        },
        "danger",
      ),
    ),
  );
}

function renderStatus(el: HTMLElement, c: Capsule): void {
  replace(
    el,
    facts([
      ["State", [stateBadge(c.state, c.state_reason), c.state_reason ? ` (${c.state_reason})` : ""]],
      ["Size", c.size],
      ["Image", h("span", { id: "image" }, c.image)],
      ["Region", c.region],
      ["Disk", `${c.disk_gib} GiB`],
      ["Network", String(c.network)],
      ["Running", `${c.meter.minutes_total} billed min`],
      ["Cost", costBar(c.meter.spent, c.limits.credit_limit)],
      ["Created", when(c.created_at_ms)],
      ["Id", h("code", {}, c.id)],
    ]),
  );
}

function renderLimits(el: HTMLElement, c: Capsule, path: string, act: Act): void {
  if (editing(el)) return; // do not reset a form being edited
  const limit = h("input", { id: "l-credit_limit", value: credits(c.limits.credit_limit, 2), inputmode: "decimal" });
  const idle = h("input", { id: "l-idle", type: "number", min: 1, value: Math.round(c.limits.idle_timeout_ms / 60000) });
  const runtime = h("input", { id: "l-runtime", type: "number", min: 1, value: Math.round(c.limits.max_runtime_ms / 60000) });
  const network = h("input", { id: "l-network", value: String(c.network), spellcheck: "false" });
  const form = h(
    "form",
    { class: "form-grid compact", id: "limits-form" },
    h("div", { class: "field" }, h("label", { for: "l-credit_limit" }, "Credit limit"), limit),
    h("div", { class: "field" }, h("label", { for: "l-idle" }, "Idle timeout (min)"), idle),
    h("div", { class: "field" }, h("label", { for: "l-runtime" }, "Max runtime (min)"), runtime),
    h("div", { class: "field" }, h("label", { for: "l-network" }, "Network"), network),
    h("div", { class: "actions" }, h("button", { type: "submit", id: "save-limits" }, "Save limits")),
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const body: Record<string, unknown> = {};
    if (limit.value.trim() !== credits(c.limits.credit_limit, 2)) body.credit_limit = limit.value.trim();
    if (Number(idle.value) * 60000 !== c.limits.idle_timeout_ms) body.idle_timeout_secs = Math.round(Number(idle.value) * 60);
    if (Number(runtime.value) * 60000 !== c.limits.max_runtime_ms) body.max_runtime_secs = Math.round(Number(runtime.value) * 60);
    if (network.value.trim() !== String(c.network)) body.network = network.value.trim();
    (document.activeElement as HTMLElement | null)?.blur();
    void act("Save limits", () => call("PATCH", path, body));
  });
  replace(el, form);
}

function renderUrl(el: HTMLElement, c: Capsule, path: string, act: Act, say: (t: string, e?: boolean) => void): void {
  if (editing(el)) return;
  const port = h("input", { id: "u-port", type: "number", min: 1, max: 65535, value: c.url ? c.url.port : "", placeholder: "8080" });
  const access = h(
    "select",
    { id: "u-access" },
    h("option", { value: "token", selected: c.url?.access !== "public" }, "token (needs a token that can read it)"),
    h("option", { value: "public", selected: c.url?.access === "public" }, "public (needs urls:public)"),
  );
  const open = async () => {
    // A preview token for this capsule only; the proxy trades it for a cookie at once.
    const href = c.url?.href;
    if (!href) throw new Error("the server did not give this URL an address (preview proxy not enabled)");
    const win = window.open("about:blank", "_blank");
    try {
      const t = await post<{ secret: string }>(`${path}/preview-token`, { ttl_secs: 300 });
      const target = new URL(href);
      target.searchParams.set("capsule_token", t.secret);
      if (win) {
        win.opener = null;
        win.location.href = target.toString();
      }
    } catch (e) {
      win?.close();
      throw e;
    }
  };
  const form = h(
    "form",
    { class: "form-grid compact", id: "url-form" },
    h(
      "p",
      { class: "url-line" },
      c.url
        ? [h("code", { id: "url-href" }, c.url.href ?? c.url.host_label), ` → port ${c.url.port} (${c.url.access})`]
        : h("span", { class: "muted", id: "url-none" }, "No public URL."),
    ),
    h("div", { class: "field" }, h("label", { for: "u-port" }, "Port"), port),
    h("div", { class: "field" }, h("label", { for: "u-access" }, "Access"), access),
    h(
      "div",
      { class: "actions" },
      h("button", { type: "submit", id: "url-set" }, c.url ? "Replace" : "Expose"),
      c.url ? h("button", { type: "button", id: "url-remove", onclick: () => void act("Remove URL", () => call("DELETE", `${path}/url`)) }, "Remove") : null,
      c.url ? h("button", { type: "button", id: "url-open", onclick: () => open().catch((e) => say((e as Error).message, true)) }, "Open ↗") : null,
    ),
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    (document.activeElement as HTMLElement | null)?.blur();
    void act("Expose", () => call("PUT", `${path}/url`, { port: Number(port.value), access: access.value }));
  });
  replace(el, form);
}

function renderUsage(el: HTMLElement, entries: LedgerEntry[]): void {
  const data = series(entries);
  const compute = entries.filter((e) => e.kind === "compute").reduce((a, e) => a - e.amount, 0);
  replace(
    el,
    h(
      "div",
      { class: "usage-head" },
      h("span", { class: "stat" }, h("strong", { id: "usage-minutes" }, String(data.minutes)), " compute minutes"),
      h("span", { class: "stat" }, h("strong", { id: "usage-cost" }, credits(data.cost)), " credits in total"),
      h("span", { class: "stat muted" }, `compute ${credits(compute)}, other ${credits(data.cost - compute)}`),
      h("span", { class: "legend" }, h("span", { class: "key minutes" }), "minutes ", h("span", { class: "key cost" }), "cost"),
    ),
    usageChart(data, Math.max(480, Math.round(el.clientWidth) || 640)),
  );
}

function describe(e: Event): string {
  const k = e.kind;
  switch (k.type) {
    case "state_changed":
      return `${k.from} → ${k.to}${k.reason ? ` (${k.reason})` : ""}`;
    case "exec":
      return `${(k.argv as string[]).join(" ")} → ${k.error ? `error: ${k.error}` : `exit ${k.exit_code ?? "?"}`} in ${duration(Number(k.duration_ms))}`;
    case "charged":
      return `${k.what} ×${k.quantity}: ${credits(Number(k.amount))}`;
    case "created":
      return `${k.name} (${k.size}, ${k.image}, ${k.disk_gib} GiB)`;
    default: {
      const rest = Object.entries(k).filter(([key]) => key !== "type");
      return rest.map(([key, v]) => `${key}=${typeof v === "string" ? v : JSON.stringify(v)}`).join(" ");
    }
  }
}

function renderHistory(el: HTMLElement, events: Event[]): void {
  const execs = events.filter((e) => e.kind.type === "exec" || e.kind.type === "spawned").reverse();
  if (execs.length === 0) return replace(el, h("p", { class: "muted" }, "No commands run yet."));
  replace(
    el,
    h(
      "table",
      { class: "grid" },
      h("thead", {}, h("tr", {}, h("th", {}, "When"), h("th", {}, "Command"), h("th", {}, "Result"), h("th", {}, "Duration"))),
      h(
        "tbody",
        {},
        execs.slice(0, 50).map((e) => {
          const k = e.kind;
          const result = k.type === "spawned" ? "background" : k.error ? `error: ${k.error}` : `exit ${k.exit_code ?? "?"}`;
          return h(
            "tr",
            {},
            h("td", {}, when(e.at_ms)),
            h("td", {}, h("code", {}, (k.argv as string[]).join(" "))),
            h("td", {}, result),
            h("td", {}, k.duration_ms === undefined ? "—" : duration(Number(k.duration_ms))),
          );
        }),
      ),
    ),
  );
}

function renderEvents(el: HTMLElement, events: Event[]): void {
  const shown = events.filter((e) => e.kind.type !== "charged").reverse().slice(0, 100);
  replace(
    el,
    h(
      "table",
      { class: "grid", id: "events-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "When"), h("th", {}, "Event"), h("th", {}, "Detail"), h("th", {}, "Token"))),
      h(
        "tbody",
        {},
        shown.map((e) => h("tr", {}, h("td", {}, when(e.at_ms)), h("td", {}, e.kind.type), h("td", {}, describe(e)), h("td", {}, h("code", {}, e.token ?? "—")))),
      ),
    ),
  );
}

/** One command through `POST /exec`; its output (NDJSON, base64 bytes) goes in as text only. */
function renderRun(el: HTMLElement, path: string, done: () => void): void {
  const cmd = h("input", { id: "exec-cmd", placeholder: "ls -la /workspace", spellcheck: "false", autocomplete: "off" });
  const out = h("pre", { id: "exec-output", class: "log" });
  const code = h("span", { id: "exec-exit", class: "muted" });
  const form = h("form", { class: "run", id: "exec-form" }, cmd, h("button", { type: "submit", id: "exec-run" }, "Run"), code);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const line = cmd.value.trim();
    if (!line) return;
    replace(out);
    code.textContent = "running…";
    try {
      const resp = await raw("POST", `${path}/exec`, { argv: ["sh", "-c", line] });
      const reader = resp.body!.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done: end } = await reader.read();
        if (value) buf += value;
        let nl;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const msg = JSON.parse(buf.slice(0, nl));
          buf = buf.slice(nl + 1);
          if (msg.stdout !== undefined) out.append(document.createTextNode(bytesText(msg.stdout)));
          else if (msg.stderr !== undefined) out.append(h("span", { class: "stderr" }, bytesText(msg.stderr)));
          else if (msg.exit) code.textContent = msg.exit.code !== null && msg.exit.code !== undefined ? `exit ${msg.exit.code}` : msg.exit.timed_out ? "timed out" : `signal ${msg.exit.signal}`;
          else if (msg.error) code.textContent = `error: ${msg.error.message}`;
        }
        if (end) break;
      }
    } catch (err) {
      code.textContent = (err as Error).message;
    }
    done();
  });
  replace(el, form, out);
}
