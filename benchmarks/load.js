'use strict';
// The load generator of benchmarks/run.py: one process per scenario run.
//
//   node load.js '{"mode": "echo", "port": 8000, ...}'
//
// It talks to run.py in JSON lines on stdout ({"event": "warm" | "ready" |
// "result" | "error", ...}) and one-word commands on stdin: "setup" opens the
// connections, "go" runs the measured phase, "exit" ends the process (so does
// the end of stdin). run.py reads this process's CPU time between the events,
// which is why setup and measurement are separate steps.
//
// Every phase stops by itself: the measured ones after cfg.duration, every
// connection attempt after cfg.connectTimeout seconds (20 by default), the
// whole process after cfg.lifetime seconds.
//
// With cfg.tls ({"ca": "PATH"}) every connection speaks TLS (wss://), the
// server's certificate checked against that CA: ws's client and the lean
// one both go through Node's tls module.

const fs = require('fs');
const net = require('net');
const tls = require('tls');
const readline = require('readline');
const WebSocket = require('ws');

const cfg = JSON.parse(process.argv[2]);
const TLS_CA = cfg.tls ? fs.readFileSync(cfg.tls.ca) : null;
// A TCP or a TLS connection; `ready` is the event after which to speak.
function connectSocket(port = cfg.port) {
  if (TLS_CA) return [tls.connect({ host: HOST, port, ca: TLS_CA }), 'secureConnect'];
  return [net.connect({ host: HOST, port }), 'connect'];
}
const HOST = '127.0.0.1';
const CONNECT_TIMEOUT = (cfg.connectTimeout || 20) * 1000;
const REPLY_TIMEOUT = 10000;

const TEXT = { binary: false };
const BINARY = { binary: true };

const now = () => performance.now();
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function emit(event, data) {
  process.stdout.write(JSON.stringify({ event, ...data }) + '\n');
}

function fail(err) {
  emit('error', { message: String((err && err.stack) || err) });
  process.exit(1);
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer in ${Math.round(ms)} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// Text shaped like an application's JSON (records of ids, names, flags),
// exactly size bytes: what compression meets in practice, unlike 'xxx...'.
function jsonPayload(size) {
  const items = [];
  let text = '';
  for (let i = 0; ; i++) {
    items.push({ id: 1000 + i, user: `user-${(i * 7919) % 10007}`, online: i % 3 === 0,
                 score: (i * 2654435761) % 100000, room: `room-${i % 17}` });
    const next = JSON.stringify({ items, pad: '' });
    if (next.length > size) break;
    text = next;
  }
  items.pop();
  const bare = JSON.stringify({ items, pad: '' });
  return Buffer.from(JSON.stringify({ items, pad: ' '.repeat(size - bare.length) }));
}

function payload(size, binary) {
  if (!binary && cfg.json) return jsonPayload(size);
  if (!binary) return Buffer.alloc(size, 'x');
  const buf = Buffer.alloc(size);
  for (let i = 0; i < size; i++) buf[i] = (i * 31 + 7) & 0xff;
  return buf;
}

// An all-zero mask lets ws skip the XOR over the payload, which keeps the
// client's CPU out of the 1 MiB numbers. Servers cannot tell the difference
// and unmask as usual.
function zeroMask(mask) {
  mask[0] = mask[1] = mask[2] = mask[3] = 0;
}

// One client connection, WebSocket or (for tcp-echo) a raw socket that sends
// the path on a line and waits for "ok\n" in place of a handshake.
// onMessage(conn) runs once per whole message received; in raw mode a message
// is every msgSize bytes, since TCP keeps no boundaries.
function open(path, msgSize, onMessage) {
  return cfg.proto === 'tcp' ? openTcp(path, msgSize, onMessage) : openWs(path, onMessage);
}

function openWs(path, onMessage) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${TLS_CA ? 'wss' : 'ws'}://${HOST}:${cfg.port}${path}`, {
      ...(TLS_CA ? { ca: TLS_CA } : {}),
      perMessageDeflate: cfg.deflate ? { threshold: 0 } : false,
      skipUTF8Validation: true,
      handshakeTimeout: CONNECT_TIMEOUT,
      generateMask: zeroMask,
    });
    let opened = false;
    const conn = {
      closed: false,
      onclose: null,
      send(data, binary) {
        ws.send(data, binary ? BINARY : TEXT);
      },
      close() {
        return new Promise((res) => {
          if (ws.readyState === WebSocket.CLOSED) return res();
          ws.once('close', res);
          ws.close(1000);
        });
      },
    };
    ws.on('open', () => {
      opened = true;
      resolve(conn);
    });
    ws.on('message', () => onMessage(conn));
    ws.on('error', (err) => {
      if (!opened) reject(err);
    });
    ws.on('close', () => {
      conn.closed = true;
      if (!opened) reject(new Error('closed during the handshake'));
      else if (conn.onclose) conn.onclose();
    });
  });
}

