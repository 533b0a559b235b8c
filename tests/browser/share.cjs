// Opens pages in headless Chromium (Debian's, driven by playwright-core) and
// prints what each showed, as JSON, for tests/share.rs to check.
//
//   node share.cjs '{"resolve": "*.preview.test=198.18.255.254",
//                    "pages": [{"url": "...", "expect": "chain", "screenshot": "a.png"}]}'
//
// expect: "chain" waits until the demo page has both the fetch and the
// WebSocket chain (data-fetch, data-ws on <body>); "page" takes the page as
// it loads (a 404 or 410 page, say); "login" opens /login and reports where
// its redirect landed and the cookies the browser kept for that host.
const { chromium } = require(process.env.PLAYWRIGHT_CORE || "playwright-core");

async function main() {
  const spec = JSON.parse(process.argv[2]);
  const [from, to] = (spec.resolve || "").split("=");
  const args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"];
  if (from) args.push(`--host-resolver-rules=MAP ${from} ${to}`);
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args });
  const out = [];
  try {
    for (const p of spec.pages) {
      const context = await browser.newContext({ viewport: { width: 900, height: 640 } });
      const page = await context.newPage();
      const r = { url: p.url };
      try {
        const resp = await page.goto(p.expect === "login" ? p.url + "login" : p.url, { timeout: 20000 });
        r.status = resp ? resp.status() : 0;
        if (p.expect === "chain") {
          await page.waitForFunction(() => document.body.dataset.fetch && document.body.dataset.ws, null,
            { timeout: 20000 });
          r.fetch = await page.evaluate(() => document.body.dataset.fetch);
          r.ws = await page.evaluate(() => document.body.dataset.ws);
        }
        if (p.expect === "login") {
          r.landed = page.url();
          r.cookies = (await context.cookies(page.url())).map(c => `${c.name}=${c.value}`);
        }
        r.text = (await page.evaluate(() => document.body.innerText)).slice(0, 2000);
        if (p.screenshot) await page.screenshot({ path: p.screenshot, fullPage: true });
      } catch (e) {
        r.error = String(e);
      }
      out.push(r);
      await context.close();
    }
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(out));
}

main().catch(e => { console.error(e); process.exit(1); });
