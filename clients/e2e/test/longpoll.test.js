// The client (clients/js/livepush.js, run in node) long-polling the real server: the parts of
// contract v1.1 that only show against a server (decisions 4, 5 and 6). Each test starts its
// own `livepush serve --dev`.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { LivepushClient } from '../../js/livepush.js';
import { record, tapFetch, waitFor } from '../lib/events.js';
import { startProxy } from '../lib/proxy.js';
import { API_KEY, longPollsEnded, mintToken, withServer } from '../lib/server.js';

/**
 * A long-polling client of `room` resuming from `since`, with short parks.
 * @param {{url: string}} server @param {string} room @param {{epoch: string, seq: number}} since
 */
function resume(server, room, since) {
  const tap = tapFetch();
  const c = new LivepushClient({
    server: server.url, WebSocket: null, transport: 'longpoll', fetch: tap.fetch, rooms: [{ room, since }], longPollWaitMs: 400,
  });
  return { c, rec: record(c), tap };
}

/**
 * After the first answer: a few more polls come and go, none with a `joined`, each from a
 * position at or past `floor`; then a new message arrives live.
 * @param {{publish: Function}} server @param {ReturnType<typeof resume>} client @param {string} room @param {number} floor
 */
async function expectQuietAfter(server, { rec, tap }, room, floor) {
  const n = tap.polls.length;
  await waitFor(() => tap.polls.length >= n + 3, 10_000, 'three more polls');
  const { seq } = await server.publish(room, 'gift', { n: 'next' });
  await waitFor(() => rec.seqs().includes(seq), 10_000, 'the next message');
  const joined = tap.polls.flatMap((p) => p.answer.frames.filter((/** @type {any} */ f) => f.op === 'joined'));
  assert.deepEqual(joined.map((f) => f.recovered), [false], 'recovered:false once, and no joined after it');
  assert.equal(rec.of('joined').filter((j) => !j.recovered).length, 1);
  for (const p of tap.polls.slice(1)) {
    assert.ok(p.body.rooms[room].seq >= floor, `a later poll asked from ${p.body.rooms[room].seq} (< ${floor})`);
  }
}

