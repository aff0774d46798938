import { ApiError, raw, signIn, takeSignedOutMessage } from "../api";
import { h } from "../dom";

export function signInPage(view: HTMLElement): void {
  const reason = takeSignedOutMessage();
  const input = h("input", {
    id: "token",
    name: "token",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    placeholder: "cap_...",
    required: true,
  });
  const error = h("p", { class: "error", id: "sign-in-error", role: "alert" });
  const button = h("button", { type: "submit", id: "sign-in" }, "Sign in");
  const form = h(
    "form",
    { class: "card narrow", id: "sign-in-form" },
    h("h1", {}, "Sign in"),
    reason ? h("p", { class: "notice", id: "signed-out" }, `Signed out: ${reason}`) : null,
    h("label", { for: "token" }, "API token"),
    input,
    h(
      "p",
      { class: "hint" },
      "Paste a token (",
      h("code", {}, "capsule tokens create"),
      " mints one). It is kept for this tab only and sent as a bearer header; the console can do exactly what the token can.",
    ),
    error,
    button,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const secret = input.value.trim();
    error.textContent = "";
    if (!/^cap_/.test(secret)) {
      error.textContent = "A Capsules token starts with cap_.";
      return;
    }
    button.disabled = true;
    try {
      // Any authenticated answer will do: 403 means the token is valid but cannot list capsules.
      await raw("GET", "/v1/capsules?limit=1", undefined, secret).catch((err: ApiError) => {
        if (err.status !== 403) throw err;
      });
      signIn(secret);
      location.hash = "#/capsules";
    } catch (err) {
      error.textContent = (err as Error).message;
    } finally {
      button.disabled = false;
    }
  });
  view.appendChild(form);
  input.focus();
}
