// WebSocket and EventSource for running the client in node against the real server: node 20
// has neither without experimental flags. Each implements just what the client uses (the
// `on…` handlers, `send`, `close`, `readyState`; an event's `data`, and an SSE event's
// `lastEventId`), and records what went over the wire, so that a test can check it too.
import { randomBytes } from 'node:crypto';
import http from 'node:http';

/**
 * What a transport received: one entry per WebSocket message or SSE event.
 * @typedef {{transport: 'ws'|'sse', data: string, lastEventId?: string}} Received
 */

/**
 * Fresh `WebSocket` and `EventSource` classes (pass them to `LivepushClient`), the list of
 * everything their instances received, in order, and of every WebSocket message sent.
 */
export function nodeTransports() {
  /** @type {Received[]} */
  const received = [];
  /** @type {string[]} */
  const sent = [];

  /** An RFC 6455 client: text frames, fragments, ping/pong, the closing handshake. */
  class NodeWebSocket {
    /** @param {string} url */
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      /** @type {any} */ this.onopen = null;
      /** @type {any} */ this.onmessage = null;
      /** @type {any} */ this.onclose = null;
      /** @type {any} */ this.onerror = null;
      /** @type {import('node:net').Socket|null} */
      this._socket = null;
      this._buf = Buffer.alloc(0);
      /** @type {Buffer[]} fragments of the message being received */
      this._parts = [];
      /** @type {{code: number, reason: string}|null} the server's close frame */
      this._closeFrame = null;
      const u = new URL(url);
      this._req = http.request({
        host: u.hostname,
        port: u.port,
        path: `${u.pathname}${u.search}`,
        headers: {
          connection: 'Upgrade',
          upgrade: 'websocket',
          'sec-websocket-version': '13',
          'sec-websocket-key': randomBytes(16).toString('base64'),
        },
      });
      this._req.on('upgrade', (_res, socket, head) => {
        this._socket = socket;
        socket.setNoDelay(true);
        socket.on('data', (/** @type {Buffer} */ d) => this._read(d));
        socket.on('close', () => this._ended());
        socket.on('error', () => {});
        this.readyState = 1;
        this.onopen?.({});
        if (head.length > 0) this._read(head);
      });
      this._req.on('response', (res) => {
        res.resume();
        this._ended();
      });
      this._req.on('error', () => this._ended());
      this._req.end();
    }

    /** @param {string} text */
    send(text) {
      if (this.readyState === 0) throw new Error('InvalidStateError: still connecting');
      if (this.readyState !== 1) return;
      sent.push(text);
      this._write(1, Buffer.from(text, 'utf8'));
    }

    /** @param {number} [code] @param {string} [reason] */
    close(code, reason = '') {
      if (this.readyState >= 2) return;
      if (this.readyState === 0) {
        this._req.destroy();
        return;
      }
      this.readyState = 2;
      /** @type {Buffer} */
      let payload = Buffer.alloc(0);
      if (code !== undefined) {
        payload = Buffer.alloc(2);
        payload.writeUInt16BE(code);
        payload = Buffer.concat([payload, Buffer.from(reason, 'utf8')]);
      }
      this._write(8, payload);
      // The server answers with its close frame and ends the connection.
      setTimeout(() => this._socket?.destroy(), 2000).unref();
    }

    /** @param {number} opcode @param {Buffer} payload */
    _write(opcode, payload) {
      const n = payload.length;
      const head = n < 126 ? Buffer.alloc(2) : n < 65536 ? Buffer.alloc(4) : Buffer.alloc(10);
      head[0] = 0x80 | opcode;
      if (n < 126) {
        head[1] = 0x80 | n;
      } else if (n < 65536) {
        head[1] = 0x80 | 126;
        head.writeUInt16BE(n, 2);
      } else {
        head[1] = 0x80 | 127;
        head.writeBigUInt64BE(BigInt(n), 2);
      }
      const mask = randomBytes(4);
      const body = Buffer.alloc(n);
      for (let i = 0; i < n; i++) body[i] = payload[i] ^ mask[i & 3];
      this._socket?.write(Buffer.concat([head, mask, body]));
    }

    /** @param {Buffer} chunk */
    _read(chunk) {
      this._buf = Buffer.concat([this._buf, chunk]);
      while (this._buf.length >= 2 && this.readyState !== 3) {
        const b = this._buf;
        let len = b[1] & 0x7f;
        let at = 2;
        if (len === 126) {
          if (b.length < 4) return;
          len = b.readUInt16BE(2);
          at = 4;
        } else if (len === 127) {
          if (b.length < 10) return;
          len = Number(b.readBigUInt64BE(2));
          at = 10;
        }
        const masked = (b[1] & 0x80) !== 0; // a server does not mask; accepted all the same
        const maskAt = at;
        if (masked) at += 4;
        if (b.length < at + len) return;
        const payload = Buffer.from(b.subarray(at, at + len));
        if (masked) for (let i = 0; i < len; i++) payload[i] ^= b[maskAt + (i & 3)];
        this._buf = b.subarray(at + len);
        this._frame((b[0] & 0x80) !== 0, b[0] & 0x0f, payload);
      }
    }

    /** @param {boolean} fin @param {number} opcode @param {Buffer} payload */
    _frame(fin, opcode, payload) {
      if (opcode === 9) {
        if (this.readyState === 1) this._write(10, payload);
      } else if (opcode === 8) {
        this._closeFrame = {
          code: payload.length >= 2 ? payload.readUInt16BE(0) : 1005,
          reason: payload.subarray(2).toString('utf8'),
        };
        if (this.readyState === 1) this._write(8, payload.subarray(0, 2));
        this.readyState = 2;
        this._socket?.end();
      } else if (opcode <= 2) {
        this._parts.push(payload);
        if (!fin) return;
        const data = Buffer.concat(this._parts).toString('utf8');
        this._parts = [];
        received.push({ transport: 'ws', data });
        if (this.readyState === 1) this.onmessage?.({ data });
      }
    }

    /** The connection is gone (or never came up). */
    _ended() {
      if (this.readyState === 3) return;
      const opened = this._socket !== null;
      this.readyState = 3;
      this._socket?.destroy();
      if (!opened || !this._closeFrame) this.onerror?.({});
      const { code, reason } = this._closeFrame ?? { code: 1006, reason: '' };
      this.onclose?.({ code, reason, wasClean: this._closeFrame !== null });
    }
  }

  /** A stream read with fetch; unlike a browser's, it does not reconnect on its own. */
  class NodeEventSource {
    /** @param {string} url */
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      /** @type {any} */ this.onopen = null;
      /** @type {any} */ this.onmessage = null;
      /** @type {any} */ this.onerror = null;
      this._ctrl = new AbortController();
      this._lastEventId = '';
      this._run();
    }

    close() {
      this.readyState = 2;
      this._ctrl.abort();
    }

    async _run() {
      try {
        const res = await fetch(this.url, { headers: { accept: 'text/event-stream' }, signal: this._ctrl.signal });
        if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
        if (this.readyState === 2) return;
        this.readyState = 1;
        this.onopen?.({});
        const dec = new TextDecoder();
        let text = '';
        for await (const chunk of res.body) {
          text += dec.decode(chunk, { stream: true }).replace(/\r\n?/g, '\n');
          let end;
          while ((end = text.indexOf('\n\n')) >= 0) {
            const block = text.slice(0, end);
            text = text.slice(end + 2);
            this._event(block);
          }
        }
      } catch {
        // closed by us, or the stream failed: the same as its end
      }
      if (this.readyState === 2) return;
      this.readyState = 2;
      this.onerror?.({});
    }

    /** @param {string} block  One event's lines. */
    _event(block) {
      /** @type {string[]} */
      const data = [];
      for (const line of block.split('\n')) {
        const colon = line.indexOf(':');
        if (colon === 0) continue; // a comment
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? '' : line.slice(colon + 1);
        if (value.startsWith(' ')) value = value.slice(1);
        if (field === 'data') data.push(value);
        else if (field === 'id') this._lastEventId = value;
      }
      if (data.length === 0 || this.readyState !== 1) return;
      const ev = { data: data.join('\n'), lastEventId: this._lastEventId };
      received.push({ transport: 'sse', ...ev });
      this.onmessage?.(ev);
    }
  }

  return { WebSocket: NodeWebSocket, EventSource: /** @type {any} */ (NodeEventSource), received, sent };
}