function openTcp(path, msgSize, onMessage) {
  return new Promise((resolve, reject) => {
    const sock = net.connect({ host: HOST, port: cfg.port });
    sock.setNoDelay(true);
    let opened = false;
    let pending = 0;
    const timer = setTimeout(() => sock.destroy(new Error('no greeting in time')), CONNECT_TIMEOUT);
    const conn = {
      closed: false,
      onclose: null,
      send(data) {
        sock.write(data);
      },
      close() {
        return new Promise((res) => {
          if (conn.closed) return res();
          sock.once('close', res);
          sock.end();
        });
      },
    };
    const count = (bytes) => {
      pending += bytes;
      while (pending >= msgSize) {
        pending -= msgSize;
        onMessage(conn);
      }
    };
    // Broadcast clients tell the size of the messages, which the server
    // forwards one by one.
    sock.on('connect', () => sock.write(path === '/broadcast' ? `${path} ${msgSize}\n` : `${path}\n`));
    sock.on('data', (chunk) => {
      if (opened) return count(chunk.length);
      // The greeting is "ok\n"; anything before the newline is ignored.
      const end = chunk.indexOf(10);
      if (end < 0) return;
      opened = true;
      clearTimeout(timer);
      resolve(conn);
      if (end + 1 < chunk.length) count(chunk.length - end - 1);
    });
    sock.on('error', (err) => {
      if (!opened) reject(err);
    });
    sock.on('close', () => {
      clearTimeout(timer);
      conn.closed = true;
      if (!opened) reject(new Error('closed before the greeting'));
      else if (conn.onclose) conn.onclose();
    });
  });
}

// A lean client for the scenarios where ws's own cost would be the bottleneck
// (handshakes, broadcast): a fixed handshake request, a check of the status
// line and the accept key, then bytes counted rather than frames parsed.
// That is exact only when every frame the server sends has the same size,
// which holds in those scenarios: frameSize is 2 + payload for a server
// frame of under 126 bytes. Frames it sends are masked with zeros.
// In tcp mode it is the same client as open().
const KEY = 'dGhlIHNhbXBsZSBub25jZQ=='; // RFC 6455's example, with its answer:
const ACCEPT = 's3pPLMBiTxaQ9kYGzzhZRbK+xOo=';
const CLOSE_1000 = Buffer.from([0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]);

function clientFrame(payloadBuf) {
  if (cfg.proto === 'tcp') return payloadBuf;
  if (payloadBuf.length < 126) {
    return Buffer.concat([Buffer.from([0x81, 0x80 | payloadBuf.length, 0, 0, 0, 0]), payloadBuf]);
  }
  if (payloadBuf.length > 65535) throw new Error('lean frames are under 64 KiB');
  const head = Buffer.from([0x81, 0x80 | 126, 0, 0, 0, 0, 0, 0]);
  head.writeUInt16BE(payloadBuf.length, 2);
  return Buffer.concat([head, payloadBuf]);
}

// The size of the frame at the start of buf (server frames: unmasked, under
// 64 KiB), or 0 if its header is not all there.
function frameSizeAt(buf) {
  if (buf.length < 2) return 0;
  const len = buf[1] & 0x7f;
  if (len < 126) return 2 + len;
  if (len === 126) return buf.length < 4 ? 0 : 4 + buf.readUInt16BE(2);
  throw new Error('lean clients take frames under 64 KiB');
}

