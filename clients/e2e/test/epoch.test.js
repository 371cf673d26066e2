// Contract v1.1, decision 8, against the real server: while the client (clients/js/livepush.js,
// run in node) is in a room, the backend starts the room's history anew
// (`DELETE /v1/rooms/{room}/history`: a new epoch at seq 0). Over WebSocket, SSE and
// long-polling the client moves to the new epoch, tells the app (`joined` with
// `recovered: false`), delivers what follows once, and resumes there after a reconnect. Each
// test starts its own `livepush serve --dev`.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { LivepushClient } from '../../js/livepush.js';
import { record, tapFetch, waitFor } from '../lib/events.js';
import { nodeTransports } from '../lib/node-transports.js';
import { withServer } from '../lib/server.js';

/**
 * Every frame the server sent to the client, in order, with the SSE event id it came with
 * or the body of the poll it answered.
 * @param {ReturnType<typeof nodeTransports>} wire
 * @param {ReturnType<typeof tapFetch>} tap
 * @returns {Array<{frame: any, lastEventId?: string, poll?: any}>}
 */
function serverFrames(wire, tap) {
  const streamed = wire.received.flatMap(({ data, lastEventId }) =>
    data.split('\n').filter(Boolean).map((line) => ({ frame: JSON.parse(line), lastEventId })),
  );
  const polled = tap.polls.flatMap(({ body, answer }) => answer.frames.map((/** @type {any} */ frame) => ({ frame, poll: body })));
  return [...streamed, ...polled];
}

/** @param {ReturnType<typeof record>} rec @returns {string[]} `epoch:seq` of every message */
const delivered = (rec) => rec.of('message').map((m) => `${m.epoch}:${m.seq}`);

describe('decision 8: the room history is reset while the client is in the room', { concurrency: false }, () => {
  for (const transport of /** @type {const} */ (['websocket', 'sse', 'longpoll'])) {
    test(`over ${transport}: joined{recovered:false} with the new epoch, then seq 1 once; a reconnect resumes there`, {
      timeout: 60_000,
    }, async () => {
      await withServer([], async (server) => {
        const room = `live:reset-${transport}`;
        for (let i = 1; i <= 3; i++) await server.publish(room, 'gift', { n: i });
        const { epoch: old } = await server.room(room);
        const wire = nodeTransports();
        const tap = tapFetch();
        const c = new LivepushClient({
          server: server.url, transport, WebSocket: wire.WebSocket, EventSource: wire.EventSource, fetch: tap.fetch, rooms: [room],
        });
        const rec = record(c);
        try {
          await waitFor(() => rec.of('joined').length === 1, 10_000, 'the join');
          assert.deepEqual(rec.of('joined')[0], { room, epoch: old, seq: 3, recovered: true, resumed: false, online: 1 });
          const { seq: four } = await server.publish(room, 'gift', { n: 4 });
          await waitFor(() => rec.seqs().includes(four), 10_000, 'a live message');
          if (transport === 'longpoll') {
            // The reset is to answer a parked poll, not the next one.
            await waitFor(async () => (await server.metric('livepush_connections_open{transport="longpoll"}')) === 1, 10_000, 'the parked poll');
          }

          const reset = await server.resetHistory(room);
          assert.equal(reset.status, 200);
          const fresh = reset.body.epoch;
          assert.deepEqual(reset.body, { epoch: fresh, seq: 0 });
          assert.notEqual(fresh, old);
          await waitFor(() => rec.of('joined').length === 2, 10_000, 'the joined of the new epoch');
          assert.deepEqual(rec.of('joined')[1], { room, epoch: fresh, seq: 0, recovered: false, resumed: true, online: 1 });
          assert.deepEqual(c.position(room), { epoch: fresh, seq: 0 });
          assert.deepEqual(rec.of('lost'), [], 'nothing reported lost: the old history is simply over');

          // What the server pushed: joined without an id, with the new epoch at seq 0.
          const pushed = serverFrames(wire, tap).filter(({ frame }) => frame.op === 'joined' && frame.epoch === fresh);
          assert.equal(pushed.length, 1, 'one joined of the new epoch');
          assert.deepEqual(pushed[0].frame, { op: 'joined', room, epoch: fresh, seq: 0, recovered: false, online: 1 });
          if (transport === 'sse') assert.equal(pushed[0].lastEventId, `${room}:${fresh}:0`, 'the event id moves to the new epoch');
          if (transport === 'longpoll') assert.deepEqual(pushed[0].poll.rooms, { [room]: { epoch: old, seq: 4 } }, 'it answered the parked poll');

          const first = await server.publish(room, 'gift', { n: 'new 1' });
          assert.deepEqual(first, { seq: 1, epoch: fresh });
          await server.publish(room, 'gift', { n: 'new 2' });
          await waitFor(() => delivered(rec).includes(`${fresh}:2`), 10_000, 'the new epoch messages');
          assert.deepEqual(delivered(rec), [`${old}:4`, `${fresh}:1`, `${fresh}:2`], 'each once, in order');
          assert.equal(rec.of('message')[1].data.n, 'new 1');
          // Nothing asked again: no rejoin, no pull, no new stream.
          assert.equal(rec.of('connected').length, 1);
          assert.deepEqual(wire.sent.map((t) => JSON.parse(t).op), transport === 'websocket' ? ['connect', 'join'] : []);
          assert.equal(tap.polls.filter((p) => p.body.ops).length, 0, 'no pull');
          assert.equal(serverFrames(wire, tap).filter(({ frame }) => frame.op === 'connected').length, 1, 'one session');

          c.reconnect();
          await waitFor(() => rec.of('joined').length === 3, 10_000, 'the resume');
          assert.deepEqual(rec.of('joined')[2], { room, epoch: fresh, seq: 2, recovered: true, resumed: true, online: 1 });
          await server.publish(room, 'gift', { n: 'new 3' });
          await waitFor(() => delivered(rec).includes(`${fresh}:3`), 10_000, 'a message after the resume');
          assert.deepEqual(delivered(rec), [`${old}:4`, `${fresh}:1`, `${fresh}:2`, `${fresh}:3`]);
          assert.equal(rec.of('connected').length, 2);
          assert.equal(serverFrames(wire, tap).filter(({ frame }) => frame.op === 'joined' && !frame.recovered).length, 1);
        } finally {
          await c.close();
        }
      });
    });
  }

  test('a room that never existed: 404 unknown_room', async () => {
    await withServer([], async (server) => {
      const res = await server.resetHistory('live:nobody');
      assert.equal(res.status, 404);
      assert.equal(res.body.error, 'unknown_room');
      assert.equal((await server.room('live:nobody')).error, 'unknown_room', 'not created by the attempt');
    });
  });
});
