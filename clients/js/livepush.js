// @ts-check
/**
 * livepush browser client: one ES module, no dependencies, no build step.
 *
 * ```js
 * import { LivepushClient } from '/livepush.js';
 *
 * const client = new LivepushClient({ server: 'https://push.example', token, rooms: ['live:42'] });
 * client.on('message', (m) => showGift(m));          // reliable: gifts, quiz, control (has seq)
 * client.on('transient', (m) => showChat(m));        // chat, entry notices (no seq)
 * client.on('online', ({ room, count }) => showCount(count));
 * client.on('connected', ({ transport }) => showTransport(transport)); // websocket | long-polling | sse
 * client.send('live:42', 'chat', { text: 'hi' });
 * ```
 *
 * Behaviour (the same as the Rust SDK, `crates/livepush-client`):
 * - Reliable messages of a room are delivered to `message` listeners exactly once each, in
 *   `seq` order. Duplicates are dropped, a gap is filled with one `pull`, a `prompt` is pulled
 *   until the prompted seq, and messages the server no longer has are reported as `lost`.
 * - **Displayed** means: every `message` listener has returned for that message. Listeners are
 *   called synchronously, in order, one message at a time, and the room's position (see
 *   {@link LivepushClient#position}) moves to a message's seq right after its listeners
 *   return (a listener that throws is reported as an `error` event with code
 *   `listener_error`; the message still counts as displayed and is not delivered again).
 *   Every reconnect resumes each room from that position, so the server replays exactly what
 *   was not displayed. If your display is asynchronous, persist positions yourself and pass
 *   them to {@link LivepushClient#join}.
 * - Reconnects use exponential back-off with full jitter:
 *   `random(0, min(backoffMaxMs, backoffBaseMs * 2^attempt))`, reset after each successful
 *   connect.
 * - WebSocket watchdog: browsers do not expose WebSocket pings, so any incoming frame feeds
 *   an idle timer; when it runs out (`idleTimeoutMs`, default the server's `heartbeat_ms` +
 *   `idleGraceMs`) the client sends `{"op":"ping"}`, and when nothing arrives within
 *   `pingTimeoutMs` after that the connection is dropped and re-established.
 * - Long-polling (`POST /v1/poll`) is used when `WebSocket` does not exist, when the
 *   WebSocket fails before it opens `wsFailuresBeforeFallback` times in a row (a browser
 *   cannot see the HTTP status of a refused upgrade, e.g. from a proxy), or when the server
 *   answers `{"op":"transport","use":"longpoll","retry_ws_after_ms":X}`; WebSocket is tried
 *   again after X (or `retryWebSocketAfterMs`).
 * - Server-Sent Events (`GET /v1/sse`) on request with `transport: 'sse'`.
 * - Contract v1.1: `close()` (and `pagehide`, with a beacon) ends a long-polling terminal's
 *   presence at once with a `"bye":true` poll; `pending` (unacknowledged inbox messages) comes
 *   with `connected`, long-poll answers and the `pending` event; a `joined` the server pushes
 *   for a live room (its history was replaced) moves the room to the new epoch without a
 *   rejoin, announced as `joined` with `recovered: false`.
 *
 * @module livepush
 */

/** Version of this client; `connect` frames carry `client: "livepush-js/VERSION"`. */
export const VERSION = '0.1.0';

// ---------------------------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------------------------

/**
 * A position in a room's reliable history: `seq` is the last message displayed in the history
 * named `epoch`. Persist it and pass it to {@link LivepushClient#join} to resume a room later.
 * @typedef {object} Position
 * @property {string} epoch
 * @property {number} seq
 */

/**
 * A `msg` frame as it comes off the wire. `seq` is present exactly for reliable messages.
 * @typedef {object} WireMessage
 * @property {string} room
 * @property {string} type
 * @property {any} data
 * @property {number} [seq]
 * @property {number} ts
 */

/**
 * A reliable room message (gift, red envelope, quiz, control, …), delivered once, in order.
 * @typedef {object} RoomMessage
 * @property {string} room
 * @property {string} epoch  The history the message belongs to.
 * @property {number} seq    Its position in that history (first is 1, +1 each).
 * @property {string} type
 * @property {any} data
 * @property {number} ts     Server timestamp, ms since the Unix epoch.
 */

/**
 * A transient room message (chat, entry notice, …): live only, never replayed.
 * @typedef {object} TransientMessage
 * @property {string} room
 * @property {string} type
 * @property {any} data
 * @property {number} ts
 */

/**
 * What a {@link RoomTracker} asks the connection to do:
 * `deliver` a message to the application, report seqs `first..last` as `lost`, send a `pull`
 * for messages after `since`, `rejoin` the room (the history changed under it), or `rewind`:
 * the server's history ends at `seq`, below the position (it lost messages we had), so the
 * position moves back to `seq` and `first..last`, the seqs it no longer has, are reported
 * `lost`.
 * @typedef {{kind: 'deliver', message: RoomMessage}
 *   | {kind: 'lost', first: number, last: number}
 *   | {kind: 'pull', since: number}
 *   | {kind: 'rejoin'}
 *   | {kind: 'rewind', seq: number, first: number, last: number}} Effect
 */

/** Display names of the transports. @typedef {'websocket'|'long-polling'|'sse'} TransportName */

/**
 * The `transport` option: `auto` (WebSocket, falling back to long-polling), or one transport.
 * @typedef {'auto'|'websocket'|'longpoll'|'sse'} TransportOption
 */

/**
 * States of the connection:
 * - `idle`: created with `autoConnect: false`, not started;
 * - `connecting`: an attempt is under way;
 * - `connected`: a session is up (`transport` says which);
 * - `reconnecting`: waiting for the back-off delay before the next attempt;
 * - `parked`: the token was refused `authFailureLimit` times; waits for {@link LivepushClient#setToken};
 * - `closed`: {@link LivepushClient#close} was called.
 * @typedef {'idle'|'connecting'|'connected'|'reconnecting'|'parked'|'closed'} ConnectionState
 */

/**
 * @typedef {object} ConnectedEvent
 * @property {TransportName} transport
 * @property {string|null} terminal  The terminal id the server knows us by.
 * @property {number} heartbeatMs
 * @property {InboxState} inbox
 */

/**
 * Where the terminal's inbox stands on the server: `seq` is the newest inbox seq handed out,
 * `acked` the newest acknowledged, and `pending` the number of unacknowledged messages still
 * kept (null when the server does not say; contract v1.1 servers do). `pending: 0` means the
 * inbox is drained, even when expired messages left gaps between `acked` and `seq`.
 * @typedef {object} InboxState
 * @property {number} seq
 * @property {number} acked
 * @property {number|null} pending
 */

/**
 * @typedef {object} DisconnectedEvent
 * @property {TransportName} transport  The transport of the session that ended.
 * @property {string} reason
 * @property {number} retryInMs  Delay before the next attempt.
 */

/**
 * @typedef {object} JoinedEvent
 * @property {string} room
 * @property {string} epoch
 * @property {number} seq  Latest seq of the room when joined.
 * @property {boolean} recovered  False: messages after the resume position were lost (see
 *   `lost`), or the room's history was replaced while we were in it (its epoch changed): the
 *   app may offer to reload what it shows of the room.
 * @property {boolean} resumed  The join resumed from a position (always true when the epoch
 *   changed under a live room).
 * @property {number|null} online  Online count, when the server said it.
 */

/** @typedef {{room: string, count: number}} OnlineEvent */
/** @typedef {{room: string, first: number, last: number}} LostEvent */
/** @typedef {{room: string}} LeftEvent */
/** @typedef {{seq: number, type: string, data: any, ts: number}} InboxMessage */
/**
 * @typedef {object} ErrorEvent
 * @property {string} code  A wire error code (`forbidden`, `muted`, `rate_limited`, …) or a
 *   client one (`listener_error`, `bad_frame`).
 * @property {string} message
 * @property {string} [room]
 */
/** @typedef {{state: ConnectionState, previous: ConnectionState}} StateEvent */

/**
 * Events of {@link LivepushClient} and their payloads.
 * @typedef {object} LivepushEvents
 * @property {ConnectedEvent} connected
 * @property {DisconnectedEvent} disconnected
 * @property {JoinedEvent} joined
 * @property {RoomMessage} message
 * @property {TransientMessage} transient
 * @property {OnlineEvent} online
 * @property {LostEvent} lost
 * @property {LeftEvent} left
 * @property {InboxMessage} inbox
 * @property {InboxState} pending  The inbox state changed (from `connected`, or from the
 *   `inbox` block of a long-poll answer).
 * @property {ErrorEvent} error
 * @property {StateEvent} state
 */

/**
 * A listener of one event.
 * @template T
 * @callback Listener
 * @param {T} payload
 * @returns {void}
 */

/**
 * Options of {@link LivepushClient}. Every delay is in milliseconds.
 * @typedef {object} LivepushOptions
 * @property {string} [server]  Base URL (`https://push.example`); default the page's origin.
 * @property {string|null} [token]  The terminal's JWT. Without one only a `--dev` server accepts us.
 * @property {Array<string|{room: string, since?: Position|null}>} [rooms]  Rooms to join at once.
 * @property {TransportOption} [transport]  Default `auto`.
 * @property {string} [clientName]  `client` of the `connect` frame. Default `livepush-js/VERSION`.
 * @property {boolean} [autoConnect]  Connect on construction (default true); else call `connect()`.
 * @property {number} [connectTimeoutMs]  From opening to `connected`. Default 10000.
 * @property {number|null} [idleTimeoutMs]  WebSocket silence before a ping probe. Default the
 *   server's `heartbeat_ms` + `idleGraceMs`.
 * @property {number} [idleGraceMs]  Default 5000.
 * @property {number} [pingTimeoutMs]  Wait for any traffic after a probe. Default 5000.
 * @property {number} [backoffBaseMs]  Default 500.
 * @property {number} [backoffMaxMs]  Default 30000.
 * @property {number|null} [authFailureLimit]  Refusals of the token in a row before `parked`;
 *   null retries forever. Default 3.
 * @property {number} [pullLimit]  `limit` of each gap pull. Default 1000.
 * @property {number} [maxBufferedPerRoom]  Out-of-order messages held per room. Default 1024.
 * @property {number} [longPollWaitMs]  `wait_ms` of each poll. Default 25000.
 * @property {number} [longPollGraceMs]  A poll unanswered after `wait_ms` + this failed. Default 10000.
 * @property {number} [byeTimeoutMs]  How long `close()` waits for the answer to its goodbye
 *   poll (`"bye":true`) before it gives up on it. Default 3000.
 * @property {number} [wsFailuresBeforeFallback]  WebSocket attempts failing before they open,
 *   in a row, after which `auto` tries long-polling. Default 2.
 * @property {number} [retryWebSocketAfterMs]  After falling back on its own, `auto` tries
 *   WebSocket again after this long. Default 30000.
 * @property {typeof WebSocket|null} [WebSocket]  Injected implementation (tests); default global.
 * @property {typeof fetch} [fetch]  Injected implementation (tests); default global.
 * @property {typeof EventSource|null} [EventSource]  Injected implementation (tests); default global.
 * @property {() => number} [random]  Random source in [0, 1) for the jitter; default Math.random.
 */

