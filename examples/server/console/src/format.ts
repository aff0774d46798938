// Display formats. Money arrives as integer micro-credits (1 credit = 1 000 000); it is shown
// as a decimal string built from integers, never through floats.

export const MICROS = 1_000_000;

export function credits(micros: number | null | undefined, decimals = 4): string {
  if (micros === null || micros === undefined) return "—";
  const neg = micros < 0;
  const abs = BigInt(Math.abs(Math.trunc(micros)));
  const whole = abs / 1_000_000n;
  let frac = (abs % 1_000_000n).toString().padStart(6, "0");
  // Keep at least `decimals` places, more when they are not zero (no rounding hides a charge).
  let keep = 6;
  while (keep > decimals && frac[keep - 1] === "0") keep--;
  frac = frac.slice(0, keep);
  return `${neg ? "-" : ""}${whole}.${frac}`;
}

export function duration(ms: number): string {
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min`;
  const hrs = Math.floor(m / 60);
  if (hrs < 48) return `${hrs} h ${m % 60} min`;
  return `${Math.floor(hrs / 24)} d ${hrs % 24} h`;
}

export function when(ms: number | null | undefined): string {
  if (!ms) return "—";
  const d = new Date(ms);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

export function bytesText(b64: string): string {
  const bin = atob(b64);
  const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
  return new TextDecoder("utf-8", { fatal: false }).decode(bytes);
}
