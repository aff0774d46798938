// The in-browser terminal: xterm.js over the console WebSocket. The socket is authorised by a
// short-lived single-use ticket fetched with the bearer token (the token itself never goes in a
// URL). Binary frames both ways are terminal bytes; text frames are control messages.
import { FitAddon } from "@xterm/addon-fit";
import { Terminal } from "@xterm/xterm";
import { ApiError, enc, post } from "../api";
import { h } from "../dom";

interface Ticket {
  ticket: string;
  expires_in_secs: number;
}

export async function terminalPage(view: HTMLElement, name: string): Promise<() => void> {
  const status = h("span", { id: "term-status", class: "muted" }, "connecting…");
  const host = h("div", { id: "terminal", class: "terminal" });
  view.classList.add("full");
  view.append(
    h(
      "div",
      { class: "page-head" },
      h("p", {}, h("a", { href: `#/capsules/${enc(name)}` }, `← ${name}`)),
      h("h1", {}, `${name} terminal`),
      status,
    ),
    host,
  );
  const term = new Terminal({
    cursorBlink: true,
    fontFamily: "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace",
    fontSize: 14,
    scrollback: 5000,
    theme: { background: "#0f1115", foreground: "#e6e6e6" },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(host);
  fit.fit();
  term.focus();
  // The size the capsule's PTY is told, for people (a tooltip) and tests alike.
  const showSize = () => {
    host.dataset.cols = String(term.cols);
    host.dataset.rows = String(term.rows);
    host.title = `${term.cols}×${term.rows}`;
  };
  showSize();

  let ws: WebSocket | null = null;
  let closed = false;
  const setStatus = (t: string, error = false) => {
    status.textContent = t;
    status.classList.toggle("error", error);
  };

  try {
    const t = await post<Ticket>(`/v1/capsules/${enc(name)}/console/ticket`);
    const url = new URL(`/v1/capsules/${enc(name)}/console`, location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("cols", String(term.cols));
    url.searchParams.set("rows", String(term.rows));
    url.searchParams.set("ticket", t.ticket);
    ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
  } catch (e) {
    setStatus((e as ApiError).message, true);
    term.write(`\r\n\x1b[31m${(e as Error).message}\x1b[0m\r\n`);
    return () => term.dispose();
  }
  const sock = ws;
  const enc8 = new TextEncoder();
  sock.onopen = () => setStatus("connected");
  sock.onmessage = (ev) => {
    if (typeof ev.data === "string") {
      let msg: { type?: string; code?: number; kind?: string; message?: string };
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (msg.type === "exit") {
        setStatus(`exited with code ${msg.code}`);
        term.write(`\r\n[process exited with code ${msg.code}]\r\n`);
      } else if (msg.type === "error") {
        setStatus(msg.message ?? "error", true);
        term.write(`\r\n\x1b[31m${msg.message ?? "error"}\x1b[0m\r\n`);
      }
    } else {
      term.write(new Uint8Array(ev.data as ArrayBuffer));
    }
  };
  sock.onclose = (ev) => {
    closed = true;
    if (!status.classList.contains("error") && !status.textContent?.startsWith("exited")) {
      setStatus(ev.reason ? `disconnected: ${ev.reason}` : "disconnected");
    }
  };
  sock.onerror = () => setStatus("the console connection failed", true);
  // Keystrokes (Ctrl-C included, as the byte 0x03) go out as binary frames.
  const input = term.onData((d) => {
    if (sock.readyState === WebSocket.OPEN) sock.send(enc8.encode(d));
  });
  const binary = term.onBinary((d) => {
    if (sock.readyState === WebSocket.OPEN) sock.send(Uint8Array.from(d, (c) => c.charCodeAt(0)));
  });
  const resized = term.onResize(({ cols, rows }) => {
    showSize();
    if (sock.readyState === WebSocket.OPEN) sock.send(JSON.stringify({ type: "resize", cols, rows }));
  });
  let pending = 0;
  const onWindow = () => {
    window.clearTimeout(pending);
    pending = window.setTimeout(() => fit.fit(), 50);
  };
  window.addEventListener("resize", onWindow);
  return () => {
    window.removeEventListener("resize", onWindow);
    input.dispose();
    binary.dispose();
    resized.dispose();
    if (!closed) sock.close(1000, "left the page");
    term.dispose();
  };
}
