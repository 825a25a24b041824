'use strict';
// A peer on the Node ws library, driven by tests/test_node_peers.py.
//
//   node peer.js '{"mode": "client", "url": "ws://127.0.0.1:PORT/echo", "followRedirects": true}'
//   node peer.js '{"mode": "server"}'     (listens on 127.0.0.1, port 0)
//
// It reports what happens in JSON lines on stdout, {"event": NAME, ...}:
// listening {port}, redirect {url}, open {url}, connection {path},
// message {data} (text) or {hex} (binary), ping {data}, pong {data},
// close {code, reason}, error {message}.
//
// It takes commands in JSON lines on stdin, for the client's connection or
// the server's latest one: {"op": "send", "data": TEXT} or {"op": "send",
// "hex": HEX} (with "fin": false for a fragment, as ws's send(data, {fin})),
// {"op": "ping", "data"}, {"op": "pong", "data"}, {"op": "close", "code",
// "reason"}. The end of stdin ends the process.
//
// The server also acts on what it receives, as the servers of
// tests/test_client.py do: "!close CODE REASON" closes, "!ping" pings with
// "srv" and sends "pong srv" once the pong came back; anything else is
// echoed. Whatever happens, the process ends after LIFETIME ms.

const readline = require('readline');
const WebSocket = require('ws');

const cfg = JSON.parse(process.argv[2]);
const LIFETIME = 60000;

function emit(event, fields) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + '\n');
}

function payload(data, isBinary) {
  return isBinary ? { hex: Buffer.from(data).toString('hex') } : { data: data.toString() };
}

let current = null; // the connection that stdin's commands apply to

function watch(ws, echo) {
  current = ws;
  ws.on('message', (data, isBinary) => {
    emit('message', payload(data, isBinary));
    if (!echo) return;
    const text = isBinary ? null : data.toString();
    if (text !== null && text.startsWith('!close ')) {
      const [, code, ...reason] = text.split(' ');
      ws.close(Number(code), reason.join(' '));
    } else if (text === '!ping') {
      ws.once('pong', () => ws.send('pong srv'));
      ws.ping('srv');
    } else {
      ws.send(data, { binary: isBinary });
    }
  });
  ws.on('ping', (data) => emit('ping', { data: data.toString() }));
  ws.on('pong', (data) => emit('pong', { data: data.toString() }));
  ws.on('close', (code, reason) => emit('close', { code, reason: reason.toString() }));
  ws.on('error', (err) => emit('error', { message: String(err) }));
}

function run(command) {
  if (current === null) throw new Error('no connection yet');
  const data = command.hex !== undefined ? Buffer.from(command.hex, 'hex') : command.data;
  switch (command.op) {
    case 'send':
      current.send(data, { binary: command.hex !== undefined, fin: command.fin !== false });
      break;
    case 'ping':
      current.ping(data);
      break;
    case 'pong':
      current.pong(data);
      break;
    case 'close':
      current.close(command.code, command.reason);
      break;
    default:
      throw new Error(`unknown op ${command.op}`);
  }
}

let server = null;
if (cfg.mode === 'client') {
  const ws = new WebSocket(cfg.url, { followRedirects: Boolean(cfg.followRedirects) });
  ws.on('redirect', (url) => emit('redirect', { url }));
  ws.on('open', () => emit('open', { url: ws.url }));
  watch(ws, false);
} else {
  server = new WebSocket.WebSocketServer({ host: '127.0.0.1', port: 0 });
  server.on('listening', () => emit('listening', { port: server.address().port }));
  server.on('connection', (ws, request) => {
    emit('connection', { path: request.url });
    watch(ws, true);
  });
}

function exit() {
  if (server !== null) server.close();
  if (current !== null) current.terminate();
  process.exit(0);
}

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  try {
    run(JSON.parse(line));
  } catch (err) {
    emit('error', { message: String(err) });
  }
}).on('close', exit);
setTimeout(exit, LIFETIME).unref();
