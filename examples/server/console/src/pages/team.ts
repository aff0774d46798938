import { ApiError, LedgerEntry, TokenInfo, call, enc, get, post } from "../api";
import { facts, h, replace, section } from "../dom";
import { credits, when } from "../format";

const SCOPES = ["capsules:read", "capsules:write", "agent:write", "tokens:write", "billing:read", "network:private", "urls:public", "admin"];

export async function teamPage(view: HTMLElement): Promise<void> {
  const balance = h("div", { id: "balance" }, "Loading…");
  const ledger = h("div", { id: "ledger" });
  const tokens = h("div", { id: "tokens" });
  view.append(
    h("div", { class: "page-head" }, h("h1", {}, "Team")),
    h("div", { class: "columns" }, section("Balance", balance), section("Mint a token", mintForm(() => void loadTokens(tokens)))),
    section("Tokens", tokens),
    section("Ledger", ledger),
  );
  try {
    const l = await get<{ balance: number; entries: LedgerEntry[] }>("/v1/team/ledger");
    const spent = l.entries.filter((e) => e.amount < 0).reduce((a, e) => a - e.amount, 0);
    const granted = l.entries.filter((e) => e.kind === "grant").reduce((a, e) => a + e.amount, 0);
    replace(
      balance,
      h("p", { class: "big", id: "balance-value" }, credits(l.balance, 2)),
      facts([
        ["Granted", credits(granted, 2)],
        ["Spent", credits(spent)],
        ["Entries", String(l.entries.length)],
      ]),
    );
    const rows = [...l.entries].reverse().slice(0, 200);
    replace(
      ledger,
      h(
        "table",
        { class: "grid", id: "ledger-table" },
        h("thead", {}, h("tr", {}, ...["When", "Kind", "Capsule", "Quantity", "Amount", "Reason"].map((t) => h("th", {}, t)))),
        h(
          "tbody",
          {},
          rows.map((e) =>
            h(
              "tr",
              {},
              h("td", {}, when(e.at_ms)),
              h("td", {}, e.kind),
              h("td", {}, e.capsule ? h("code", {}, String(e.capsule)) : "—"),
              h("td", { class: "num" }, String(e.quantity)),
              h("td", { class: `num ${e.amount < 0 ? "neg" : "pos"}` }, credits(e.amount)),
              h("td", {}, String(e.reason ?? "")),
            ),
          ),
        ),
      ),
    );
  } catch (e) {
    const msg = (e as ApiError).message;
    replace(balance, h("p", { class: "muted" }, msg));
    replace(ledger, h("p", { class: "muted" }, "The ledger needs billing:read."));
  }
  await loadTokens(tokens);
}

async function loadTokens(el: HTMLElement): Promise<void> {
  let list: TokenInfo[];
  try {
    list = (await get<{ tokens: TokenInfo[] }>("/v1/tokens")).tokens;
  } catch (e) {
    replace(el, h("p", { class: "muted" }, (e as ApiError).message));
    return;
  }
  const live = list.filter((t) => !t.revoked_at_ms);
  replace(
    el,
    h(
      "table",
      { class: "grid", id: "tokens-table" },
      h("thead", {}, h("tr", {}, ...["Id", "Label", "Scopes", "Prefix", "Sizes", "Max credit", "Expires", ""].map((t) => h("th", {}, t)))),
      h(
        "tbody",
        {},
        live.map((t) => {
          const revoke = h("button", { type: "button", class: "danger small", "data-revoke": t.id }, "Revoke");
          revoke.addEventListener("click", async () => {
            if (!window.confirm(`Revoke ${t.id} and every token minted from it?`)) return;
            try {
              await call("DELETE", `/v1/tokens/${enc(t.id)}`);
            } catch (e) {
              window.alert((e as Error).message);
            }
            await loadTokens(el);
          });
          return h(
            "tr",
            { "data-token": t.id },
            h("td", {}, h("code", {}, t.id)),
            h("td", {}, t.capsule ? `preview of ${t.capsule}` : (t.label ?? "")),
            h("td", {}, t.scopes.join(" ")),
            h("td", {}, t.prefix ?? "—"),
            h("td", {}, t.sizes ? t.sizes.join(" ") : "any"),
            h("td", {}, t.max_credit_limit === null ? "—" : credits(t.max_credit_limit, 2)),
            h("td", {}, t.expires_at_ms ? when(t.expires_at_ms) : "never"),
            h("td", {}, revoke),
          );
        }),
      ),
    ),
  );
}

function mintForm(minted: () => void): HTMLElement {
  const boxes = SCOPES.map((s) =>
    h("label", { class: "check" }, h("input", { type: "checkbox", name: "scope", value: s, "data-scope": s }), s),
  );
  const label = h("input", { id: "t-label", placeholder: "ci-bot" });
  const prefix = h("input", { id: "t-prefix", placeholder: "agent-", spellcheck: "false" });
  const sizes = h("input", { id: "t-sizes", placeholder: "1x1gb, 2x2gb (empty: any)" });
  const cap = h("input", { id: "t-max_credit_limit", placeholder: "2.00", inputmode: "decimal" });
  const expiry = h("input", { id: "t-expires", type: "number", min: 1, placeholder: "hours (empty: never)" });
  const error = h("p", { class: "error", id: "mint-error", role: "alert" });
  const secret = h("div", { id: "minted" });
  const form = h(
    "form",
    { id: "mint-form", class: "form-grid compact" },
    h("fieldset", { class: "scopes" }, h("legend", {}, "Scopes"), boxes),
    h("div", { class: "field" }, h("label", { for: "t-label" }, "Label"), label),
    h("div", { class: "field" }, h("label", { for: "t-prefix" }, "Name prefix"), prefix),
    h("div", { class: "field" }, h("label", { for: "t-sizes" }, "Sizes"), sizes),
    h("div", { class: "field" }, h("label", { for: "t-max_credit_limit" }, "Max credit limit"), cap),
    h("div", { class: "field" }, h("label", { for: "t-expires" }, "Expires in (hours)"), expiry),
    h("div", { class: "actions" }, h("button", { type: "submit", id: "mint" }, "Mint token")),
    error,
    secret,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    error.textContent = "";
    replace(secret);
    const scopes = boxes.map((b) => b.querySelector("input")!).filter((i) => i.checked).map((i) => i.value);
    const body: Record<string, unknown> = { scopes };
    if (label.value.trim()) body.label = label.value.trim();
    if (prefix.value.trim()) body.prefix = prefix.value.trim();
    const sz = sizes.value.split(/[\s,]+/).filter(Boolean);
    if (sz.length) body.sizes = sz;
    if (cap.value.trim()) body.max_credit_limit = cap.value.trim();
    if (expiry.value.trim()) body.expires_in_secs = Math.round(Number(expiry.value) * 3600);
    try {
      const t = await post<{ id: string; secret: string }>("/v1/tokens", body);
      // Shown once: it lives only in this element until the page is left.
      const code = h("code", { id: "minted-secret", class: "secret" }, t.secret);
      const copy = h("button", { type: "button", id: "copy-secret", class: "small" }, "Copy");
      copy.addEventListener("click", () => void navigator.clipboard?.writeText(t.secret).then(() => (copy.textContent = "Copied")));
      replace(secret, h("p", { class: "notice" }, `Token ${t.id} minted. Copy the secret now: it is not shown again.`), h("p", { class: "secret-line" }, code, copy));
      form.reset();
      minted();
    } catch (err) {
      error.textContent = (err as Error).message;
    }
  });
  return form;
}
