// End-to-end: the first run, as a newcomer does it (README "Run it"). `livepush serve` with no
// settings (no LIVEPUSH_* environment, a fresh directory as its working directory) generates
// its secrets; the test reads what it printed as a person would, opens the printed address in
// headless Chromium, enters the printed API key in the page and presses "Try it".
// The README's command listens on 127.0.0.1:8080, which may be taken here: the test adds
// `--listen 127.0.0.1:0` and nothing else.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { launch, screenshot } from '../lib/browser.js';
import { waitFor } from '../lib/events.js';
import { BIN, stopProcess } from '../lib/server.js';

/** @type {import('playwright-core').Browser} */
let browser;
before(async () => {
  browser = await launch();
});
after(async () => {
  await browser?.close();
});

/**
 * `livepush serve` as the README starts it, in `dir`; `output()` is what a terminal shows.
 * @param {string} dir
 */
function serveLikeANewcomer(dir) {
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('LIVEPUSH_')));
  const child = spawn(BIN, ['serve', '--listen', '127.0.0.1:0'], { cwd: dir, env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  for (const s of [child.stdout, child.stderr]) {
    s.setEncoding('utf8');
    s.on('data', (d) => {
      if (out.length < 200_000) out += d;
    });
  }
  return {
    output: () => out,
    stop: () => stopProcess(child),
  };
}

/** @param {string[]} lines */
const pageErrors = (lines) => lines.filter((l) => l.startsWith('[pageerror]'));

test('first run: the printed address opens a connected room, and "Try it" with the printed API key shows the gift', {
  timeout: 90_000,
}, async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'livepush-firstrun-'));
  const server = serveLikeANewcomer(dir);
  /** @type {import('playwright-core').BrowserContext[]} */
  const contexts = [];
  /** @type {string[]} */
  const consoleLines = [];
  try {
    // What the terminal shows: the generated key, the listening line, the address to open.
    const printed = await waitFor(() => {
      const text = server.output();
      const open = text.match(/^open (http:\/\/\S+)$/m);
      const key = text.match(/no API key \(--api-key\) given; generated one for this run: (\S+)$/m);
      return open && key && text.includes('livepush listening on http://') ? { url: open[1], key: key[1] } : null;
    }, 20_000, 'the address and the API key on the terminal').catch((e) => {
      throw new Error(`${e.message}\n${server.output()}`);
    });
    assert.match(printed.url, /^http:\/\/127\.0\.0\.1:\d+\/#token=[\w-]+\.[\w-]+\.[\w-]+$/);
    assert.ok(existsSync(path.join(dir, 'livepush-data')), 'the data directory is made in the working directory');

    const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
    contexts.push(context);
    const page = await context.newPage();
    page.on('console', (m) => consoleLines.push(`[${m.type()}] ${m.text()}`));
    page.on('pageerror', (e) => consoleLines.push(`[pageerror] ${e.message}`));
    await page.goto(printed.url);

    // Connected, counted, and the token is out of the address bar.
    await page.waitForSelector('[data-testid="state"][data-state="connected"]', { timeout: 15_000 });
    await page.waitForFunction(() => document.querySelector('[data-testid="online"]')?.textContent === '1', null, {
      timeout: 10_000,
    });
    assert.equal(await page.textContent('[data-testid="transport"]'), 'websocket');
    assert.equal(await page.isHidden('[data-testid="access"]'), true);
    assert.ok(!page.url().includes('token'), `the address bar keeps no token: ${page.url()}`);
    await screenshot(page, 'firstrun-connected');

    // "Try it" without the key says what to do.
    const rocket = '[data-publish="gift"][data-gift="rocket"]';
    await page.click(rocket);
    await page.waitForSelector('[data-testid="devtools-hint"].bad', { timeout: 10_000 });
    assert.match((await page.textContent('[data-testid="devtools-hint"]')) ?? '', /wants its API key.*printed/);

    // With the key that `serve` printed: the gift arrives, in the list and over the stream.
    await page.fill('[data-testid="api-key-input"]', printed.key);
    await page.click('[data-testid="api-key-save"]');
    assert.equal(await page.textContent('[data-testid="api-key-state"]'), 'saved for this tab');
    await page.click(rocket);
    await page.waitForSelector('[data-testid="reliable-item"][data-type="gift"]', { timeout: 10_000 });
    await page.waitForSelector('[data-testid="gift-burst"]', { timeout: 5000 });
    assert.match((await page.textContent('[data-testid="reliable-item"][data-type="gift"]')) ?? '', /sent rocket/);
    await page.waitForTimeout(700); // the gift animation under way
    await screenshot(page, 'firstrun-gift');

    // A reload keeps both (sessionStorage): connected again, and "Try it" still works.
    await page.reload();
    await page.waitForSelector('[data-testid="state"][data-state="connected"]', { timeout: 15_000 });
    await page.click('[data-publish="red_envelope"]');
    await page.waitForSelector('[data-testid="reliable-item"][data-type="red_envelope"]', { timeout: 10_000 });
    assert.deepEqual(pageErrors(consoleLines), []);

    // Opened without the token (another tab, the bare address): the page says why and how.
    const bare = await browser.newContext({ viewport: { width: 1280, height: 860 } });
    contexts.push(bare);
    const lost = await bare.newPage();
    const lostLines = /** @type {string[]} */ ([]);
    lost.on('pageerror', (e) => lostLines.push(`[pageerror] ${e.message}`));
    await lost.goto(printed.url.replace(/#.*$/, ''));
    await lost.waitForSelector('[data-testid="access"]:not([hidden])', { timeout: 15_000 });
    assert.equal(await lost.textContent('[data-testid="access-title"]'), 'This page needs a viewer token');
    const mint = (await lost.textContent('[data-testid="access-mint"]')) ?? '';
    assert.match(mint, /livepush token --sub demo-viewer --rooms 'live:demo,demo:\*' --send --ttl 24h/);
    assert.match((await lost.textContent('[data-testid="access"]')) ?? '', /open http:\/\/127\.0\.0\.1:\d+\/#token=/);
    await screenshot(lost, 'firstrun-no-token');

    // Pasting the printed address into the page lets it in.
    await lost.fill('[data-testid="token-input"]', printed.url);
    await lost.click('[data-testid="token-use"]');
    await lost.waitForSelector('[data-testid="state"][data-state="connected"]', { timeout: 15_000 });
    assert.equal(await lost.isHidden('[data-testid="access"]'), true);
    assert.deepEqual(pageErrors(lostLines), []);
  } catch (e) {
    console.error('--- page console ---');
    console.error(consoleLines.join('\n'));
    console.error('--- serve output ---');
    console.error(server.output().slice(-6000));
    throw e;
  } finally {
    for (const c of contexts) await c.close();
    await server.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});
