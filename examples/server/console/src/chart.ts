// The usage chart: cumulative compute minutes (bars) and cumulative cost (a step line) over time,
// drawn as plain SVG from the capsule's ledger entries. No library: a few dozen elements.

import type { LedgerEntry } from "./api";
import { credits, when } from "./format";

const NS = "http://www.w3.org/2000/svg";

function s<K extends keyof SVGElementTagNameMap>(tag: K, attrs: Record<string, string | number>, text?: string): SVGElementTagNameMap[K] {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

export interface UsageSeries {
  /** Per ledger entry, in time order: when, cumulative compute minutes, cumulative cost (µcr). */
  points: { at: number; minutes: number; cost: number }[];
  minutes: number;
  cost: number;
}

/** Sums a capsule's entries: charges are negative amounts; refunds give money back. */
export function series(entries: LedgerEntry[]): UsageSeries {
  const sorted = entries.filter((e) => e.kind !== "grant").sort((a, b) => a.at_ms - b.at_ms || a.seq - b.seq);
  let minutes = 0;
  let cost = 0;
  const points = [];
  for (const e of sorted) {
    if (e.kind === "compute") minutes += e.quantity;
    cost -= e.amount;
    points.push({ at: e.at_ms, minutes, cost });
  }
  return { points, minutes, cost };
}

/** The smallest "nice" number (1, 2, 2.5 or 5 × 10^k per quarter) at or above `v`. */
function niceCeil(v: number, integer: boolean): number {
  const raw = v / 4;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw && (!integer || Number.isInteger(s))) ?? 10 * mag;
  return Math.max(integer ? Math.ceil(step) : step, integer ? 1 : 0) * 4;
}

export function usageChart(data: UsageSeries, width = 640, height = 200): SVGSVGElement {
  const pad = { l: 44, r: 64, t: 12, b: 28 };
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", id: "usage-chart" });
  svg.setAttribute("aria-label", `${data.minutes} compute minutes, cost ${credits(data.cost)}`);
  svg.dataset.minutes = String(data.minutes);
  svg.dataset.cost = String(data.cost);
  const w = width - pad.l - pad.r;
  const hgt = height - pad.t - pad.b;
  if (data.points.length === 0) {
    svg.append(s("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "axis" }, "No charges yet"));
    return svg;
  }
  const t0 = data.points[0].at;
  const t1 = Math.max(data.points[data.points.length - 1].at, t0 + 60_000);
  const maxMin = niceCeil(Math.max(4, data.minutes), true);
  const maxCost = niceCeil(Math.max(1, data.cost), false);
  const x = (t: number) => pad.l + ((t - t0) / (t1 - t0)) * w;
  const yMin = (m: number) => pad.t + hgt - (m / maxMin) * hgt;
  const yCost = (c: number) => pad.t + hgt - (c / maxCost) * hgt;

  // Grid and axes.
  for (let i = 0; i <= 4; i++) {
    const y = pad.t + (hgt * i) / 4;
    svg.append(s("line", { x1: pad.l, x2: pad.l + w, y1: y, y2: y, class: "grid-line" }));
    svg.append(s("text", { x: pad.l - 6, y: y + 4, "text-anchor": "end", class: "axis" }, String(Math.round(maxMin * (1 - i / 4)))));
    svg.append(s("text", { x: pad.l + w + 6, y: y + 4, class: "axis" }, credits(Math.round(maxCost * (1 - i / 4)), 3)));
  }
  svg.append(s("text", { x: pad.l, y: height - 8, class: "axis" }, when(t0)));
  svg.append(s("text", { x: pad.l + w, y: height - 8, "text-anchor": "end", class: "axis" }, when(t1)));

  // Compute minutes: one bar per charged minute step.
  const bw = Math.max(2, Math.min(18, w / Math.max(1, data.points.length) - 2));
  for (const p of data.points) {
    const bar = s("rect", { x: x(p.at) - bw / 2, y: yMin(p.minutes), width: bw, height: pad.t + hgt - yMin(p.minutes), class: "bar-minutes" });
    bar.append(s("title", {}, `${when(p.at)}: ${p.minutes} min, ${credits(p.cost)}`));
    svg.append(bar);
  }
  // Cost: a step line.
  let d = `M ${x(t0)} ${yCost(0)}`;
  for (const p of data.points) d += ` H ${x(p.at)} V ${yCost(p.cost)}`;
  d += ` H ${x(t1)}`;
  svg.append(s("path", { d, class: "line-cost" }));
  return svg;
}
