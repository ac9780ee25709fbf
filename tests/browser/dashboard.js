// The dashboard in headless Chromium, through a whole user journey on a
// fresh deployment: set up the first user, sign in, create a workspace from
// the local-process template, watch it become ready (pushed, not polled),
// open its app through the nearest region, type in the web terminal (and
// get the same shell back after a reload), stop the workspace, create an
// API key, and as the owner suspend a user and find that in the audit log.
// Screenshots of the main pages go to <screenshots dir>.
//
//   node dashboard.js <primary URL> <work dir> <app port> <screenshots dir> <devmesh binary>
const assert = require('node:assert/strict');
const { execFileSync } = require('node:child_process');
const path = require('node:path');
const { chromium } = require('playwright-core');

const [url, work, appPort, shots, bin] = process.argv.slice(2);
const owner = { username: 'ada', email: 'ada@example.com', password: 'ada-password-1' };

function cli(...args) {
  return execFileSync(bin, args, {
    env: { ...process.env, DEVMESH_CONFIG_DIR: `${work}/dash-cli` },
    encoding: 'utf8',
  });
}

async function shot(page, name) {
  await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
}

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const ctx = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1200, height: 800 } });
    const page = await ctx.newPage();
    const problems = [];
    page.on('console', (m) => { if (m.type() === 'error') problems.push(m.text()); });
    page.on('dialog', (d) => d.accept());

    // A fresh deployment sends the visitor to set up its owner.
    const resp = await page.goto(`${url}/workspaces`);
    const csp = resp.headers()['content-security-policy'];
    assert.match(csp, /script-src 'self'/, 'pages carry a content security policy');
    assert.match(csp, /frame-ancestors 'none'/, 'pages refuse framing');
    await page.waitForURL(/\/setup$/);
    await page.fill('#s-name', owner.username);
    await page.fill('#s-email', owner.email);
    await page.fill('#s-pass', owner.password);
    await Promise.all([page.waitForURL(/\/login/), page.click('button[type=submit]')]);

    // Sign in; back on the workspaces page, empty.
    await page.fill('input[name=email]', owner.username);
    await page.fill('input[name=password]', owner.password);
    await Promise.all([page.waitForURL(/\/workspaces$/), page.click('button[type=submit]')]);
    await page.getByText('No workspaces yet.').waitFor();
    // Before signing in, the app's first call was refused (401) and sent
    // the browser to sign in: expected. From here on, no errors at all.
    problems.length = 0;

    // The template, pushed from the CLI as the README says.
    cli('login', url, '--email', owner.username, '--password', owner.password);
    cli('templates', 'push', 'local-process', '-d', path.join(__dirname, '../../examples/templates/local-process'));

    // Create a workspace: parameters checked as they are typed.
    await page.click('text=Create workspace');
    await page.waitForURL(/\/workspaces\/new$/);
    await page.fill('#ws-name', 'Bad Name');
    await page.getByText('Lowercase letters, digits and dashes.').waitFor();
    assert.equal(await page.isDisabled('button[type=submit]'), true, 'an invalid name cannot be submitted');
    await page.fill('#ws-name', 'dash');
    await page.fill('#param-web_port', 'eighty');
    await page.getByText('Must be a number.').waitFor();
    await page.fill('#param-web_port', appPort);
    await page.fill('#param-home_root', `${work}/homes`);
    await shot(page, 'create-workspace');
    await Promise.all([page.waitForURL(/\/workspaces\/[0-9a-f-]{36}$/), page.click('button[type=submit]')]);

    // The build's log streams in; the status turns ready without a reload.
    await page.locator('#build-log').getByText('Apply complete!').waitFor({ timeout: 120000 });
    await page.locator('#ws-status', { hasText: 'running · ready' }).waitFor({ timeout: 60000 });
    await shot(page, 'workspace');

    // The app, through the nearest region (the primary here).
    const [app] = await Promise.all([ctx.waitForEvent('page'), page.click('a[data-app=web]')]);
    await app.waitForLoadState();
    await app.getByText('Hello from the dashboard workspace').waitFor();
    assert.match(app.url(), /^https?:\/\/web--main--dash--ada\.apps\.localhost:\d+\/$/);
    await app.close();

    // The web terminal: a command and its output, and the same shell after a reload.
    await page.click('text=Open terminal');
    await page.waitForURL(/\/terminal\/[0-9a-f-]{36}\?session=/);
    await page.getByText('Connected.').waitFor();
    await page.click('#terminal');
    await page.keyboard.type('export MARK=$((40 + 2)); echo "mark is $MARK"\n');
    await page.locator('.xterm-rows').getByText('mark is 42').first().waitFor();
    await shot(page, 'terminal');
    await page.reload();
    await page.getByText('Connected.').waitFor();
    await page.click('#terminal');
    await page.keyboard.type('echo "still $MARK"\n');
    await page.locator('.xterm-rows').getByText('still 42').first().waitFor();

    // Stop it: the list shows it stopped, pushed from the server.
    await page.click('nav >> text=Workspaces');
    await page.locator('tr[data-workspace=dash] [data-status="running · ready"]').waitFor();
    await shot(page, 'workspaces');
    const id = cli('show', 'dash', '-o', 'json');
    const wsId = JSON.parse(id).id;
    await page.goto(`${url}/workspaces/${wsId}`);
    await page.click('button:text-is("Stop")');
    await page.locator('#ws-status', { hasText: 'stopped' }).waitFor({ timeout: 120000 });
    // The build history: the start, then the stop, each with its log, and
    // the parameters each used.
    await page.locator('tr[data-build="2"]', { hasText: 'stop' }).waitFor();
    await page.locator('tr[data-build="1"]', { hasText: `web_port=${appPort}` }).waitFor();
    await page.locator('tr[data-build="1"] button').click();
    await page.locator('#build-log').getByText('Apply complete!').waitFor();
    await page.click('nav >> text=Workspaces');
    await page.locator('tr[data-workspace=dash] [data-status="stopped"]').waitFor();
    await page.fill('#ws-search', 'nothing-like-it');
    await page.getByText('No workspace matches.').waitFor();

    // Templates: the version that is active, and its parameters.
    await page.click('nav >> text=Templates');
    await page.getByText('Versions (1)').click({ timeout: 10000 }).catch(async (e) => {
      throw new Error(`${e.message}\n${await page.locator('main').innerText()}\n${problems.join('\n')}`);
    });
    await page.locator('tr[data-version="1"]', { hasText: 'active' }).waitFor();
    await page.locator('tr[data-version="1"]', { hasText: 'web_port' }).waitFor();
    await shot(page, 'templates');

    // An API key, shown once.
    await page.click('nav >> text=Account');
    await page.fill('#key-name', 'laptop');
    await page.click('text=Create key');
    const key = await page.locator('#new-key').textContent();
    assert.match(key, /^[A-Za-z0-9]{10}-[A-Za-z0-9]+$/, 'the new key is shown');
    await page.locator('tr[data-key=laptop]').waitFor();
    await shot(page, 'account');

    // Regions: latency from this browser.
    await page.click('nav >> text=Regions');
    await page.locator('[data-latency=primary]', { hasText: 'ms' }).waitFor();
    await shot(page, 'regions');
    // A pinned region is kept by the server, for this user.
    await page.selectOption('#region-pin', 'primary');
    await page.getByText('App links go through primary.').waitFor();
    await page.reload();
    assert.equal(await page.inputValue('#region-pin'), 'primary', 'the pin survives a reload');
    const prefs = await page.evaluate(() => fetch('/api/v2/users/me/preferences').then((r) => r.json()));
    assert.equal(prefs.region, 'primary');

    // As the owner: a user created, then suspended, and the audit log says so.
    await page.click('nav >> text=Users');
    await page.fill('#u-name', 'bob');
    await page.fill('#u-email', 'bob@example.com');
    await page.fill('#u-pass', 'bob-password-1');
    await page.click('text=Create user');
    await page.locator('tr[data-user=bob]').waitFor();
    await page.locator('tr[data-user=bob] button:text-is("Make owner")').click();
    await page.locator('tr[data-user=bob]', { hasText: 'owner' }).waitFor();
    await page.locator('tr[data-user=bob] button:text-is("Suspend")').click();
    await page.locator('tr[data-user=bob]', { hasText: 'suspended' }).waitFor();
    await page.click('nav >> text=Audit');
    await page.fill('#audit-action', 'suspend');
    await page.click('button:text-is("Filter")');
    await page.locator('tr[data-action=suspend]', { hasText: 'bob' }).waitFor();
    await shot(page, 'audit');

    // Edges: added with its token shown once.
    await page.click('nav >> text=Edges');
    await page.fill('#e-name', 'sydney');
    await page.fill('#e-url', 'https://sydney.example.com');
    await page.click('text=Add edge');
    await page.locator('#edge-token').waitFor({ timeout: 10000 }).catch(async () => {
      throw new Error(`no edge token; the page said: ${await page.locator('#toast').textContent()}`);
    });
    assert.match(await page.locator('#edge-token').textContent(), /^[0-9a-f-]{36}:[A-Za-z0-9]{32}$/);
    await page.locator('tr[data-edge=sydney]').waitFor();

    // Keyboard: on a fresh page the skip link is the first stop, and it
    // lands on the content.
    await page.goto(`${url}/audit?action=suspend`);
    await page.locator('tr[data-action=suspend]').first().waitFor();
    await page.keyboard.press('Tab');
    assert.equal(await page.evaluate(() => document.activeElement.textContent), 'Skip to content');
    await page.keyboard.press('Enter');
    assert.equal(await page.evaluate(() => document.activeElement.id), 'main');

    // A narrow screen still shows every workspace's name and status.
    await page.setViewportSize({ width: 380, height: 800 });
    await page.click('nav >> text=Workspaces');
    await page.locator('tr[data-workspace=dash] [data-status="stopped"]').waitFor();
    await shot(page, 'workspaces-narrow');

    assert.deepEqual(problems, [], 'no script errors');
    console.log('browser: dashboard journey OK');
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
