// livepush demo live room. Served at /demo/app.js; the client comes from /livepush.js.
//
// Page parameters (all optional):
//   ?room=live:42            room to enter (default live:demo)
//   #token=JWT or ?token=JWT terminal token (a --dev server accepts none); kept in this tab's
//                            sessionStorage and removed from the address bar
//   ?transport=auto|websocket|longpoll|sse
//   ?server=http://host:port the livepush server (default: this page's origin)
// Knobs for tests: idle_ms, ping_ms, backoff_ms, backoff_max_ms, retry_ws_ms, wait_ms.

import { LivepushClient } from '/livepush.js';

const params = new URLSearchParams(location.search);
const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.querySelector(`[data-testid="${id}"]`));

/** @param {string} name @returns {number|undefined} */
function numParam(name) {
  const v = params.get(name);
  if (v === null || v === '') return undefined;
  const n = Number(v);
  return Number.isFinite(n) && n >= 0 ? n : undefined;
}

const server = params.get('server') || location.origin;

/** sessionStorage, which may be unavailable (then nothing is kept across reloads). */
const session = {
  /** @param {string} k */
  get: (k) => { try { return sessionStorage.getItem(k); } catch { return null; } },
  /** @param {string} k @param {string|null} v */
  set: (k, v) => {
    try { if (v) sessionStorage.setItem(k, v); else sessionStorage.removeItem(k); } catch { /* not kept */ }
  },
};
const TOKEN_KEY = 'livepush-demo-token';
const API_KEY_KEY = 'livepush-demo-api-key';

/** The token of the address (`#token=`, as `serve` prints it, or `?token=`), else the saved one. */
const token = (() => {
  const hash = new URLSearchParams(location.hash.slice(1));
  const given = hash.get('token') || params.get('token');
  if (given) {
    session.set(TOKEN_KEY, given);
    // Out of the address bar (and of bookmarks and screenshots); a reload uses the saved one.
    const url = new URL(location.href);
    url.hash = '';
    url.searchParams.delete('token');
    history.replaceState(null, '', url);
  }
  return given || session.get(TOKEN_KEY);
})();
let room = params.get('room') || 'live:demo';
const transportParam = params.get('transport');
const transport = ['auto', 'websocket', 'longpoll', 'sse'].includes(transportParam || '')
  ? /** @type {'auto'|'websocket'|'longpoll'|'sse'} */ (transportParam)
  : 'auto';

const nick = (() => {
  try {
    const saved = localStorage.getItem('livepush-demo-nick');
    if (saved) return saved;
    const made = `viewer-${Math.random().toString(36).slice(2, 6)}`;
    localStorage.setItem('livepush-demo-nick', made);
    return made;
  } catch {
    return `viewer-${Math.random().toString(36).slice(2, 6)}`;
  }
})();

/** Chat lines kept in the chat list (older ones leave as new ones arrive). */
const MAX_CHAT = 150;
/** Reliable messages kept in the gifts and events list. */
const MAX_RELIABLE = 200;
/** Chat batches larger than this are shown without the fade-in animation. */
const CHAT_ANIMATE_MAX = 12;
/** Gift banners floating over the stream at once. */
const MAX_BURSTS = 3;
/** Gifts big enough for the centre-stage animation. */
const BIG_GIFTS = new Set(['rocket', 'crown', 'diamond', 'fireworks', 'car']);
/** The rooms of the viewer token `livepush serve` prints (its --demo-rooms default). */
const DEMO_ROOMS = 'live:demo,demo:*';

const GIFT_EMOJI = {
  rose: '🌹', rocket: '🚀', heart: '❤️', crown: '👑', diamond: '💎', car: '🏎️',
  lollipop: '🍭', star: '⭐', fireworks: '🎆', cake: '🎂',
};
const TYPE_ICON = { gift: '🎁', red_envelope: '🧧', quiz: '❓', control: '⚙️' };

// ---- elements ---------------------------------------------------------------------------------

