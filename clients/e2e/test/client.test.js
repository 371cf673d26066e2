// Unit tests of LivepushClient's connection logic in node, with a scripted WebSocket and a
// scripted long-poll server injected through the `WebSocket` and `fetch` options.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { LivepushClient } from '../../js/livepush.js';
import { record, sleep, waitFor } from '../lib/events.js';

const SERVER = 'http://push.test';

/** A WebSocket class whose instances the test drives. */
function fakeWebSocket() {
  /** @type {any[]} */
  const all = [];
  class FakeWebSocket {
    /** @param {string} url */
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      /** @type {any[]} */
      this.sent = [];
      /** @type {any} */
      this.closed = null;
      /** @type {any} */ this.onopen = null;
      /** @type {any} */ this.onmessage = null;
      /** @type {any} */ this.onclose = null;
      /** @type {any} */ this.onerror = null;
      all.push(this);
    }
    /** @param {string} text */
    send(text) {
      for (const line of text.split('\n')) this.sent.push(JSON.parse(line));
    }
    /** @param {number} [code] @param {string} [reason] */
    close(code, reason) {
      this.closed = { code, reason };
      this.readyState = 3;
    }
    // ---- test side ----
    open() {
      this.readyState = 1;
      this.onopen?.({});
    }
    /** @param {...object} frames */
    deliver(...frames) {
      this.onmessage?.({ data: frames.map((f) => JSON.stringify(f)).join('\n') });
    }
    drop(code = 1006) {
      this.readyState = 3;
      this.onclose?.({ code, reason: '' });
    }
    /** @param {string} op */
    sentOps(op) {
      return this.sent.filter((f) => f.op === op);
    }
  }
  return { WebSocket: FakeWebSocket, all, last: () => all[all.length - 1] };
}

/** A long-poll server the test answers poll by poll. */
function fakePollServer() {
  /** @type {Array<{url: string, body: any, init: any, aborted: boolean, answer: (frames: any[], extra?: object) => void, fail: (status: number, body?: any) => void}>} */
  const polls = [];
  /** @type {typeof fetch} */
  const fetch = (url, init) =>
    new Promise((resolve, reject) => {
      const p = {
        url: String(url),
        body: JSON.parse(String(init?.body)),
        init,
        aborted: false,
        answer: (/** @type {any[]} */ frames, extra = {}) =>
          resolve(new Response(JSON.stringify({ frames, ...extra }), { status: 200, headers: { 'content-type': 'application/json' } })),
        fail: (/** @type {number} */ status, /** @type {any} */ body = { error: 'internal', message: 'boom' }) =>
          resolve(new Response(JSON.stringify(body), { status })),
      };
      init?.signal?.addEventListener('abort', () => {
        p.aborted = true;
        reject(new DOMException('aborted', 'AbortError'));
      });
      polls.push(p);
    });
  return { fetch, polls, last: () => polls[polls.length - 1] };
}

/** An EventSource class whose instances the test drives. */
function fakeEventSource() {
  /** @type {any[]} */
  const sources = [];
  class FakeEventSource {
    /** @param {string} url */
    constructor(url) {
      this.url = url;
      this.closed = false;
      /** @type {any} */ this.onmessage = null;
      /** @type {any} */ this.onerror = null;
      sources.push(this);
    }
    close() {
      this.closed = true;
    }
    /** @param {...object} frames */
    emit(...frames) {
      this.onmessage?.({ data: frames.map((f) => JSON.stringify(f)).join('\n') });
    }
  }
  return { EventSource: /** @type {any} */ (FakeEventSource), sources };
}

const noFetch = /** @type {typeof fetch} */ (() => Promise.reject(new Error('no HTTP in this test')));

const connected = (transport = 'ws', terminal = 't1') => ({
  op: 'connected', terminal, transport, heartbeat_ms: 25000, inbox: { seq: 0, acked: 0 }, wake_key: '',
});
const msg = (/** @type {number} */ seq, room = 'r') => ({ op: 'msg', room, type: 'gift', data: { n: seq }, seq, ts: seq });