function openLean(path, payloadSize, onMessage, port = cfg.port) {
  if (cfg.proto === 'tcp') return openTcp(path, payloadSize, onMessage);
  // Every frame has the size of the first: the same message each time (with
  // cfg.deflate, compressed the same way each time: a server that cannot
  // compress it the same way each time is not measured right).
  let frameSize = 0;
  let first = Buffer.alloc(0);
  const offer = cfg.deflate ? 'Sec-WebSocket-Extensions: permessage-deflate\r\n' : '';
  return new Promise((resolve, reject) => {
    const [sock, ready] = connectSocket(port);
    sock.setNoDelay(true);
    let opened = false;
    let head = '';
    let pending = 0;
    const timer = setTimeout(() => sock.destroy(new Error('handshake timed out')), CONNECT_TIMEOUT);
    const conn = {
      closed: false,
      onclose: null,
      send(frame) {
        sock.write(frame);
      },
      // Sends a close frame and waits for the server to close TCP.
      close() {
        return new Promise((res) => {
          if (conn.closed) return res();
          sock.once('close', res);
          sock.write(CLOSE_1000);
        });
      },
    };
    sock.on(ready, () =>
      sock.write(
        `GET ${path} HTTP/1.1\r\nHost: ${HOST}:${port}\r\nUpgrade: websocket\r\n` +
          `Connection: Upgrade\r\nSec-WebSocket-Key: ${KEY}\r\nSec-WebSocket-Version: 13\r\n` +
          `${offer}\r\n`,
      ),
    );
    sock.on('data', (chunk) => {
      if (!opened) {
        head += chunk.toString('latin1');
        const end = head.indexOf('\r\n\r\n');
        if (end < 0) return;
        if (!/^HTTP\/1\.1 101/.test(head) || !head.includes(ACCEPT)) {
          sock.destroy(new Error(`handshake refused: ${head.split('\r\n')[0]}`));
          return;
        }
        if (cfg.deflate && !/permessage-deflate/i.test(head.slice(0, end))) {
          sock.destroy(new Error('permessage-deflate not accepted'));
          return;
        }
        opened = true;
        clearTimeout(timer);
        resolve(conn);
        chunk = Buffer.from(head.slice(end + 4), 'latin1');
      }
      if (!frameSize) {
        first = Buffer.concat([first, chunk]);
        frameSize = frameSizeAt(first);
        if (!frameSize) return;
        chunk = first;
      }
      pending += chunk.length;
      while (pending >= frameSize) {
        pending -= frameSize;
        onMessage(conn);
      }
    });
    sock.on('error', (err) => {
      if (!opened) reject(err);
    });
    sock.on('close', () => {
      clearTimeout(timer);
      conn.closed = true;
      if (!opened) reject(new Error('closed during the handshake'));
      else if (conn.onclose) conn.onclose();
    });
  });
}

// Open n connections, at most `parallel` handshakes at a time, giving up
// after maxFailures failed attempts (a server that stopped accepting would
// otherwise cost a timeout per remaining connection).
async function openMany(n, path, msgSize, onMessage, parallel, maxFailures = 0, opener = open) {
  const conns = [];
  let next = 0;
  let failed = 0;
  let firstError = null;
  const started = now();
  async function worker() {
    while (next < n && failed <= maxFailures) {
      next++;
      try {
        conns.push(await opener(path, msgSize, onMessage));
      } catch (err) {
        failed++;
        if (!firstError) firstError = err.message;
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(parallel, n) }, worker));
  return { conns, failed, firstError, openSeconds: (now() - started) / 1000 };
}

// One echo round trip on a new connection, then close it: the server has
// imported and allocated whatever it does lazily before run.py reads any
// baseline.
async function warmUp() {
  let replied;
  const reply = new Promise((resolve) => (replied = resolve));
  const conn = await withTimeout(open('/echo', 32, () => replied()), CONNECT_TIMEOUT, 'warm-up');
  conn.send(payload(32, false), false);
  await withTimeout(reply, REPLY_TIMEOUT, 'warm-up echo');
  await withTimeout(conn.close(), REPLY_TIMEOUT, 'warm-up close');
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted.length ? sorted[Math.floor(sorted.length / 2)] : null;
}

// -- The scenarios -------------------------------------------------------------
// Each has setup() (returns what "ready" reports) and go() (returns the result).

const scenarios = {};

