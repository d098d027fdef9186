// Follows an async call from a web page as a browser app would: the page (served by this
// script on its own origin, which the gateway allows with --cors-origins) POSTs with
// `Prefer: respond-async`, opens an `EventSource` on the call's `/events`, and records every
// event. Once the stream ends the browser reconnects with `Last-Event-ID` on its own; the
// gateway's 204 then closes the `EventSource` for good.
//
// Usage: node events.mjs GATEWAY_URL PAGE_PORT DEVICE_ID
// Prints one JSON document: {status, location, events: [{event, id, data}], closed}.

import http from "node:http";
import { chromium } from "playwright-core";

const [gateway, pagePort, device] = process.argv.slice(2);
if (!gateway || !pagePort || !device) {
  console.error("usage: node events.mjs GATEWAY_URL PAGE_PORT DEVICE_ID");
  process.exit(2);
}

const page_html = `<!doctype html><meta charset="utf-8"><title>events</title>
<script>
window.events = [];
window.sourceClosed = false;
window.run = async (gateway, device) => {
  const response = await fetch(gateway + "/api/v1/devices/" + device + "/services/count", {
    method: "POST",
    headers: { "Prefer": "respond-async", "Content-Type": "application/json" },
    body: JSON.stringify({ to: 5, every_ms: 100 }),
  });
  window.postStatus = response.status;
  window.location_header = response.headers.get("Location");
  const source = new EventSource(gateway + window.location_header + "/events");
  for (const name of ["progress", "result", "problem"]) {
    source.addEventListener(name, (e) => {
      window.events.push({ event: name, id: e.lastEventId, data: JSON.parse(e.data) });
    });
  }
  source.onerror = () => {
    // After the final event the stream ends and the browser reconnects; the 204 it gets
    // closes the source (readyState 2).
    if (source.readyState === 2) window.sourceClosed = true;
  };
};
</script>`;

const server = http.createServer((req, res) => {
  res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
  res.end(page_html);
});
await new Promise((resolve) => server.listen(Number(pagePort), "127.0.0.1", resolve));

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
let code = 0;
let page;
try {
  page = await browser.newPage();
  page.on("console", (m) => console.error("console:", m.text()));
  await page.goto(`http://127.0.0.1:${pagePort}/`);
  await page.evaluate(([g, d]) => window.run(g, d), [gateway, device]);
  await page.waitForFunction(() => window.sourceClosed, null, { timeout: 20000 });
  const result = await page.evaluate(() => ({
    status: window.postStatus,
    location: window.location_header,
    events: window.events,
    closed: window.sourceClosed,
  }));
  console.log(JSON.stringify(result));
} catch (e) {
  console.error(String(e));
  if (page) {
    const state = await page.evaluate(() => ({
      status: window.postStatus, location: window.location_header, events: window.events,
    })).catch(() => null);
    console.error("the page saw:", JSON.stringify(state));
  }
  code = 1;
} finally {
  await browser.close();
  server.close();
}
process.exit(code);
