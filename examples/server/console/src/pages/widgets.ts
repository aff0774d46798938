import { h } from "../dom";
import { credits } from "../format";

export function stateBadge(state: string, reason?: string): HTMLElement {
  return h("span", { class: `badge state-${state}`, title: reason || state, "data-state": state }, state);
}

/** Spent against a limit: the numbers and a bar (over 80% turns amber, at the limit red). */
export function costBar(spent: number, limit: number): HTMLElement {
  const pct = limit > 0 ? Math.min(100, (spent / limit) * 100) : 100;
  const bar = h("span", { class: "bar" }, h("span", { class: `fill${pct >= 100 ? " full" : pct >= 80 ? " high" : ""}` }));
  (bar.firstChild as HTMLElement).style.width = `${pct.toFixed(1)}%`;
  return h("span", { class: "cost" }, h("span", { class: "num" }, `${credits(spent)} / ${credits(limit, 2)}`), bar);
}
