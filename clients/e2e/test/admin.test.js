// End-to-end: the admin page (clients/admin, served by the real server at /admin) in headless
// Chromium, with demo pages as viewers. The page asks for the API key once (kept in
// sessionStorage), follows the rooms live over livepush's own feed, and closes a room.
// Screenshots go to target/screenshots/admin*.png.
import assert from 'node:assert/strict';
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { launch, openDemo, waitForCount, waitForJoined } from '../lib/browser.js';
import { API_KEY, ROOT, startServer } from '../lib/server.js';

const SHOTS = path.join(ROOT, 'target/screenshots');

/** @type {import('playwright-core').Browser} */
let browser;
before(async () => {
  browser = await launch();
  await mkdir(SHOTS, { recursive: true });
});
after(async () => {
  await browser?.close();
});

/**
 * The online count the admin page shows for `room` (null when the room is not listed).
 * @param {import('playwright-core').Page} page @param {string} room
 */
function shownOnline(page, room) {
  return page.evaluate(
    (r) => document.querySelector(`[data-testid="room-row"][data-room="${r}"] [data-testid="room-online"]`)?.textContent ?? null,
    room,
  );
}

/**
 * Wait until the admin page shows `count` online in `room`.
 * @param {import('playwright-core').Page} page @param {string} room @param {string} count
 */
function waitForOnline(page, room, count) {
  return page.waitForFunction(
    ([r, n]) =>
      document.querySelector(`[data-testid="room-row"][data-room="${r}"] [data-testid="room-online"]`)?.textContent === n,
    [room, count],
    { timeout: 15_000 },
  );
}

describe('admin page', { concurrency: false }, () => {
  test('shows the room live, follows a second viewer, publishes, and closes the room', { timeout: 90_000 }, async () => {
    const server = await startServer({ args: ['--admin-interval', '250ms'] });
    /** @type {string[]} */
    const consoleLines = [];
    /** @type {Array<{close: () => Promise<void>}>} */
    const contexts = [];
    try {
      const room = 'live:admin-e2e';
      const first = await openDemo(browser, `${server.url}/?room=${room}`);
      contexts.push(first.context);
      await waitForJoined(first.page, room, 'websocket');

      const context = await browser.newContext({ viewport: { width: 1360, height: 900 } });
      contexts.push(context);
      const page = await context.newPage();
      page.on('console', (m) => consoleLines.push(`[${m.type()}] ${m.text()}`));
      page.on('pageerror', (e) => consoleLines.push(`[pageerror] ${e.message}`));
      await page.goto(`${server.url}/admin`);

      // A wrong key: a clear message, and the form stays.
      await page.fill('[data-testid="key-input"]', 'not-the-key-0123456789');
      await page.click('[data-testid="key-submit"]');
      await page.waitForSelector('[data-testid="key-error"]:not([hidden])', { timeout: 10_000 });
      assert.match((await page.textContent('[data-testid="key-error"]')) ?? '', /401/);
      assert.equal(await page.evaluate(() => sessionStorage.getItem('livepush-admin-key')), null);

      await page.fill('[data-testid="key-input"]', API_KEY);
      await page.click('[data-testid="key-submit"]');
      await page.waitForSelector('[data-testid="dashboard"]:not([hidden])', { timeout: 10_000 });
      await waitForOnline(page, room, '1');
      // The live feed is livepush's own client, joined to the admin room.
      await page.waitForFunction(
        () => document.querySelector('[data-testid="feed-state"]')?.getAttribute('data-state') === 'connected',
        null,
        { timeout: 10_000 },
      );
      assert.equal(await page.textContent('[data-testid="nodes-count"]'), '1');

      // A second viewer: the count follows without a reload.
      await page.evaluate(() => Object.assign(window, { notReloaded: true }));
      const second = await openDemo(browser, `${server.url}/?room=${room}`);
      contexts.push(second.context);
      await waitForJoined(second.page, room, 'websocket');
      await waitForOnline(page, room, '2');
      assert.equal(await page.evaluate(() => /** @type {any} */ (window).notReloaded), true);
      assert.equal(await page.textContent('[data-testid="terminals-online"]'), '3', 'two viewers and the admin page');
      assert.equal(await page.textContent('[data-testid="rooms-open"]'), '1', 'the admin room aside');

      // A test message from the page reaches the viewers.
      await page.click(`[data-testid="room-row"][data-room="${room}"] [data-testid="room-test"]`);
      assert.equal(await page.inputValue('[data-testid="publish-room"]'), room);
      await page.click('[data-testid="publish-send"]');
      await waitForCount(first.page, 1);
      await waitForCount(second.page, 1);
      await page.waitForFunction(
        (r) => document.querySelector(`[data-testid="room-row"][data-room="${r}"] [data-testid="room-seq"]`)?.textContent === '1',
        room,
        { timeout: 10_000 },
      );
      await page.screenshot({ path: path.join(SHOTS, 'admin.png'), fullPage: true });

      // Close the room from the page: both viewers are told and leave.
      await page.click(`[data-testid="room-row"][data-room="${room}"] [data-testid="room-close"]`);
      for (const viewer of [first.page, second.page]) {
        await viewer.waitForFunction(
          () => /left the room/.test(document.querySelector('[data-testid="notice"]')?.textContent ?? ''),
          null,
          { timeout: 10_000 },
        );
      }
      await waitForOnline(page, room, '0');
      await page.waitForSelector(`[data-testid="room-row"][data-room="${room}"] [data-testid="room-open"]`, { timeout: 10_000 });
      const info = await server.room(room);
      assert.equal(info.closed, true);
      assert.equal(info.online, 0);
      await page.screenshot({ path: path.join(SHOTS, 'admin-closed.png'), fullPage: true });

      // The key is kept for the tab: a reload goes straight to the dashboard.
      await page.reload();
      await page.waitForSelector('[data-testid="dashboard"]:not([hidden])', { timeout: 10_000 });
      await waitForOnline(page, room, '0');
      assert.equal(await page.isHidden('[data-testid="signin"]'), true);

      // The feed over SSE: reopening the room from the API shows on the page live.
      await page.goto(`${server.url}/admin?transport=sse`);
      await page.waitForFunction(
        () => document.querySelector('[data-testid="feed-state"]')?.textContent?.includes('live · sse'),
        null,
        { timeout: 10_000 },
      );
      await waitForOnline(page, room, '0');
      await server.publish(room, 'control', { action: 'open' });
      await page.waitForSelector(`[data-testid="room-row"][data-room="${room}"] [data-testid="room-close"]`, { timeout: 10_000 });
      assert.deepEqual(consoleLines.filter((l) => l.startsWith('[pageerror]')), []);
    } catch (e) {
      console.error(consoleLines.join('\n'));
      console.error(server.logs().slice(-6000));
      throw e;
    } finally {
      for (const c of contexts.reverse()) await c.close();
      await server.stop();
    }
  });
});