const stateEl = $('state');
const transportEl = $('transport');
const onlineEl = $('online');
const roomNameEl = $('room-name');
const roomInput = /** @type {HTMLInputElement} */ ($('room-input'));
const chatList = $('chat-list');
const chatInput = /** @type {HTMLInputElement} */ ($('chat-input'));
const chatSend = /** @type {HTMLButtonElement} */ ($('chat-send'));
const reliableList = $('reliable-list');
const overlay = $('gift-overlay');
const quizEl = $('quiz');
const noticeEl = $('notice');
const terminalEl = $('terminal');
const positionEl = $('position');
const streamEl = $('stream');
const logEl = $('log');
const hintEl = $('devtools-hint');
const reloadHintEl = $('reload-hint');
const accessEl = $('access');
const reconnectsEl = $('reconnects');
const apiKeyInput = /** @type {HTMLInputElement} */ ($('api-key-input'));

// ---- the client -------------------------------------------------------------------------------

const client = new LivepushClient({
  server,
  token: token || null,
  transport,
  rooms: [room],
  clientName: 'livepush-demo/0.1',
  idleTimeoutMs: numParam('idle_ms'),
  pingTimeoutMs: numParam('ping_ms'),
  backoffBaseMs: numParam('backoff_ms'),
  backoffMaxMs: numParam('backoff_max_ms'),
  retryWebSocketAfterMs: numParam('retry_ws_ms'),
  longPollWaitMs: numParam('wait_ms'),
});
// For the console (and the end-to-end tests).
Object.assign(window, { livepush: client });

const STATE_LABEL = {
  idle: 'starting',
  connecting: 'connecting…',
  connected: 'connected',
  reconnecting: 'reconnecting…',
  parked: 'token refused',
  closed: 'closed',
};

/** @param {string} state */
function showState(state) {
  stateEl.dataset.state = state;
  /** @type {HTMLElement} */ (stateEl.querySelector('.label')).textContent = STATE_LABEL[state] || state;
  transportEl.classList.toggle('stale', state !== 'connected');
}

/** @param {string} text */
function log(text) {
  const li = document.createElement('li');
  li.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
  logEl.prepend(li);
  while (logEl.childElementCount > 100) logEl.lastElementChild?.remove();
}

/** @param {HTMLElement} list @param {Node} items an element or a fragment @param {number} max */
function append(list, items, max) {
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.append(items);
  while (list.childElementCount > max) list.firstElementChild?.remove();
  if (atBottom) list.scrollTop = list.scrollHeight;
}

/** Chat lines waiting for the next frame: a busy room is drawn in batches, never line by line. */
let pendingChat = /** @type {HTMLElement[]} */ ([]);
let chatFrame = 0;

/** @param {HTMLElement} li */
function queueChat(li) {
  pendingChat.push(li);
  // Only the last MAX_CHAT lines can be seen: a hidden tab (no frames) keeps no more.
  if (pendingChat.length > 2 * MAX_CHAT) pendingChat = pendingChat.slice(-MAX_CHAT);
  if (!chatFrame) chatFrame = requestAnimationFrame(flushChat);
}

function flushChat() {
  chatFrame = 0;
  const batch = pendingChat.slice(-MAX_CHAT);
  pendingChat = [];
  chatList.classList.toggle('busy', batch.length > CHAT_ANIMATE_MAX);
  const frag = document.createDocumentFragment();
  frag.append(...batch);
  append(chatList, frag, MAX_CHAT);
}

function showPosition() {
  // After the listener returned: that is when the client counts a message as displayed.
  queueMicrotask(() => {
    const p = client.position(room);
    positionEl.textContent = p ? `${room} · ${p.epoch}:${p.seq}` : '—';
  });
}

/** @param {string|null} text */
function showNotice(text) {
  noticeEl.hidden = !text;
  noticeEl.textContent = text || '';
}

/**
 * The room could not be resumed in full (messages were lost, or its history was replaced on
 * the server): what the page shows may be incomplete, so offer a reload.
 * @param {string|null} text
 */
function showReloadHint(text) {
  reloadHintEl.hidden = !text;
  $('reload-hint-text').textContent = text || '';
}

/** Epoch of the room's last `joined`, to tell a replaced history from a lossy resume. */
let joinedEpoch = /** @type {string|null} */ (null);

let muted = false;
let closed = false;
function updateChatForm() {
  const off = muted || closed;
  chatInput.disabled = off;
  chatSend.disabled = off;
  chatInput.placeholder = closed ? 'The room is closed' : muted ? 'Chat is muted by the host' : 'Say something…';
}

// ---- why the page cannot connect, and what fixes it ------------------------------------------