// ---------------------------------------------------------------------------------------------
// Pure parts: back-off, frames, positions, per-room ordering
// ---------------------------------------------------------------------------------------------

/**
 * A uniformly random whole number of milliseconds in `[0, ceilingMs]`.
 * @param {number} ceilingMs
 * @param {() => number} [random]  In [0, 1).
 * @returns {number}
 */
export function jitter(ceilingMs, random = Math.random) {
  if (!(ceilingMs > 0)) return 0;
  return Math.min(ceilingMs, Math.floor(random() * (Math.floor(ceilingMs) + 1)));
}

/**
 * Exponential back-off with full jitter: the delay before attempt `n` is uniformly random in
 * `[0, min(maxMs, baseMs * 2^n)]`.
 */
export class Backoff {
  /**
   * @param {number} [baseMs]
   * @param {number} [maxMs]  A max below base caps every delay at max.
   */
  constructor(baseMs = 500, maxMs = 30000) {
    this.baseMs = baseMs;
    this.maxMs = maxMs;
    this._attempt = 0;
  }

  /** Attempts counted since the last reset. @returns {number} */
  get attempt() {
    return this._attempt;
  }

  /**
   * Upper bound of the delay for `attempt`: `min(maxMs, baseMs * 2^attempt)`.
   * @param {number} attempt
   * @returns {number}
   */
  ceiling(attempt) {
    if (!(this.baseMs > 0) || !(this.maxMs > 0)) return 0;
    return Math.min(this.maxMs, this.baseMs * 2 ** attempt);
  }

  /**
   * The delay before the next attempt; counts the attempt.
   * @param {() => number} [random]
   * @returns {number}
   */
  nextDelay(random = Math.random) {
    const c = this.ceiling(this._attempt);
    this._attempt += 1;
    return jitter(c, random);
  }

  /** Start over (after a successful connect). */
  reset() {
    this._attempt = 0;
  }
}

/** Room ids: `[A-Za-z0-9_.:-]{1,128}`. */
export const ROOM_PATTERN = /^[A-Za-z0-9_.:-]{1,128}$/;
const EPOCH_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;

/**
 * Split a transport message into frames (one JSON object per line) and parse them. Lines that
 * are blank or not JSON objects are skipped and counted in `bad`.
 * @param {string} text
 * @returns {{frames: Array<Record<string, any>>, bad: string[]}}
 */
export function parseFrames(text) {
  /** @type {Array<Record<string, any>>} */
  const frames = [];
  /** @type {string[]} */
  const bad = [];
  for (const raw of String(text).split('\n')) {
    const line = raw.trim();
    if (!line) continue;
    try {
      const f = JSON.parse(line);
      if (f && typeof f === 'object' && !Array.isArray(f) && typeof f.op === 'string') {
        frames.push(f);
      } else {
        bad.push(line);
      }
    } catch {
      bad.push(line);
    }
  }
  return { frames, bad };
}

/**
 * Format positions for the SSE `since` parameter: `ROOM:EPOCH:SEQ,…`.
 * @param {Record<string, Position>} positions
 * @returns {string}
 */
export function formatPositions(positions) {
  return Object.entries(positions)
    .map(([room, p]) => `${room}:${p.epoch}:${p.seq}`)
    .join(',');
}

/**
 * Parse `ROOM:EPOCH:SEQ,…` (from the right: rooms may contain `:`). Malformed entries are
 * skipped.
 * @param {string} text
 * @returns {Record<string, Position>}
 */
export function parsePositions(text) {
  /** @type {Record<string, Position>} */
  const out = {};
  for (const item of String(text || '').split(',')) {
    const j = item.lastIndexOf(':');
    const i = j > 0 ? item.lastIndexOf(':', j - 1) : -1;
    if (i <= 0) continue;
    const room = item.slice(0, i);
    const epoch = item.slice(i + 1, j);
    const seqText = item.slice(j + 1);
    if (!ROOM_PATTERN.test(room) || !EPOCH_PATTERN.test(epoch) || !/^\d+$/.test(seqText)) continue;
    out[room] = { epoch, seq: Number(seqText) };
  }
  return out;
}

/** @param {unknown} v @returns {v is number} */
function isSeq(v) {
  return typeof v === 'number' && Number.isInteger(v) && v >= 0;
}

/**
 * Per-room ordering of reliable messages, with no IO: a port of the Rust SDK's `RoomTracker`.
 * It sees every `joined`, reliable `msg`, `prompt` and `pulled` frame of one room and answers
 * with {@link Effect}s.
 *
 * Rules:
 * - `seq <= last delivered` is a duplicate and is dropped;
 * - `seq == last + 1` is delivered, then any buffered successors;
 * - `seq > last + 1` is a gap: the message is buffered (bounded) and ONE `pull` is sent;
 *   further pulls wait for its `pulled` answer;
 * - `prompt{seq}`: messages up to `seq` exist; pull until they are delivered;
 * - `joined{recovered:false}` / `pulled{recovered:false}`: the first message the server still
 *   has becomes the new base and the skipped seqs are reported `lost`; with no message at all,
 *   the room continues from the latest seq the server named (contract v1.1, decision 4);
 * - a `pulled` with nothing past the pull's `since` ends the pulling; held messages beyond the
 *   gap are then delivered after a `lost`;
 * - `pulled{recovered:false}` whose latest seq is below the pull's `since` (the server lost
 *   messages we had): the position moves back to that seq, what it no longer has is reported
 *   `lost`, and nothing is pulled again (decision 7);
 * - an epoch change pushed while the room is live ({@link RoomTracker#onEpochChange},
 *   decision 8): the new position is adopted as it is, without replay or pull;
 * - a `pulled` answer from the history the room just left (an epoch change overtook the
 *   pull) is ignored.
 */
export class RoomTracker {
  /**
   * @param {string} room
   * @param {Position|null} [since]  Resume after this position; none: start at the live edge
   *   given by the first `joined`.
   * @param {number} [maxBuffered]  Bound of the out-of-order buffer (at least 1).
   */
  constructor(room, since = null, maxBuffered = 1024) {
    this.room = room;
    /** @type {string|null} */
    this._epoch = since ? since.epoch : null;
    this._last = since ? since.seq : 0;
    /** @type {Map<number, WireMessage>} */
    this._buffer = new Map();
    /** @type {number[]} buffered seqs, ascending */
    this._keys = [];
    this._maxBuffered = Math.max(1, Math.floor(maxBuffered) || 1);
    this._live = false;
    this._resync = false;
    this._pullInFlight = false;
    this._pullTarget = 0;
    this._pullSince = 0;
    /** @type {string|null} the epoch followed before the last epoch change */
    this._leftEpoch = null;
  }

  /** The `since` of the next join: epoch and last delivered seq, once an epoch is known. @returns {Position|null} */
  resumeFrom() {
    return this._epoch === null ? null : { epoch: this._epoch, seq: this._last };
  }

  /** The epoch followed, if known. @returns {string|null} */
  get epoch() {
    return this._epoch;
  }

  /** Last seq delivered (or the base we start after). @returns {number} */
  get last() {
    return this._last;
  }

  /** Whether a `joined` has been seen since the last disconnect. @returns {boolean} */
  get live() {
    return this._live;
  }

  /** Whether a pull is outstanding. @returns {boolean} */
  get pullInFlight() {
    return this._pullInFlight;
  }

  /** Messages held in the out-of-order buffer. @returns {number} */
  get buffered() {
    return this._buffer.size;
  }

  /** The connection ended: forget per-connection state; the position stays. */
  onDisconnect() {
    this._live = false;
    this._resync = false;
    this._pullInFlight = false;
    this._pullTarget = 0;
    this._buffer.clear();
    this._keys = [];
  }

  /**
   * Long-poll: the room is attached again at {@link RoomTracker#resumeFrom} by a new poll. A
   * server answers a complete resume in the same epoch without `joined`, with only the
   * messages after the position, so the tracker goes live at once; a `joined` in the answer
   * (another epoch, messages lost) is still applied with {@link RoomTracker#onJoined}. The
   * per-poll state (a held gap, an outstanding pull) is forgotten: the poll's replay from the
   * position covers it. Does nothing while no epoch is known (a fresh join waits for `joined`).
   */
  onAttached() {
    if (this._epoch !== null) {
      this.onDisconnect();
      this._live = true;
    }
  }

  /**
   * Long-poll: the answer that carried `joined{seq: latest}` has been read to its end and held
   * no `prompt` for the room, so the whole replay has been seen. When the join said
   * `recovered: false` and no message followed it, the server keeps nothing after the
   * position: `last+1..latest` are reported lost and the room continues from `latest`
   * (otherwise every poll would be answered with the same `joined` again).
   * @param {number} latest
   * @returns {Effect[]}
   */
  onReplayComplete(latest) {
    /** @type {Effect[]} */
    const out = [];
    if (this._live && this._resync && !this._pullInFlight && isSeq(latest)) {
      this._resync = false;
      this._skipTo(latest, out);
      this._drain(out);
    }
    return out;
  }

  /**
   * A `joined{epoch, seq, recovered}` answer; the replay follows as messages.
   * @param {string} epoch
   * @param {number} seq
   * @param {boolean} recovered
   */
  onJoined(epoch, seq, recovered) {
    this.onDisconnect();
    this._live = true;
    if (this._epoch === null) {
      // A join without `since`: start at the live edge; there is no replay.
      this._epoch = epoch;
      this._last = seq;
    } else if (this._epoch === epoch) {
      // The server has fewer messages than we delivered: it lost data. Follow it.
      if (seq < this._last) this._last = seq;
      this._resync = !recovered;
    } else {
      // Another history: our position means nothing in it; its first message is the base.
      this._leftEpoch = this._epoch;
      this._epoch = epoch;
      this._last = 0;
      this._resync = true;
    }
  }

  /**
   * The server pushed `joined{epoch, seq}` for the room while it was live and no join was
   * asked for: the room's history was replaced (its store lost it; contract v1.1, decision
   * 8). The position becomes `(epoch, seq)` and the room continues live from there: no
   * replay is expected and nothing is pulled. Messages held or pulled for the old history
   * are dropped. In the same epoch, seqs skipped forward are reported `lost`.
   * @param {string} epoch
   * @param {number} seq
   * @returns {Effect[]}
   */
  onEpochChange(epoch, seq) {
    /** @type {Effect[]} */
    const out = [];
    if (typeof epoch !== 'string' || !isSeq(seq)) return out;
    const sameEpoch = this._epoch === epoch;
    if (!sameEpoch && this._epoch !== null) this._leftEpoch = this._epoch;
    this.onDisconnect();
    this._live = true;
    this._epoch = epoch;
    if (sameEpoch && seq > this._last) this._skipTo(seq, out);
    this._last = seq;
    return out;
  }

