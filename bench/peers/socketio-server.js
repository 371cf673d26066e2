// Socket.IO v4 peer for `livepush bench --target socketio`.
//   subscribers: ws://HOST/socket.io/?EIO=4&transport=websocket
//   publish: POST http://HOST/publish  (body = payload JSON) -> io.emit("msg", payload)
// Usage: PORT=8091 node socketio-server.js   (npm install first)
'use strict';
const http = require('http');
const { Server } = require('socket.io');

const port = Number(process.env.PORT || 8091);
const host = process.env.HOST || '127.0.0.1';

const server = http.createServer((req, res) => {
  if (req.method === 'POST' && req.url === '/publish') {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      let payload;
      try {
        payload = JSON.parse(Buffer.concat(chunks).toString('utf8'));
      } catch (e) {
        res.writeHead(400);
        res.end('bad json');
        return;
      }
      io.emit('msg', payload);
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ delivered: io.engine.clientsCount }));
    });
    return;
  }
  if (req.url === '/healthz') {
    res.writeHead(200);
    res.end('ok');
    return;
  }
  // Socket.IO handles /socket.io/ itself.
});

const io = new Server(server, {
  transports: ['websocket'],
  perMessageDeflate: false,
  serveClient: false,
  pingInterval: 25000,
  pingTimeout: 20000,
});
server.listen(port, host, () => console.log(`socket.io peer listening on http://${host}:${port}`));