// Each connection sends one message and sends the next when the echo
// arrives, for cfg.duration seconds.
scenarios.echo = () => {
  let conns = [];
  let onReply = () => {};
  return {
    async setup() {
      const opened = await openMany(cfg.conns, '/echo', cfg.size, (c) => onReply(c), 100);
      conns = opened.conns;
      if (opened.failed) throw new Error(`${opened.failed} connections failed: ${opened.firstError}`);
      return { conns: conns.length };
    },
    async go() {
      const msg = payload(cfg.size, cfg.binary);
      const binary = cfg.binary;
      let count = 0;
      let stop = false;
      onReply = (c) => {
        if (stop) return;
        count++;
        c.send(msg, binary);
      };
      const start = now();
      for (const c of conns) c.send(msg, binary);
      await sleep(cfg.duration * 1000);
      stop = true;
      const elapsed = (now() - start) / 1000;
      return { count, elapsed, closed: conns.filter((c) => c.closed).length };
    },
  };
};

// cfg.parallel workers, each connecting, completing the handshake and closing
// (and waiting for the close to complete), over and over.
scenarios.handshake = () => ({
  async setup() {
    return {};
  },
  async go() {
    let count = 0;
    let errors = 0;
    let firstError = null;
    let stop = false;
    const worker = async () => {
      while (!stop) {
        try {
          const conn = await openLean('/echo', 32, () => {});
          await withTimeout(conn.close(), REPLY_TIMEOUT, 'close');
          if (!stop) count++;
        } catch (err) {
          errors++;
          if (!firstError) firstError = err.message;
          await sleep(10);
        }
      }
    };
    const start = now();
    // Not awaited: each worker ends after its current attempt, which no
    // longer counts.
    for (let i = 0; i < cfg.parallel; i++) worker();
    await sleep(cfg.duration * 1000);
    stop = true;
    const elapsed = (now() - start) / 1000;
    return { count, elapsed, errors, firstError };
  },
});

// cfg.conns clients on /broadcast; the first also sends. It keeps at most
// cfg.window broadcasts in flight (counted from the deliveries), so the
// server's buffers stay small and never trip a slow-client limit. With
// cfg.ports (servers sharing a broker), the clients take each port in turn.
scenarios.broadcast = () => {
  let conns = [];
  let onDelivery = () => {};
  let closed = 0;
  let turn = 0;
  const opener = cfg.ports
    ? (path, size, onMessage) => openLean(path, size, onMessage, cfg.ports[turn++ % cfg.ports.length])
    : openLean;
  return {
    async setup() {
      const opened = await openMany(cfg.conns, '/broadcast', cfg.size, () => onDelivery(), 100, 0, opener);
      conns = opened.conns;
      if (opened.failed) throw new Error(`${opened.failed} connections failed: ${opened.firstError}`);
      for (const c of conns) c.onclose = () => closed++;
      return { conns: conns.length };
    },
    async go() {
      const msg = clientFrame(payload(cfg.size, false));
      const sender = conns[0];
      const n = conns.length;
      let delivered = 0;
      let sent = 0;
      let stop = false;
      let stalled = false;
      const pump = () => {
        const alive = n - closed;
        if (alive <= 0 || sender.closed) return;
        while (!stop && sent - Math.floor(delivered / alive) < cfg.window) {
          sender.send(msg);
          sent++;
        }
      };
      onDelivery = () => {
        if (stop) return;
        delivered++;
        pump();
      };
      const start = now();
      pump();
      // Ends after cfg.duration, or earlier if deliveries stop for 2 s.
      let last = -1;
      let quietSince = now();
      const deadline = start + cfg.duration * 1000;
      while (now() < deadline) {
        await sleep(Math.min(100, Math.max(1, deadline - now())));
        if (delivered !== last) {
          last = delivered;
          quietSince = now();
        } else if (now() - quietSince > 2000) {
          stalled = true;
          break;
        }
      }
      stop = true;
      const elapsed = (now() - start) / 1000;
      return { count: delivered, elapsed, sent, closed, stalled };
    },
  };
};