  /**
   * A `msg` frame. Transient messages (no seq) yield nothing.
   * @param {WireMessage} msg
   * @returns {Effect[]}
   */
  onMessage(msg) {
    /** @type {Effect[]} */
    const out = [];
    const seq = msg.seq;
    if (!isSeq(seq)) return out;
    if (!this._live || seq <= this._last) return out;
    if (seq === this._last + 1) {
      this._resync = false;
      this._deliver(msg, out);
      this._drain(out);
      this._maybePull(out);
    } else if (this._resync && !this._pullInFlight) {
      // First message after `joined{recovered:false}`: the server kept nothing older.
      this._resync = false;
      this._skipTo(seq - 1, out);
      this._deliver(msg, out);
      this._drain(out);
      this._maybePull(out);
    } else {
      this._hold(seq, msg);
      this._pullTarget = Math.max(this._pullTarget, seq);
      this._maybePull(out);
    }
    return out;
  }

  /**
   * A `prompt{seq}`: messages up to `seq` exist; pull them.
   * @param {number} seq
   * @returns {Effect[]}
   */
  onPrompt(seq) {
    /** @type {Effect[]} */
    const out = [];
    if (this._live && isSeq(seq)) {
      this._pullTarget = Math.max(this._pullTarget, seq);
      this._maybePull(out);
    }
    return out;
  }

  /**
   * A `pulled{epoch, seq: latest, recovered, messages}` answer to our pull.
   * @param {string} epoch
   * @param {number} latest
   * @param {boolean} recovered
   * @param {WireMessage[]} messages
   * @returns {Effect[]}
   */
  onPulled(epoch, latest, recovered, messages) {
    /** @type {Effect[]} */
    const out = [];
    if (!this._live) return out;
    // An answer to a pull sent before the epoch changed: the new history has its own position.
    if (this._epoch !== epoch && this._leftEpoch !== null && epoch === this._leftEpoch) return out;
    this._pullInFlight = false;
    if (this._epoch !== epoch) {
      // Not the history we follow: re-establish the position with a fresh `joined`.
      this.onDisconnect();
      out.push({ kind: 'rejoin' });
      return out;
    }
    if (!recovered && isSeq(latest) && latest < this._pullSince) {
      // We asked from beyond the server's latest seq: it lost messages we had (decision 7).
      // Follow it back to its latest seq; whatever we had or were promised beyond it is gone.
      let to = Math.max(this._last, this._pullTarget);
      if (this._keys.length > 0) to = Math.max(to, this._keys[this._keys.length - 1]);
      this.onDisconnect();
      this._live = true;
      this._last = latest;
      this._pullSince = latest;
      out.push({ kind: 'rewind', seq: latest, first: latest + 1, last: to });
      return out;
    }
    const list = Array.isArray(messages) ? messages.filter((m) => m && isSeq(m.seq)) : [];
    const answeredPastSince = list.some((m) => /** @type {number} */ (m.seq) > this._pullSince);
    let firstKept = Infinity;
    for (const m of list) firstKept = Math.min(firstKept, /** @type {number} */ (m.seq));
    const fresh = list
      .filter((m) => /** @type {number} */ (m.seq) > this._last)
      .sort((a, b) => /** @type {number} */ (a.seq) - /** @type {number} */ (b.seq));
    // A pull answer settles the question a `joined{recovered:false}` left open.
    this._resync = false;
    if (!recovered) {
      if (firstKept !== Infinity) this._skipTo(firstKept - 1, out);
      else if (isSeq(latest)) this._skipTo(latest, out);
    }
    for (const m of fresh) {
      const seq = /** @type {number} */ (m.seq);
      if (seq === this._last + 1) {
        this._deliver(m, out);
        this._drain(out);
      } else if (seq > this._last) {
        this._hold(seq, m);
      }
    }
    this._drain(out);
    if (!answeredPastSince) {
      // The server has nothing more for this gap: give up on it rather than pull forever.
      this._pullTarget = 0;
      if (this._keys.length > 0) {
        this._skipTo(this._keys[0] - 1, out);
        this._drain(out);
      }
    }
    this._maybePull(out);
    return out;
  }

  /** Our pull was answered with an error: forget it; the next gap or prompt pulls again. */
  onPullFailed() {
    this._pullInFlight = false;
  }

  /** @param {WireMessage} m @param {Effect[]} out */
  _deliver(m, out) {
    const seq = /** @type {number} */ (m.seq);
    this._last = seq;
    out.push({
      kind: 'deliver',
      message: {
        room: m.room,
        epoch: this._epoch ?? '',
        seq,
        type: m.type,
        data: m.data,
        ts: m.ts,
      },
    });
  }

  /** Deliver buffered successors of `last`; drop buffered entries at or below it. @param {Effect[]} out */
  _drain(out) {
    while (this._keys.length > 0) {
      const seq = this._keys[0];
      if (seq <= this._last) {
        this._keys.shift();
        this._buffer.delete(seq);
      } else if (seq === this._last + 1) {
        this._keys.shift();
        const m = /** @type {WireMessage} */ (this._buffer.get(seq));
        this._buffer.delete(seq);
        this._deliver(m, out);
      } else {
        break;
      }
    }
    if (this._pullTarget <= this._last) this._pullTarget = 0;
  }

  /** Give up on seqs up to `to`: report them lost and move `last` there. @param {number} to @param {Effect[]} out */
  _skipTo(to, out) {
    if (to > this._last) {
      out.push({ kind: 'lost', first: this._last + 1, last: to });
      this._last = to;
    }
  }

