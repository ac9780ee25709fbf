// Opens a workspace app in headless Chromium the way a person would: the
// app host sends the browser to the primary, the sign-in form is filled and
// submitted, and the browser lands back on the app. Then a dev URL opens
// without signing in again, and the page must not see devmesh cookies.
//
//   node app-sign-in.js <app URL> <dev URL> <username> <password> <expected text>
const assert = require('node:assert/strict');
const { chromium } = require('playwright-core');

(async () => {
  const [appUrl, devUrl, user, password, expected] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const ctx = await browser.newContext({ ignoreHTTPSErrors: true });
    const page = await ctx.newPage();
    await page.goto(appUrl);
    assert.match(page.url(), /\/login\?redirect=/, 'an unsigned browser is sent to the sign-in page');
    await page.fill('input[name=email]', user);
    await page.fill('input[name=password]', password);
    await Promise.all([page.waitForURL(appUrl), page.click('button[type=submit]')]);
    assert.equal(page.url(), appUrl, 'back on the app, sign-in key stripped from the URL');
    assert.match(await page.textContent('body'), new RegExp(expected));
    const cookies = await page.evaluate(() => document.cookie);
    assert.doesNotMatch(cookies, /devmesh/, 'devmesh cookies are HttpOnly and never visible to the app');

    const dev = await ctx.newPage();
    await dev.goto(devUrl);
    assert.equal(dev.url(), devUrl, 'the dev URL opens without a second sign-in');
    assert.match(await dev.textContent('body'), new RegExp(expected));
    console.log('browser: sign-in flow, app and dev URL OK');
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
