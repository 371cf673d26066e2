// Plain WebSocket broadcast peer for `livepush bench --target ws`.
//   subscribers: ws://HOST/        publish: POST http://HOST/publish  (body = payload JSON)
// Every publish is sent as one text frame to every connected subscriber.
// Usage: PORT=8090 node ws-server.js   (npm install first)
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');

const port = Number(process.env.PORT || 8090);
const host = process.env.HOST || '127.0.0.1';

const server = http.createServer((req, res) => {
  if (req.method === 'POST' && req.url === '/publish') {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks).toString('utf8');
      let n = 0;
      for (const ws of wss.clients) {
        if (ws.readyState === 1) {
          ws.send(body);
          n += 1;
        }
      }
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ delivered: n }));
    });
    return;
  }
  if (req.url === '/healthz') {
    res.writeHead(200);
    res.end('ok');
    return;
  }
  res.writeHead(404);
  res.end();
});

const wss = new WebSocketServer({ server, path: '/', perMessageDeflate: false });
server.listen(port, host, () => console.log(`ws peer listening on http://${host}:${port}`));