  /** @param {number} seq @param {WireMessage} m */
  _hold(seq, m) {
    if (this._buffer.size >= this._maxBuffered && !this._buffer.has(seq)) {
      // Too far behind: drop what we hold; the pull brings it back in order.
      this._buffer.clear();
      this._keys = [];
    }
    if (!this._buffer.has(seq)) {
      let lo = 0;
      let hi = this._keys.length;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (this._keys[mid] < seq) lo = mid + 1;
        else hi = mid;
      }
      this._keys.splice(lo, 0, seq);
    }
    this._buffer.set(seq, m);
  }

  /** Send one pull if a gap or a prompt wants one and none is outstanding. @param {Effect[]} out */
  _maybePull(out) {
    const gap = this._keys.length > 0 && this._keys[0] > this._last + 1;
    if ((gap || this._pullTarget > this._last) && !this._pullInFlight) {
      this._pullInFlight = true;
      this._pullSince = this._last;
      out.push({ kind: 'pull', since: this._last });
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/** @type {Required<Omit<LivepushOptions, 'server'|'token'|'rooms'|'WebSocket'|'fetch'|'EventSource'|'random'>>} */
const DEFAULTS = {
  transport: 'auto',
  clientName: `livepush-js/${VERSION}`,
  autoConnect: true,
  connectTimeoutMs: 10000,
  idleTimeoutMs: null,
  idleGraceMs: 5000,
  pingTimeoutMs: 5000,
  backoffBaseMs: 500,
  backoffMaxMs: 30000,
  authFailureLimit: 3,
  pullLimit: 1000,
  maxBufferedPerRoom: 1024,
  longPollWaitMs: 25000,
  longPollGraceMs: 10000,
  byeTimeoutMs: 3000,
  wsFailuresBeforeFallback: 2,
  retryWebSocketAfterMs: 30000,
};

/** Used when the server announces `heartbeat_ms: 0`. */
const FALLBACK_HEARTBEAT_MS = 25000;

/**
 * @typedef {object} RoomEntry
 * @property {string} name
 * @property {RoomTracker} tracker
 * @property {Position|null} displayed  Last position whose listeners returned.
 * @property {number|null} joinId  Id of the outstanding WebSocket `join`.
 * @property {Backoff} retry  Back-off of join retries after `rate_limited` / `internal`.
 * @property {ReturnType<typeof setTimeout>|null} retryTimer
 * @property {number|null} online
 */

/**
 * How a link (one transport session) ended.
 * @typedef {object} LinkEnd
 * @property {string} reason
 * @property {boolean} [connected]  The link had reached `connected`.
 * @property {{code: string, message: string}} [auth]  The token was refused.
 * @property {{code: string, message: string}} [refused]  Another refusal before `connected`.
 * @property {{retryWsAfterMs: number}} [switchTo]  The server asked for long-polling.
 * @property {boolean} [retryWs]  Long-polling ended to try WebSocket again.
 */

/** @typedef {{kind: 'join'|'leave'|'pull'|'send'|'ack'|'ping', room?: string}} Request */

/** The live-room client. See the module documentation. */
export class LivepushClient {
  /** @param {LivepushOptions} [options] */
  constructor(options = {}) {
    /** @type {typeof DEFAULTS} */
    this._opts = { ...DEFAULTS };
    for (const [k, v] of Object.entries(options)) {
      if (v !== undefined && k in DEFAULTS) /** @type {any} */ (this._opts)[k] = v;
    }
    this._server = normalizeServer(options.server);
    /** @type {string|null} */
    this._token = options.token || null;
    /** @type {any} */
    this._WebSocket = options.WebSocket !== undefined ? options.WebSocket : globalThis.WebSocket;
    /** @type {any} */
    this._EventSource =
      options.EventSource !== undefined ? options.EventSource : globalThis.EventSource;
    /** @type {typeof fetch} */
    this._fetch = options.fetch || ((input, init) => globalThis.fetch(input, init));
    this._random = options.random || Math.random;
    /** @type {Map<string, Set<Function>>} */
    this._listeners = new Map();
    /** @type {Map<string, RoomEntry>} */
    this._rooms = new Map();
    /** @type {ConnectionState} */
    this._state = 'idle';
    /** @type {WsLink|LongPollLink|SseLink|null} */
    this._link = null;
    /** @type {TransportName|null} */
    this._connectedTransport = null;
    this._backoff = new Backoff(this._opts.backoffBaseMs, this._opts.backoffMaxMs);
    /** @type {ReturnType<typeof setTimeout>|null} */
    this._timer = null;
    this._authFailures = 0;
    this._wsFailures = 0;
    /** In `auto` mode, long-polling is used until this time (ms since epoch). */
    this._wsRetryAt = 0;
    /** `auto` fell back to long-polling on its own (not asked by the server). */
    this._fellBack = false;
    /** @type {string|null} */
    this._terminal = null;
    /** @type {string|null} terminal id a dev server made up for us; sent back in polls */
    this._anonTerminal = null;
    this._heartbeatMs = 0;
    this._inboxDelivered = 0;
    /** @type {InboxState|null} */
    this._inbox = null;
    /** A poll went out since the last goodbye: the terminal may be present through long-polling. */
    this._byeOwed = false;
    /** `pagehide` ended the session (the page may come back from the back/forward cache). */
    this._suspended = false;
    this._nextId = 0;
    this._closed = false;
    this._onNetworkOnline = () => {
      if (this._state === 'reconnecting' && this._timer !== null) {
        clearTimeout(this._timer);
        this._timer = null;
        this._attempt();
      }
    };
    this._onPageHide = () => this._pageHidden();
    this._onPageShow = () => {
      if (this._suspended && !this._closed) this._attempt();
    };
    for (const r of options.rooms || []) {
      if (typeof r === 'string') this.join(r);
      else this.join(r.room, r.since);
    }
    if (this._opts.autoConnect) {
      // After the caller had a chance to add listeners.
      queueMicrotask(() => this.connect());
    }
  }

  // ---- public API ------------------------------------------------------------------------

  /** The connection state. @returns {ConnectionState} */
  get state() {
    return this._state;
  }

  /**
   * The transport of the current session while connected; otherwise the one being tried,
   * or null.
   * @returns {TransportName|null}
   */
  get transport() {
    return this._link ? this._link.kind : null;
  }

  /** The terminal id from the last `connected` frame. @returns {string|null} */
  get terminal() {
    return this._terminal;
  }

  /** Rooms followed. @returns {string[]} */
  get rooms() {
    return [...this._rooms.keys()];
  }

  /**
   * Where the terminal's inbox stood when the server last said (see the `pending` event), or
   * null before the first `connected`.
   * @returns {InboxState|null}
   */
  get inbox() {
    return this._inbox ? { ...this._inbox } : null;
  }

  /**
   * Listen to an event. Returns a function that removes the listener.
   * @template {keyof LivepushEvents} K
   * @param {K} event
   * @param {Listener<LivepushEvents[K]>} listener
   * @returns {() => void}
   */
  on(event, listener) {
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(listener);
    return () => this.off(event, listener);
  }

  /**
   * Remove a listener.
   * @template {keyof LivepushEvents} K
   * @param {K} event
   * @param {Listener<LivepushEvents[K]>} listener
   */
  off(event, listener) {
    this._listeners.get(event)?.delete(listener);
  }

  /**
   * Listen to the next occurrence of an event only.
   * @template {keyof LivepushEvents} K
   * @param {K} event
   * @param {Listener<LivepushEvents[K]>} listener
   * @returns {() => void}
   */
  once(event, listener) {
    /** @type {Listener<LivepushEvents[K]>} */
    const wrapped = (p) => {
      this.off(event, wrapped);
      listener(p);
    };
    return this.on(event, wrapped);
  }

  /** Start connecting (only needed with `autoConnect: false`). */
  connect() {
    if (this._closed || this._link || this._timer !== null || this._state === 'parked') return;
    if (typeof globalThis.addEventListener === 'function') {
      globalThis.addEventListener('online', this._onNetworkOnline);
      globalThis.addEventListener('pagehide', this._onPageHide);
      globalThis.addEventListener('pageshow', this._onPageShow);
    }
    this._attempt();
  }

  /**
   * Follow a room. With `since`, resume after that position (every reliable message after it
   * is delivered, or `lost` is reported); without, start at the live edge. Joining a room
   * already followed does nothing.
   * @param {string} room
   * @param {Position|null} [since]
   */
  join(room, since = null) {
    if (typeof room !== 'string' || !ROOM_PATTERN.test(room)) {
      throw new TypeError(`livepush: invalid room id ${JSON.stringify(room)}`);
    }
    if (since && !(typeof since.epoch === 'string' && isSeq(since.seq))) {
      throw new TypeError('livepush: since must be {epoch: string, seq: number}');
    }
    if (this._closed || this._rooms.has(room)) return;
    /** @type {RoomEntry} */
    const r = {
      name: room,
      tracker: new RoomTracker(room, since, this._opts.maxBufferedPerRoom),
      displayed: since ? { epoch: since.epoch, seq: since.seq } : null,
      joinId: null,
      retry: new Backoff(this._opts.backoffBaseMs, this._opts.backoffMaxMs),
      retryTimer: null,
      online: null,
    };
    this._rooms.set(room, r);
    this._link?.join(r);
  }

  /**
   * Stop following a room. Returns whether it was followed.
   * @param {string} room
   * @returns {boolean}
   */
  leave(room) {
    if (!this._unregister(room)) return false;
    this._link?.leave(room);
    return true;
  }

  /**
   * Send a transient message (chat) to a room. Returns false when there is no session to
   * send it on; refusals (`muted`, `forbidden`, `rate_limited`, …) come as `error` events.
   * @param {string} room
   * @param {string} type
   * @param {any} [data]
   * @returns {boolean}
   */
  send(room, type, data = {}) {
    if (!this._link || !this._link.connected) return false;
    return this._link.op({ op: 'send', room, type, data }, { kind: 'send', room });
  }

  /**
   * Acknowledge inbox messages up to `seq`.
   * @param {number} seq
   * @returns {boolean}
   */
  ack(seq) {
    if (!this._link || !this._link.connected) return false;
    return this._link.op({ op: 'ack', inbox: seq }, { kind: 'ack' });
  }

  /**
   * The last displayed position of a room (persist it to resume after a page reload).
   * @param {string} room
   * @returns {Position|null}
   */
  position(room) {
    const p = this._rooms.get(room)?.displayed;
    return p ? { ...p } : null;
  }

  /** Displayed positions of every room that has one. @returns {Record<string, Position>} */
  positions() {
    /** @type {Record<string, Position>} */
    const out = {};
    for (const r of this._rooms.values()) if (r.displayed) out[r.name] = { ...r.displayed };
    return out;
  }

  /**
   * Use another token from the next connection on (also wakes a `parked` client).
   * @param {string|null} token
   */
  setToken(token) {
    this._token = token || null;
    this._authFailures = 0;
    if (this._state === 'parked') {
      this._setState('reconnecting');
      this._attempt();
    }
  }

  /** Drop the current connection (if any) and connect again at once. */
  reconnect() {
    if (this._closed) return;
    if (this._timer !== null) clearTimeout(this._timer);
    this._timer = null;
    const link = this._link;
    if (link) {
      link.close();
      this._detach(link);
    }
    this._attempt();
  }

  /**
   * Close for good: the session ends cleanly and nothing reconnects. A client that has
   * long-polled says goodbye with one more poll (`"bye":true`, with an `ack` not sent yet), so
   * that the server ends its presence at once instead of after its grace period. The
   * goodbye goes out at once, as a `keepalive` fetch, so it is delivered even when the page
   * is going away. The promise settles when it is answered or `byeTimeoutMs` later (at once
   * when there is none); it never rejects.
   * @returns {Promise<void>}
   */
  close() {
    if (this._closed) return Promise.resolve();
    this._closed = true;
    if (this._timer !== null) clearTimeout(this._timer);
    this._timer = null;
    for (const r of this._rooms.values()) {
      if (r.retryTimer !== null) clearTimeout(r.retryTimer);
      r.retryTimer = null;
    }
    const link = this._link;
    this._link = null;
    const bye = this._byeBody(link);
    // The parked poll is given up; the server ends it without a grace period when it sees
    // it end after the goodbye (the poll began before the goodbye).
    link?.close();
    if (typeof globalThis.removeEventListener === 'function') {
      globalThis.removeEventListener('online', this._onNetworkOnline);
      globalThis.removeEventListener('pageshow', this._onPageShow);
      globalThis.removeEventListener('pagehide', this._onPageHide);
    }
    this._setState('closed');
    return bye ? this._sendBye(bye, false) : Promise.resolve();
  }

  // ---- internals: events ------------------------------------------------------------------

  /**
   * @template {keyof LivepushEvents} K
   * @param {K} event
   * @param {LivepushEvents[K]} payload
   */
  _emit(event, payload) {
    const set = this._listeners.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(payload);
      } catch (e) {
        if (event !== 'error' && this._listeners.get('error')?.size) {
          this._emit('error', { code: 'listener_error', message: `a ${event} listener threw: ${e}` });
        } else {
          console.error(`livepush: a ${event} listener threw`, e);
        }
      }
    }
  }

  /** @param {ConnectionState} state */
  _setState(state) {
    const previous = this._state;
    if (previous === state) return;
    this._state = state;
    this._emit('state', { state, previous });
  }

  // ---- internals: connection lifecycle ----------------------------------------------------

  _wsUrl() {
    return `${this._server.replace(/^http/, 'ws')}/v1/connect`;
  }

  _httpUrl(/** @type {string} */ path) {
    return `${this._server}${path}`;
  }

  /** @returns {boolean} */
  _hasWebSocket() {
    return typeof this._WebSocket === 'function';
  }

  /** @returns {TransportName} */
  _pickTransport() {
    const t = this._opts.transport;
    if (t === 'longpoll') return 'long-polling';
    if (t === 'sse') return typeof this._EventSource === 'function' ? 'sse' : 'long-polling';
    if (!this._hasWebSocket()) return 'long-polling';
    if (t === 'websocket') return 'websocket';
    return Date.now() < this._wsRetryAt ? 'long-polling' : 'websocket';
  }

  _attempt() {
    this._timer = null;
    if (this._closed || this._link) return;
    this._suspended = false;
    const kind = this._pickTransport();
    const link =
      kind === 'websocket' ? new WsLink(this) : kind === 'sse' ? new SseLink(this) : new LongPollLink(this);
    this._link = link;
    this._setState('connecting');
    link.start();
  }

  /** The session lost every per-connection state. @param {WsLink|LongPollLink|SseLink} link */
  _detach(link) {
    if (this._link !== link) return;
    this._link = null;
    for (const r of this._rooms.values()) {
      r.tracker.onDisconnect();
      r.joinId = null;
      if (r.retryTimer !== null) clearTimeout(r.retryTimer);
      r.retryTimer = null;
      r.retry.reset();
    }
  }

  /**
   * A link received its `connected` frame.
   * @param {WsLink|LongPollLink|SseLink} link
   * @param {Record<string, any>} f
   */
  _linkConnected(link, f) {
    if (link !== this._link || this._closed) return;
    this._backoff.reset();
    this._authFailures = 0;
    if (link.kind === 'websocket') {
      this._wsFailures = 0;
      this._fellBack = false;
      this._wsRetryAt = 0;
    }
    this._terminal = typeof f.terminal === 'string' ? f.terminal : null;
    this._anonTerminal = this._token ? null : this._terminal;
    this._heartbeatMs = isSeq(f.heartbeat_ms) ? f.heartbeat_ms : 0;
    this._connectedTransport = link.kind;
    this._setState('connected');
    const inbox = readInboxState(f.inbox) ?? { seq: 0, acked: 0, pending: null };
    this._emit('connected', {
      transport: link.kind,
      terminal: this._terminal,
      heartbeatMs: this._heartbeatMs,
      inbox: { ...inbox },
    });
    if (link === this._link && !this._closed) this._inboxState(inbox);
  }

  /**
   * Where the server says the inbox stands (`connected.inbox`, a long-poll answer's `inbox`
   * block): remember it, and emit `pending` when it changed.
   * @param {InboxState|null} state
   */
  _inboxState(state) {
    const was = this._inbox;
    if (!state || (was && was.seq === state.seq && was.acked === state.acked && was.pending === state.pending)) return;
    this._inbox = state;
    this._emit('pending', { ...state });
  }

  /**
   * A link ended by itself (not through `close()`): decide what comes next.
   * @param {WsLink|LongPollLink|SseLink} link
   * @param {LinkEnd} info
   */
  _linkEnded(link, info) {
    if (link !== this._link) return;
    this._detach(link);
    if (this._closed) return;
    const auto = this._opts.transport === 'auto';
    let delay = -1;
    if (info.switchTo) {
      // The server moved us to long-polling for a while.
      this._wsRetryAt = Date.now() + Math.max(0, Number(info.switchTo.retryWsAfterMs) || 0);
      delay = 0;
    } else if (info.retryWs) {
      delay = 0;
    } else if (auto && !info.connected) {
      if (link.kind === 'websocket' && this._hasWebSocket()) {
        this._wsFailures += 1;
        if (this._fellBack || this._wsFailures >= Math.max(1, this._opts.wsFailuresBeforeFallback)) {
          // Maybe a proxy that refuses upgrades: try long-polling.
          this._wsFailures = 0;
          this._fellBack = true;
          this._wsRetryAt = Date.now() + this._opts.retryWebSocketAfterMs;
        }
      } else if (link.kind === 'long-polling' && this._fellBack) {
        // Long-polling does not work either: not a WebSocket problem. Alternate.
        this._wsRetryAt = 0;
      }
    }
    if (info.auth) {
      this._authFailures += 1;
      this._emit('error', { code: info.auth.code, message: info.auth.message });
    } else if (info.refused) {
      this._emit('error', { code: info.refused.code, message: info.refused.message });
    }
    if (this._closed || this._link) return; // a listener closed or reconnected us
    const limit = this._opts.authFailureLimit;
    if (info.auth && limit !== null && limit !== undefined && this._authFailures >= limit) {
      if (info.connected) {
        this._emit('disconnected', { transport: link.kind, reason: info.reason, retryInMs: -1 });
      }
      this._setState('parked');
      return;
    }
    if (delay < 0) delay = this._backoff.nextDelay(this._random);
    if (info.connected) {
      this._emit('disconnected', { transport: link.kind, reason: info.reason, retryInMs: delay });
    }
    if (this._closed || this._link || this._timer !== null) return;
    this._setState('reconnecting');
    this._timer = setTimeout(() => this._attempt(), delay);
  }

  // ---- internals: frames ------------------------------------------------------------------

  _id() {
    this._nextId += 1;
    return this._nextId;
  }

  /**
   * @param {WsLink|LongPollLink|SseLink} link
   * @param {Array<Record<string, any>>} frames
   */
  _onFrames(link, frames) {
    for (const f of frames) {
      if (this._closed || link !== this._link || link.ended) return;
      this._onFrame(link, f);
    }
  }

  /**
   * @param {WsLink|LongPollLink|SseLink} link
   * @param {Record<string, any>} f
   */
  _onFrame(link, f) {
    switch (f.op) {
      case 'joined': {
        if (f.id != null) link.requests.delete(f.id);
        const r = this._rooms.get(f.room);
        if (!r || typeof f.epoch !== 'string' || !isSeq(f.seq)) return;
        if (f.id != null && f.id !== r.joinId) return; // stale
        // A `joined` nobody asked for (no id; long-poll answers are always asked for): the
        // server says where the room is now. While our join is in flight its answer will.
        const pushed = f.id == null && !(link instanceof LongPollLink);
        if (pushed && r.joinId !== null) return;
        if (pushed && r.tracker.live) {
          this._epochChanged(link, r, f);
          return;
        }
        const resumed = r.tracker.resumeFrom() !== null;
        r.tracker.onJoined(f.epoch, f.seq, f.recovered !== false);
        r.joinId = null;
        if (r.retryTimer !== null) clearTimeout(r.retryTimer);
        r.retryTimer = null;
        r.retry.reset();
        this._joined(r, f, f.recovered !== false, resumed);
        return;
      }
      case 'msg': {
        const r = this._rooms.get(f.room);
        if (!r || !r.tracker.live) return;
        if (f.seq === undefined || f.seq === null) {
          this._emit('transient', { room: f.room, type: f.type, data: f.data, ts: f.ts });
        } else {
          this._apply(link, r, r.tracker.onMessage(/** @type {WireMessage} */ (f)));
        }
        return;
      }
      case 'prompt': {
        const r = this._rooms.get(f.room);
        if (r) this._apply(link, r, r.tracker.onPrompt(f.seq));
        return;
      }
      case 'pulled': {
        if (f.id != null) link.requests.delete(f.id);
        const r = this._rooms.get(f.room);
        if (r) {
          this._apply(link, r, r.tracker.onPulled(f.epoch, f.seq, f.recovered !== false, f.messages));
        }
        return;
      }
      case 'online': {
        const r = this._rooms.get(f.room);
        if (r && r.tracker.live && isSeq(f.count)) {
          r.online = f.count;
          this._emit('online', { room: r.name, count: f.count });
        }
        return;
      }
      case 'inbox': {
        if (isSeq(f.seq) && f.seq > this._inboxDelivered) {
          this._inboxDelivered = f.seq;
          this._emit('inbox', { seq: f.seq, type: f.type, data: f.data, ts: f.ts });
        }
        return;
      }
      case 'left': {
        const answered = f.id != null && link.requests.delete(f.id);
        const n = link.leaving.get(f.room);
        if (n) {
          // The answer to our own `leave`.
          if (n <= 1) link.leaving.delete(f.room);
          else link.leaving.set(f.room, n - 1);
        } else if (!answered && this._unregister(f.room)) {
          link.roomsChanged();
          this._emit('left', { room: f.room });
        }
        return;
      }
      case 'pong':
        if (f.id != null) link.requests.delete(f.id);
        return;
      case 'error':
        this._onError(link, f);
        return;
      case 'transport':
        if (link instanceof WsLink) {
          link.end({
            reason: 'the server asked to use long-polling',
            switchTo: { retryWsAfterMs: Number(f.retry_ws_after_ms) || 0 },
          });
        }
        return;
      case 'connected':
        return; // extra `connected`: ignored
      default:
        return; // unknown ops are ignored (the contract may add some)
    }
  }

  /**
   * A room live on this connection got a `joined` it did not ask for: its history was
   * replaced (contract v1.1, decision 8). Continue live from the new position, and tell the
   * app (`joined` with `recovered: false`) so that it can offer to reload what it shows.
   * @param {WsLink|LongPollLink|SseLink} link
   * @param {RoomEntry} r
   * @param {Record<string, any>} f  The `joined` frame.
   */
  _epochChanged(link, r, f) {
    const effects = r.tracker.onEpochChange(f.epoch, f.seq);
    this._joined(r, f, false, true);
    this._apply(link, r, effects);
  }

  /**
   * The tracker took a `joined`: the room's position is where it says; tell the app.
   * @param {RoomEntry} r
   * @param {Record<string, any>} f  The `joined` frame.
   * @param {boolean} recovered
   * @param {boolean} resumed
   */
  _joined(r, f, recovered, resumed) {
    r.displayed = r.tracker.resumeFrom();
    if (isSeq(f.online)) r.online = f.online;
    this._emit('joined', {
      room: r.name,
      epoch: f.epoch,
      seq: f.seq,
      recovered,
      resumed,
      online: isSeq(f.online) ? f.online : null,
    });
  }

  /**
   * @param {WsLink|LongPollLink|SseLink} link
   * @param {Record<string, any>} f
   */
  _onError(link, f) {
    const code = typeof f.code === 'string' ? f.code : 'internal';
    const message = typeof f.message === 'string' ? f.message : '';
    const req = f.id != null ? link.requests.get(f.id) : undefined;
    if (req) link.requests.delete(f.id);
    const roomName = req?.room ?? (typeof f.room === 'string' ? f.room : undefined);
    if (req?.kind === 'join' && req.room) {
      const r = this._rooms.get(req.room);
      if (r && r.joinId === f.id) {
        r.joinId = null;
        this._joinFailed(link, r, code);
      }
    } else if (req?.kind === 'pull' && req.room) {
      this._rooms.get(req.room)?.tracker.onPullFailed();
    } else if (req?.kind === 'leave' && req.room) {
      const n = link.leaving.get(req.room);
      if (n && n > 1) link.leaving.set(req.room, n - 1);
      else link.leaving.delete(req.room);
    } else if (!req && f.id == null) {
      const r = roomName ? this._rooms.get(roomName) : undefined;
      if (r && !(link instanceof WsLink) && code !== 'rate_limited' && code !== 'internal' && code !== 'muted' && code !== 'too_large') {
        // A long-poll / SSE refusal naming a room (forbidden, room_closed): stop asking.
        this._joinFailed(link, r, code);
      } else {
        // Not tied to a request: it may concern any outstanding pull or join.
        for (const room of this._rooms.values()) {
          room.tracker.onPullFailed();
          if (room.joinId !== null && room.retryTimer === null) this._retryJoin(link, room);
        }
      }
    }
    const ev = /** @type {ErrorEvent} */ ({ code, message });
    if (roomName) ev.room = roomName;
    this._emit('error', ev);
  }

  /**
   * @param {WsLink|LongPollLink|SseLink} link
   * @param {RoomEntry} r
   * @param {string} code
   */
  _joinFailed(link, r, code) {
    if (code === 'rate_limited' || code === 'internal') {
      this._retryJoin(link, r);
    } else if (this._unregister(r.name)) {
      // room_closed, forbidden, …: retrying would not help.
      link.roomsChanged();
    }
  }

  /** @param {WsLink|LongPollLink|SseLink} link @param {RoomEntry} r */
  _retryJoin(link, r) {
    const delay = r.retry.nextDelay(this._random);
    r.retryTimer = setTimeout(() => {
      r.retryTimer = null;
      if (this._rooms.get(r.name) === r && this._link === link && link.connected) link.join(r);
    }, delay);
  }

  /** @param {string} room @returns {boolean} */
  _unregister(room) {
    const r = this._rooms.get(room);
    if (!r) return false;
    if (r.retryTimer !== null) clearTimeout(r.retryTimer);
    r.retryTimer = null;
    this._rooms.delete(room);
    return true;
  }

  /**
   * Carry out a tracker's effects.
   * @param {WsLink|LongPollLink|SseLink} link
   * @param {RoomEntry} r
   * @param {Effect[]} effects
   */
  _apply(link, r, effects) {
    for (const e of effects) {
      // A listener may have left the room or closed the client.
      if (this._closed || this._rooms.get(r.name) !== r) return;
      switch (e.kind) {
        case 'deliver':
          this._emit('message', e.message);
          r.displayed = { epoch: e.message.epoch, seq: e.message.seq };
          break;
        case 'lost':
          r.displayed = { epoch: r.tracker.epoch ?? '', seq: e.last };
          this._emit('lost', { room: r.name, first: e.first, last: e.last });
          break;
        case 'rewind':
          r.displayed = { epoch: r.tracker.epoch ?? '', seq: e.seq };
          if (e.first <= e.last) this._emit('lost', { room: r.name, first: e.first, last: e.last });
          break;
        case 'pull':
          if (link === this._link && !link.ended) {
            link.op(
              { op: 'pull', room: r.name, since: e.since, limit: Math.max(1, this._opts.pullLimit) },
              { kind: 'pull', room: r.name },
            );
          }
          break;
        case 'rejoin':
          if (link === this._link && !link.ended) link.join(r);
          break;
      }
    }
  }

  /**
   * Rooms in the form of a long-poll `rooms` object, with the positions sent.
   * @returns {{rooms: Record<string, Position|{}>, sent: Array<[RoomEntry, Position]>}}
   */
  _pollRooms() {
    /** @type {Record<string, Position|{}>} */
    const rooms = {};
    /** @type {Array<[RoomEntry, Position]>} */
    const sent = [];
    for (const r of this._rooms.values()) {
      const p = r.tracker.resumeFrom();
      rooms[r.name] = p ? { epoch: p.epoch, seq: p.seq } : {};
      if (p) sent.push([r, p]);
    }
    return { rooms, sent };
  }

  /**
   * Long-poll and SSE resume a room without a `joined` when the position is complete in the
   * current epoch: once the server accepted the position, the room is live.
   * @param {Array<[RoomEntry, Position]>} sent
   * @param {Array<Record<string, any>>} frames  The answer; rooms it has a `joined` for are left alone.
   */
  _resumeQuietly(sent, frames) {
    const announced = new Set(frames.filter((f) => f.op === 'joined').map((f) => f.room));
    for (const [r, p] of sent) {
      if (this._closed || this._rooms.get(r.name) !== r) continue;
      if (r.tracker.live || announced.has(r.name) || r.tracker.epoch !== p.epoch) continue;
      r.tracker.onJoined(p.epoch, p.seq, true);
      r.displayed = r.tracker.resumeFrom();
      this._emit('joined', {
        room: r.name,
        epoch: p.epoch,
        seq: p.seq,
        recovered: true,
        resumed: true,
        online: r.online,
      });
    }
  }

  /**
   * The page is going away, or into the back/forward cache (`pagehide`). Over long-polling
   * (or SSE, whose ops are polls) the session ends here with a goodbye that the browser
   * delivers after the page is gone (a beacon); `pageshow` from the cache connects again.
   * WebSocket is left to the browser, which closes it.
   */
  _pageHidden() {
    const link = this._link;
    if (this._closed || this._suspended || link instanceof WsLink) return;
    if (this._state === 'parked' || this._state === 'idle') return;
    const bye = this._byeBody(link);
    if (!bye) return;
    this._suspended = true;
    if (this._timer !== null) clearTimeout(this._timer);
    this._timer = null;
    if (link) {
      link.close();
      this._detach(link);
    }
    this._setState('reconnecting');
    this._sendBye(bye, true);
  }

  /**
   * The body of a goodbye poll (contract v1.1, decision 5): every room (so that the server
   * stops counting the terminal in them), rooms whose `leave` was not sent yet, and the
   * highest `ack` not sent yet. Null when no poll went out since the last goodbye, or when
   * the server could not tell who we are.
   * @param {WsLink|LongPollLink|SseLink|null} link
   * @returns {Record<string, any>|null}
   */
  _byeBody(link) {
    if (!this._byeOwed) return null;
    const body = this._identity();
    if (!body.token && !body.terminal) return null;
    const { rooms } = this._pollRooms();
    let ack = 0;
    for (const o of link instanceof LongPollLink ? link.unsentOps() : []) {
      if (o.op === 'ack' && isSeq(o.inbox)) ack = Math.max(ack, o.inbox);
      else if (o.op === 'leave' && typeof o.room === 'string' && !(o.room in rooms)) rooms[o.room] = {};
    }
    body.bye = true;
    body.rooms = rooms;
    body.wait_ms = 0;
    if (ack > 0) body.ops = [{ op: 'ack', inbox: ack }];
    return body;
  }

  /**
   * Send a goodbye poll. On page unload it goes as a beacon when the browser has
   * `navigator.sendBeacon`, else as a `keepalive` fetch; otherwise as a `keepalive` fetch given
   * up after `byeTimeoutMs`. The body goes as text/plain (the server reads JSON whatever the
   * type), which needs no CORS preflight. Never rejects.
   * @param {Record<string, any>} body
   * @param {boolean} unloading
   * @returns {Promise<void>}
   */
  _sendBye(body, unloading) {
    this._byeOwed = false;
    const url = this._httpUrl('/v1/poll');
    const text = JSON.stringify(body);
    if (unloading) {
      try {
        const nav = /** @type {any} */ (globalThis).navigator;
        if (nav && typeof nav.sendBeacon === 'function' && nav.sendBeacon(url, text)) return Promise.resolve();
      } catch {
        // a keepalive fetch instead
      }
    }
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), Math.max(0, this._opts.byeTimeoutMs));
    return (async () => {
      try {
        const res = await this._fetch(url, { method: 'POST', body: text, keepalive: true, signal: controller.signal });
        await res.text();
      } catch {
        // Best effort: without it the server's grace period ends the presence.
      } finally {
        clearTimeout(timer);
      }
    })();
  }

  /** Fields every HTTP request carries: token, or the terminal a dev server gave us. */
  _identity() {
    /** @type {Record<string, any>} */
    const body = {};
    if (this._token) body.token = this._token;
    else if (this._anonTerminal) body.terminal = this._anonTerminal;
    return body;
  }
}

