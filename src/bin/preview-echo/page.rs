//! The demo page: a browser that opens the app (through staging, or a share
//! link) sees which version answered at each hop of the chain, by `fetch`
//! and over a WebSocket. Tests read the same facts from `data-` attributes.

/// The page, for the app at `version` in `pod`.
pub fn render(version: &str, pod: &str) -> String {
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;");
    PAGE.replace("{version}", &esc(version)).replace("{pod}", &esc(pod))
}

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>preview-echo</title>
<style>
body{font-family:sans-serif;margin:2em;max-width:46em}
h1{font-size:1.4em}
li{margin:.3em 0}
.v{display:inline-block;min-width:2.5em;padding:.1em .5em;border-radius:.3em;background:#ddd;font-weight:bold}
.v2{background:#2e7d32;color:#fff}
</style></head>
<body>
<h1>preview-echo</h1>
<p>Opened at <code id="at"></code>, served by <span class="v" id="me">{version}</span> ({pod}).</p>
<h2>The chain, by fetch</h2><ol id="fetch"><li>…</li></ol>
<h2>The chain, over a WebSocket</h2><ol id="ws"></ol>
<script>
document.getElementById("at").textContent = location.origin + "/";
const cls = v => "v" + (v === "v1" ? "" : " v2");
const item = (v, what) => { const li = document.createElement("li");
  li.innerHTML = `<span class="${cls(v)}"></span> `; li.firstChild.textContent = v;
  li.append(what); return li; };
fetch(location.pathname, {headers: {accept: "application/json"}}).then(r => r.json()).then(v => {
  const ol = document.getElementById("fetch"); ol.textContent = ""; const hops = [];
  for (let h = v; h && h.version; h = h.downstream) { hops.push(h.version); ol.append(item(h.version, h.pod)); }
  document.body.dataset.fetch = hops.join(",");
}).catch(e => { document.body.dataset.fetch = "error: " + e; });
const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
const got = [];
ws.onopen = () => ws.send("end");
ws.onmessage = e => {
  if (e.data === "end") { document.body.dataset.ws = got.join(","); ws.close(); return; }
  got.push(e.data); document.getElementById("ws").append(item(e.data, "hop " + got.length));
};
ws.onerror = () => { document.body.dataset.ws = "error"; };
</script>
</body></html>
"#;
