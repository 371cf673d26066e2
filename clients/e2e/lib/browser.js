// Headless Chromium (Debian's package) driven by playwright-core.
import { chromium } from 'playwright-core';

export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

/** Without the background-networking flags Chromium's connections are refused here. */
export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

export function launch() {
  return chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
}

/**
 * Open the demo page and record what it says on the console.
 * @param {import('playwright-core').Browser} browser
 * @param {string} url
 * @param {{noWebSocket?: boolean}} [options]  `noWebSocket`: remove `window.WebSocket` before
 *   any script of the page runs.
 */
export async function openDemo(browser, url, { noWebSocket = false } = {}) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  /** @type {string[]} */
  const consoleLines = [];
  page.on('console', (m) => consoleLines.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => consoleLines.push(`[pageerror] ${e.message}`));
  if (noWebSocket) {
    await page.addInitScript(() => {
      // @ts-ignore
      delete window.WebSocket;
    });
  }
  await page.goto(url);
  return { context, page, consoleLines };
}

/**
 * The seqs the page lists in its reliable list, in display order.
 * @param {import('playwright-core').Page} page
 * @returns {Promise<number[]>}
 */
export function listedSeqs(page) {
  return page.$$eval('[data-testid="reliable-item"]', (els) =>
    els.map((e) => Number(/** @type {HTMLElement} */ (e).dataset.seq)),
  );
}

/**
 * Wait until the page lists at least `n` reliable messages.
 * @param {import('playwright-core').Page} page
 * @param {number} n
 * @param {number} [timeout]
 */
export function waitForCount(page, n, timeout = 15_000) {
  return page.waitForFunction(
    (k) => document.querySelectorAll('[data-testid="reliable-item"]').length >= k,
    n,
    { timeout },
  );
}

/**
 * Wait until the page is connected over `transport` and has joined `room`.
 * @param {import('playwright-core').Page} page
 * @param {string} room
 * @param {string} transport
 * @param {number} [timeout]
 */
export async function waitForJoined(page, room, transport, timeout = 15_000) {
  await page.waitForFunction(
    ([r, t]) => {
      // @ts-ignore
      const c = window.livepush;
      const el = document.querySelector('[data-testid="transport"]');
      return (
        c && c.state === 'connected' && c.position(r) !== null &&
        el && el.textContent === t && el.getAttribute('data-transport') === t
      );
    },
    [room, transport],
    { timeout },
  );
}

/** @param {number} ms */
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Save a screenshot of `page` as `target/screenshots/NAME.png` (from the repository root),
 * for a person to look at after the run.
 * @param {import('playwright-core').Page} page
 * @param {string} name
 */
export async function screenshot(page, name) {
  const { mkdir } = await import('node:fs/promises');
  const path = await import('node:path');
  const { fileURLToPath } = await import('node:url');
  const dir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../target/screenshots');
  await mkdir(dir, { recursive: true });
  const file = path.join(dir, `${name}.png`);
  await page.screenshot({ path: file });
  return file;
}