describe('LivepushClient over WebSocket', () => {
  test('connects, joins, delivers once in order, and resumes from the displayed position', async () => {
    const ws = fakeWebSocket();
    const c = new LivepushClient({ server: SERVER, WebSocket: ws.WebSocket, fetch: noFetch, rooms: ['r'], backoffBaseMs: 1, random: () => 0 });
    const rec = record(c);
    try {
      assert.equal(c.state, 'idle');
      const s1 = await waitFor(() => ws.last(), 1000, 'a WebSocket');
      assert.equal(s1.url, 'ws://push.test/v1/connect');
      assert.equal(c.state, 'connecting');
      assert.equal(c.transport, 'websocket');
      s1.open();
      assert.deepEqual(s1.sent, [{ op: 'connect', client: 'livepush-js/0.1.0' }]);
      s1.deliver(connected());
      const [join] = s1.sentOps('join');
      assert.deepEqual(join, { op: 'join', id: join.id, room: 'r' }, 'a fresh join has no since');
      assert.equal(c.state, 'connected');
      assert.deepEqual(rec.of('connected'), [{ transport: 'websocket', terminal: 't1', heartbeatMs: 25000, inbox: { seq: 0, acked: 0, pending: null } }]);

      s1.deliver({ op: 'joined', id: join.id, room: 'r', epoch: 'E', seq: 5, recovered: true, online: 2 });
      assert.deepEqual(rec.of('joined'), [{ room: 'r', epoch: 'E', seq: 5, recovered: true, resumed: false, online: 2 }]);
      assert.deepEqual(c.position('r'), { epoch: 'E', seq: 5 });

      s1.deliver(msg(5), msg(6), msg(6), msg(8), { op: 'msg', room: 'r', type: 'chat', data: { text: 'hi' }, ts: 1 });
      assert.deepEqual(rec.seqs(), [6]);
      assert.deepEqual(rec.of('transient'), [{ room: 'r', type: 'chat', data: { text: 'hi' }, ts: 1 }]);
      const [pull] = s1.sentOps('pull');
      assert.deepEqual(pull, { op: 'pull', room: 'r', since: 6, limit: 1000, id: pull.id }, 'ONE pull for the gap');
      s1.deliver(msg(9));
      assert.equal(s1.sentOps('pull').length, 1, 'no second pull while one is in flight');
      s1.deliver({ op: 'pulled', id: pull.id, room: 'r', epoch: 'E', seq: 9, recovered: true, messages: [msg(7), msg(8), msg(9)] });
      assert.deepEqual(rec.seqs(), [6, 7, 8, 9]);
      assert.deepEqual(c.position('r'), { epoch: 'E', seq: 9 });
      const m7 = rec.of('message')[1];
      assert.deepEqual(m7, { room: 'r', epoch: 'E', seq: 7, type: 'gift', data: { n: 7 }, ts: 7 });

      s1.deliver({ op: 'online', room: 'r', count: 3 });
      assert.deepEqual(rec.of('online'), [{ room: 'r', count: 3 }]);

      // The connection drops: back-off, reconnect, resume from seq 9.
      s1.drop();
      assert.equal(rec.of('disconnected').length, 1);
      assert.equal(rec.of('disconnected')[0].transport, 'websocket');
      const s2 = await waitFor(() => ws.all[1], 1000, 'a second WebSocket');
      s2.open();
      s2.deliver(connected());
      const [join2] = s2.sentOps('join');
      assert.deepEqual(join2.since, { epoch: 'E', seq: 9 });
      s2.deliver({ op: 'joined', id: join2.id, room: 'r', epoch: 'E', seq: 11, recovered: true, online: 1 }, msg(9), msg(10), msg(11));
      assert.deepEqual(rec.seqs(), [6, 7, 8, 9, 10, 11]);
      assert.equal(rec.of('joined')[1].resumed, true);

      const states = rec.of('state').map((s) => s.state);
      assert.deepEqual(states, ['connecting', 'connected', 'reconnecting', 'connecting', 'connected']);
    } finally {
      c.close();
    }
    assert.equal(c.state, 'closed');
    assert.deepEqual(ws.all[1].closed, { code: 1000, reason: 'client closed' });
  });

  test('the watchdog probes a silent connection with a ping, and drops it when nothing answers', async () => {
    const ws = fakeWebSocket();
    const c = new LivepushClient({
      server: SERVER, WebSocket: ws.WebSocket, fetch: noFetch, idleTimeoutMs: 60, pingTimeoutMs: 60, backoffBaseMs: 1, random: () => 0,
    });
    const rec = record(c);
    try {
      const s1 = await waitFor(() => ws.last());
      s1.open();
      s1.deliver(connected());
      await sleep(30);
      assert.equal(s1.sentOps('ping').length, 0, 'no probe before the idle timeout');
      await waitFor(() => s1.sentOps('ping').length === 1, 1000, 'a ping');
      s1.deliver({ op: 'pong' }); // any traffic answers the probe
      await sleep(90);
      assert.equal(ws.all.length, 1, 'still the same connection');
      await waitFor(() => s1.sentOps('ping').length === 2, 1000, 'a second ping');
      // Nothing comes back this time.
      await waitFor(() => ws.all.length === 2, 1000, 'a reconnect');
      assert.ok(s1.closed, 'the dead socket was closed');
      assert.equal(rec.of('disconnected')[0].reason, 'heartbeat timeout');
    } finally {
      c.close();
    }
  });

  test('a refused token parks the client after authFailureLimit; setToken wakes it', async () => {
    const ws = fakeWebSocket();
    const c = new LivepushClient({
      server: SERVER, token: 'bad', WebSocket: ws.WebSocket, fetch: noFetch, authFailureLimit: 2, backoffBaseMs: 1, random: () => 0,
    });
    const rec = record(c);
    try {
      for (let i = 0; i < 2; i++) {
        const s = await waitFor(() => ws.all[i]);
        s.open();
        assert.equal(s.sent[0].token, 'bad');
        s.deliver({ op: 'error', code: 'unauthorized', message: 'token expired' });
      }
      assert.equal(c.state, 'parked');
      assert.deepEqual(rec.of('error').map((e) => e.code), ['unauthorized', 'unauthorized']);
      await sleep(30);
      assert.equal(ws.all.length, 2, 'parked: no more attempts');
      c.setToken('good');
      const s3 = await waitFor(() => ws.all[2]);
      s3.open();
      assert.equal(s3.sent[0].token, 'good');
      s3.deliver(connected());
      assert.equal(c.state, 'connected');
    } finally {
      c.close();
    }
  });

  test('displayed: a throwing listener is reported and counts as displayed; leave() in a listener stops delivery', async () => {
    const ws = fakeWebSocket();
    const c = new LivepushClient({ server: SERVER, WebSocket: ws.WebSocket, fetch: noFetch, rooms: ['r'] });
    const rec = record(c);
    /** @type {number[]} */
    const positionsSeen = [];
    c.on('message', (m) => {
      positionsSeen.push(/** @type {any} */ (c.position('r')).seq);
      if (m.seq === 2) throw new Error('render failed');
      if (m.seq === 5) c.leave('r');
    });
    try {
      const s = await waitFor(() => ws.last());
      s.open();
      s.deliver(connected());
      const [join] = s.sentOps('join');
      s.deliver({ op: 'joined', id: join.id, room: 'r', epoch: 'E', seq: 0, recovered: true, online: 1 });
      s.deliver(msg(1), msg(2), msg(3));
      assert.deepEqual(rec.seqs(), [1, 2, 3]);
      assert.deepEqual(positionsSeen, [0, 1, 2], 'the position moves after the listeners return');
      assert.deepEqual(c.position('r'), { epoch: 'E', seq: 3 });
      assert.equal(rec.of('error')[0].code, 'listener_error');
      s.deliver(msg(4), msg(5), msg(6));
      assert.deepEqual(rec.seqs(), [1, 2, 3, 4, 5], 'nothing after leave()');
      assert.deepEqual(s.sentOps('leave').map((f) => f.room), ['r']);
      assert.equal(c.position('r'), null);
    } finally {
      c.close();
    }
  });

  test('join errors: rate_limited retries the join, forbidden gives the room up', async () => {
    const ws = fakeWebSocket();
    const c = new LivepushClient({ server: SERVER, WebSocket: ws.WebSocket, fetch: noFetch, rooms: ['a', 'b'], backoffBaseMs: 1, random: () => 0 });
    const rec = record(c);
    try {
      const s = await waitFor(() => ws.last());
      s.open();
      s.deliver(connected());
      const [ja, jb] = s.sentOps('join');
      s.deliver({ op: 'error', id: ja.id, code: 'rate_limited', message: 'slow down' });
      s.deliver({ op: 'error', id: jb.id, code: 'forbidden', message: 'not your room' });
      assert.deepEqual(c.rooms, ['a']);
      assert.deepEqual(rec.of('error').map((e) => [e.code, e.room]), [['rate_limited', 'a'], ['forbidden', 'b']]);
      await waitFor(() => s.sentOps('join').length === 3, 1000, 'the retried join');
      assert.equal(s.sentOps('join')[2].room, 'a');
    } finally {
      c.close();
    }
  });
});

