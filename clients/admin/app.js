// @ts-check
// livepush admin page. Served at /admin/app.js; the client comes from /livepush.js.
//
// The API key is entered once and kept in sessionStorage (this tab only). With it the page
// mints a token for the admin room (POST /v1/admin/token) and joins that room with livepush's
// own browser client: every node sends its watchers a snapshot of all nodes there each
// `interval_ms` (docs/protocol.md, "Admin page"). Actions go through the HTTP API with the key:
// close / open / mute / unmute are control messages, and a test message is a plain publish.
// Rates (publishes, deliveries, a room's messages per second) come from two snapshots.
//
// Page parameters (optional): ?transport=auto|websocket|longpoll|sse (the live feed's).

import { LivepushClient } from '/livepush.js';

const KEY_STORAGE = 'livepush-admin-key';
const params = new URLSearchParams(location.search);
const transportParam = params.get('transport') || 'auto';
const transport = /** @type {'auto'|'websocket'|'longpoll'|'sse'} */ (
  ['auto', 'websocket', 'longpoll', 'sse'].includes(transportParam) ? transportParam : 'auto'
);

const $ = (/** @type {string} */ id) =>
  /** @type {HTMLElement} */ (document.querySelector(`[data-testid="${id}"]`));

/** @type {LivepushClient|null} */
let client = null;
/** @type {ReturnType<typeof setTimeout>|null} */
let renewTimer = null;
/** Rates are averaged over this window of snapshots. */
const RATE_WINDOW_MS = 5000;
/** Recent snapshots, oldest first, for rates. @type {any[]} */
let recent = [];

// ---- the API key ------------------------------------------------------------------------------

function storedKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE);
  } catch {
    return null;
  }
}

/** @param {string|null} key */
function storeKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // Storage disabled: the key lives as long as the page.
  }
}

let apiKey = storedKey();

class ApiFailure extends Error {
  /** @param {number} status @param {string} code @param {string} message */
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/**
 * Call the HTTP API with the key; a JSON error answer becomes an ApiFailure.
 * @param {string} method @param {string} path @param {any} [body]
 */
async function api(method, path, body) {
  /** @type {Record<string, string>} */
  const headers = { authorization: `Bearer ${apiKey}` };
  if (body !== undefined) headers['content-type'] = 'application/json';
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiFailure(0, 'network', `the server cannot be reached (${e instanceof Error ? e.message : e})`);
  }
  const answer = await res.json().catch(() => null);
  if (!res.ok) {
    throw new ApiFailure(res.status, answer?.error || 'http', answer?.message || `HTTP ${res.status}`);
  }
  return answer;
}

// ---- signing in and out -----------------------------------------------------------------------

const keyForm = /** @type {HTMLFormElement} */ ($('key-form'));
const keyInput = /** @type {HTMLInputElement} */ ($('key-input'));
const keyError = $('key-error');

/** @param {string|null} message */
function showSignIn(message) {
  $('signin').hidden = false;
  $('dashboard').hidden = true;
  $('sign-out').hidden = true;
  keyError.hidden = !message;
  keyError.textContent = message || '';
  showFeed('signed-out', 'signed out');
  keyInput.focus();
}

/** Stop the feed; with `message`, ask for the key again. @param {string|null} message */
function signOut(message) {
  if (renewTimer !== null) clearTimeout(renewTimer);
  renewTimer = null;
  client?.close();
  client = null;
  recent = [];
  apiKey = null;
  storeKey(null);
  showSignIn(message);
}

/** @param {unknown} e */
function describe(e) {
  if (e instanceof ApiFailure && e.status === 401) {
    return 'The server refused this API key (401 unauthorized). Check --api-key and sign in again.';
  }
  return e instanceof Error ? e.message : String(e);
}

async function signIn() {
  let minted;
  try {
    minted = await api('POST', '/v1/admin/token');
  } catch (e) {
    signOut(describe(e));
    return;
  }
  storeKey(apiKey);
  $('signin').hidden = true;
  $('dashboard').hidden = false;
  $('sign-out').hidden = false;
  log(`signed in; live feed from node ${minted.node} every ${minted.interval_ms} ms`);
  startFeed(minted);
  // The first figures at once, without waiting for the feed's first snapshot.
  api('GET', '/v1/admin/stats').then(render, (e) => log(`stats: ${describe(e)}`));
}

keyForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  apiKey = keyInput.value.trim();
  keyInput.value = '';
  if (apiKey) signIn();
});

$('sign-out').addEventListener('click', () => signOut(null));

// ---- the live feed (livepush's own client) ----------------------------------------------------

const FEED_LABEL = {
  idle: 'starting',
  connecting: 'connecting…',
  connected: 'live',
  reconnecting: 'reconnecting…',
  parked: 'token refused',
  closed: 'stopped',
  'signed-out': 'signed out',
};

/** @param {string} state @param {string} [label] */
function showFeed(state, label) {
  const el = $('feed-state');
  el.dataset.state = state;
  /** @type {HTMLElement} */ (el.querySelector('.label')).textContent =
    label || FEED_LABEL[/** @type {keyof typeof FEED_LABEL} */ (state)] || state;
}

/** @param {{token: string, room: string, type: string, ttl_s: number}} minted */
function startFeed(minted) {
  const c = new LivepushClient({
    server: location.origin,
    token: minted.token,
    transport,
    rooms: [minted.room],
    clientName: 'livepush-admin/0.1',
  });
  client = c;
  Object.assign(window, { livepush: c });
  c.on('state', ({ state }) => {
    if (client !== c) return;
    showFeed(state, state === 'connected' && c.transport ? `live · ${c.transport}` : undefined);
    if (state === 'parked') renewToken();
  });
  c.on('connected', ({ transport: t }) => {
    if (client === c) showFeed('connected', `live · ${t}`);
  });
  c.on('transient', (m) => {
    if (client === c && m.room === minted.room && m.type === minted.type) render(m.data);
  });
  c.on('error', (e) => log(`feed: ${e.code}: ${e.message}`));
  scheduleRenewal(minted.ttl_s);
}

/** Renew the feed's token halfway through its life. @param {number} ttlS */
function scheduleRenewal(ttlS) {
  if (renewTimer !== null) clearTimeout(renewTimer);
  renewTimer = setTimeout(renewToken, Math.max(5, ttlS / 2) * 1000);
}

async function renewToken() {
  const c = client;
  if (!c) return;
  try {
    const minted = await api('POST', '/v1/admin/token');
    if (client !== c) return;
    c.setToken(minted.token);
    scheduleRenewal(minted.ttl_s);
  } catch (e) {
    if (e instanceof ApiFailure && e.status === 401) signOut(describe(e));
    else {
      log(`token renewal: ${describe(e)}; retrying in 10 s`);
      if (renewTimer !== null) clearTimeout(renewTimer);
      renewTimer = setTimeout(renewToken, 10_000);
    }
  }
}

// ---- rendering --------------------------------------------------------------------------------

const fmt = new Intl.NumberFormat('en', { maximumFractionDigits: 1 });

/** @param {number|null|undefined} n */
const num = (n) => (n === null || n === undefined || !Number.isFinite(n) ? '—' : fmt.format(n));

/** Per second between two snapshots. @param {number} now @param {number|undefined} before @param {number} dtMs */
function rate(now, before, dtMs) {
  if (before === undefined || dtMs <= 0 || now < before) return null;
  return ((now - before) * 1000) / dtMs;
}

/** @param {number} s */
function uptime(s) {
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

/**
 * @param {string} tag @param {Record<string, string>} [attrs] @param {Array<Node|string>} [children]
 * @returns {HTMLElement}
 */
function el(tag, attrs = {}, children = []) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('data-')) e.setAttribute(k, v);
    else /** @type {any} */ (e)[k] = v;
  }
  e.append(...children);
  return e;
}

/** @param {any[]} nodes @param {(n: any) => number} f */
const sum = (nodes, f) => nodes.reduce((a, n) => a + f(n), 0);