/** The claims of a JWT, read without checking it (only to explain a refusal). @param {string|null} jwt */
function claimsOf(jwt) {
  try {
    const part = (jwt || '').split('.')[1] || '';
    return JSON.parse(atob(part.replace(/-/g, '+').replace(/_/g, '/')));
  } catch {
    return null;
  }
}

/** @param {string} pattern @param {string} r */
const grants = (pattern, r) => (pattern.endsWith('*') ? r.startsWith(pattern.slice(0, -1)) : pattern === r);

/**
 * Show why the server refused this page, and the commands that fix it; `null` hides it.
 * @param {{code: string, message: string}|null} refusal
 */
function showAccess(refusal) {
  accessEl.hidden = !refusal;
  if (!refusal) return;
  const current = session.get(TOKEN_KEY) || token;
  const claims = claimsOf(current);
  let title;
  let why;
  if (!current) {
    title = 'This page needs a viewer token';
    why = `The server refused the connection (${refusal.message}): it is not a --dev server, so every viewer needs a token signed with its token secret.`;
  } else if (claims && Number(claims.exp) * 1000 < Date.now()) {
    title = 'Your viewer token expired';
    why = `It expired at ${new Date(Number(claims.exp) * 1000).toLocaleString()}. Get a new one:`;
  } else if (refusal.code === 'forbidden') {
    title = `Your token does not grant room ${room}`;
    const rooms = claims && Array.isArray(claims.rooms) ? claims.rooms.join(', ') : 'none';
    why = `It grants ${rooms}. Pick one of those rooms above, or get a token for this one:`;
  } else {
    title = 'The server refused your viewer token';
    why = `It said: ${refusal.message}. A server that generated its own secrets makes new ones at each start, so a token from before a restart no longer works. Get a new one:`;
  }
  $('access-title').textContent = title;
  $('access-why').textContent = why;
  const demoRoom = DEMO_ROOMS.split(',').some((p) => grants(p, room));
  const rooms = demoRoom ? DEMO_ROOMS : room;
  $('access-mint').textContent = [
    'export LIVEPUSH_TOKEN_SECRET=…   # the secret the server was given',
    `TOKEN=$(livepush token --sub demo-viewer --rooms '${rooms}' --send --ttl 24h)`,
    `echo "${location.origin}/#token=$TOKEN"`,
  ].join('\n');
  for (const el of accessEl.querySelectorAll('[data-origin]')) el.textContent = location.origin;
}

/** The refusal that made the page stop, if any (shown once the client is parked). */
let refusal = /** @type {{code: string, message: string}|null} */ (null);

// ---- connection events ------------------------------------------------------------------------

client.on('state', ({ state }) => {
  showState(state);
  if (state === 'parked') showAccess(refusal || { code: 'unauthorized', message: 'token refused' });
});

let connects = 0;

client.on('connected', ({ transport: t, terminal }) => {
  transportEl.dataset.transport = t;
  transportEl.textContent = t;
  terminalEl.textContent = terminal || '—';
  connects += 1;
  const reconnects = Math.max(0, connects - 1);
  reconnectsEl.textContent = `${reconnects} reconnect${reconnects === 1 ? '' : 's'}`;
  reconnectsEl.dataset.count = String(reconnects);
  refusal = null;
  showAccess(null);
  log(`connected over ${t}${terminal ? ` as ${terminal}` : ''}`);
});

client.on('disconnected', ({ transport: t, reason, retryInMs }) => {
  log(`disconnected from ${t}: ${reason}${retryInMs >= 0 ? `; retrying in ${retryInMs} ms` : ''}`);
});

client.on('joined', (j) => {
  if (j.room !== room) return;
  if (j.online !== null) onlineEl.textContent = String(j.online);
  showAccess(null);
  log(`joined ${j.room} at ${j.epoch}:${j.seq}${j.resumed ? (j.recovered ? ', resumed' : ', NOT recovered') : ''}`);
  if (j.resumed && !j.recovered) {
    showReloadHint(
      joinedEpoch !== null && joinedEpoch !== j.epoch
        ? "This room's history was reset on the server."
        : 'Some messages of this room could not be recovered.',
    );
  }
  joinedEpoch = j.epoch;
  showPosition();
});

client.on('online', ({ room: r, count }) => {
  if (r === room) onlineEl.textContent = String(count);
});

client.on('left', ({ room: r }) => {
  log(`removed from ${r} by the server`);
  if (r === room) {
    closed = true;
    updateChatForm();
    showNotice('You left the room: it was closed by the host');
  }
});

