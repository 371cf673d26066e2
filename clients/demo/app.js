// livepush demo live room. Served at /demo/app.js; the client comes from /livepush.js.
//
// Page parameters (all optional):
//   ?room=live:42            room to enter (default live:demo)
//   ?token=JWT               terminal token (a --dev server accepts none)
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

const MAX_CHAT = 200;
const MAX_RELIABLE = 500;

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

// ---- the client -------------------------------------------------------------------------------

const client = new LivepushClient({
  server,
  token: params.get('token') || null,
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

/** @param {HTMLElement} list @param {HTMLElement} item @param {number} max */
function append(list, item, max) {
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.append(item);
  while (list.childElementCount > max) list.firstElementChild?.remove();
  if (atBottom) list.scrollTop = list.scrollHeight;
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

// ---- connection events ------------------------------------------------------------------------

client.on('state', ({ state }) => showState(state));

client.on('connected', ({ transport: t, terminal }) => {
  transportEl.dataset.transport = t;
  transportEl.textContent = t;
  terminalEl.textContent = terminal || '—';
  log(`connected over ${t}${terminal ? ` as ${terminal}` : ''}`);
});

client.on('disconnected', ({ transport: t, reason, retryInMs }) => {
  log(`disconnected from ${t}: ${reason}${retryInMs >= 0 ? `; retrying in ${retryInMs} ms` : ''}`);
});

client.on('joined', (j) => {
  if (j.room !== room) return;
  if (j.online !== null) onlineEl.textContent = String(j.online);
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
/** @param {string} icon @param {string} text */
function burst(icon, text) {
  const el = document.createElement('div');
  el.className = 'gift-burst';
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
  while (overlay.childElementCount > 3) overlay.firstElementChild?.remove();
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
  if (m.type === 'gift' || m.type === 'red_envelope') burst(iconOf(m), describe(m));
  if (m.type === 'quiz') showQuiz(d);
  if (m.type === 'control') {
    switch (d.action) {
      case 'mute': muted = true; break;
      case 'unmute': muted = false; break;
      case 'close': closed = true; showNotice('This room was closed by the host'); break;
      case 'open': closed = false; showNotice(null); break;
      case 'stream_switch': streamEl.textContent = str(d.stream || d.url) || 'new stream'; break;
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

/** @param {any} d */
function showQuiz(d) {
  quizEl.hidden = false;
  $('quiz-question').textContent = str(d.q || d.question) || '?';
  const opts = $('quiz-options');
  opts.replaceChildren();
  for (const o of Array.isArray(d.options) ? d.options.slice(0, 6) : []) {
    const li = document.createElement('li');
    li.textContent = str(o);
    opts.append(li);
  }
}

/** @param {string} text */
function chatSystem(text) {
  const li = document.createElement('li');
  li.className = 'system';
  li.textContent = text;
  append(chatList, li, MAX_CHAT);
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
    append(chatList, li, MAX_CHAT);
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
  overlay.replaceChildren();
  quizEl.hidden = true;
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
    try {
      const res = await fetch(`${server}/v1/rooms/${encodeURIComponent(room)}/messages`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ type, data }),
      });
      if (res.ok) {
        hintEl.textContent = `published ${type}: ${await res.text()}`;
        hintEl.classList.remove('bad');
      } else {
        hintEl.textContent =
          res.status === 401
            ? 'This server wants an API key: publish with `livepush publish` or the HTTP API instead.'
            : `publish failed: HTTP ${res.status}`;
        hintEl.classList.add('bad');
      }
    } catch (e) {
      hintEl.textContent = `publish failed: ${e}`;
      hintEl.classList.add('bad');
    }
  });
}

// ---- start ------------------------------------------------------------------------------------

roomNameEl.textContent = room;
roomInput.value = room;
showState(client.state);
updateChatForm();
log(`starting (transport option: ${transport})`);
