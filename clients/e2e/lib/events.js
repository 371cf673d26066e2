// Helpers for tests that drive a LivepushClient in node: wait for a condition, record events.

/**
 * Wait until `cond()` is truthy (polling; an async `cond` is awaited), or fail after
 * `timeout` ms.
 * @template T
 * @param {() => T | Promise<T>} cond
 * @param {number} [timeout]
 * @param {string} [what]
 * @returns {Promise<T>}
 */
export async function waitFor(cond, timeout = 3000, what = 'condition') {
  const end = Date.now() + timeout;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** @param {number} ms */
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Record every event of a client.
 * @param {import('../../js/livepush.js').LivepushClient} c
 */
export function record(c) {
  /** @type {Array<[string, any]>} */
  const events = [];
  for (const name of /** @type {const} */ ([
    'connected', 'disconnected', 'joined', 'message', 'transient', 'online', 'lost', 'left', 'inbox', 'pending', 'error', 'state',
  ])) {
    c.on(name, (p) => events.push([name, p]));
  }
  return {
    events,
    /** @param {string} name */
    of: (name) => events.filter(([n]) => n === name).map(([, p]) => p),
    seqs: () => events.filter(([n]) => n === 'message').map(([, p]) => p.seq),
  };
}

/** A `fetch` that keeps every request's body and answer (both parsed as JSON). */
export function tapFetch() {
  /** @type {Array<{body: any, answer: any}>} */
  const polls = [];
  /** @type {typeof fetch} */
  const tapped = async (url, init) => {
    const res = await fetch(url, init);
    const text = await res.text();
    polls.push({ body: JSON.parse(String(init?.body)), answer: JSON.parse(text) });
    return new Response(text, { status: res.status, headers: res.headers });
  };
  return { fetch: tapped, polls };
}
