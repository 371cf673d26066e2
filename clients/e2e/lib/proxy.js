// A TCP proxy between the browser and the server, so that a test can kill the page's
// connections from the server side (or blackhole them) without stopping the server.
import net from 'node:net';

/**
 * @typedef {object} Proxy
 * @property {string} url  `http://127.0.0.1:PORT`, to open in the browser instead of the server.
 * @property {() => void} cut  Reset every open connection and refuse new ones until `restore`.
 * @property {() => void} restore  Accept (and forward) new connections again.
 * @property {() => void} freeze  Stop forwarding on every open connection without closing it
 *   (a dead network path); new connections are forwarded normally.
 * @property {() => number} open  Connections currently forwarded.
 * @property {() => string} sent  What the browser sent through the proxy (the last 256 KiB, as
 *   latin1 text): to check that a request went out, e.g. a beacon sent while a page unloads.
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
  let refusing = false;
  let sent = '';
  const server = net.createServer((client) => {
    if (refusing) {
      client.resetAndDestroy();
      return;
    }
    const upstream = net.connect(Number(port), hostname);
    const pair = { client, upstream };
    pairs.add(pair);
    client.pipe(upstream);
    upstream.pipe(client);
    client.on('data', (/** @type {Buffer} */ d) => {
      sent = (sent + d.toString('latin1')).slice(-262_144);
    });
    const drop = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    for (const s of [client, upstream]) {
      s.on('error', drop);
      s.on('close', drop);
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(undefined)));
  const addr = /** @type {net.AddressInfo} */ (server.address());
  return {
    url: `http://127.0.0.1:${addr.port}`,
    cut() {
      refusing = true;
      for (const { client, upstream } of pairs) {
        // TCP reset towards the browser: an interruption, not a clean close.
        client.resetAndDestroy();
        upstream.destroy();
      }
      pairs.clear();
    },
    restore() {
      refusing = false;
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
    open: () => pairs.size,
    sent: () => sent,
    async close() {
      refusing = true;
      for (const { client, upstream } of [...pairs, ...frozen]) {
        client.destroy();
        upstream.destroy();
      }
      await new Promise((resolve) => server.close(() => resolve(undefined)));
    },
  };
}