// Open cfg.conns connections and leave them idle. "go" then checks that the
// server still works: first a new client connects and makes cfg.rtts echo
// round trips, then every held connection sends one message at once (a
// stampede: every connection's thread or task wakes up together).
scenarios.hold = () => {
  let conns = [];
  let onReply = () => {};
  let lost = 0;
  return {
    async setup() {
      const opened = await openMany(cfg.conns, '/echo', 32, () => onReply(), cfg.parallel, cfg.maxFailures);
      conns = opened.conns;
      for (const c of conns) c.onclose = () => lost++;
      if (cfg.deflate) {
        // One compressed message each way per connection, echoed, before
        // the server's memory is read: whatever compression keeps per
        // connection after a message is then counted.
        let replies = 0;
        onReply = () => replies++;
        const msg = jsonPayload(2048);
        for (const c of conns) c.send(msg, false);
        const until = now() + REPLY_TIMEOUT;
        while (replies < conns.length && now() < until) await sleep(10);
        onReply = () => {};
      }
      return {
        held: conns.length,
        failed: opened.failed,
        firstError: opened.firstError,
        openSeconds: opened.openSeconds,
      };
    },
    async go() {
      const fresh = await probeOnce(cfg.rtts, cfg.probeTimeout * 1000);
      const msg = payload(32, false);
      const live = conns.filter((c) => !c.closed);
      let replies = 0;
      let allReplied;
      const all = new Promise((resolve) => (allReplied = resolve));
      onReply = () => {
        replies++;
        if (replies === live.length) allReplied();
      };
      const start = now();
      for (const c of live) c.send(msg, false);
      if (live.length === 0) allReplied();
      let echoAllSeconds = null;
      try {
        await withTimeout(all, cfg.echoTimeout * 1000, 'echo on every held connection');
        echoAllSeconds = (now() - start) / 1000;
      } catch (err) {
        // Reported as the count of replies that did arrive in time.
      }
      return { held: live.length, lost, replies, echoAllSeconds, ...fresh };
    },
  };
};

// A new client: connect, then `rounds` echo round trips.
// A new client: connect, then `rounds` echo round trips, all within
// `timeout` ms. timedOut tells a slow server from one that refused.
async function probeOnce(rounds, timeout) {
  const start = now();
  const left = () => Math.max(1, timeout - (now() - start));
  let replied = () => {};
  let conn = null;
  try {
    conn = await withTimeout(open('/echo', 32, () => replied()), left(), 'connecting');
    const connectMs = now() - start;
    const msg = payload(32, false);
    const rtts = [];
    for (let i = 0; i < rounds; i++) {
      const t = now();
      const reply = new Promise((resolve) => (replied = resolve));
      conn.send(msg, false);
      await withTimeout(reply, left(), 'echo on a new connection');
      rtts.push(now() - t);
    }
    const servedMs = now() - start;
    conn.close();
    return { ok: true, connectMs, rttMs: median(rtts), servedMs };
  } catch (err) {
    const servedMs = now() - start;
    return { ok: false, error: err.message, timedOut: servedMs >= timeout - 1, servedMs };
  }
}

// Waits, with no connection, for "go"; then serves as the new client of the
// mass-disconnect scenario.
scenarios.probe = () => ({
  async setup() {
    return {};
  },
  async go() {
    return probeOnce(1, cfg.probeTimeout * 1000);
  },
});

// -- The command loop ----------------------------------------------------------

async function main() {
  const make = scenarios[cfg.mode];
  if (!make) throw new Error(`unknown mode ${cfg.mode}`);
  const scenario = make();
  setTimeout(() => fail(new Error(`still running after ${cfg.lifetime} s`)), cfg.lifetime * 1000).unref();

  if (cfg.warm !== false) await warmUp();
  emit('warm', {});

  const commands = [];
  let wake = null;
  const lines = readline.createInterface({ input: process.stdin });
  lines.on('line', (line) => {
    commands.push(line.trim());
    if (wake) wake();
  });
  lines.on('close', () => process.exit(0));
  const nextCommand = async () => {
    while (!commands.length) await new Promise((resolve) => (wake = resolve));
    return commands.shift();
  };

  for (;;) {
    const command = await nextCommand();
    if (command === 'setup') emit('ready', await scenario.setup());
    else if (command === 'go') emit('result', await scenario.go());
    else if (command === 'exit') process.exit(0);
  }
}

main().catch(fail);