describe('long-polling against the server (contract v1.1)', { concurrency: false }, () => {
  test('decision 4: far behind the history, recovered:false once, then quiet resumes', { timeout: 60_000 }, async () => {
    await withServer(['--history-size', '5'], async (server) => {
      const room = 'live:far';
      for (let i = 1; i <= 20; i++) await server.publish(room, 'gift', { n: i });
      const { epoch } = await server.room(room);
      const client = resume(server, room, { epoch, seq: 2 });
      try {
        await waitFor(() => client.rec.seqs().length === 5, 10_000, 'the replay');
        assert.deepEqual(client.rec.seqs(), [16, 17, 18, 19, 20]);
        assert.deepEqual(client.rec.of('lost'), [{ room, first: 3, last: 15 }]);
        await expectQuietAfter(server, client, room, 20);
      } finally {
        await client.c.close();
      }
    });
  });

  test('decision 4: nothing kept at all (expired), the position moves to joined.seq', { timeout: 60_000 }, async () => {
    await withServer(['--history-ttl', '1s'], async (server) => {
      const room = 'live:expired';
      for (let i = 1; i <= 3; i++) await server.publish(room, 'gift', { n: i });
      const { epoch } = await server.room(room);
      await waitFor(async () => {
        const res = await fetch(`${server.url}/v1/rooms/${room}/history?since=0`, { headers: { authorization: `Bearer ${API_KEY}` } });
        return (await res.json()).messages.length === 0;
      }, 10_000, 'the history to expire');
      const client = resume(server, room, { epoch, seq: 1 });
      try {
        await waitFor(() => client.rec.of('lost').length === 1, 10_000, 'the loss');
        assert.deepEqual(client.rec.of('lost'), [{ room, first: 2, last: 3 }]);
        assert.deepEqual(client.c.position(room), { epoch, seq: 3 });
        await expectQuietAfter(server, client, room, 3);
      } finally {
        await client.c.close();
      }
    });
  });

  test('decision 4: ahead of the server (it lost messages), the position moves back to joined.seq', { timeout: 60_000 }, async () => {
    await withServer([], async (server) => {
      const room = 'live:ahead';
      for (let i = 1; i <= 4; i++) await server.publish(room, 'gift', { n: i });
      const { epoch } = await server.room(room);
      const client = resume(server, room, { epoch, seq: 9 });
      try {
        await waitFor(() => client.rec.of('joined').length === 1, 10_000, 'joined');
        assert.deepEqual(client.c.position(room), { epoch, seq: 4 });
        await expectQuietAfter(server, client, room, 4);
        assert.deepEqual(client.rec.seqs(), [5]);
      } finally {
        await client.c.close();
      }
    });
  });

  test('decisions 5 and 6: pending drains with acks; close() acks and leaves at once despite a long poll grace', {
    timeout: 60_000,
  }, async () => {
    await withServer(['--poll-grace', '10m'], async (server) => {
      const terminal = 'box-7';
      const room = 'live:box';
      await server.postInbox(terminal, 'dm', { text: 'one' });
      await server.postInbox(terminal, 'dm', { text: 'two' });
      const c = new LivepushClient({
        server: server.url, token: mintToken({ sub: terminal }), WebSocket: null, transport: 'longpoll', rooms: [room],
      });
      const rec = record(c);
      try {
        await waitFor(() => rec.of('inbox').length === 2 && c.position(room), 10_000, 'the inbox and the join');
        assert.deepEqual(rec.of('connected')[0].inbox, { seq: 2, acked: 0, pending: 2 });
        c.ack(2);
        await waitFor(() => c.inbox?.pending === 0, 10_000, 'pending 0 after the ack');
        assert.deepEqual(rec.of('pending').at(-1), { seq: 2, acked: 2, pending: 0 });

        await server.postInbox(terminal, 'dm', { text: 'three' });
        await waitFor(() => rec.of('inbox').length === 3, 10_000, 'the third inbox message');
        assert.equal((await server.terminal(terminal)).online, true);
        assert.equal((await server.room(room)).online, 1);
        c.ack(3); // not sent yet when close() runs: the bye carries it
        await c.close();
        const t = await server.terminal(terminal);
        assert.equal(t.online, false, 'offline at once, not after the 10 min grace');
        assert.deepEqual(t.inbox, { seq: 3, acked: 3, pending: 0 });
        assert.equal((await server.room(room)).online, 0, 'no longer counted in the room');
        await longPollsEnded(server);
        assert.equal((await server.terminal(terminal)).online, false, 'still offline once the given-up poll ended');
      } finally {
        await c.close();
      }
    });
  });

  test('decision 5: the given-up poll ending on the server after the bye does not bring the terminal back', {
    timeout: 60_000,
  }, async () => {
    await withServer(['--poll-grace', '10m'], async (server) => {
      // The proxy keeps the server's side of the given-up poll open until the bye has been
      // answered: the order a browser often produces (the bye goes on another connection).
      const proxy = await startProxy(server.url);
      const room = 'live:race';
      const c = new LivepushClient({ server: proxy.url, WebSocket: null, transport: 'longpoll', rooms: [room] });
      const open = () => server.metric('livepush_connections_open{transport="longpoll"}');
      try {
        await waitFor(() => c.position(room), 10_000, 'the join');
        await waitFor(async () => (await open()) === 1, 10_000, 'the parked poll');
        const terminal = /** @type {string} */ (c.terminal);
        proxy.holdEnds();
        await c.close();
        assert.equal(await open(), 1, 'the bye was answered while the given-up poll was still parked on the server');
        proxy.releaseEnds();
        await longPollsEnded(server);
        assert.equal((await server.terminal(terminal)).online, false, 'offline, not for the 10 min grace');
        assert.equal((await server.room(room)).online, 0, 'not lingering in the room');
      } finally {
        await c.close();
        await proxy.close();
      }
    });
  });
});