/**
 * @param {string|undefined} server
 * @returns {string}
 */
function normalizeServer(server) {
  let s = server;
  if (!s) {
    const loc = /** @type {any} */ (globalThis).location;
    s = loc && loc.origin && loc.origin !== 'null' ? loc.origin : 'http://127.0.0.1:8080';
  }
  s = String(s).trim().replace(/\/+$/, '');
  if (s.startsWith('ws://') || s.startsWith('wss://')) s = s.replace(/^ws/, 'http');
  s = s.replace(/\/v1\/connect$/, '');
  return s;
}

/**
 * Error details from a failed HTTP answer.
 * @param {Response} res
 * @returns {Promise<{code: string, message: string}>}
 */
async function httpError(res) {
  let code = `http_${res.status}`;
  let message = `HTTP ${res.status}`;
  try {
    const body = await res.json();
    if (body && typeof body.error === 'string') code = body.error;
    if (body && typeof body.message === 'string') message = body.message;
  } catch {
    // not JSON
  }
  return { code, message };
}

/**
 * An inbox position from the wire (`{seq, acked, pending?}`), or null when it is not one.
 * @param {unknown} v
 * @returns {InboxState|null}
 */
function readInboxState(v) {
  if (!v || typeof v !== 'object') return null;
  const o = /** @type {Record<string, unknown>} */ (v);
  if (!isSeq(o.seq) || !isSeq(o.acked)) return null;
  return { seq: o.seq, acked: o.acked, pending: isSeq(o.pending) ? o.pending : null };
}

