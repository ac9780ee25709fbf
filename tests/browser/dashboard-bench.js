// The workspaces page with many workspaces, beside the JSON API call that
// lists them, in the same browser and run: bytes transferred and time to
// first render (the table filled), medians of RUNS loads each.
//
//   node dashboard-bench.js <primary URL> <username> <password> [runs]
const { chromium } = require('playwright-core');

const [url, user, password, runsArg] = process.argv.slice(2);
const runs = Number(runsArg || 7);
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; };

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync'],
  });
  try {
    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    await page.goto(`${url}/login?redirect=/workspaces`);
    await page.fill('input[name=email]', user);
    await page.fill('input[name=password]', password);
    await Promise.all([page.waitForURL(/\/workspaces$/), page.click('button[type=submit]')]);
    const count = await page.evaluate(() => fetch('/api/v2/workspaces').then((r) => r.json()).then((j) => j.workspaces.length));
    const pageMs = []; const pageBytes = []; const apiMs = []; const apiBytes = [];
    for (let i = 0; i < runs; i++) {
      // A cold load: nothing cached.
      const cdp = await ctx.newCDPSession(page);
      await cdp.send('Network.clearBrowserCache');
      await page.goto(`${url}/workspaces`);
      await page.waitForFunction((n) => document.querySelectorAll('tr[data-workspace]').length === n, count);
      const m = await page.evaluate(() => {
        const nav = performance.getEntriesByType('navigation')[0];
        const bytes = performance.getEntriesByType('resource').reduce((a, r) => a + r.transferSize, nav.transferSize);
        return { ms: performance.now(), bytes };
      });
      pageMs.push(m.ms); pageBytes.push(m.bytes);
      const a = await page.evaluate(async () => {
        performance.clearResourceTimings();
        const t = performance.now();
        const r = await fetch('/api/v2/workspaces', { cache: 'no-store' });
        await r.json();
        const ms = performance.now() - t;
        const e = performance.getEntriesByType('resource').find((x) => x.name.endsWith('/api/v2/workspaces'));
        return { ms, bytes: e ? e.transferSize : 0 };
      });
      apiMs.push(a.ms); apiBytes.push(a.bytes);
    }
    const out = {
      workspaces: count, runs,
      page: { ms: median(pageMs), bytes: median(pageBytes) },
      api: { ms: median(apiMs), bytes: median(apiBytes) },
    };
    out.ratio = { ms: out.page.ms / out.api.ms, bytes: out.page.bytes / out.api.bytes };
    console.log(JSON.stringify(out, null, 2));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
