// Unit tests of the client's pure parts: RoomTracker (a port of the Rust SDK's tracker, with
// the same cases), Backoff, frame and position parsing.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import {
  Backoff,
  RoomTracker,
  formatPositions,
  jitter,
  parseFrames,
  parsePositions,
} from '../../js/livepush.js';

const ROOM = 'live:1';

/** @param {number} seq */
const msg = (seq) => ({ room: ROOM, type: 'gift', data: { n: seq }, seq, ts: seq });
/** @param {string} epoch @param {number} seq */
const pos = (epoch, seq) => ({ epoch, seq });
/** @param {any[]} effects */
const delivered = (effects) => effects.filter((e) => e.kind === 'deliver').map((e) => e.message.seq);
/** @param {any[]} effects */
const pulls = (effects) => effects.filter((e) => e.kind === 'pull').map((e) => e.since);
/** @param {number} a @param {number} b */
const range = (a, b) => Array.from({ length: Math.max(0, b - a + 1) }, (_, i) => a + i);

describe('RoomTracker', () => {
  test('a fresh join starts at the live edge', () => {
    const t = new RoomTracker(ROOM, null, 16);
    assert.equal(t.resumeFrom(), null);
    assert.deepEqual(t.onMessage(msg(1)), [], 'nothing before joined');
    t.onJoined('e1', 7, true);
    assert.deepEqual(t.resumeFrom(), pos('e1', 7));
    assert.deepEqual(t.onMessage(msg(7)), []);
    const e = t.onMessage(msg(8));
    assert.deepEqual(delivered(e), [8]);
    assert.deepEqual(e[0], {
      kind: 'deliver',
      message: { room: ROOM, epoch: 'e1', seq: 8, type: 'gift', data: { n: 8 }, ts: 8 },
    });
  });

  test('duplicates are dropped and a gap pulls once', () => {
    const t = new RoomTracker(ROOM, pos('e', 0), 16);
    t.onJoined('e', 0, true);
    assert.deepEqual(delivered(t.onMessage(msg(1))), [1]);
    assert.deepEqual(t.onMessage(msg(1)), []);
    assert.deepEqual(t.onMessage(msg(4)), [{ kind: 'pull', since: 1 }]);
    assert.deepEqual(t.onMessage(msg(5)), [], 'one pull in flight at a time');
    assert.deepEqual(t.onPrompt(9), [], 'still in flight');
    let e = t.onPulled('e', 9, true, [msg(2), msg(3), msg(4)]);
    assert.deepEqual(delivered(e), [2, 3, 4, 5]);
    assert.deepEqual(pulls(e), [5], 'the prompt wants up to 9');
    e = t.onPulled('e', 9, true, [msg(6), msg(7), msg(8), msg(9)]);
    assert.deepEqual(delivered(e), [6, 7, 8, 9]);
    assert.deepEqual(pulls(e), []);
    assert.equal(t.pullInFlight, false);
    assert.deepEqual(t.resumeFrom(), pos('e', 9));
  });

  test('a live message filling the gap before the pull answer', () => {
    const t = new RoomTracker(ROOM, pos('e', 0), 16);
    t.onJoined('e', 0, true);
    assert.deepEqual(pulls(t.onMessage(msg(2))), [0]);
    assert.deepEqual(delivered(t.onMessage(msg(1))), [1, 2]);
    const e = t.onPulled('e', 3, true, [msg(1), msg(2), msg(3)]);
    assert.deepEqual(delivered(e), [3]);
    assert.deepEqual(pulls(e), []);
  });

  test('a resume in the same epoch drops the overlap', () => {
    const t = new RoomTracker(ROOM, pos('e', 3), 16);
    t.onJoined('e', 5, true);
    const all = [2, 3, 4, 4, 5, 5, 6].flatMap((s) => delivered(t.onMessage(msg(s))));
    assert.deepEqual(all, [4, 5, 6]);
  });

  test('a reconnect forgets the connection state but not the position', () => {
    const t = new RoomTracker(ROOM, pos('e', 0), 16);
    t.onJoined('e', 0, true);
    t.onMessage(msg(1));
    assert.deepEqual(pulls(t.onMessage(msg(3))), [1]);
    t.onDisconnect();
    assert.equal(t.live, false);
    assert.equal(t.buffered, 0);
    assert.deepEqual(t.resumeFrom(), pos('e', 1));
    assert.deepEqual(t.onMessage(msg(2)), [], 'not joined yet');
    t.onJoined('e', 3, true);
    assert.deepEqual([2, 3].flatMap((s) => delivered(t.onMessage(msg(s)))), [2, 3]);
    assert.equal(t.pullInFlight, false, 'the old pull was forgotten');
  });

  test('history exceeded: skip to the first kept message', () => {
    const t = new RoomTracker(ROOM, pos('e', 3), 16);
    t.onJoined('e', 60, false);
    const e = t.onMessage(msg(50));
    assert.deepEqual(e[0], { kind: 'lost', first: 4, last: 49 });
    assert.deepEqual(delivered(e), [50]);
    assert.deepEqual(delivered(t.onMessage(msg(51))), [51]);
    assert.deepEqual(pulls(t.onMessage(msg(53))), [51], 'only the first message re-bases');
  });

  test('a new epoch resets the position', () => {
    const t = new RoomTracker(ROOM, pos('old', 40), 16);
    t.onJoined('new', 3, false);
    assert.deepEqual(t.resumeFrom(), pos('new', 0));
    assert.deepEqual([1, 2, 3, 4].flatMap((s) => delivered(t.onMessage(msg(s)))), [1, 2, 3, 4]);
  });

  test('a server that lost data is followed', () => {
    const t = new RoomTracker(ROOM, pos('e', 10), 16);
    t.onJoined('e', 4, false);
    assert.deepEqual(t.resumeFrom(), pos('e', 4));
    assert.deepEqual(delivered(t.onMessage(msg(5))), [5]);
  });

  test('a replay that did not fit is pulled after the prompt', () => {
    const t = new RoomTracker(ROOM, pos('e', 0), 16);
    t.onJoined('e', 250, true);
    const all = [1, 2, 3].flatMap((s) => delivered(t.onMessage(msg(s))));
    assert.deepEqual(pulls(t.onPrompt(250)), [3]);
    assert.deepEqual(t.onMessage(msg(251)), [], 'a live message arrives before the answer');
    let since = 3;
    for (;;) {
      const batch = range(since + 1, Math.min(since + 100, 250)).map(msg);
      const e = t.onPulled('e', 251, true, batch);
      all.push(...delivered(e));
      const p = pulls(e);
      if (p.length === 0) break;
      assert.equal(p.length, 1);
      since = p[0];
    }
    assert.deepEqual(all, range(1, 251));
  });

  test('recovered:false pull skips, and an empty answer gives up', () => {
    const t = new RoomTracker(ROOM, pos('e', 0), 16);
    t.onJoined('e', 0, true);
    t.onMessage(msg(1));
    assert.deepEqual(pulls(t.onMessage(msg(30))), [1]);
    let e = t.onPulled('e', 30, false, [msg(20), msg(21)]);
    assert.deepEqual(e[0], { kind: 'lost', first: 2, last: 19 });
    assert.deepEqual(delivered(e), [20, 21]);
    assert.deepEqual(pulls(e), [21]);
    e = t.onPulled('e', 30, true, []);
    assert.deepEqual(e[0], { kind: 'lost', first: 22, last: 29 });
    assert.deepEqual(delivered(e), [30]);
    assert.deepEqual(pulls(e), []);
  });

  test('resync waits for an outstanding pull', () => {
    const t = new RoomTracker(ROOM, pos('e', 3), 16);
    t.onJoined('e', 100, false);
    assert.deepEqual(pulls(t.onPrompt(100)), [3]);
    assert.deepEqual(t.onMessage(msg(101)), []);
    const e = t.onPulled('e', 101, false, range(50, 100).map(msg));
    assert.deepEqual(e[0], { kind: 'lost', first: 4, last: 49 });
    assert.deepEqual(delivered(e), range(50, 101));
  });

  test('buffer overflow drops the buffer and relies on the pull', () => {
    const t = new RoomTracker(ROOM, pos('e', 0), 4);
    t.onJoined('e', 0, true);
    assert.deepEqual(pulls(t.onMessage(msg(3))), [0]);
    for (let s = 4; s <= 10; s++) t.onMessage(msg(s));
    assert.ok(t.buffered <= 4);
    const all = delivered(t.onPulled('e', 10, true, range(1, 4).map(msg)));
    all.push(...delivered(t.onPulled('e', 10, true, range(5, 10).map(msg))));
    assert.deepEqual(all, range(1, 10));
  });

  test('a pulled answer from another epoch asks for a rejoin', () => {
    const t = new RoomTracker(ROOM, pos('e', 0), 4);
    t.onJoined('e', 0, true);
    t.onMessage(msg(2));
    assert.deepEqual(t.onPulled('x', 5, false, [msg(1)]), [{ kind: 'rejoin' }]);
    assert.deepEqual(t.resumeFrom(), pos('e', 0));
    assert.equal(t.live, false);
  });

  test('transient messages and pull failures', () => {
    const t = new RoomTracker(ROOM, pos('e', 0), 4);
    t.onJoined('e', 0, true);
    assert.deepEqual(t.onMessage({ room: ROOM, type: 'chat', data: {}, ts: 1 }), []);
    assert.deepEqual(pulls(t.onMessage(msg(3))), [0]);
    t.onPullFailed();
    assert.deepEqual(pulls(t.onMessage(msg(4))), [0], 'pulls again on the next gap');
  });

  test('long-poll: an attach goes live without joined and forgets the per-poll state', () => {
    const t = new RoomTracker(ROOM, null, 16);
    t.onAttached();
    assert.equal(t.live, false, 'a fresh join waits for its joined');
    t.onJoined('e', 4, true);
    assert.deepEqual(delivered(t.onMessage(msg(5))), [5]);
    assert.deepEqual(pulls(t.onMessage(msg(7))), [5]);
    t.onAttached();
    assert.equal(t.live, true);
    assert.equal(t.buffered, 0);
    assert.equal(t.pullInFlight, false);
    assert.deepEqual(t.resumeFrom(), pos('e', 5));
    assert.deepEqual(delivered(t.onMessage(msg(5))), []);
    assert.deepEqual(delivered(t.onMessage(msg(6))), [6]);
  });

  test('long-poll: replay complete after recovered:false skips what is gone', () => {
    let t = new RoomTracker(ROOM, pos('e', 3), 16);
    t.onAttached();
    t.onJoined('e', 9, false);
    assert.deepEqual(t.onReplayComplete(9), [{ kind: 'lost', first: 4, last: 9 }]);
    assert.deepEqual(t.resumeFrom(), pos('e', 9));
    assert.deepEqual(delivered(t.onMessage(msg(10))), [10]);
    // With a replay the first message already re-based: nothing more to do.
    t = new RoomTracker(ROOM, pos('e', 3), 16);
    t.onJoined('e', 9, false);
    assert.deepEqual(delivered(t.onMessage(msg(8))), [8]);
    assert.deepEqual(t.onReplayComplete(9), []);
    // A complete resume never skips.
    t = new RoomTracker(ROOM, pos('e', 3), 16);
    t.onJoined('e', 9, true);
    assert.deepEqual(t.onReplayComplete(9), []);
    assert.deepEqual(t.resumeFrom(), pos('e', 3));
  });

  test('v1.1 decision 4: same-epoch recovered:false ends past what is gone, and asks no more', () => {
    // A replay: its first message is the base, the rest follows; nothing is pulled.
    let t = new RoomTracker(ROOM, pos('e', 2), 16);
    t.onJoined('e', 20, false);
    let e = range(16, 20).flatMap((s) => t.onMessage(msg(s)));
    assert.deepEqual(e[0], { kind: 'lost', first: 3, last: 15 });
    assert.deepEqual(delivered(e), range(16, 20));
    assert.deepEqual(pulls(e), []);
    assert.deepEqual(t.onReplayComplete(20), []);
    assert.deepEqual(t.resumeFrom(), pos('e', 20));
    // No replay at all (long-poll sees the answer end): the position moves to joined.seq.
    t = new RoomTracker(ROOM, pos('e', 2), 16);
    t.onAttached();
    t.onJoined('e', 20, false);
    assert.deepEqual(t.onReplayComplete(20), [{ kind: 'lost', first: 3, last: 20 }]);
    assert.deepEqual(t.resumeFrom(), pos('e', 20));
    // The next poll resumes from there, quietly: live at once, nothing more to skip.
    t.onAttached();
    assert.deepEqual(t.onReplayComplete(20), []);
    assert.deepEqual(delivered(t.onMessage(msg(21))), [21]);
  });

  test('v1.1 decision 7: a pull from beyond the latest seq moves the position back to it, once', () => {
    const t = new RoomTracker(ROOM, null, 16);
    t.onJoined('e', 10, true);
    assert.deepEqual(pulls(t.onMessage(msg(12))), [10], 'a gap: pull after 10');
    assert.deepEqual(t.onPrompt(13), [], 'the pull is in flight');
    const e = t.onPulled('e', 4, false, []);
    assert.deepEqual(e, [{ kind: 'rewind', seq: 4, first: 5, last: 13 }], 'what the server no longer has, up to the prompt');
    assert.deepEqual(t.resumeFrom(), pos('e', 4));
    assert.equal(t.pullInFlight, false);
    assert.equal(t.buffered, 0, 'held messages of the lost stretch are dropped');
    assert.deepEqual(t.onPulled('e', 4, false, []), [], 'a repeated answer changes nothing');
    assert.deepEqual(delivered(t.onMessage(msg(5))), [5], 'live again from the server latest seq');
    assert.deepEqual(pulls(t.onMessage(msg(6))), []);
    // A stale answer (latest below our position only because live messages overtook it) is
    // not a rewind: its latest is not below what the pull asked from.
    const u = new RoomTracker(ROOM, null, 16);
    u.onJoined('e', 5, true);
    assert.deepEqual(pulls(u.onMessage(msg(7))), [5]);
    assert.deepEqual(delivered(u.onMessage(msg(6))), [6, 7]);
    assert.deepEqual(delivered(u.onMessage(msg(8))), [8]);
    assert.deepEqual(u.onPulled('e', 7, false, [msg(7)]), []);
    assert.deepEqual(u.resumeFrom(), pos('e', 8));
  });

  test('v1.1 decision 8: an epoch change adopts the new position, without replay or pull', () => {
    const t = new RoomTracker(ROOM, null, 16);
    t.onJoined('old', 3, true);
    assert.deepEqual(pulls(t.onMessage(msg(5))), [3]);
    assert.deepEqual(t.onEpochChange('new', 7), [], 'nothing lost, nothing pulled');
    assert.deepEqual(t.resumeFrom(), pos('new', 7));
    assert.equal(t.live, true);
    assert.equal(t.buffered, 0, 'messages held for the old history are dropped');
    assert.equal(t.pullInFlight, false);
    assert.deepEqual(t.onPulled('old', 9, true, [msg(4), msg(5)]), [], 'the old pull answer is ignored');
    const e = [8, 9].flatMap((s) => t.onMessage(msg(s)));
    assert.deepEqual(e.map((x) => x.kind), ['deliver', 'deliver']);
    assert.deepEqual(e.map((x) => x.kind === 'deliver' && x.message.epoch), ['new', 'new']);
    assert.deepEqual(t.onMessage(msg(7)), [], 'at or below the adopted seq: nothing');
    // Within one epoch a push forward skips (reported), a push backward follows the server.
    assert.deepEqual(t.onEpochChange('new', 12), [{ kind: 'lost', first: 10, last: 12 }]);
    assert.deepEqual(t.onEpochChange('new', 2), []);
    assert.deepEqual(t.resumeFrom(), pos('new', 2));
    assert.deepEqual(t.onEpochChange('bad epoch', -1), [], 'garbage is ignored');
    assert.deepEqual(t.resumeFrom(), pos('new', 2));
  });

  test('a pull answer from the history a joined left is ignored, not a rejoin', () => {
    const t = new RoomTracker(ROOM, pos('old', 0), 16);
    t.onJoined('old', 0, true);
    assert.deepEqual(pulls(t.onMessage(msg(2))), [0]);
    t.onJoined('new', 0, false);
    assert.deepEqual(t.onPulled('old', 2, true, [msg(1), msg(2)]), []);
    assert.deepEqual(delivered(t.onMessage(msg(1))), [1]);
    assert.deepEqual(t.onPulled('other', 2, true, []), [{ kind: 'rejoin' }], 'an unknown history still rejoins');
  });

  // The property test of the Rust SDK, with a seeded generator: the server's history is
  // 1..n of one epoch and complete, so every seq must be delivered exactly once, in order,
  // whatever mix of live messages, duplicates, prompts, partial pull answers and reconnects.
  test('every seq exactly once, in order (randomized, 500 cases)', () => {
    const rng = mulberry32(0x5eed);
    const int = (/** @type {number} */ lo, /** @type {number} */ hi) => lo + Math.floor(rng() * (hi - lo + 1));
    for (let c = 0; c < 500; c++) {
      const n = int(1, 39);
      const maxBuffered = int(1, 15);
      const cap = int(1, n);
      const t = new RoomTracker(ROOM, pos('e', 0), maxBuffered);
      /** @type {number[]} */
      const got = [];
      /** @type {number|null} */
      let pending = null;
      const apply = (/** @type {any[]} */ effects) => {
        for (const e of effects) {
          if (e.kind === 'deliver') got.push(e.message.seq);
          else if (e.kind === 'pull') {
            assert.equal(pending, null, 'two pulls in flight');
            pending = e.since;
          } else assert.fail(`unexpected ${JSON.stringify(e)}`);
        }
        got.forEach((s, i) => assert.equal(s, i + 1, `case ${c}: delivered ${got}`));
      };
      const answer = (/** @type {number} */ k) => {
        if (pending === null) return;
        const since = pending;
        pending = null;
        apply(t.onPulled('e', n, true, range(since + 1, Math.min(since + k, n)).map(msg)));
      };
      const reconnect = (/** @type {number} */ cut, /** @type {number} */ dup) => {
        t.onDisconnect();
        pending = null;
        const since = t.resumeFrom()?.seq ?? 0;
        t.onJoined('e', n, true);
        for (let s = Math.max(1, since - dup); s <= since; s++) apply(t.onMessage(msg(s)));
        const end = Math.min(since + cut, n);
        for (let s = since + 1; s <= end; s++) apply(t.onMessage(msg(s)));
        if (end < n) apply(t.onPrompt(n));
      };
      t.onJoined('e', n, true);
      const ops = int(0, 119);
      for (let i = 0; i < ops; i++) {
        const r = int(1, 8);
        if (r <= 4) apply(t.onMessage(msg(int(1, n))));
        else if (r <= 6) answer(int(1, n));
        else if (r === 7) apply(t.onPrompt(int(1, n)));
        else reconnect(int(0, n), int(0, n));
        assert.ok(t.buffered <= maxBuffered);
      }
      for (let i = 0; i <= n; i++) answer(cap);
      reconnect(n, 2);
      for (let i = 0; i <= n; i++) answer(cap);
      assert.deepEqual(got, range(1, n), `case ${c}`);
      assert.equal(pending, null);
    }
  });

  test('garbage frames never throw and never deliver a seq twice within an epoch', () => {
    const rng = mulberry32(42);
    const int = (/** @type {number} */ lo, /** @type {number} */ hi) => lo + Math.floor(rng() * (hi - lo + 1));
    for (let c = 0; c < 300; c++) {
      const t = new RoomTracker(ROOM, null, 8);
      /** @type {number|null} */
      let last = null;
      for (let i = 0; i < int(0, 200); i++) {
        const seq = rng() < 0.9 ? int(0, 49) : int(0, 2 ** 52);
        const epoch = ['a', 'b', 'c'][int(0, 2)];
        const flag = rng() < 0.5;
        /** @type {any[]} */
        let effects = [];
        switch (int(0, 4)) {
          case 0:
            t.onJoined(epoch, seq, flag);
            last = null;
            break;
          case 1:
            effects = t.onMessage(msg(seq));
            break;
          case 2:
            effects = t.onPrompt(seq);
            break;
          case 3:
            effects = t.onPulled(epoch, seq, flag, range(Math.max(0, seq - 3), seq + 2).map(msg));
            break;
          case 4:
            effects = t.onEpochChange(epoch, seq);
            last = null;
        }
        for (const e of effects) {
          if (e.kind === 'deliver') {
            if (last !== null) assert.ok(e.message.seq > last);
            last = e.message.seq;
          } else if (e.kind === 'rejoin') last = null;
          // The server lost what we had: it may hand out those seqs again.
          else if (e.kind === 'rewind') last = e.seq;
        }
        assert.ok(t.buffered <= 8);
      }
    }
  });
});

