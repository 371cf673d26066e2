// A TCP proxy between the browser and the server, so that a test can kill the page's
// connections from the server side (or blackhole them) without stopping the server.
import net from 'node:net';

/**
 * @typedef {object} Proxy
 * @property {string} url  `http://127.0.0.1:PORT`, to open in the browser instead of the server.
 * @property {(options?: {holdNew?: boolean}) => void} cut  Reset every open connection and refuse
 *   new ones until `restore`; with `holdNew`, accept new ones but forward them only at
 *   `restore` (the browser sees a connect that takes long, not one that fails).
 * @property {() => void} restore  Accept (and forward) new connections again.
 * @property {() => void} freeze  Stop forwarding on every open connection without closing it
 *   (a dead network path); new connections are forwarded normally.
 * @property {() => number} open  Connections currently forwarded.
 * @property {() => string} sent  What the browser sent through the proxy (the last 256 KiB, as
 *   latin1 text): to check that a request went out, e.g. a beacon sent while a page unloads.
 * @property {() => string} received  What the server answered through the proxy (likewise).
 * @property {() => void} holdEnds  From now on, when the browser ends a connection, keep the
 *   server's side open until `releaseEnds`: the server sees that request end only then.
 * @property {() => void} releaseEnds  End the connections held open, and stop holding.
 * @property {() => Promise<void>} close
 */

/**
 * @param {string} target  `http://HOST:PORT` of the server.
 * @returns {Promise<Proxy>}
 */
export async function startProxy(target) {
  const { hostname, port } = new URL(target);
  /** @type {Set<{client: net.Socket, upstream: net.Socket}>} */
  const pairs = new Set();
  /** @type {Set<{client: net.Socket, upstream: net.Socket}>} */
  const frozen = new Set();
  /** @type {Set<net.Socket>} server sides kept open after the browser ended the connection */
  const held = new Set();
  let holding = false;
  let refusing = false;
  /** @type {Set<net.Socket>|null} new connections waiting for `restore` (cut with holdNew) */
  let waiting = null;
  let sent = '';
  let received = '';
  /** @param {net.Socket} client */
  const forward = (client) => {
    const upstream = net.connect(Number(port), hostname);
    const pair = { client, upstream };
    pairs.add(pair);
    // The browser's end of a connection is passed on by `drop` (or held back by `holdEnds`).
    client.pipe(upstream, { end: false });
    upstream.pipe(client);
    client.on('data', (/** @type {Buffer} */ d) => {
      sent = (sent + d.toString('latin1')).slice(-262_144);
    });
    upstream.on('data', (/** @type {Buffer} */ d) => {
      received = (received + d.toString('latin1')).slice(-262_144);
    });
    /** @param {net.Socket} from */
    const drop = (from) => {
      pairs.delete(pair);
      client.destroy();
      if (holding && from === client && !upstream.destroyed) {
        client.unpipe(upstream);
        held.add(upstream);
        return;
      }
      held.delete(upstream);
      upstream.destroy();
    };
    for (const s of [client, upstream]) {
      s.on('error', () => drop(s));
      s.on('close', () => drop(s));
    }
    client.resume();
  };
  const server = net.createServer((client) => {
    if (refusing) {
      client.resetAndDestroy();
    } else if (waiting) {
      const queue = waiting;
      client.pause();
      queue.add(client);
      client.on('error', () => client.destroy());
      client.on('close', () => queue.delete(client));
    } else {
      forward(client);
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(undefined)));
  const addr = /** @type {net.AddressInfo} */ (server.address());
  return {
    url: `http://127.0.0.1:${addr.port}`,
    cut({ holdNew = false } = {}) {
      if (holdNew) waiting = new Set();
      else refusing = true;
      for (const { client, upstream } of pairs) {
        // TCP reset towards the browser: an interruption, not a clean close.
        client.resetAndDestroy();
        upstream.destroy();
      }
      pairs.clear();
    },
    restore() {
      refusing = false;
      const queue = waiting;
      waiting = null;
      for (const client of queue ?? []) forward(client);
    },
    freeze() {
      for (const { client, upstream } of pairs) {
        client.unpipe(upstream);
        upstream.unpipe(client);
        client.pause();
        upstream.pause();
        frozen.add({ client, upstream });
      }
      pairs.clear();
    },
    holdEnds() {
      holding = true;
    },
    releaseEnds() {
      holding = false;
      for (const upstream of held) upstream.destroy();
      held.clear();
    },
    open: () => pairs.size,
    sent: () => sent,
    received: () => received,
    async close() {
      refusing = true;
      for (const { client, upstream } of [...pairs, ...frozen]) {
        client.destroy();
        upstream.destroy();
      }
      for (const upstream of held) upstream.destroy();
      for (const client of waiting ?? []) client.destroy();
      await new Promise((resolve) => server.close(() => resolve(undefined)));
    },
  };
}