/** @param {any} snap */
function render(snap) {
  if (!snap || !Array.isArray(snap.nodes)) return;
  const latest = recent[recent.length - 1];
  if (latest && snap.ts <= latest.ts) return; // an older answer arriving late
  // The oldest snapshot within the window is what rates are measured from.
  recent = recent.filter((/** @type {any} */ s) => snap.ts - s.ts <= RATE_WINDOW_MS);
  const before = recent[0] || latest || null;
  recent.push(snap);
  const dt = before ? snap.ts - before.ts : 0;
  /** @type {Map<string, any>} */
  const nodesBefore = new Map((before?.nodes || []).map((/** @type {any} */ n) => [n.id, n]));
  /** @type {Map<string, any>} */
  const roomsBefore = new Map((before?.rooms || []).map((/** @type {any} */ r) => [r.room, r]));
  const nodes = snap.nodes;

  $('updated').textContent = `updated ${new Date(snap.ts).toLocaleTimeString()}${
    snap.complete === false ? ' · other nodes unreadable (shared store down)' : ''}`;
  $('nodes-count').textContent = String(nodes.length);
  const t = (/** @type {string} */ k) => sum(nodes, (n) => n.terminals[k]);
  $('terminals-online').textContent = num(t('online'));
  $('terminals-by-transport').textContent = `ws ${t('ws')} · long-poll ${t('longpoll')} · sse ${t('sse')}`;
  const c = (/** @type {string} */ k) => sum(nodes, (n) => n.connections[k]);
  $('connections').textContent = num(c('ws') + c('longpoll') + c('sse'));
  $('connections-by-transport').textContent = `ws ${c('ws')} · long-poll ${c('longpoll')} · sse ${c('sse')}`;
  $('rooms-open').textContent = num(sum(nodes, (n) => n.rooms_open));
  $('rooms-listed').textContent = `${snap.rooms_listed} listed by the nodes`;
  const published = (/** @type {any} */ n) => n.published.reliable + n.published.transient;
  /** @param {(n: any) => number} f */
  const nodeRate = (f) => {
    let total = 0;
    let known = false;
    for (const n of nodes) {
      const b = nodesBefore.get(n.id);
      const r = b ? rate(f(n), f(b), n.ts - b.ts) : null;
      if (r !== null) {
        total += r;
        known = true;
      }
    }
    return known ? total : null;
  };
  $('publish-rate').textContent = num(nodeRate(published));
  $('published').textContent = `${num(sum(nodes, (n) => n.published.reliable))} reliable · ${num(sum(nodes, (n) => n.published.transient))} transient`;
  $('delivery-rate').textContent = num(nodeRate((n) => n.transient_deliveries));
  $('slow').textContent = num(sum(nodes, (n) => n.slow_consumer_closes));
  $('slow-detail').textContent = `closes · ${num(sum(nodes, (n) => n.dropped_transient))} transient dropped · ${num(sum(nodes, (n) => n.prompted))} prompted`;
  $('inbox-pending').textContent = num(sum(nodes, (n) => n.inbox.pending));
  $('inbox-detail').textContent = `in ${num(sum(nodes, (n) => n.inbox.inboxes))} inboxes · ${num(sum(nodes, (n) => n.inbox.posted))} posted`;
  $('wakes').textContent = num(sum(nodes, (n) => n.inbox.wakes_sent));

  const roomRows = snap.rooms.map((/** @type {any} */ r) => {
    const b = roomsBefore.get(r.room);
    const msgRate = b ? rate(r.seq, b.seq, dt) : null;
    const state = el('td', { class: 'flags' }, [
      r.closed ? el('span', { class: 'badge bad' }, ['closed']) : el('span', { class: 'badge ok' }, ['open']),
      ...(r.muted ? [el('span', { class: 'badge warn' }, ['muted'])] : []),
    ]);
    const actions = el('td', { class: 'actions' }, [
      actionButton(r.closed ? 'Open' : 'Close', r.room, r.closed ? 'open' : 'close', r.closed ? '' : 'danger'),
      actionButton(r.muted ? 'Unmute' : 'Mute', r.room, r.muted ? 'unmute' : 'mute', ''),
      el('button', { type: 'button', class: 'ghost', 'data-testid': 'room-test', onclick: () => prefillPublish(r.room) }, ['Test…']),
    ]);
    return el('tr', { 'data-testid': 'room-row', 'data-room': r.room }, [
      el('td', { class: 'room' }, [r.room]),
      el('td', { class: 'n', 'data-testid': 'room-online' }, [String(r.online)]),
      el('td', { class: 'n', 'data-testid': 'room-rate' }, [num(msgRate)]),
      el('td', { class: 'n', 'data-testid': 'room-seq' }, [String(r.seq)]),
      el('td', { class: 'n' }, [String(r.history)]),
      state,
      actions,
    ]);
  });
  $('rooms').replaceChildren(...roomRows);
  $('rooms-empty').hidden = roomRows.length > 0;

  const nodeRows = nodes.map((/** @type {any} */ n) => {
    const b = nodesBefore.get(n.id);
    const pubRate = b ? rate(published(n), published(b), n.ts - b.ts) : null;
    return el('tr', { 'data-testid': 'node-row', 'data-node': n.id }, [
      el('td', { class: 'mono' }, [n.id + (n.id === snap.node ? ' (this one)' : '')]),
      el('td', {}, [n.version]),
      el('td', { class: 'n' }, [uptime(n.uptime_s)]),
      el('td', {}, [n.healthy ? el('span', { class: 'badge ok' }, ['ok']) : el('span', { class: 'badge bad' }, ['degraded'])]),
      el('td', { class: 'n' }, [String(n.connections.ws)]),
      el('td', { class: 'n' }, [String(n.connections.longpoll)]),
      el('td', { class: 'n' }, [String(n.connections.sse)]),
      el('td', { class: 'n' }, [String(n.terminals.online)]),
      el('td', { class: 'n' }, [String(n.rooms_open)]),
      el('td', { class: 'n' }, [num(pubRate)]),
      el('td', { class: 'n' }, [String(n.slow_consumer_closes)]),
      el('td', { class: 'n' }, [String(n.inbox.pending)]),
      el('td', { class: 'n' }, [String(n.inbox.wakes_sent)]),
    ]);
  });
  $('nodes').replaceChildren(...nodeRows);
}