describe('Backoff', () => {
  test('the ceiling doubles, then caps', () => {
    const b = new Backoff(100, 1000);
    assert.deepEqual(range(0, 5).map((a) => b.ceiling(a)), [100, 200, 400, 800, 1000, 1000]);
    assert.equal(b.ceiling(31), 1000);
    assert.equal(b.ceiling(2000), 1000);
  });

  test('a zero base never waits', () => {
    const b = new Backoff(0, 1000);
    for (let i = 0; i < 100; i++) assert.equal(b.nextDelay(), 0);
  });

  test('reset starts over', () => {
    const b = new Backoff(10, 60_000);
    for (let i = 0; i < 10; i++) b.nextDelay();
    assert.equal(b.attempt, 10);
    b.reset();
    assert.equal(b.attempt, 0);
    assert.ok(b.nextDelay() <= 10);
  });

  test('full jitter spreads over the whole range', () => {
    const rng = mulberry32(7);
    const samples = range(1, 2000).map(() => jitter(1000, rng));
    assert.ok(samples.every((d) => d >= 0 && d <= 1000 && Number.isInteger(d)));
    assert.ok(samples.some((d) => d < 100), 'small delays occur too (not "equal jitter")');
    assert.ok(samples.some((d) => d > 900));
    const mean = samples.reduce((a, b) => a + b, 0) / samples.length;
    assert.ok(mean > 400 && mean < 600, `mean ${mean}`);
  });

  test('the extremes of the random source stay in range', () => {
    assert.equal(jitter(500, () => 0), 0);
    assert.equal(jitter(500, () => 0.999999999), 500);
    const b = new Backoff(100, 250);
    const delays = range(0, 5).map(() => b.nextDelay(() => 0.999999999));
    assert.deepEqual(delays, [100, 200, 250, 250, 250, 250]);
  });
});

describe('frames and positions', () => {
  test('parseFrames splits lines and skips garbage', () => {
    const { frames, bad } = parseFrames('{"op":"pong"}\n\nnot json\n{"op":"online","room":"r","count":2}\n[1]\n');
    assert.deepEqual(frames, [{ op: 'pong' }, { op: 'online', room: 'r', count: 2 }]);
    assert.deepEqual(bad, ['not json', '[1]']);
  });

  test('SSE positions round-trip, parsed from the right', () => {
    const p = { 'live:42': { epoch: 'Ab_c-1', seq: 7 }, plain: { epoch: 'e', seq: 0 } };
    const text = formatPositions(p);
    assert.equal(text, 'live:42:Ab_c-1:7,plain:e:0');
    assert.deepEqual(parsePositions(text), p);
    assert.deepEqual(parsePositions('a:b:c:d:12'), { 'a:b:c': { epoch: 'd', seq: 12 } });
    assert.deepEqual(parsePositions('nope,x:y,:e:1,r:e:-1,r:e:1x'), {});
  });
});

/** A small seeded PRNG (mulberry32). @param {number} seed @returns {() => number} */
function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
