// The one way the console talks to the server: `/v1` calls with the bearer token pasted at
// sign-in. The token lives in sessionStorage (this tab only) and never in a URL. A 401 from any
// call signs the tab out and shows the server's message on the sign-in page.

const KEY = "capsules.token";

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly kind: string,
    message: string,
    readonly field?: string,
  ) {
    super(message);
  }
}

let signedOutMessage: string | null = null;
let onSignedOut: (() => void) | null = null;

export function token(): string | null {
  return sessionStorage.getItem(KEY);
}

export function signIn(secret: string): void {
  sessionStorage.setItem(KEY, secret);
  signedOutMessage = null;
}

export function signOut(message: string | null = null): void {
  sessionStorage.removeItem(KEY);
  signedOutMessage = message;
  onSignedOut?.();
}

/** The message that ended the last session (a 401), once. */
export function takeSignedOutMessage(): string | null {
  const m = signedOutMessage;
  signedOutMessage = null;
  return m;
}

export function whenSignedOut(f: () => void): void {
  onSignedOut = f;
}

async function errorOf(resp: Response): Promise<ApiError> {
  let kind = "http_" + resp.status;
  let message = `${resp.status} ${resp.statusText}`;
  let field: string | undefined;
  try {
    const body = await resp.json();
    if (body?.error) {
      kind = String(body.error.kind ?? kind);
      message = String(body.error.message ?? message);
      field = body.error.field ? String(body.error.field) : undefined;
    }
  } catch {
    /* not JSON: keep the status line */
  }
  return new ApiError(resp.status, kind, message, field);
}

/** One request. Every API call carries a token; the only public route the console uses (`/v1/sizes`) takes one as well. */
export async function raw(method: string, path: string, body?: unknown, secret = token()): Promise<Response> {
  if (!secret) throw new ApiError(401, "unauthenticated", "not signed in");
  const headers: Record<string, string> = { authorization: `Bearer ${secret}` };
  if (body !== undefined) headers["content-type"] = "application/json";
  let resp: Response;
  try {
    resp = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
    });
  } catch (e) {
    throw new ApiError(0, "unavailable", `the server did not answer (${(e as Error).message})`);
  }
  if (!resp.ok) {
    const err = await errorOf(resp);
    if (resp.status === 401 && secret === token()) signOut(err.message);
    throw err;
  }
  return resp;
}

export async function call<T>(method: string, path: string, body?: unknown): Promise<T> {
  const resp = await raw(method, path, body);
  if (resp.status === 204) return undefined as T;
  const text = await resp.text();
  return (text ? JSON.parse(text) : undefined) as T;
}

export const get = <T>(path: string) => call<T>("GET", path);
export const post = <T>(path: string, body?: unknown) => call<T>("POST", path, body ?? {});

export const enc = encodeURIComponent;

// ---- the shapes the console reads (see /v1/openapi.json) ----

export interface Capsule {
  id: string;
  name: string;
  size: string;
  image: string;
  region: string;
  disk_gib: number;
  network: unknown;
  limits: { credit_limit: number; idle_timeout_ms: number; max_runtime_ms: number };
  url: null | { port: number; access: string; host_label: string; href?: string };
  state: string;
  state_reason: string;
  created_at_ms: number;
  terminated_at_ms: number | null;
  meter: { minutes_total: number; spent: number; runtime_before_ms: number; run_started_ms: number | null };
}

export interface LedgerEntry {
  seq: number;
  at_ms: number;
  kind: string;
  quantity: number;
  amount: number;
  capsule?: string | null;
  [k: string]: unknown;
}

export interface Event {
  seq: number;
  at_ms: number;
  capsule: string | null;
  token: string | null;
  kind: { type: string; [k: string]: unknown };
}

export interface Usage {
  compute_minutes: number;
  compute_cost: number;
  storage_gib_hours: number;
  storage_cost: number;
  traffic_mib: number;
  traffic_cost: number;
  cost: number;
}

export interface CapsuleUsage {
  capsule: Capsule;
  usage: Usage;
  entries: LedgerEntry[];
  events: Event[];
}

export interface TokenInfo {
  id: string;
  parent: string | null;
  scopes: string[];
  prefix: string | null;
  sizes: string[] | null;
  max_credit_limit: number | null;
  expires_at_ms: number | null;
  capsule: string | null;
  label: string | null;
  created_at_ms: number;
  revoked_at_ms: number | null;
}

export interface SizeInfo {
  name: string;
  vcpus: number;
  memory_mib: number;
  max_disk_gib: number;
  compute_per_minute: number;
}
