import { ApiError, Capsule, Event, SizeInfo, enc, get, post } from "../api";
import { h, replace, section } from "../dom";
import { credits, duration, when } from "../format";
import { costBar, stateBadge } from "./widgets";

/** Events that count as activity (DESIGN.md §3): what keeps a capsule awake. */
const ACTIVITY = new Set(["exec", "spawned", "console_attached", "console_detached", "file_written", "files_uploaded", "file_removed", "file_renamed"]);

export function lastActivity(events: Event[]): number | null {
  let at: number | null = null;
  for (const e of events) if (ACTIVITY.has(e.kind.type) && (at === null || e.at_ms > at)) at = e.at_ms;
  return at;
}

export async function capsulesPage(view: HTMLElement): Promise<() => void> {
  const list = h("div", { id: "capsule-list" }, h("p", { class: "muted" }, "Loading…"));
  view.append(
    h("div", { class: "page-head" }, h("h1", {}, "Capsules"), h("span", { class: "muted", id: "list-note" })),
    section("Your capsules", list),
    await createForm(),
  );
  let alive = true;
  const load = async () => {
    let caps: Capsule[];
    try {
      caps = (await get<{ capsules: Capsule[] }>("/v1/capsules?limit=500")).capsules;
    } catch (e) {
      if (alive) replace(list, h("p", { class: "error" }, (e as ApiError).message));
      return;
    }
    if (!alive) return;
    renderList(list, caps);
  };
  await load();
  // The list follows state changes (creating → running, idle sleep) without a reload.
  const timer = window.setInterval(() => void load(), 5000);
  return () => {
    alive = false;
    window.clearInterval(timer);
  };
}

function renderList(list: HTMLElement, caps: Capsule[]): void {
  if (caps.length === 0) {
    replace(list, h("p", { class: "muted", id: "no-capsules" }, "No capsules in this token's reach yet. Create one below."));
    return;
  }
  const rows = caps.map((c) => {
    const activity = h("td", { "data-col": "activity", class: "muted" }, "…");
    // Last activity comes from each capsule's audit trail, filled in as it arrives.
    get<{ events: Event[] }>(`/v1/capsules/${enc(c.id)}/events`)
      .then((r) => replace(activity, when(lastActivity(r.events))))
      .catch(() => replace(activity, "—"));
    return h(
      "tr",
      { "data-capsule": c.name },
      h("td", {}, h("a", { href: `#/capsules/${enc(c.name)}`, class: "capsule-link" }, c.name)),
      h("td", { "data-col": "state" }, stateBadge(c.state, c.state_reason)),
      h("td", {}, c.size),
      h("td", { "data-col": "runtime", title: "billed minutes of running time" }, duration(c.meter.minutes_total * 60_000)),
      h("td", { "data-col": "cost" }, costBar(c.meter.spent, c.limits.credit_limit)),
      activity,
    );
  });
  replace(
    list,
    h(
      "table",
      { class: "grid", id: "capsules-table" },
      h("thead", {}, h("tr", {}, ...["Name", "State", "Size", "Running", "Cost / limit", "Last activity"].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows),
    ),
  );
}

async function createForm(): Promise<HTMLElement> {
  let sizes: SizeInfo[] = [];
  try {
    sizes = (await get<{ sizes: SizeInfo[] }>("/v1/sizes")).sizes;
  } catch {
    sizes = [];
  }
  const errors: Record<string, HTMLElement> = {};
  const field = (name: string, label: string, input: HTMLElement, hint?: string) => {
    errors[name] = h("span", { class: "field-error", id: `error-${name}`, role: "alert" });
    return h("div", { class: "field", "data-field": name }, h("label", { for: `f-${name}` }, label), input, hint ? h("span", { class: "hint" }, hint) : null, errors[name]);
  };
  const name = h("input", { id: "f-name", name: "name", required: true, autocomplete: "off", spellcheck: "false", placeholder: "agent-pr-482" });
  const size = h(
    "select",
    { id: "f-size", name: "size" },
    sizes.map((s) => h("option", { value: s.name }, `${s.name} — ${s.vcpus} vCPU, ${s.memory_mib / 1024} GiB, ${credits(s.compute_per_minute)}/min`)),
  );
  if (sizes.length === 0) size.append(h("option", { value: "1x1gb" }, "1x1gb"));
  const limit = h("input", { id: "f-credit_limit", name: "credit_limit", inputmode: "decimal", placeholder: "1.00" });
  const disk = h("input", { id: "f-disk_gib", name: "disk_gib", type: "number", min: 1, placeholder: "10" });
  const network = h(
    "select",
    { id: "f-network", name: "network" },
    h("option", { value: "internet" }, "internet (public egress)"),
    h("option", { value: "none" }, "none"),
    h("option", { value: "allow" }, "allow list…"),
  );
  const allow = h("input", { id: "f-allow", placeholder: "registry.npmjs.org, 203.0.113.0/24", hidden: true });
  network.addEventListener("change", () => (allow.hidden = network.value !== "allow"));
  const idle = h("input", { id: "f-idle_timeout_secs", name: "idle_timeout_secs", type: "number", min: 1, placeholder: "10" });
  const status = h("p", { class: "form-status", id: "create-status", role: "status" });
  const submit = h("button", { type: "submit", id: "create" }, "Create capsule");
  const updateDiskHint = () => {
    const s = sizes.find((z) => z.name === size.value);
    disk.setAttribute("placeholder", "10");
    if (s) disk.setAttribute("max", String(s.max_disk_gib));
  };
  size.addEventListener("change", updateDiskHint);
  updateDiskHint();
  const form = h(
    "form",
    { id: "create-form", class: "form-grid", novalidate: true },
    field("name", "Name", name, "a-z, 0-9 and -, starting with a letter"),
    field("size", "Size", size),
    field("credit_limit", "Credit limit", limit, "credits; default 1.00"),
    field("disk_gib", "Disk (GiB)", disk, "default 10"),
    field("network", "Network", h("div", { class: "stack" }, network, allow)),
    field("idle_timeout_secs", "Idle timeout (min)", idle, "default 10"),
    h("div", { class: "actions" }, submit, status),
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    for (const el of Object.values(errors)) el.textContent = "";
    status.textContent = "";
    const body: Record<string, unknown> = { name: name.value.trim(), size: size.value };
    if (limit.value.trim()) body.credit_limit = limit.value.trim();
    if (disk.value.trim()) body.disk_gib = Number(disk.value);
    body.network = network.value === "allow" ? `allow:${allow.value}` : network.value;
    if (idle.value.trim()) body.idle_timeout_secs = Math.round(Number(idle.value) * 60);
    submit.disabled = true;
    try {
      const c = await post<Capsule>("/v1/capsules", body);
      status.textContent = `Created ${c.name}.`;
      location.hash = `#/capsules/${enc(c.name)}`;
    } catch (err) {
      const ae = err as ApiError;
      const target = ae.field && errors[ae.field] ? errors[ae.field] : null;
      if (target) target.textContent = ae.message;
      else status.textContent = ae.message;
      status.classList.toggle("error", !target);
    } finally {
      submit.disabled = false;
    }
  });
  return section("Create a capsule", form);
}