client.on('error', ({ code, message, room: r }) => {
  log(`error ${code}${r ? ` (${r})` : ''}: ${message}`);
  if (code === 'unauthorized' || (code === 'forbidden' && /does not grant room/.test(message))) {
    refusal = { code, message };
    showAccess(refusal);
  }
  if (code === 'muted' || code === 'rate_limited' || code === 'forbidden') {
    chatSystem(code === 'muted' ? 'Chat is muted' : code === 'rate_limited' ? 'Slow down a little' : message);
  }
});

// ---- messages ---------------------------------------------------------------------------------

/** @param {any} v @returns {string} */
function str(v) {
  return typeof v === 'string' ? v : v === undefined || v === null ? '' : JSON.stringify(v);
}

/** @param {import('/livepush.js').RoomMessage} m @returns {string} */
function describe(m) {
  const d = m.data && typeof m.data === 'object' ? m.data : {};
  const who = str(d.from || d.user || d.name) || 'someone';
  switch (m.type) {
    case 'gift': {
      const gift = str(d.gift || d.item) || 'a gift';
      const count = Number(d.count) > 1 ? ` ×${Number(d.count)}` : '';
      return `${who} sent ${gift}${count}`;
    }
    case 'red_envelope':
      return `${who} dropped a red envelope${d.amount ? ` (${str(d.amount)})` : ''}`;
    case 'quiz':
      return `Quiz: ${str(d.q || d.question) || '?'}`;
    case 'control':
      switch (d.action) {
        case 'close': return 'The host closed the room';
        case 'open': return 'The room is open again';
        case 'mute': return 'Chat muted by the host';
        case 'unmute': return 'Chat unmuted';
        case 'stream_switch': return `Stream switched${d.stream || d.url ? ` to ${str(d.stream || d.url)}` : ''}`;
        default: return `Control: ${str(d.action)}`;
      }
    default: {
      const text = str(m.data);
      return `${m.type}: ${text.length > 80 ? `${text.slice(0, 80)}…` : text}`;
    }
  }
}

/** @param {import('/livepush.js').RoomMessage} m */
function iconOf(m) {
  if (m.type === 'gift') {
    const g = str(m.data && (m.data.gift || m.data.item)).toLowerCase();
    return GIFT_EMOJI[g] || TYPE_ICON.gift;
  }
  return TYPE_ICON[m.type] || '📣';
}

let lane = 0;
/** @param {string} icon @param {string} text @param {boolean} big */
function burst(icon, text, big) {
  if (big && !overlay.querySelector('.gift-big')) {
    const b = document.createElement('div');
    b.className = 'gift-big';
    b.dataset.testid = 'gift-big';
    b.textContent = icon;
    overlay.append(b);
    b.addEventListener('animationend', () => b.remove());
  }
  const el = document.createElement('div');
  el.className = 'gift-burst';
  el.dataset.testid = 'gift-burst';
  lane = (lane + 1) % 3;
  el.style.bottom = `${96 + lane * 58}px`;
  const e = document.createElement('span');
  e.className = 'gift-emoji';
  e.textContent = icon;
  const t = document.createElement('span');
  t.textContent = text;
  el.append(e, t);
  overlay.append(el);
  el.addEventListener('animationend', () => el.remove());
  const bursts = overlay.querySelectorAll('.gift-burst');
  for (let i = 0; i < bursts.length - MAX_BURSTS; i++) bursts[i].remove();
}

client.on('message', (m) => {
  if (m.room !== room) return;
  const li = document.createElement('li');
  li.dataset.testid = 'reliable-item';
  li.dataset.seq = String(m.seq);
  li.dataset.type = m.type;
  const icon = document.createElement('span');
  icon.className = 'icon';
  icon.textContent = iconOf(m);
  const text = document.createElement('span');
  text.className = 'text';
  text.textContent = describe(m);
  const seq = document.createElement('span');
  seq.className = 'seq';
  seq.textContent = `#${m.seq}`;
  li.append(icon, text, seq);
  append(reliableList, li, MAX_RELIABLE);

  const d = m.data && typeof m.data === 'object' ? m.data : {};
  if (m.type === 'gift' || m.type === 'red_envelope') {
    burst(iconOf(m), describe(m), m.type === 'gift' && BIG_GIFTS.has(str(d.gift).toLowerCase()));
  }
  if (m.type === 'quiz') showQuiz(d);
  if (m.type === 'control') {
    switch (d.action) {
      case 'mute': muted = true; break;
      case 'unmute': muted = false; break;
      case 'close': closed = true; showNotice('This room was closed by the host'); break;
      case 'open': closed = false; showNotice(null); break;
      case 'stream_switch':
        streamEl.textContent = str(d.stream || d.url) || 'new stream';
        streamEl.classList.remove('switched');
        void streamEl.offsetWidth; // restart the animation
        streamEl.classList.add('switched');
        break;
      default: break;
    }
    updateChatForm();
  }
  showPosition();
});

