// Start the real livepush server binary for a test, and talk to its HTTP API.
import { execFileSync, spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { waitFor } from './events.js';

/** The repository root. */
export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
/** The server binary (`cargo build -p livepush`); override with LIVEPUSH_BIN. */
export const BIN = process.env.LIVEPUSH_BIN || path.join(ROOT, 'target/debug/livepush');
export const API_KEY = 'e2e-api-key-0123456789';
export const TOKEN_SECRET = '0123456789abcdef0123';

/** @type {boolean|undefined} */
let dataDirKnown;
/** Whether this build knows `--data-dir` (it was added while these tests were written). */
function knowsDataDir() {
  if (dataDirKnown === undefined) {
    const help = execFileSync(BIN, ['serve', '--help'], { encoding: 'utf8' });
    dataDirKnown = help.includes('--data-dir');
  }
  return dataDirKnown;
}

/**
 * @typedef {object} Server
 * @property {string} url  `http://127.0.0.1:PORT`
 * @property {(room: string, type: string, data?: any, extra?: object) => Promise<any>} publish
 * @property {(room: string) => Promise<any>} room  `GET /v1/rooms/{room}`
 * @property {(id: string) => Promise<any>} terminal  `GET /v1/terminals/{id}`
 * @property {(id: string, type: string, data?: any) => Promise<any>} postInbox
 *   `POST /v1/terminals/{id}/messages`
 * @property {(room: string) => Promise<{status: number, body: any}>} resetHistory
 *   `DELETE /v1/rooms/{room}/history`: the room starts a new epoch (contract v1.1, decision 8).
 * @property {(series: string) => Promise<number>} metric  The value of one series of
 *   `/metrics`, e.g. `livepush_connections_open{transport="longpoll"}` (0 when absent).
 * @property {() => string} logs  What the server wrote on stderr.
 * @property {() => Promise<void>} stop
 */

/**
 * Start `livepush serve --dev` on a free port and wait for its `listening` line.
 * @param {{args?: string[]}} [options]  Extra `serve` flags.
 * @returns {Promise<Server>}
 */
export async function startServer({ args = [] } = {}) {
  const argv = [
    'serve', '--dev', '--listen', '127.0.0.1:0',
    '--api-key', API_KEY, '--token-secret', TOKEN_SECRET,
  ];
  if (knowsDataDir()) argv.push('--data-dir', ':memory:');
  argv.push(...args);
  const child = spawn(BIN, argv, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'info' },
  });
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (d) => {
    stderr += d;
    if (stderr.length > 400_000) stderr = stderr.slice(-200_000);
  });
  const url = await new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`livepush did not start within 15 s\n${stderr}`));
    }, 15_000);
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/livepush listening on (http:\/\/\S+)/);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`livepush exited (${code ?? signal}) before listening\n${stderr}`));
    });
  });
  const auth = { authorization: `Bearer ${API_KEY}` };
  return {
    url,
    async publish(room, type, data = {}, extra = {}) {
      const res = await fetch(`${url}/v1/rooms/${encodeURIComponent(room)}/messages`, {
        method: 'POST',
        headers: { ...auth, 'content-type': 'application/json' },
        body: JSON.stringify({ type, data, ...extra }),
      });
      const body = await res.json();
      if (!res.ok) throw new Error(`publish answered ${res.status}: ${JSON.stringify(body)}`);
      return body;
    },
    async room(room) {
      const res = await fetch(`${url}/v1/rooms/${encodeURIComponent(room)}`, { headers: auth });
      return res.json();
    },
    async terminal(id) {
      const res = await fetch(`${url}/v1/terminals/${encodeURIComponent(id)}`, { headers: auth });
      return res.json();
    },
    async postInbox(id, type, data = {}) {
      const res = await fetch(`${url}/v1/terminals/${encodeURIComponent(id)}/messages`, {
        method: 'POST',
        headers: { ...auth, 'content-type': 'application/json' },
        body: JSON.stringify({ type, data }),
      });
      const body = await res.json();
      if (!res.ok) throw new Error(`inbox post answered ${res.status}: ${JSON.stringify(body)}`);
      return body;
    },
    async resetHistory(room) {
      const res = await fetch(`${url}/v1/rooms/${encodeURIComponent(room)}/history`, { method: 'DELETE', headers: auth });
      return { status: res.status, body: await res.json() };
    },
    async metric(series) {
      const res = await fetch(`${url}/metrics`, { headers: auth });
      const line = (await res.text()).split('\n').find((l) => l.startsWith(`${series} `));
      return line ? Number(line.slice(series.length + 1)) : 0;
    },
    logs: () => stderr,
    stop: () => stopProcess(child),
  };
}

/**
 * Stop a process gracefully (SIGTERM), or with SIGKILL after 5 s; resolves once it exited.
 * @param {import('node:child_process').ChildProcess} child
 */
export async function stopProcess(child) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  await exited;
  clearTimeout(timer);
}

/**
 * Mint a terminal token (JWT HS256) the test server accepts.
 * @param {{sub: string, rooms?: string[], send?: boolean, ttlSeconds?: number}} claims
 * @returns {string}
 */
export function mintToken({ sub, rooms = ['*'], send = true, ttlSeconds = 3600 }) {
  const b64 = (/** @type {object} */ o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64({ sub, rooms, send, exp: Math.floor(Date.now() / 1000) + ttlSeconds });
  const mac = createHmac('sha256', TOKEN_SECRET).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${mac}`;
}

/**
 * Run `body` against a fresh server started with `args`; on failure, show the server's log.
 * @param {string[]} args
 * @param {(server: Server) => Promise<void>} body
 */
export async function withServer(args, body) {
  const server = await startServer({ args });
  try {
    await body(server);
  } catch (e) {
    console.error(server.logs().slice(-4000));
    throw e;
  } finally {
    await server.stop();
  }
}

/**
 * Wait until the server has ended every long-poll session: a parked poll that the client
 * gave up is over on the server too (it notices only when it sees the connection end).
 * @param {Server} server
 */
export async function longPollsEnded(server) {
  const open = () => server.metric('livepush_connections_open{transport="longpoll"}');
  await waitFor(async () => (await open()) === 0, 10_000, 'no long-poll session open on the server');
}
