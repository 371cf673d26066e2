// The parts of the wire contract (/work/shared/spec/wire-v1.md, "Long-poll exchange" and SSE)
// that the browser client relies on, checked over plain HTTP against the real server.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { startServer } from '../lib/server.js';

/** @param {string} url @param {object} body */
async function poll(url, body) {
  const res = await fetch(`${url}/v1/poll`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  assert.equal(res.status, 200, `poll answered ${res.status}`);
  return /** @type {{frames: any[]}} */ (await res.json());
}

/** @param {(url: string, server: Awaited<ReturnType<typeof startServer>>) => Promise<void>} body */
async function withServer(body) {
  const server = await startServer();
  try {
    await body(server.url, server);
  } finally {
    await server.stop();
  }
}

describe('server: long-poll exchange', () => {
  test('hello, fresh join, quiet resume, resume from another epoch', async () => {
    await withServer(async (url, server) => {
      const room = 'live:lp';
      const a = await poll(url, { hello: true, rooms: { [room]: {} }, wait_ms: 2000 });
      assert.equal(a.frames[0].op, 'connected', 'the answer to hello starts with connected');
      assert.equal(a.frames[0].transport, 'longpoll');
      const terminal = a.frames[0].terminal;
      const joined = a.frames.find((f) => f.op === 'joined');
      assert.ok(joined, 'a fresh join is answered with joined at once');
      await server.publish(room, 'gift', { n: 1 });
      await server.publish(room, 'gift', { n: 2 });
      const b = await poll(url, { terminal, rooms: { [room]: { epoch: joined.epoch, seq: 1 } }, wait_ms: 2000 });
      assert.deepEqual(b.frames.filter((f) => f.op !== 'online').map((f) => [f.op, f.seq]), [['msg', 2]], 'no joined on a complete resume');
      const c = await poll(url, { terminal, rooms: { [room]: { epoch: 'other', seq: 5 } }, wait_ms: 2000 });
      const ops = c.frames.filter((f) => f.op !== 'online');
      assert.deepEqual(ops.map((f) => f.op), ['joined', 'msg', 'msg']);
      assert.equal(ops[0].recovered, false);
    });
  });

  test('a parked poll answers as soon as a message is published, also after an online update', async () => {
    await withServer(async (url, server) => {
      const room = 'live:parked';
      const a = await poll(url, { hello: true, rooms: { [room]: {} }, wait_ms: 0 });
      const terminal = a.frames[0].terminal;
      const joined = a.frames.find((f) => f.op === 'joined');
      const started = Date.now();
      const parked = poll(url, { terminal, rooms: { [room]: { epoch: joined.epoch, seq: joined.seq } }, wait_ms: 8000 });
      // Another terminal joins: the online count changes, and the next online tick queues an
      // `online` frame (which alone does not answer a parked poll) before the message.
      await poll(url, { hello: true, rooms: { [room]: {} }, wait_ms: 0 });
      await new Promise((r) => setTimeout(r, 1500));
      await server.publish(room, 'gift', { n: 1 });
      const published = Date.now() - started;
      const answer = await parked;
      const waited = Date.now() - started - published;
      assert.deepEqual(answer.frames.filter((f) => f.op === 'msg').map((f) => f.seq), [1]);
      assert.ok(waited < 2000, `the parked poll was answered ${waited} ms after the publish (wait_ms 8000)`);
    });
  });
});

/**
 * Open an SSE stream and read its events until `done(events)` holds or 5 s pass.
 * @param {string} url
 * @param {(events: string[]) => boolean} done
 * @param {Record<string, string>} [headers]
 * @returns {Promise<{status: number, contentType: string, events: string[]}>}  Each event as
 *   its raw text (its `data:` and `id:` lines).
 */
async function readSse(url, done, headers = {}) {
  const ctrl = new AbortController();
  const res = await fetch(url, { signal: ctrl.signal, headers });
  const reader = /** @type {ReadableStreamDefaultReader<Uint8Array>} */ (res.body?.getReader());
  const dec = new TextDecoder();
  const timer = setTimeout(() => ctrl.abort(), 5000);
  let text = '';
  const events = () => text.split('\n\n').slice(0, -1).filter(Boolean);
  try {
    while (!done(events())) {
      const { value, done: ended } = await reader.read();
      if (ended) break;
      text += dec.decode(value, { stream: true });
    }
  } catch {
    // aborted: the caller's assertions say what was missing
  }
  clearTimeout(timer);
  ctrl.abort();
  return { status: res.status, contentType: res.headers.get('content-type') ?? '', events: events() };
}

/** The frames of some SSE events, in order. @param {string[]} events @returns {any[]} */
const framesOf = (events) =>
  events.flatMap((ev) => ev.split('\n').filter((l) => l.startsWith('data:')).map((l) => JSON.parse(l.slice(5))));

/** The `id:` of an SSE event. @param {string|undefined} event */
const idOf = (event) => event?.split('\n').find((l) => l.startsWith('id:'))?.slice(3).trim();

describe('server: SSE', () => {
  test('reliable events carry the positions of every room as id; since resumes', async () => {
    await withServer(async (url, server) => {
      await server.publish('live:s1', 'gift', { n: 1 });
      const e1 = (await server.room('live:s1')).epoch;
      await server.publish('live:s1', 'gift', { n: 2 });
      const { status, contentType, events } = await readSse(
        `${url}/v1/sse?rooms=live:s1,live:s2&since=live:s1:${e1}:1`,
        (evs) => evs.some((ev) => ev.includes('"seq":2') && ev.includes('\nid:')),
      );
      assert.equal(status, 200);
      assert.match(contentType, /text\/event-stream/);
      const frames = framesOf(events);
      assert.equal(frames[0].op, 'connected');
      assert.equal(frames[0].transport, 'sse');
      const msgs = frames.filter((f) => f.op === 'msg');
      assert.deepEqual(msgs.map((f) => f.seq), [2], 'resumed after seq 1');
      const id = idOf(events.find((ev) => ev.includes('"seq":2')));
      assert.ok(id, 'the reliable event has an id');
      const e2 = (await server.room('live:s2')).epoch;
      assert.deepEqual(id.split(',').sort(), [`live:s1:${e1}:2`, `live:s2:${e2}:0`].sort());
    });
  });

  test('v1.1 decision 3: the joined event has an id, so a stream cut before its first message resumes', async () => {
    await withServer(async (url, server) => {
      const room = 'live:s3';
      const first = await readSse(`${url}/v1/sse?rooms=${room}`, (evs) => evs.some((ev) => ev.includes('"op":"joined"')));
      const id = idOf(first.events.find((ev) => ev.includes('"op":"joined"')));
      assert.equal(id, `${room}:${(await server.room(room)).epoch}:0`);
      await server.publish(room, 'gift', { n: 1 });
      await server.publish(room, 'gift', { n: 2 });
      // What a browser's EventSource does on its own when the stream breaks.
      const again = await readSse(
        `${url}/v1/sse?rooms=${room}`,
        (evs) => framesOf(evs).filter((f) => f.op === 'msg').length >= 2,
        { 'last-event-id': String(id) },
      );
      const frames = framesOf(again.events);
      assert.equal(frames.find((f) => f.op === 'joined')?.recovered, true);
      assert.deepEqual(frames.filter((f) => f.op === 'msg').map((f) => f.seq), [1, 2]);
    });
  });
});