// ---------------------------------------------------------------------------------------------
// Links: one transport session each
// ---------------------------------------------------------------------------------------------

/** Bookkeeping shared by the links. */
class BaseLink {
  /** @param {LivepushClient} client */
  constructor(client) {
    this.client = client;
    this.connected = false;
    this.ended = false;
    /** @type {Map<number, Request>} requests awaiting an answer, by id */
    this.requests = new Map();
    /** @type {Map<string, number>} rooms with a `leave` in flight */
    this.leaving = new Map();
  }

  /** @param {number} id @param {Request} req */
  remember(id, req) {
    this.requests.set(id, req);
    while (this.requests.size > 1024) {
      const oldest = this.requests.keys().next().value;
      if (oldest === undefined) break;
      this.requests.delete(oldest);
    }
  }
}

/** A WebSocket session. */
class WsLink extends BaseLink {
  /** @param {LivepushClient} client */
  constructor(client) {
    super(client);
    /** @type {TransportName} */
    this.kind = 'websocket';
    this.opened = false;
    /** @type {WebSocket|null} */
    this.ws = null;
    /** @type {ReturnType<typeof setTimeout>|null} */
    this._connectTimer = null;
    /** @type {ReturnType<typeof setTimeout>|null} */
    this._watchTimer = null;
    this._probing = false;
    this._idleMs = 0;
  }

  start() {
    const c = this.client;
    try {
      this.ws = new c._WebSocket(c._wsUrl());
    } catch (e) {
      setTimeout(() => this.end({ reason: `websocket: ${e}` }), 0);
      return;
    }
    const ws = /** @type {WebSocket} */ (this.ws);
    this._connectTimer = setTimeout(
      () => this.end({ reason: 'connect timeout' }),
      c._opts.connectTimeoutMs,
    );
    ws.onopen = () => {
      this.opened = true;
      /** @type {Record<string, any>} */
      const connect = { op: 'connect', client: c._opts.clientName };
      if (c._token) connect.token = c._token;
      this._write(connect);
    };
    ws.onmessage = (ev) => this._onData(ev.data);
    ws.onerror = () => {}; // a close event follows
    ws.onclose = (ev) => {
      const why = `${ev.code}${ev.reason ? ` ${ev.reason}` : ''}`;
      let reason;
      if (!this.opened) reason = 'websocket failed to open';
      else if (!this.connected) reason = `closed before connected (${why})`;
      else reason = `connection closed (${why})`;
      this.end({ reason });
    };
  }

  /** @param {unknown} data */
  _onData(data) {
    if (this.ended || typeof data !== 'string') return;
    const c = this.client;
    this._traffic();
    const { frames, bad } = parseFrames(data);
    for (const line of bad) console.warn('livepush: unreadable frame skipped', line.slice(0, 200));
    if (this.connected) {
      c._onFrames(this, frames);
      return;
    }
    for (let i = 0; i < frames.length; i++) {
      const f = frames[i];
      if (f.op === 'connected') {
        this.connected = true;
        if (this._connectTimer !== null) clearTimeout(this._connectTimer);
        this._connectTimer = null;
        const hb = isSeq(f.heartbeat_ms) && f.heartbeat_ms > 0 ? f.heartbeat_ms : FALLBACK_HEARTBEAT_MS;
        this._idleMs = c._opts.idleTimeoutMs ?? hb + c._opts.idleGraceMs;
        this._traffic();
        // Rejoin every room (from its position) before anyone hears of the connection, so
        // that a `join()` from a `connected` listener is not sent twice.
        for (const r of c._rooms.values()) this.join(r);
        c._linkConnected(this, f);
        if (this.ended || c._link !== this) return;
        c._onFrames(this, frames.slice(i + 1));
        return;
      }
      if (f.op === 'error') {
        const code = String(f.code);
        const detail = { code, message: String(f.message ?? '') };
        const auth = code === 'unauthorized' || code === 'forbidden';
        this.end({ reason: `refused: ${code}`, ...(auth ? { auth: detail } : { refused: detail }) });
        return;
      }
      if (f.op === 'transport') {
        this.end({
          reason: 'the server asked to use long-polling',
          switchTo: { retryWsAfterMs: Number(f.retry_ws_after_ms) || 0 },
        });
        return;
      }
    }
  }

  /** Any incoming traffic: the connection is alive; restart the idle timer. */
  _traffic() {
    if (!this.connected || this.ended) return;
    if (this._watchTimer !== null) clearTimeout(this._watchTimer);
    this._probing = false;
    this._watchTimer = setTimeout(() => this._watchdog(), this._idleMs);
  }

  _watchdog() {
    this._watchTimer = null;
    if (this.ended) return;
    if (this._probing) {
      this.end({ reason: 'heartbeat timeout' });
      return;
    }
    this._probing = true;
    this._write({ op: 'ping' });
    this._watchTimer = setTimeout(() => this._watchdog(), this.client._opts.pingTimeoutMs);
  }