client.on('lost', ({ room: r, first, last }) => {
  if (r !== room) return;
  const li = document.createElement('li');
  li.className = 'lost';
  li.dataset.testid = 'lost-item';
  li.dataset.first = String(first);
  li.dataset.last = String(last);
  li.textContent = `⚠ ${last - first + 1} message(s) could not be recovered (#${first}–#${last})`;
  append(reliableList, li, MAX_RELIABLE);
  showPosition();
});

let quizTimer = 0;
let quizId = /** @type {any} */ (null);
/** How long an answered quiz stays on screen (ms). */
const QUIZ_LINGER_MS = 8000;

/**
 * A quiz: `{q, options, seconds}` counts down; `{id, answer}` afterwards reveals the answer of
 * the quiz with that id.
 * @param {any} d
 */
function showQuiz(d) {
  clearInterval(quizTimer);
  quizTimer = 0;
  const clock = $('quiz-clock');
  const bar = $('quiz-bar');
  if (d.answer !== undefined && d.id !== undefined && d.id === quizId && !quizEl.hidden) {
    clock.textContent = 'answer';
    bar.style.transition = 'none';
    bar.style.width = '0%';
    for (const li of $('quiz-options').children) {
      li.classList.toggle('correct', li.textContent === str(d.answer));
    }
    const id = quizId;
    quizTimer = window.setTimeout(() => {
      if (quizId === id) quizEl.hidden = true;
    }, QUIZ_LINGER_MS);
    return;
  }
  quizId = d.id ?? null;
  quizEl.hidden = false;
  $('quiz-question').textContent = str(d.q || d.question) || '?';
  const opts = $('quiz-options');
  opts.replaceChildren();
  for (const o of Array.isArray(d.options) ? d.options.slice(0, 6) : []) {
    const li = document.createElement('li');
    li.textContent = str(o);
    if (d.answer !== undefined) li.classList.toggle('correct', li.textContent === str(d.answer));
    opts.append(li);
  }
  const seconds = Number(d.seconds);
  if (!(seconds > 0) || d.answer !== undefined) {
    clock.textContent = '';
    bar.style.width = '0%';
    return;
  }
  const ends = Date.now() + seconds * 1000;
  const tick = () => {
    const left = Math.max(0, ends - Date.now());
    clock.textContent = `${Math.ceil(left / 1000)} s`;
    if (left === 0) {
      clearInterval(quizTimer);
      clock.textContent = "time's up";
    }
  };
  bar.style.transition = 'none';
  bar.style.width = '100%';
  void bar.offsetWidth;
  bar.style.transition = `width ${seconds}s linear`;
  bar.style.width = '0%';
  tick();
  quizTimer = window.setInterval(tick, 250);
}

/** @param {string} text */
function chatSystem(text) {
  const li = document.createElement('li');
  li.className = 'system';
  li.textContent = text;
  queueChat(li);
}

client.on('transient', (m) => {
  if (m.room !== room) return;
  const d = m.data && typeof m.data === 'object' ? m.data : {};
  if (m.type === 'chat') {
    const li = document.createElement('li');
    li.dataset.testid = 'chat-item';
    const from = str(d.from || d.user) || 'anonymous';
    if (from === nick) li.classList.add('mine');
    const who = document.createElement('span');
    who.className = 'who';
    who.textContent = from;
    const text = document.createElement('span');
    text.className = 'text';
    text.textContent = str(d.text ?? d.msg ?? m.data);
    li.append(who, text);
    queueChat(li);
  } else if (m.type === 'enter') {
    chatSystem(`${str(d.from || d.user) || 'someone'} entered the room`);
  } else if (m.type === 'online' && Number.isFinite(Number(d.count))) {
    onlineEl.textContent = String(Number(d.count));
  } else {
    chatSystem(`${m.type}: ${str(m.data)}`);
  }
});

