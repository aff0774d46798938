// Bundles the console into dist/: index.html (names the hashed bundles), assets/*.js, assets/*.css.
// Prints the bytes of the console's own JS and CSS apart from xterm.js (a separate, lazily loaded chunk).
import * as esbuild from "esbuild";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { basename } from "node:path";

const dist = "dist";
rmSync(dist, { recursive: true, force: true });
mkdirSync(`${dist}/assets`, { recursive: true });

const result = await esbuild.build({
  entryPoints: { app: "src/main.ts" },
  bundle: true,
  splitting: true,
  format: "esm",
  target: "es2022",
  minify: true,
  sourcemap: false,
  outdir: `${dist}/assets`,
  entryNames: "[name]-[hash]",
  chunkNames: "[name]-[hash]",
  assetNames: "[name]-[hash]",
  legalComments: "linked",
  metafile: true,
  logLevel: "warning",
});

const outputs = Object.entries(result.metafile.outputs);
const entry = (ext) => {
  const found = outputs.find(([path, o]) => path.endsWith(ext) && (o.entryPoint === "src/main.ts" || basename(path).startsWith("app-")));
  if (!found) throw new Error(`no ${ext} output for the app entry`);
  return `assets/${basename(found[0])}`;
};
const html = readFileSync("index.html", "utf8")
  .replace("%APP_JS%", entry(".js"))
  .replace("%APP_CSS%", entry(".css"));
writeFileSync(`${dist}/index.html`, html);

// Own bytes vs xterm's, from esbuild's per-input accounting.
const tally = { js: 0, css: 0, xtermJs: 0, xtermCss: 0 };
for (const [path, o] of outputs) {
  const kind = path.endsWith(".css") ? "css" : path.endsWith(".js") ? "js" : null;
  if (!kind) continue;
  for (const [input, { bytesInOutput }] of Object.entries(o.inputs)) {
    const third = input.includes("node_modules/");
    const key = third ? (kind === "js" ? "xtermJs" : "xtermCss") : kind;
    tally[key] += bytesInOutput;
  }
}
const sizes = {
  own_js_bytes: tally.js,
  own_css_bytes: tally.css,
  xterm_js_bytes: tally.xtermJs,
  xterm_css_bytes: tally.xtermCss,
  files: Object.fromEntries(outputs.map(([p, o]) => [basename(p), o.bytes])),
};
writeFileSync(`${dist}/sizes.json`, JSON.stringify(sizes, null, 2) + "\n");
console.log(
  `console: built ${dist}/ (own JS ${tally.js} B, own CSS ${tally.css} B minified; xterm.js ${tally.xtermJs} B JS + ${tally.xtermCss} B CSS, loaded only by the terminal)`,
);