describe('LivepushClient transports', () => {
  test('without WebSocket it long-polls: hello, positions, terminal; ops in a short poll beside the parked one', async () => {
    const srv = fakePollServer();
    const c = new LivepushClient({ server: SERVER, WebSocket: null, fetch: srv.fetch, rooms: ['r'], backoffBaseMs: 1, random: () => 0 });
    const rec = record(c);
    const find = (/** @type {(p: any) => boolean} */ pred, what = 'a poll') =>
      waitFor(() => srv.polls.find((p) => !p.done && !p.aborted && pred(p)), 2000, what);
    const answer = (/** @type {any} */ p, /** @type {any[]} */ frames) => {
      p.done = true;
      p.answer(frames);
    };
    const isMain = (/** @type {any} */ p) => p.body.wait_ms === 25000;
    try {
      const p1 = await find(() => true);
      assert.equal(p1.url, 'http://push.test/v1/poll');
      assert.deepEqual(p1.body, { hello: true, rooms: { r: {} }, wait_ms: 25000 });
      answer(p1, [connected('longpoll', 'anon-1'), { op: 'joined', room: 'r', epoch: 'E', seq: 3, recovered: true, online: 1 }]);
      const p2 = await find(isMain, 'the parked main poll');
      assert.equal(c.transport, 'long-polling');
      assert.equal(rec.of('connected')[0].transport, 'long-polling');
      assert.deepEqual(p2.body, { terminal: 'anon-1', rooms: { r: { epoch: 'E', seq: 3 } }, wait_ms: 25000 });

      // An op goes out at once in a short poll; the parked poll stays.
      assert.equal(c.send('r', 'chat', { text: 'hi' }), true);
      const p3 = await find((p) => p.body.wait_ms === 0, 'the short poll');
      assert.equal(p2.aborted, false);
      assert.deepEqual(p3.body, {
        terminal: 'anon-1', rooms: { r: { epoch: 'E', seq: 3 } }, wait_ms: 0,
        ops: [{ op: 'send', room: 'r', type: 'chat', data: { text: 'hi' }, id: p3.body.ops[0].id }],
      });
      const chat = { op: 'msg', room: 'r', type: 'chat', data: { text: 'hi' }, ts: 5 };
      answer(p3, [chat, msg(4)]);
      await waitFor(() => rec.seqs().length === 1);
      assert.deepEqual(rec.of('transient'), [], 'transient messages come with the main poll only');

      // The main poll's answer: a duplicate, a gap (one pull, in a short poll), the chat.
      answer(p2, [msg(4), msg(6), chat]);
      const p4 = await find((p) => isMain(p), 'the next main poll');
      assert.deepEqual(p4.body.rooms, { r: { epoch: 'E', seq: 4 } });
      const p5 = await find((p) => p.body.ops?.[0]?.op === 'pull', 'the pull');
      const [pull] = p5.body.ops;
      assert.deepEqual(pull, { op: 'pull', room: 'r', since: 4, limit: 1000, id: pull.id });
      assert.deepEqual(p5.body.rooms, {});
      assert.deepEqual(rec.of('transient'), [{ room: 'r', type: 'chat', data: { text: 'hi' }, ts: 5 }]);
      answer(p5, [{ op: 'pulled', id: pull.id, room: 'r', epoch: 'E', seq: 6, recovered: true, messages: [msg(5), msg(6)] }]);
      await waitFor(() => rec.seqs().length === 3);
      answer(p4, [msg(5), msg(6), msg(7)]); // the main poll's replay overlaps the pull
      const p6 = await find(isMain);
      assert.deepEqual(rec.seqs(), [4, 5, 6, 7]);
      assert.deepEqual(p6.body.rooms, { r: { epoch: 'E', seq: 7 } });

      // A failed poll: back off, say hello again, resume quietly (no `joined` from the server).
      p6.done = true;
      p6.fail(500);
      const p7 = await find(isMain);
      assert.equal(rec.of('disconnected').length, 1);
      assert.deepEqual(p7.body, { terminal: 'anon-1', hello: true, rooms: { r: { epoch: 'E', seq: 7 } }, wait_ms: 25000 });
      answer(p7, [connected('longpoll', 'anon-1'), msg(8)]);
      const p8 = await find(isMain);
      assert.deepEqual(rec.of('joined')[1], { room: 'r', epoch: 'E', seq: 7, recovered: true, resumed: true, online: 1 });
      assert.deepEqual(rec.seqs(), [4, 5, 6, 7, 8]);
      const kinds = rec.events.map(([n]) => n).filter((n) => n === 'joined' || n === 'message');
      assert.deepEqual(kinds.slice(-2), ['joined', 'message'], 'joined comes before the messages');

      // Joining gives up the parked poll and sends it again with the new room.
      c.join('s');
      const p9 = await find((p) => isMain(p) && p !== p8, 'the restarted main poll');
      assert.equal(p8.aborted, true);
      assert.deepEqual(p9.body.rooms, { r: { epoch: 'E', seq: 8 }, s: {} });

      // Leaving: a leave op, and the room is gone from the main poll.
      c.leave('r');
      const p10 = await find((p) => p.body.ops?.[0]?.op === 'leave', 'the leave');
      assert.deepEqual(p10.body.ops[0], { op: 'leave', room: 'r', id: p10.body.ops[0].id });
      const p11 = await find((p) => isMain(p) && p !== p9);
      assert.deepEqual(p11.body.rooms, { s: {} });
      assert.equal(rec.of('left').length, 0);
    } finally {
      c.close();
    }
  });

  test('long-poll: joined{recovered:false} with nothing kept reports the loss and moves on', async () => {
    const srv = fakePollServer();
    const c = new LivepushClient({
      server: SERVER, WebSocket: null, fetch: srv.fetch, rooms: [{ room: 'r', since: { epoch: 'E', seq: 3 } }],
    });
    const rec = record(c);
    try {
      const p1 = await waitFor(() => srv.polls[0]);
      assert.deepEqual(p1.body.rooms, { r: { epoch: 'E', seq: 3 } });
      p1.answer([connected('longpoll'), { op: 'joined', room: 'r', epoch: 'E', seq: 9, recovered: false, online: 1 }]);
      const p2 = await waitFor(() => srv.polls[1]);
      assert.deepEqual(rec.of('lost'), [{ room: 'r', first: 4, last: 9 }]);
      assert.deepEqual(p2.body.rooms, { r: { epoch: 'E', seq: 9 } }, 'not the same position again');
      assert.deepEqual(c.position('r'), { epoch: 'E', seq: 9 });
    } finally {
      c.close();
    }
  });

  test('long-poll: a refused room (named in the error message) is given up', async () => {
    const srv = fakePollServer();
    const c = new LivepushClient({ server: SERVER, WebSocket: null, fetch: srv.fetch, rooms: ['ok', 'closed:1'] });
    const rec = record(c);
    try {
      const p1 = await waitFor(() => srv.polls[0]);
      p1.answer([
        connected('longpoll'),
        { op: 'joined', room: 'ok', epoch: 'E', seq: 0, recovered: true, online: 1 },
        { op: 'error', code: 'room_closed', message: 'room "closed:1" is closed' },
      ]);
      const p2 = await waitFor(() => srv.polls[1]);
      assert.deepEqual(Object.keys(p2.body.rooms), ['ok']);
      assert.deepEqual(c.rooms, ['ok']);
      assert.deepEqual(rec.of('error'), [{ code: 'room_closed', message: 'room "closed:1" is closed', room: 'closed:1' }]);
    } finally {
      c.close();
    }
  });

  test("the server's transport frame moves auto to long-polling, then back to WebSocket", async () => {
    const ws = fakeWebSocket();
    const srv = fakePollServer();
    const c = new LivepushClient({ server: SERVER, WebSocket: ws.WebSocket, fetch: srv.fetch, rooms: ['r'], backoffBaseMs: 1, random: () => 0 });
    const rec = record(c);
    try {
      const s1 = await waitFor(() => ws.last());
      s1.open();
      s1.deliver({ op: 'transport', use: 'longpoll', retry_ws_after_ms: 150 });
      const p1 = await waitFor(() => srv.polls[0]);
      assert.equal(p1.body.hello, true);
      p1.answer([connected('longpoll'), { op: 'joined', room: 'r', epoch: 'E', seq: 0, recovered: true, online: 1 }]);
      await waitFor(() => srv.polls[1]);
      assert.equal(c.transport, 'long-polling');
      const s2 = await waitFor(() => ws.all[1], 2000, 'WebSocket again');
      assert.equal(srv.polls[1].aborted, true, 'the parked poll was given up');
      s2.open();
      s2.deliver(connected());
      assert.deepEqual(s2.sentOps('join')[0].since, { epoch: 'E', seq: 0 });
      assert.deepEqual(rec.of('connected').map((e) => e.transport), ['long-polling', 'websocket']);
    } finally {
      c.close();
    }
  });

  test('a WebSocket that fails before opening, twice, makes auto try long-polling', async () => {
    const ws = fakeWebSocket();
    const srv = fakePollServer();
    const c = new LivepushClient({
      server: SERVER, WebSocket: ws.WebSocket, fetch: srv.fetch, backoffBaseMs: 1, random: () => 0, retryWebSocketAfterMs: 60_000,
    });
    const rec = record(c);
    try {
      (await waitFor(() => ws.all[0])).drop();
      (await waitFor(() => ws.all[1])).drop();
      const p1 = await waitFor(() => srv.polls[0], 1000, 'a poll');
      p1.answer([connected('longpoll')]);
      await waitFor(() => srv.polls[1]);
      assert.deepEqual(rec.of('connected').map((e) => e.transport), ['long-polling']);
      assert.equal(ws.all.length, 2);
    } finally {
      c.close();
    }
  });

  test('SSE: stream URL with rooms and positions; pulls go out as one-off polls', async () => {
    const { EventSource: FakeEventSource, sources } = fakeEventSource();
    const srv = fakePollServer();
    const c = new LivepushClient({
      server: SERVER, transport: 'sse', EventSource: FakeEventSource, fetch: srv.fetch,
      rooms: [{ room: 'live:1', since: { epoch: 'E', seq: 2 } }, 'b'], backoffBaseMs: 1, random: () => 0,
    });
    const rec = record(c);
    try {
      const es = await waitFor(() => sources[0]);
      const u = new URL(es.url);
      assert.equal(u.pathname, '/v1/sse');
      assert.equal(u.searchParams.get('rooms'), 'live:1,b');
      assert.equal(u.searchParams.get('since'), 'live:1:E:2');
      es.emit(connected('sse', 'anon-9'));
      assert.equal(rec.of('connected')[0].transport, 'sse');
      es.emit({ op: 'joined', room: 'b', epoch: 'F', seq: 0, recovered: true, online: 1 });
      es.emit(msg(3, 'live:1'));
      es.emit(msg(5, 'live:1'));
      assert.deepEqual(rec.seqs(), [3]);
      const p = await waitFor(() => srv.polls[0], 1000, 'the pull');
      assert.deepEqual(p.body.rooms, {});
      assert.equal(p.body.terminal, 'anon-9');
      assert.equal(p.body.wait_ms, 0);
      const [pull] = p.body.ops;
      assert.deepEqual(pull, { op: 'pull', room: 'live:1', since: 3, limit: 1000, id: pull.id });
      p.answer([{ op: 'pulled', id: pull.id, room: 'live:1', epoch: 'E', seq: 5, recovered: true, messages: [msg(4, 'live:1'), msg(5, 'live:1')] }]);
      await waitFor(() => rec.seqs().length === 3);
      assert.deepEqual(rec.seqs(), [3, 4, 5]);
      // The stream breaks: reconnect with the displayed positions.
      es.onerror?.({});
      const es2 = await waitFor(() => sources[1]);
      assert.equal(es.closed, true);
      assert.equal(new URL(es2.url).searchParams.get('since'), 'live:1:E:5,b:F:0');
      assert.equal(new URL(es2.url).searchParams.get('terminal'), 'anon-9', 'the dev terminal continues');
    } finally {
      c.close();
    }
  });
});