// ---- user actions -----------------------------------------------------------------------------

/** @param {string} next */
function enterRoom(next) {
  if (next === room && client.rooms.includes(room)) return;
  client.leave(room);
  room = next;
  reliableList.replaceChildren();
  chatList.replaceChildren();
  pendingChat = [];
  overlay.replaceChildren();
  quizEl.hidden = true;
  quizId = null;
  muted = false;
  closed = false;
  joinedEpoch = null;
  showNotice(null);
  showReloadHint(null);
  updateChatForm();
  onlineEl.textContent = '0';
  roomNameEl.textContent = room;
  roomInput.value = room;
  const url = new URL(location.href);
  url.searchParams.set('room', room);
  history.replaceState(null, '', url);
  client.join(room);
  showPosition();
}

$('reload').addEventListener('click', () => location.reload());

$('room-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const next = roomInput.value.trim();
  if (next) enterRoom(next);
});

$('chat-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const text = chatInput.value.trim();
  if (!text) return;
  if (client.send(room, 'chat', { from: nick, text })) {
    chatInput.value = '';
  } else {
    chatSystem('Not connected; your message was not sent');
  }
});

for (const btn of document.querySelectorAll('[data-publish]')) {
  btn.addEventListener('click', async () => {
    const el = /** @type {HTMLElement} */ (btn);
    const type = el.dataset.publish || 'gift';
    /** @type {any} */
    let data;
    if (type === 'gift') data = { from: nick, gift: el.dataset.gift, count: 1 + Math.floor(Math.random() * 3) };
    else if (type === 'red_envelope') data = { from: nick, amount: `¥${(Math.random() * 100).toFixed(2)}` };
    else if (type === 'quiz') data = { q: 'Which planet has the most moons?', options: ['Jupiter', 'Saturn', 'Uranus'] };
    else data = { from: 'host', text: 'Thanks for watching! 🎉' };
    /** @type {Record<string, string>} */
    const headers = { 'content-type': 'application/json' };
    const key = session.get(API_KEY_KEY);
    if (key) headers.authorization = `Bearer ${key}`;
    try {
      const res = await fetch(`${server}/v1/rooms/${encodeURIComponent(room)}/messages`, {
        method: 'POST',
        headers,
        body: JSON.stringify({ type, data }),
      });
      if (res.ok) {
        hintEl.textContent = `published ${type}: ${await res.text()}`;
        hintEl.classList.remove('bad');
      } else {
        hintEl.textContent =
          res.status === 401
            ? key
              ? 'The server refused this API key (HTTP 401): enter the one `livepush serve` printed when it started (a restart generates a new one).'
              : 'This server wants its API key (HTTP 401): enter it above; `livepush serve` printed it when it started.'
            : `publish failed: HTTP ${res.status}`;
        hintEl.classList.add('bad');
        if (res.status === 401) apiKeyInput.focus();
      }
    } catch (e) {
      hintEl.textContent = `publish failed: ${e}`;
      hintEl.classList.add('bad');
    }
  });
}

/** @param {string|null} key */
function showApiKey(key) {
  $('api-key-state').textContent = key ? 'saved for this tab' : 'none yet';
  $('api-key-state').classList.toggle('bad', !key);
}

$('api-key-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const key = apiKeyInput.value.trim() || null;
  session.set(API_KEY_KEY, key);
  apiKeyInput.value = '';
  showApiKey(key);
  hintEl.textContent = '';
});

$('token-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const input = /** @type {HTMLInputElement} */ ($('token-input'));
  // A pasted address works too: take its token.
  const text = input.value.trim();
  const next = (text.match(/token=([^&\s]+)/) || [])[1] || text;
  if (!next) return;
  input.value = '';
  session.set(TOKEN_KEY, next);
  refusal = null;
  log('using the pasted token');
  client.setToken(next);
  if (client.state === 'connected') client.reconnect();
});

$('token-forget').addEventListener('click', () => {
  session.set(TOKEN_KEY, null);
  location.reload();
});

// ---- start ------------------------------------------------------------------------------------

roomNameEl.textContent = room;
roomInput.value = room;
showState(client.state);
showApiKey(session.get(API_KEY_KEY));
updateChatForm();
log(`starting (transport option: ${transport})`);