// ---- actions ----------------------------------------------------------------------------------

/** @param {string} text */
function log(text) {
  const li = el('li', {}, [`${new Date().toLocaleTimeString()}  ${text}`]);
  $('log').prepend(li);
  while ($('log').childElementCount > 50) $('log').lastElementChild?.remove();
}

/**
 * A control action on a room (a reliable `control` message).
 * @param {string} label @param {string} room @param {string} action @param {string} cls
 */
function actionButton(label, room, action, cls) {
  return el('button', {
    type: 'button',
    class: cls,
    title: `${action} the room (a control message)`,
    'data-testid': `room-${action}`,
    onclick: async (/** @type {MouseEvent} */ ev) => {
      const button = /** @type {HTMLButtonElement} */ (ev.currentTarget);
      button.disabled = true;
      try {
        const r = await api('POST', `/v1/rooms/${encodeURIComponent(room)}/messages`, {
          type: 'control',
          data: { action, by: 'admin' },
        });
        log(`${action} ${room}: seq ${r.seq}`);
      } catch (e) {
        log(`${action} ${room} failed: ${describe(e)}`);
        if (e instanceof ApiFailure && e.status === 401) signOut(describe(e));
      } finally {
        button.disabled = false;
      }
    },
  }, [label]);
}

const publishRoom = /** @type {HTMLInputElement} */ ($('publish-room'));

/** @param {string} room */
function prefillPublish(room) {
  publishRoom.value = room;
  /** @type {HTMLTextAreaElement} */ ($('publish-data')).focus();
}

$('publish-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const room = publishRoom.value.trim();
  const type = /** @type {HTMLInputElement} */ ($('publish-type')).value.trim();
  const cls = /** @type {HTMLSelectElement} */ ($('publish-class')).value;
  let data;
  try {
    data = JSON.parse(/** @type {HTMLTextAreaElement} */ ($('publish-data')).value);
  } catch (e) {
    log(`publish: the data is not JSON (${e instanceof Error ? e.message : e})`);
    return;
  }
  try {
    const r = await api('POST', `/v1/rooms/${encodeURIComponent(room)}/messages`, {
      type,
      data,
      ...(cls ? { class: cls } : {}),
    });
    log(`published ${type} to ${room}: ${r.seq !== undefined ? `seq ${r.seq}` : `transient, ${r.delivered ?? 0} queued here`}`);
  } catch (e) {
    log(`publish to ${room} failed: ${describe(e)}`);
    if (e instanceof ApiFailure && e.status === 401) signOut(describe(e));
  }
});

// ---- start ------------------------------------------------------------------------------------

if (apiKey) signIn();
else showSignIn(null);