  /** @param {Record<string, any>} frame @returns {boolean} */
  _write(frame) {
    if (this.ended || !this.ws || this.ws.readyState !== 1) return false;
    try {
      this.ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  /** @param {Record<string, any>} frame @param {Request} req @returns {boolean} */
  op(frame, req) {
    if (!this.connected) return false;
    const id = this.client._id();
    this.remember(id, req);
    return this._write({ ...frame, id });
  }

  /** @param {RoomEntry} r */
  join(r) {
    if (!this.connected || this.ended) return;
    const id = this.client._id();
    r.joinId = id;
    if (r.retryTimer !== null) clearTimeout(r.retryTimer);
    r.retryTimer = null;
    this.remember(id, { kind: 'join', room: r.name });
    /** @type {Record<string, any>} */
    const frame = { op: 'join', id, room: r.name };
    const since = r.tracker.resumeFrom();
    if (since) frame.since = since;
    this._write(frame);
  }

  /** @param {string} room */
  leave(room) {
    if (!this.connected || this.ended) return;
    const id = this.client._id();
    this.remember(id, { kind: 'leave', room });
    this.leaving.set(room, (this.leaving.get(room) || 0) + 1);
    this._write({ op: 'leave', id, room });
  }

  roomsChanged() {}

  _teardown() {
    this.ended = true;
    if (this._connectTimer !== null) clearTimeout(this._connectTimer);
    if (this._watchTimer !== null) clearTimeout(this._watchTimer);
    this._connectTimer = null;
    this._watchTimer = null;
    const ws = this.ws;
    if (ws) {
      ws.onopen = null;
      ws.onmessage = null;
      ws.onclose = null;
      ws.onerror = null;
    }
    return ws;
  }

  /** The session ended (not on purpose). @param {LinkEnd} info */
  end(info) {
    if (this.ended) return;
    const ws = this._teardown();
    try {
      if (ws && ws.readyState < 2) ws.close();
    } catch {
      // ignore
    }
    this.client._linkEnded(this, { ...info, connected: this.connected });
  }

  /** Close on purpose, cleanly. */
  close() {
    if (this.ended) return;
    const ws = this._teardown();
    try {
      if (ws && ws.readyState < 2) ws.close(1000, 'client closed');
    } catch {
      // ignore
    }
  }
}

/**
 * One long-poll request in flight.
 * @typedef {object} Poll
 * @property {AbortController} controller
 * @property {boolean} hello
 * @property {Array<[RoomEntry, Position|null]>} sent  The rooms it carries, at the positions sent.
 * @property {Array<Record<string, any>>} ops  The ops it carries.
 * @property {boolean} aborted  Given up on purpose (rooms changed, or the link ended).
 * @property {boolean} timedOut
 */

/**
 * @param {LinkEnd} info
 * @returns {Error & {info: LinkEnd}}
 */
function linkError(info) {
  return Object.assign(new Error(info.reason), { info });
}

/**
 * A long-polling session (`POST /v1/poll`). One *main* poll is parked at a time: it carries
 * every room at its position and no ops, and the next one starts as soon as it is answered.
 * Ops (send, ack, pull, leave) go out at once in a *short* poll (`wait_ms: 0`) beside it,
 * which carries the rooms of its sends (the server wants the sender in the room), so that
 * the parked poll is not cut short for them. When the rooms change (join, leave, rejoin) the
 * parked main poll is given up and sent again. Every poll carries the positions of its
 * rooms, so a lost answer loses nothing and any server node can answer.
 */
class LongPollLink extends BaseLink {
  /** @param {LivepushClient} client */
  constructor(client) {
    super(client);
    /** @type {TransportName} */
    this.kind = 'long-polling';
    /** @type {Array<Record<string, any>>} ops for the next short poll */
    this._ops = [];
    this._hello = true;
    /** @type {Poll|null} */
    this._main = null;
    /** @type {Poll|null} */
    this._side = null;
    /** @type {ReturnType<typeof setTimeout>|null} the next main poll waits (after errors) */
    this._hold = null;
    /** @type {ReturnType<typeof setTimeout>|null} */
    this._wsTimer = null;
    this._sideQueued = false;
    this._restartQueued = false;
    this._pace = new Backoff(client._opts.backoffBaseMs, client._opts.backoffMaxMs);
    /** Rooms whose attach was confirmed in this session (a `joined`, or a quiet resume). */
    this._announced = new Set();
  }

  start() {
    this._pollMain();
  }

  /**
   * Send one poll; resolves with its frames and its `inbox` block.
   * @param {Record<string, any>} body
   * @param {Poll} poll
   * @returns {Promise<{frames: Array<Record<string, any>>, inbox: InboxState|null}>}
   */
  async _exchange(body, poll) {
    const c = this.client;
    c._byeOwed = true;
    const timer = setTimeout(() => {
      poll.timedOut = true;
      poll.controller.abort();
    }, body.wait_ms + c._opts.longPollGraceMs);
    try {
      let text;
      try {
        const res = await c._fetch(c._httpUrl('/v1/poll'), {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify(body),
          signal: poll.controller.signal,
        });
        if (!res.ok) {
          const err = await httpError(res);
          const auth = res.status === 401 || res.status === 403;
          throw linkError({
            reason: `poll refused: ${err.code} (HTTP ${res.status})`,
            ...(auth ? { auth: err } : { refused: err }),
          });
        }
        text = await res.text();
      } catch (e) {
        if (/** @type {any} */ (e).info) throw e;
        throw linkError({ reason: poll.timedOut ? 'poll timed out' : `poll failed: ${e}` });
      }
      /** @type {any} */
      let json;
      try {
        json = JSON.parse(text);
      } catch {
        json = null;
      }
      if (!json || !Array.isArray(json.frames)) throw linkError({ reason: 'unreadable poll answer' });
      return {
        frames: json.frames.filter((/** @type {any} */ f) => f && typeof f === 'object' && typeof f.op === 'string'),
        inbox: readInboxState(json.inbox),
      };
    } finally {
      clearTimeout(timer);
    }
  }

  async _pollMain() {
    if (this.ended || this._main || this._hold !== null) return;
    const c = this.client;
    /** @type {Array<[RoomEntry, Position|null]>} */
    const sent = [];
    /** @type {Record<string, any>} */
    const rooms = {};
    for (const r of c._rooms.values()) {
      const p = r.tracker.resumeFrom();
      r.tracker.onAttached();
      rooms[r.name] = p ? { epoch: p.epoch, seq: p.seq } : {};
      sent.push([r, p]);
    }
    /** @type {Record<string, any>} */
    const body = c._identity();
    if (this._hello) body.hello = true;
    body.rooms = rooms;
    if (c._inboxDelivered > 0) body.inbox = c._inboxDelivered;
    body.wait_ms = c._opts.longPollWaitMs;
    /** @type {Poll} */
    const poll = { controller: new AbortController(), hello: this._hello, sent, ops: [], aborted: false, timedOut: false };
    this._main = poll;
    const started = Date.now();
    /** @type {Array<Record<string, any>>} */
    let frames;
    /** @type {InboxState|null} */
    let inbox;
    try {
      ({ frames, inbox } = await this._exchange(body, poll));
    } catch (e) {
      if (this._main === poll) this._main = null;
      if (this.ended) return;
      if (poll.aborted && !poll.timedOut) {
        // Given up because the rooms changed: send it again with the current rooms.
        this._pollMain();
        return;
      }
      this.end(/** @type {any} */ (e).info);
      return;
    }
    // (An answer that arrived in full although the poll was given up is used all the same.)
    if (this._main === poll) this._main = null;
    if (this.ended) return;
    if (poll.hello) {
      const i = frames.findIndex((f) => f.op === 'connected');
      if (i < 0) {
        const err = frames.find((f) => f.op === 'error');
        const detail = err
          ? { code: String(err.code), message: String(err.message ?? '') }
          : { code: 'bad_frame', message: 'the hello poll was answered without `connected`' };
        const auth = detail.code === 'unauthorized' || detail.code === 'forbidden';
        this.end({ reason: `refused: ${detail.code}`, ...(auth ? { auth: detail } : { refused: detail }) });
        return;
      }
      const [hello] = frames.splice(i, 1);
      this._hello = false;
      this.connected = true;
      c._linkConnected(this, hello);
      if (this.ended || c._link !== this) return;
      this._armWsRetry();
      this._queueSide();
    }
    const retryLater = this._onAnswer(poll, frames, true, inbox);
    if (this.ended || c._link !== this) return;
    // Pace a server that answers at once with errors or with nothing (instead of parking).
    const early = frames.length === 0 && Date.now() - started < Math.min(1000, c._opts.longPollWaitMs / 2);
    if (retryLater || early) {
      this._hold = setTimeout(() => {
        this._hold = null;
        this._pollMain();
      }, this._pace.nextDelay(c._random));
    } else {
      this._pace.reset();
      this._pollMain();
    }
  }

  async _pollSide() {
    if (this.ended || !this.connected || this._side || this._ops.length === 0) return;
    const c = this.client;
    const ops = this._ops.splice(0);
    /** @type {Array<[RoomEntry, Position|null]>} */
    const sent = [];
    /** @type {Record<string, any>} */
    const rooms = {};
    for (const o of ops) {
      const r = o.op === 'send' ? c._rooms.get(o.room) : undefined;
      if (!r || o.room in rooms) continue;
      const p = r.tracker.resumeFrom();
      rooms[o.room] = p ? { epoch: p.epoch, seq: p.seq } : {};
      sent.push([r, p]);
    }
    /** @type {Record<string, any>} */
    const body = c._identity();
    body.rooms = rooms;
    if (c._inboxDelivered > 0) body.inbox = c._inboxDelivered;
    body.wait_ms = 0;
    body.ops = ops;
    /** @type {Poll} */
    const poll = { controller: new AbortController(), hello: false, sent, ops, aborted: false, timedOut: false };
    this._side = poll;
    /** @type {Array<Record<string, any>>} */
    let frames;
    /** @type {InboxState|null} */
    let inbox;
    try {
      ({ frames, inbox } = await this._exchange(body, poll));
    } catch (e) {
      if (this._side === poll) this._side = null;
      if (this.ended) return;
      for (const o of ops) if (o.op === 'pull') c._rooms.get(o.room)?.tracker.onPullFailed();
      this.end(/** @type {any} */ (e).info);
      return;
    }
    if (this._side === poll) this._side = null;
    if (this.ended) return;
    this._onAnswer(poll, frames, false, inbox);
    if (this.ended || c._link !== this) return;
    this._pollSide();
  }

  /**
   * Handle the frames of an answer, then its `inbox` block. Returns whether the next main
   * poll should wait (an error the server may repeat at once).
   * @param {Poll} poll
   * @param {Array<Record<string, any>>} frames
   * @param {boolean} main
   * @param {InboxState|null} inbox
   * @returns {boolean}
   */
  _onAnswer(poll, frames, main, inbox) {
    const c = this.client;
    const names = poll.sent.map(([r]) => r.name);
    let retryLater = false;
    /** @type {Map<string, number>} */
    const joinedSeq = new Map();
    /** @type {Set<string>} */
    const prompted = new Set();
    /** @type {Set<string>} */
    const refused = new Set();
    /** @type {Array<Record<string, any>>} */
    const todo = [];
    for (let f of frames) {
      if (!main && (f.op === 'joined' || f.op === 'online' || f.op === 'prompt' || (f.op === 'msg' && f.seq == null))) {
        // A short poll: its attach is only for sending. Transient messages, `joined` and
        // online counts come with the main poll (they would be shown twice).
        continue;
      }
      if (f.op === 'joined') {
        const entry = poll.sent.find(([r]) => r.name === f.room);
        if (!entry || c._rooms.get(f.room) !== entry[0]) continue; // not for the room followed now
        joinedSeq.set(f.room, f.seq);
        this._announced.add(f.room);
      } else if (f.op === 'prompt') {
        prompted.add(f.room);
      } else if (f.op === 'error' && f.id == null) {
        // A refusal of an attach names the room in `room` (or, for malformed entries, only
        // in its message).
        const msgText = typeof f.message === 'string' ? f.message : '';
        const room =
          typeof f.room === 'string'
            ? f.room
            : names.find((n) => msgText.includes(`"${n}"`)) ?? names.find((n) => msgText.includes(n));
        if (room) {
          f = { ...f, room };
          refused.add(room);
        }
        if (!room || f.code === 'rate_limited' || f.code === 'internal') retryLater = true;
      }
      todo.push(f);
    }
    if (main) {
      // Rooms resumed quietly (neither `joined` nor a refusal): live from their position.
      for (const [r, p] of poll.sent) {
        if (!p || this._announced.has(r.name) || refused.has(r.name) || joinedSeq.has(r.name)) continue;
        if (c._closed || c._rooms.get(r.name) !== r || !r.tracker.live) continue;
        this._announced.add(r.name);
        c._emit('joined', { room: r.name, epoch: p.epoch, seq: p.seq, recovered: true, resumed: true, online: r.online });
      }
    }
    c._onFrames(this, todo);
    if (main) {
      for (const [room, seq] of joinedSeq) {
        if (prompted.has(room) || c._closed || this.ended) continue;
        const r = c._rooms.get(room);
        if (r) c._apply(this, r, r.tracker.onReplayComplete(seq));
      }
    }
    if (!c._closed && !this.ended && c._link === this) c._inboxState(inbox);
    return retryLater;
  }

  /** Ops queued or riding in the short poll in flight (whose answer is not in yet). @returns {Array<Record<string, any>>} */
  unsentOps() {
    return [...(this._side ? this._side.ops : []), ...this._ops];
  }

  /** In `auto` mode, go back to WebSocket when its time has come. */
  _armWsRetry() {
    const c = this.client;
    if (c._opts.transport !== 'auto' || !c._hasWebSocket() || !(c._wsRetryAt > 0)) return;
    this._wsTimer = setTimeout(() => {
      this._wsTimer = null;
      this.end({ reason: 'trying WebSocket again', retryWs: true });
    }, Math.max(0, c._wsRetryAt - Date.now()));
  }

  _queueSide() {
    if (this.ended || this._sideQueued) return;
    this._sideQueued = true;
    queueMicrotask(() => {
      this._sideQueued = false;
      this._pollSide();
    });
  }

  /** The rooms changed: give up the parked main poll and send it again. */
  _restartMain() {
    if (this.ended || this._restartQueued) return;
    this._restartQueued = true;
    queueMicrotask(() => {
      this._restartQueued = false;
      if (this.ended) return;
      const m = this._main;
      if (m) {
        // The hello poll is answered at once anyway; the next one carries the new rooms.
        if (!m.hello && !m.aborted) {
          m.aborted = true;
          m.controller.abort();
        }
        return;
      }
      if (this._hold !== null) {
        clearTimeout(this._hold);
        this._hold = null;
      }
      this._pollMain();
    });
  }

  /** @param {Record<string, any>} frame @param {Request} req @returns {boolean} */
  op(frame, req) {
    if (this.ended) return false;
    const id = this.client._id();
    this.remember(id, req);
    this._ops.push({ ...frame, id });
    this._queueSide();
    return true;
  }

  /** @param {RoomEntry} _r */
  join(_r) {
    this._restartMain();
  }

  /** @param {string} room */
  leave(room) {
    this._announced.delete(room);
    if (this.connected) {
      this.leaving.set(room, (this.leaving.get(room) || 0) + 1);
      this.op({ op: 'leave', room }, { kind: 'leave', room });
    }
    this._restartMain();
  }

  roomsChanged() {
    this._restartMain();
  }

  _teardown() {
    this.ended = true;
    for (const t of [this._hold, this._wsTimer]) if (t !== null) clearTimeout(t);
    this._hold = null;
    this._wsTimer = null;
    for (const p of [this._main, this._side]) {
      if (p) {
        p.aborted = true;
        p.controller.abort();
      }
    }
    this._main = null;
    this._side = null;
  }

  /** @param {LinkEnd} info */
  end(info) {
    if (this.ended) return;
    this._teardown();
    this.client._linkEnded(this, { ...info, connected: this.connected });
  }

  close() {
    if (!this.ended) this._teardown();
  }
}

/**
 * A Server-Sent Events session: `GET /v1/sse` receives; pulls, sends and acks go out as
 * one-off long-poll requests (`wait_ms: 0`). The client reconnects the stream itself, with
 * explicit positions, rather than letting EventSource retry.
 */
class SseLink extends BaseLink {
  /** @param {LivepushClient} client */
  constructor(client) {
    super(client);
    /** @type {TransportName} */
    this.kind = 'sse';
    /** @type {EventSource|null} */
    this.es = null;
    /** @type {ReturnType<typeof setTimeout>|null} */
    this._connectTimer = null;
    /** @type {Array<[RoomEntry, Position]>} */
    this._sent = [];
    this._streamUp = false;
    this._reopenQueued = false;
  }

  start() {
    this._open();
  }

  /** Open the stream with the current rooms and positions (a stream needs a room: without
   * one, nothing is opened until `join`). */
  _open() {
    const c = this.client;
    this.es = null;
    if (c._rooms.size === 0) return;
    if (!this.connected && this._connectTimer === null) {
      this._connectTimer = setTimeout(() => this.end({ reason: 'connect timeout' }), c._opts.connectTimeoutMs);
    }
    const params = new URLSearchParams();
    if (c._token) params.set('token', c._token);
    else if (c._anonTerminal) params.set('terminal', c._anonTerminal);
    const { rooms, sent } = c._pollRooms();
    const names = Object.keys(rooms);
    if (names.length) params.set('rooms', names.join(','));
    /** @type {Record<string, Position>} */
    const since = {};
    for (const [r, p] of sent) since[r.name] = p;
    if (sent.length) params.set('since', formatPositions(since));
    this._sent = sent;
    this._streamUp = false;
    let es;
    try {
      es = new c._EventSource(`${c._httpUrl('/v1/sse')}?${params}`);
    } catch (e) {
      setTimeout(() => this.end({ reason: `sse: ${e}` }), 0);
      return;
    }
    this.es = es;
    es.onmessage = (/** @type {MessageEvent} */ ev) => this._onData(ev.data);
    es.onerror = () => this.end({ reason: this.connected ? 'event stream interrupted' : 'event stream failed' });
  }

  /** @param {unknown} data */
  _onData(data) {
    if (this.ended || typeof data !== 'string') return;
    const c = this.client;
    const { frames } = parseFrames(data);
    if (!this._streamUp) {
      const i = frames.findIndex((f) => f.op === 'connected');
      if (i < 0) {
        const err = frames.find((f) => f.op === 'error');
        if (err) {
          const detail = { code: String(err.code), message: String(err.message ?? '') };
          const auth = detail.code === 'unauthorized' || detail.code === 'forbidden';
          this.end({ reason: `refused: ${detail.code}`, ...(auth ? { auth: detail } : { refused: detail }) });
          return;
        }
      }
      // The first event opens the stream (with `connected` first, per the contract).
      this._streamUp = true;
      const hello = i >= 0 ? frames.splice(i, 1)[0] : { terminal: null };
      if (!this.connected) {
        this.connected = true;
        if (this._connectTimer !== null) clearTimeout(this._connectTimer);
        this._connectTimer = null;
        c._linkConnected(this, hello);
        if (this.ended || c._link !== this) return;
      }
    }
    for (const f of frames) {
      if (c._closed || this.ended || c._link !== this) return;
      if ((f.op === 'msg' && f.seq != null) || f.op === 'prompt') {
        // A room resumed without a `joined` (the server may announce it or not): the stream
        // accepted our position, so the room is live.
        const entry = this._sent.find(([r]) => r.name === f.room);
        if (entry && !entry[0].tracker.live) c._resumeQuietly([entry], []);
      }
      c._onFrame(this, f);
    }
  }

  /** Re-open the stream with the current rooms and positions (after join/leave/rejoin). */
  _reopen() {
    if (this.ended || this._reopenQueued) return;
    this._reopenQueued = true;
    queueMicrotask(() => {
      this._reopenQueued = false;
      if (this.ended) return;
      const es = this.es;
      if (es) {
        es.onmessage = null;
        es.onerror = null;
        es.close();
      }
      for (const r of this.client._rooms.values()) r.tracker.onDisconnect();
      this._open();
    });
  }

  /** @param {Record<string, any>} frame @param {Request} req @returns {boolean} */
  op(frame, req) {
    if (this.ended || !this.connected) return false;
    const c = this.client;
    const id = c._id();
    this.remember(id, req);
    /** @type {Record<string, any>} */
    const body = c._identity();
    body.rooms = {};
    if (frame.op === 'send') {
      // Sending needs membership: name the room at our position (its messages are ignored).
      const p = c._rooms.get(frame.room)?.tracker.resumeFrom();
      body.rooms[frame.room] = p ? { epoch: p.epoch, seq: p.seq } : {};
    }
    body.wait_ms = 0;
    body.ops = [{ ...frame, id }];
    c._byeOwed = true;
    c._fetch(c._httpUrl('/v1/poll'), {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body),
    })
      .then(async (res) => {
        if (!res.ok) throw new Error((await httpError(res)).message);
        const json = await res.json();
        const frames = Array.isArray(json?.frames) ? json.frames : [];
        // Only the answers to our op: room traffic comes over the stream.
        const answers = frames.filter(
          (/** @type {any} */ f) => f && (f.op === 'pulled' || f.op === 'error') && f.id === id,
        );
        if (!this.ended && c._link === this) c._onFrames(this, answers);
      })
      .catch((e) => {
        if (this.ended || c._link !== this) return;
        this.requests.delete(id);
        if (frame.op === 'pull') c._rooms.get(frame.room)?.tracker.onPullFailed();
        c._emit('error', { code: 'internal', message: `${frame.op} failed: ${e}`, room: frame.room });
      });
    return true;
  }

  /** @param {RoomEntry} _r */
  join(_r) {
    this._reopen();
  }

  /** @param {string} _room */
  leave(_room) {
    this._reopen();
  }

  roomsChanged() {
    this._reopen();
  }

  _teardown() {
    this.ended = true;
    if (this._connectTimer !== null) clearTimeout(this._connectTimer);
    this._connectTimer = null;
    const es = this.es;
    if (es) {
      es.onmessage = null;
      es.onerror = null;
      es.close();
    }
  }

  /** @param {LinkEnd} info */
  end(info) {
    if (this.ended) return;
    this._teardown();
    this.client._linkEnded(this, { ...info, connected: this.connected });
  }

  close() {
    if (!this.ended) this._teardown();
  }
}

export default LivepushClient;