describe('contract v1.1 in the client', () => {
  /**
   * A long-poll client connected as `anon-1` with room `r` at E:2, its main poll parked.
   * @param {Partial<import('../../js/livepush.js').LivepushOptions>} [options]
   */
  async function longPolling(options = {}) {
    const srv = fakePollServer();
    const c = new LivepushClient({ server: SERVER, WebSocket: null, fetch: srv.fetch, rooms: ['r'], backoffBaseMs: 1, random: () => 0, ...options });
    const rec = record(c);
    const hello = await waitFor(() => srv.polls[0], 2000, 'the hello poll');
    hello.answer([connected('longpoll', 'anon-1'), { op: 'joined', room: 'r', epoch: 'E', seq: 2, recovered: true, online: 1 }]);
    const main = await waitFor(() => srv.polls[1], 2000, 'the parked poll');
    return { srv, c, rec, main };
  }

  /** A WebSocket client connected, with `r` joined at `epoch`:`seq`. */
  async function webSocket(epoch = 'E', seq = 0) {
    const ws = fakeWebSocket();
    const c = new LivepushClient({ server: SERVER, WebSocket: ws.WebSocket, fetch: noFetch, rooms: ['r'] });
    const rec = record(c);
    const s = await waitFor(() => ws.last());
    s.open();
    s.deliver(connected());
    const [join] = s.sentOps('join');
    s.deliver({ op: 'joined', id: join.id, room: 'r', epoch, seq, recovered: true, online: 1 });
    return { c, rec, s };
  }

  test('decision 6: pending comes with connected and with every long-poll answer inbox block', async () => {
    const ws = fakeWebSocket();
    const w = new LivepushClient({ server: SERVER, WebSocket: ws.WebSocket, fetch: noFetch });
    const wrec = record(w);
    try {
      assert.equal(w.inbox, null);
      const s = await waitFor(() => ws.last());
      s.open();
      s.deliver({ ...connected(), inbox: { seq: 3, acked: 1, pending: 2 } });
      assert.deepEqual(wrec.of('connected')[0].inbox, { seq: 3, acked: 1, pending: 2 });
      assert.deepEqual(wrec.of('pending'), [{ seq: 3, acked: 1, pending: 2 }]);
      assert.deepEqual(w.inbox, { seq: 3, acked: 1, pending: 2 });
    } finally {
      w.close();
    }

    const { srv, c, rec, main } = await longPolling();
    try {
      assert.deepEqual(rec.of('pending'), [{ seq: 0, acked: 0, pending: null }], 'a v1.0 connected: pending unknown');
      c.ack(5);
      const side = await waitFor(() => srv.polls.find((p) => p.body.ops?.[0]?.op === 'ack'), 2000, 'the ack');
      side.answer([], { inbox: { seq: 5, acked: 5, pending: 0 } });
      await waitFor(() => rec.of('pending').length === 2, 2000, 'the pending event');
      assert.deepEqual(rec.of('pending')[1], { seq: 5, acked: 5, pending: 0 });
      assert.deepEqual(c.inbox, { seq: 5, acked: 5, pending: 0 });
      // The same state again (the main poll's answer) is not an event; garbage is ignored.
      main.answer([], { inbox: { seq: 5, acked: 5, pending: 0 } });
      const next = await waitFor(() => srv.polls.find((p) => p !== main && p.body.wait_ms === 25000 && !p.body.hello), 2000);
      next.answer([], { inbox: { seq: 'x', pending: -1 } });
      await waitFor(() => srv.polls.length >= 5, 2000, 'another poll');
      assert.equal(rec.of('pending').length, 2);
    } finally {
      c.close();
    }
  });

  test('decision 7: pulled{recovered:false} below the position moves it back there, reports the loss, pulls no more', async () => {
    const { c, rec, s } = await webSocket('E', 10);
    try {
      s.deliver(msg(12));
      const [pull] = s.sentOps('pull');
      assert.equal(pull.since, 10);
      s.deliver({ op: 'prompt', room: 'r', seq: 13 });
      s.deliver({ op: 'pulled', id: pull.id, room: 'r', epoch: 'E', seq: 4, recovered: false, messages: [] });
      assert.deepEqual(c.position('r'), { epoch: 'E', seq: 4 });
      assert.deepEqual(rec.of('lost'), [{ room: 'r', first: 5, last: 13 }]);
      assert.equal(s.sentOps('pull').length, 1, 'no pull again');
      s.deliver(msg(5), msg(6));
      assert.deepEqual(rec.seqs(), [5, 6]);
      assert.equal(s.sentOps('pull').length, 1);
      assert.equal(s.sentOps('join').length, 1, 'no rejoin');
    } finally {
      c.close();
    }
  });

  test('decision 8 over WebSocket: a pushed joined adopts the new epoch and seq, no rejoin, no pull storm', async () => {
    const { c, rec, s } = await webSocket('E1', 3);
    try {
      s.deliver(msg(4), msg(6));
      const [pull] = s.sentOps('pull');
      s.deliver({ op: 'joined', room: 'r', epoch: 'E2', seq: 7, recovered: false, online: 2 });
      assert.deepEqual(rec.of('joined')[1], { room: 'r', epoch: 'E2', seq: 7, recovered: false, resumed: true, online: 2 });
      assert.deepEqual(c.position('r'), { epoch: 'E2', seq: 7 });
      // The old pull's answer comes from the history that is gone: ignored.
      s.deliver({ op: 'pulled', id: pull.id, room: 'r', epoch: 'E1', seq: 9, recovered: true, messages: [msg(5), msg(6)] });
      s.deliver(msg(8), msg(9));
      const got = rec.of('message').map((m) => `${m.epoch}:${m.seq}`);
      assert.deepEqual(got, ['E1:4', 'E2:8', 'E2:9']);
      assert.equal(s.sentOps('join').length, 1, 'no rejoin');
      assert.equal(s.sentOps('pull').length, 1, 'no pull');
      assert.deepEqual(rec.of('lost'), []);
      // A joined without id while our own join is in flight is left to that join's answer.
      c.join('s');
      const [, joinS] = s.sentOps('join');
      s.deliver({ op: 'joined', room: 's', epoch: 'X', seq: 50, recovered: false, online: 1 });
      s.deliver({ op: 'joined', id: joinS.id, room: 's', epoch: 'F', seq: 1, recovered: true, online: 1 });
      assert.deepEqual(c.position('s'), { epoch: 'F', seq: 1 });
    } finally {
      c.close();
    }
  });

  test('decision 8 over SSE: a second joined on the stream is an epoch change', async () => {
    const { EventSource, sources } = fakeEventSource();
    const c = new LivepushClient({ server: SERVER, transport: 'sse', EventSource, fetch: noFetch, rooms: ['r'] });
    const rec = record(c);
    try {
      const es = await waitFor(() => sources[0]);
      es.emit(connected('sse'), { op: 'joined', room: 'r', epoch: 'E1', seq: 0, recovered: true, online: 1 });
      es.emit(msg(1));
      es.emit({ op: 'joined', room: 'r', epoch: 'E2', seq: 5, recovered: false, online: 1 });
      assert.deepEqual(c.position('r'), { epoch: 'E2', seq: 5 }, 'adopted at once');
      es.emit(msg(6));
      assert.deepEqual(rec.of('message').map((m) => `${m.epoch}:${m.seq}`), ['E1:1', 'E2:6']);
      assert.deepEqual(rec.of('joined').map((j) => j.recovered), [true, false]);
      assert.deepEqual(rec.of('lost'), [], 'the new history starts at its seq: nothing of it is lost');
      assert.equal(sources.length, 1, 'the stream goes on');
      assert.deepEqual(c.position('r'), { epoch: 'E2', seq: 6 });
    } finally {
      c.close();
    }
  });

  test('decision 8 over long-polling: a joined of another epoch ends at the new epoch, quietly after', async () => {
    const { srv, c, rec, main } = await longPolling();
    try {
      assert.deepEqual(main.body.rooms, { r: { epoch: 'E', seq: 2 } });
      main.answer([{ op: 'joined', room: 'r', epoch: 'E2', seq: 0, recovered: false, online: 1 }]);
      const p3 = await waitFor(() => srv.polls[2]);
      assert.deepEqual(p3.body.rooms, { r: { epoch: 'E2', seq: 0 } });
      p3.answer([msg(1)]);
      const p4 = await waitFor(() => srv.polls[3]);
      assert.deepEqual(p4.body.rooms, { r: { epoch: 'E2', seq: 1 } });
      assert.deepEqual(rec.of('joined').map((j) => [j.epoch, j.recovered]), [['E', true], ['E2', false]]);
      assert.deepEqual(rec.of('message').map((m) => `${m.epoch}:${m.seq}`), ['E2:1']);
      assert.deepEqual(rec.of('lost'), []);
      assert.equal(srv.polls.filter((p) => p.body.ops).length, 0, 'no pull');
    } finally {
      c.close();
    }
  });

  test('decision 5: close() on long-polling gives up the parked poll and says bye at once, once, with the unsent ack', async () => {
    const { srv, c, main } = await longPolling();
    c.ack(7); // queued for a short poll that close() overtakes
    const closed = c.close();
    assert.equal(c.state, 'closed');
    const bye = srv.polls.find((p) => p.body.bye);
    assert.ok(bye, 'the bye went out within close(), not after a delay');
    assert.equal(main.aborted, true, 'the parked poll was given up');
    assert.deepEqual(bye.body, { terminal: 'anon-1', bye: true, rooms: { r: { epoch: 'E', seq: 2 } }, wait_ms: 0, ops: [{ op: 'ack', inbox: 7 }] });
    assert.equal(bye.url, 'http://push.test/v1/poll');
    assert.equal(bye.init.keepalive, true);
    bye.answer([{ op: 'left', room: 'r' }], { ops: [{ op: 'left', room: 'r' }] });
    await closed;
    await sleep(20);
    assert.equal(srv.polls.filter((p) => p.body.bye).length, 1);
    assert.equal(srv.polls.filter((p) => p.body.ops?.some((/** @type {any} */ o) => o.op === 'ack') && !p.body.bye).length, 0);
    await c.close(); // again: nothing more
    assert.equal(srv.polls.filter((p) => p.body.bye).length, 1);
  });

  test('decision 5: the bye is bounded in time; a WebSocket-only client sends none', async () => {
    const { srv, c } = await longPolling({ byeTimeoutMs: 30 });
    await c.close(); // the fake server never answers the bye
    const bye = srv.polls.find((p) => p.body.bye);
    assert.ok(bye && bye.aborted, 'given up after byeTimeoutMs');

    const { c: w } = await webSocket();
    await w.close(); // noFetch would reject: nothing was fetched, nothing thrown
  });

  test('decision 5: on pagehide a long-polling client says bye with a beacon, and pageshow connects again', async () => {
    const target = new EventTarget();
    /** @type {Array<[string, string]>} */
    const beacons = [];
    let beaconWorks = true;
    const saved = Object.getOwnPropertyDescriptor(globalThis, 'navigator');
    Object.assign(globalThis, {
      addEventListener: target.addEventListener.bind(target),
      removeEventListener: target.removeEventListener.bind(target),
    });
    Object.defineProperty(globalThis, 'navigator', {
      configurable: true,
      value: { sendBeacon: (/** @type {string} */ url, /** @type {string} */ body) => (beacons.push([url, body]), beaconWorks) },
    });
    try {
      const { srv, c, rec, main } = await longPolling();
      try {
        target.dispatchEvent(new Event('pagehide'));
        assert.equal(main.aborted, true);
        assert.equal(beacons.length, 1);
        assert.equal(beacons[0][0], 'http://push.test/v1/poll');
        assert.deepEqual(JSON.parse(beacons[0][1]), { terminal: 'anon-1', bye: true, rooms: { r: { epoch: 'E', seq: 2 } }, wait_ms: 0 });
        assert.equal(c.state, 'reconnecting');
        await sleep(20);
        assert.equal(srv.polls.length, 2, 'no poll while the page is hidden');
        target.dispatchEvent(new Event('pageshow'));
        const again = await waitFor(() => srv.polls[2], 1000, 'a new hello poll');
        assert.deepEqual(again.body, { terminal: 'anon-1', hello: true, rooms: { r: { epoch: 'E', seq: 2 } }, wait_ms: 25000 });
        again.answer([connected('longpoll', 'anon-1')]);
        await waitFor(() => rec.of('connected').length === 2);
        // A browser whose beacon is refused: a keepalive fetch instead.
        beaconWorks = false;
        target.dispatchEvent(new Event('pagehide'));
        const bye = await waitFor(() => srv.polls.find((p) => p.body.bye), 1000, 'the bye fetch');
        assert.equal(bye.init.keepalive, true);
        assert.equal(beacons.length, 2);
        // close() from the app's own pagehide listener: its goodbye has gone (a keepalive
        // fetch, which outlives the page) before the page goes; pagehide adds nothing.
        beaconWorks = true;
        target.dispatchEvent(new Event('pageshow'));
        (await waitFor(() => srv.polls.find((p, i) => p.body.hello && i > srv.polls.indexOf(again)), 1000, 'hello')).answer([connected('longpoll', 'anon-1')]);
        await waitFor(() => rec.of('connected').length === 3);
        c.close();
        const byes = srv.polls.filter((p) => p.body.bye);
        assert.equal(byes.length, 2, 'the goodbye of close() went out at once');
        assert.equal(byes[1].init.keepalive, true);
        target.dispatchEvent(new Event('pagehide'));
        assert.equal(beacons.length, 2, 'no second goodbye on pagehide');
      } finally {
        c.close();
      }
    } finally {
      // @ts-ignore
      delete globalThis.addEventListener;
      // @ts-ignore
      delete globalThis.removeEventListener;
      if (saved) Object.defineProperty(globalThis, 'navigator', saved);
      // @ts-ignore
      else delete globalThis.navigator;
    }
  });
});
