import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { FrameDecoder, encodeFrame } from '../src/protocol/framing.js';
import { parseLayerMessage, sessionMessageToWire } from '../src/session/layer-messages.js';
import { untilAccepted } from './support/accepted.js';

// The LD_PRELOAD layer (layer/layer.c) in real programs: node and python3 servers, real sockets,
// loopback only. A small unix-socket server stands in for the session, speaking the channel's
// messages (src/session/layer-messages.ts). Build first: make -C layer.

const LAYER = resolve('layer/.output/mirrord_layer.so');
const PYTHON = '/usr/bin/python3'; // not the pyenv shim: it must also run as nobody
const NODE = process.execPath;
// One base per run, so a leftover of an earlier run cannot collide.
const BASE = 21000 + Math.floor(Math.random() * 80) * 100;

interface LayerEvent {
  event: string;
  pid: number;
  port: number;
  local_port?: number;
  family?: number;
  address?: string;
  token?: string;
  conn: number; // which unix connection it came on
}

/** Stand-in for the session's side of the layer socket. */
class FakeSession {
  readonly events: LayerEvent[] = [];
  readonly hellos: LayerEvent[] = [];
  readonly conns: net.Socket[] = [];
  readonly ended = new Set<number>();
  private waiters: (() => void)[] = [];
  private constructor(
    readonly path: string,
    private readonly server: net.Server,
  ) {}

  static async start(dir: string): Promise<FakeSession> {
    const path = join(dir, 'layer.sock');
    const server = net.createServer();
    const session = new FakeSession(path, server);
    server.on('connection', (c) => session.accept(c));
    await new Promise<void>((ok) => server.listen(path, ok));
    chmodSync(path, 0o777); // reachable by an app running as nobody
    return session;
  }

  private accept(c: net.Socket): void {
    const id = this.conns.push(c) - 1;
    const decoder = new FrameDecoder(parseLayerMessage);
    c.on('data', (d: Buffer) => {
      for (const message of decoder.push(d)) {
        const { type, ...fields } = message;
        const event: LayerEvent = {
          event: type,
          port: 0,
          ...fields,
          ...('localPort' in fields ? { local_port: fields.localPort } : {}),
          conn: id,
        };
        // Every connection opens with a hello; the events under test are what follows it.
        if (event.event === 'hello') this.hellos.push(event);
        else this.events.push(event);
      }
      this.wake();
    });
    c.on('error', () => {});
    c.on('close', () => {
      this.ended.add(id);
      this.wake();
    });
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  async until<T>(what: string, check: () => T | undefined, ms = 10000): Promise<T> {
    const deadline = Date.now() + ms;
    for (;;) {
      const v = check();
      if (v !== undefined && v !== false) return v;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${what}; events: ${this.dump()}`);
      await new Promise<void>((ok) => {
        const t = setTimeout(ok, Math.min(left, 200));
        this.waiters.push(() => {
          clearTimeout(t);
          ok();
        });
      });
    }
  }

  listenEvent(port: number, pid?: number): Promise<LayerEvent> {
    return this.until(`listen ${port}`, () =>
      this.events.find((e) => e.event === 'listen' && e.port === port && (!pid || e.pid === pid)),
    );
  }

  closeEvent(port: number, pid?: number): Promise<LayerEvent> {
    return this.until(`close ${port}`, () =>
      this.events.find((e) => e.event === 'close' && e.port === port && (!pid || e.pid === pid)),
    );
  }

  /** The original client of the connection from `sourcePort` to the app's `localPort`. */
  sendPeer(
    conn: number,
    sourcePort: number,
    localPort: number,
    address: string,
    port: number,
  ): void {
    this.conns[conn]!.write(
      encodeFrame([
        sessionMessageToWire({ type: 'peer', sourcePort, localPort, address, port, socket: null }),
      ]),
    );
  }

  dump(): string {
    return JSON.stringify(this.events);
  }

  async stop(): Promise<void> {
    for (const c of this.conns) c.destroy();
    await new Promise<void>((ok) => this.server.close(() => ok()));
  }
}

interface App {
  child: ChildProcess;
  stdout: () => string;
  stderr: () => string;
  line: (re: RegExp) => Promise<RegExpMatchArray>;
  exited: Promise<number | null>;
}

const TOKEN = 'f00dfeed';
const running = new Set<ChildProcess>();
let dir: string;
let session: FakeSession;

function start(argv: string[], env: Record<string, string | undefined>): App {
  // Own process group, so afterEach kills forked children and runuser's child too.
  const [cmd, ...args] = argv;
  if (!cmd) throw new Error('no command');
  const child = spawn(cmd, args, {
    env: { PATH: process.env.PATH, HOME: dir, ...env },
    stdio: ['pipe', 'pipe', 'pipe'],
    detached: true,
  });
  running.add(child);
  let out = '';
  let err = '';
  const waiters: (() => void)[] = [];
  child.stdout!.setEncoding('utf8').on('data', (d: string) => {
    out += d;
    for (const w of waiters.splice(0)) w();
  });
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  const exited = new Promise<number | null>((ok) =>
    child.on('exit', (code) => {
      running.delete(child);
      for (const w of waiters.splice(0)) w();
      ok(code);
    }),
  );
  const line = async (re: RegExp): Promise<RegExpMatchArray> => {
    const deadline = Date.now() + 10000;
    for (;;) {
      const m = out.match(re);
      if (m) return m;
      if (child.exitCode !== null || Date.now() > deadline)
        throw new Error(`no ${re} in stdout ${JSON.stringify(out)}, stderr ${JSON.stringify(err)}`);
      await new Promise<void>((ok) => {
        const t = setTimeout(ok, 200);
        waiters.push(() => {
          clearTimeout(t);
          ok();
        });
      });
    }
  };
  return { child, stdout: () => out, stderr: () => err, line, exited };
}

function layered(argv: string[], extra: Record<string, string | undefined> = {}): App {
  return start(argv, {
    LD_PRELOAD: LAYER,
    MIRRORD_LAYER_SOCKET: session.path,
    MIRRORD_LAYER_TOKEN: TOKEN,
    ...extra,
  });
}

function httpGet(port: number): Promise<string> {
  return new Promise((ok, fail) => {
    const c = net.connect(port, '127.0.0.1', () =>
      c.end('GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'),
    );
    let body = '';
    c.setEncoding('utf8').on('data', (d: string) => (body += d));
    c.on('end', () => ok(body));
    c.on('error', fail);
  });
}

/** Connects to the app, lets `beforeRequest` run with the connection's source port, then sends
 * a GET and returns the response. */
function exchange(
  port: number,
  beforeRequest: (localPort: number) => Promise<void>,
): Promise<string> {
  return new Promise((ok, fail) => {
    // From the session's replay source, the only peer the layer waits for.
    const c = net.connect({ port, host: '127.0.0.1', localAddress: '127.0.0.2' }, () => {
      beforeRequest(c.localPort!).then(
        () => c.end('GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'),
        fail,
      );
    });
    let body = '';
    c.setEncoding('utf8').on('data', (d: string) => (body += d));
    c.on('end', () => ok(body));
    c.on('error', fail);
  });
}

// A node HTTP server that answers with the peer it sees and its own view of its port.
const NODE_ECHO = `
const http = require('http');
const [port, host] = [Number(process.argv[1]), process.argv[2] || '127.0.0.1'];
const s = http.createServer((req, res) =>
  res.end(req.socket.remoteAddress + ':' + req.socket.remotePort + ' local ' + req.socket.localPort));
s.listen(port, host, () => console.log('ready ' + s.address().port));
process.stdin.on('data', () => s.close(() => console.log('closed')));
`;

beforeAll(() => {
  if (!existsSync(LAYER)) throw new Error(`${LAYER} missing: run make -C layer`);
});

beforeEach(async () => {
  dir = mkdtempSync(join(tmpdir(), 'mirrord-layer-'));
  chmodSync(dir, 0o755);
  session = await FakeSession.start(dir);
});

afterEach(async () => {
  for (const child of running) {
    try {
      process.kill(-child.pid!, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  await Promise.all(
    [...running].map((c) => new Promise((ok) => (c.exitCode !== null ? ok(0) : c.on('exit', ok)))),
  );
  await session.stop();
  rmSync(dir, { recursive: true, force: true });
});

describe('listen and close events', () => {
  test('a node http server reports listen, and close when the server closes', async () => {
    const port = BASE + 1;
    const app = layered([NODE, '-e', NODE_ECHO, String(port)]);
    await app.line(/ready (\d+)/);
    const ev = await session.listenEvent(port);
    expect(ev).toMatchObject({ pid: app.child.pid, port, local_port: port, family: 4 });
    expect(ev.address).toBe('127.0.0.1');
    // The connection opened with the token from the app's environment.
    expect(session.hellos.find((h) => h.conn === ev.conn)).toMatchObject({
      pid: app.child.pid,
      token: TOKEN,
    });
    expect(await httpGet(port)).toMatch(/127\.0\.0\.1:\d+ local \d+$/);

    app.child.stdin!.write('close\n');
    await app.line(/closed/);
    const closed = await session.closeEvent(port);
    expect(closed).toMatchObject({ pid: app.child.pid, port, conn: ev.conn });
    expect(app.stderr()).toBe('');
  });

  test('python3 http.server reports listen; its exit drops the connection', async () => {
    const port = BASE + 2;
    const app = layered([PYTHON, '-u', '-m', 'http.server', String(port), '--bind', '127.0.0.1']);
    await app.line(new RegExp(`Serving HTTP on 127\\.0\\.0\\.1 port ${port}`));
    const ev = await session.listenEvent(port);
    expect(ev).toMatchObject({ pid: app.child.pid, port, local_port: port, family: 4 });
    expect(await httpGet(port)).toMatch(/^HTTP\/1\.0 200/);

    // The process's own connection ending is how the session learns of an exit (no close line
    // can be sent by a killed process).
    app.child.kill('SIGTERM');
    await app.exited;
    await session.until('connection end', () => session.ended.has(ev.conn));
  });

  test('a socket closed through one of two fds is reported only when the last fd closes', async () => {
    const [a, marker] = [BASE + 3, BASE + 4];
    const script = `
import os, socket
s = socket.socket(); s.bind(('127.0.0.1', ${a})); s.listen()
d = os.dup(s.fileno())
d2 = os.dup2(d, 100)       # a third fd for the same socket
s.close()                  # two fds left: no close event
m = socket.socket(); m.bind(('127.0.0.1', ${marker})); m.listen()   # marker, same connection
os.close(d)                # one left
os.close(100)              # last one: close event
print('done', flush=True)
import time; time.sleep(30)
`;
    const app = layered([PYTHON, '-c', script]);
    await app.line(/done/);
    await session.closeEvent(a);
    const mine = session.events.map((e) => `${e.event} ${e.port}`);
    expect(mine).toEqual([`listen ${a}`, `listen ${marker}`, `close ${a}`]);
  });
});

describe('a taken or privileged port still binds', () => {
  test('a port taken by another process: the app binds elsewhere and sees the requested port', async () => {
    const port = BASE + 5;
    const other = net.createServer();
    await new Promise<void>((ok) => other.listen(port, '127.0.0.1', ok));
    try {
      const app = layered([NODE, '-e', NODE_ECHO, String(port)]);
      const [, seen] = await app.line(/ready (\d+)/);
      expect(Number(seen)).toBe(port); // server.address().port: getsockname lies consistently
      const ev = await session.listenEvent(port);
      expect(ev.pid).toBe(app.child.pid);
      expect(ev.local_port).toBeGreaterThan(0);
      expect(ev.local_port).not.toBe(port);
      // The app really serves on local_port, and its accepted sockets agree on the port too.
      expect(await httpGet(ev.local_port!)).toMatch(
        new RegExp(`127\\.0\\.0\\.1:\\d+ local ${port}$`),
      );

      app.child.stdin!.write('close\n');
      await session.closeEvent(port);
      expect(app.stderr()).toBe('');
    } finally {
      await new Promise((ok) => other.close(ok));
    }
  });

  test('a non-root app binding port 80 works the same way', async () => {
    const app = layered(['runuser', '-u', 'nobody', '--', NODE, '-e', NODE_ECHO, '80']);
    const [, seen] = await app.line(/ready (\d+)/);
    expect(Number(seen)).toBe(80);
    const ev = await session.listenEvent(80);
    expect(ev.local_port).not.toBe(80);
    expect(ev.local_port).toBeGreaterThan(1023);
    expect(await httpGet(ev.local_port!)).toMatch(/127\.0\.0\.1:\d+ local 80$/);
  });
});

describe('accept reports the original client', () => {
  test('node on AF_INET: accept and remoteAddress show the client the session names', async () => {
    const port = BASE + 6;
    const app = layered([NODE, '-e', NODE_ECHO, String(port)]);
    await app.line(/ready/);
    const ev = await session.listenEvent(port);

    // Mapping sent once the app has accepted: its accept has to wait for it.
    const mapped = await exchange(ev.local_port!, async (localPort) => {
      await untilAccepted(ev.local_port!, localPort);
      session.sendPeer(ev.conn, localPort, ev.local_port!, '10.213.9.9', 40000);
    });
    expect(mapped).toMatch(/\r\n\r\n10\.213\.9\.9:40000 local \d+$/);

    // No mapping: the real loopback peer, after the brief wait.
    let src = 0;
    const plain = await exchange(ev.local_port!, async (localPort) => {
      src = localPort;
    });
    expect(plain).toMatch(new RegExp(`\\r\\n\\r\\n127\\.0\\.0\\.2:${src} local \\d+$`));

    // Any other loopback client (a developer's curl) is neither delayed nor rewritten.
    expect(await httpGet(ev.local_port!)).toMatch(/\r\n\r\n127\.0\.0\.1:\d+ local \d+$/);
  });

  test('python on AF_INET6 (v4-mapped): accept and getpeername agree, short buffers too', async () => {
    const port = BASE + 7;
    const script = `
import socket, ctypes, ctypes.util, struct
s = socket.socket(socket.AF_INET6); s.bind(('::ffff:127.0.0.1', ${port})); s.listen()
print('ready', flush=True)
libc = ctypes.CDLL(None, use_errno=True)
while True:
    c, addr = s.accept()
    # getpeername with a buffer too short for sockaddr_in6: truncated, full length returned
    buf = ctypes.create_string_buffer(28); n = ctypes.c_uint32(8)
    libc.getpeername(c.fileno(), buf, ctypes.byref(n))
    short_port = struct.unpack('!H', buf.raw[2:4])[0]
    print('peer', addr[0], addr[1], c.getpeername()[0], c.getpeername()[1], n.value, short_port, flush=True)
    c.close()
`;
    const app = layered([PYTHON, '-c', script]);
    await app.line(/ready/);
    const ev = await session.listenEvent(port);
    expect(ev.family).toBe(6);
    await new Promise<void>((ok, fail) => {
      const c = net.connect(
        { port: ev.local_port!, host: '127.0.0.1', localAddress: '127.0.0.2' },
        () => {
          session.sendPeer(ev.conn, c.localPort!, ev.local_port!, '10.213.9.9', 40000);
          ok();
        },
      );
      c.on('error', fail);
      c.on('data', () => {});
    });
    const [line] = await app.line(/peer .*\n/);
    expect(line.trim()).toBe('peer ::ffff:10.213.9.9 40000 ::ffff:10.213.9.9 40000 28 40000');
  });
});

describe('without a session', () => {
  test('no MIRRORD_LAYER_SOCKET: nothing extra is printed and a taken port fails as usual', async () => {
    const port = BASE + 8;
    const ok = start([NODE, '-e', NODE_ECHO, String(port)], { LD_PRELOAD: LAYER });
    await ok.line(/ready/);
    expect(ok.stdout()).toBe(`ready ${port}\n`);
    expect(await httpGet(port)).toMatch(/127\.0\.0\.1:\d+ local \d+$/);

    const taken = start([NODE, '-e', NODE_ECHO, String(port)], { LD_PRELOAD: LAYER });
    expect(await taken.exited).not.toBe(0);
    expect(taken.stderr()).toMatch(/EADDRINUSE/);
    expect(taken.stderr()).not.toMatch(/mirrord/);
    expect(ok.stderr()).toBe('');
  });

  test('a socket path nobody listens on: the app runs unhooked and silent', async () => {
    const port = BASE + 9;
    const nowhere = { LD_PRELOAD: LAYER, MIRRORD_LAYER_SOCKET: join(dir, 'nobody.sock') };
    const ok = start([NODE, '-e', NODE_ECHO, String(port)], nowhere);
    await ok.line(/ready/);
    expect(await httpGet(port)).toMatch(/127\.0\.0\.1:\d+ local \d+$/);
    const taken = start([NODE, '-e', NODE_ECHO, String(port)], nowhere);
    expect(await taken.exited).not.toBe(0);
    expect(taken.stderr()).toMatch(/EADDRINUSE/);
    ok.child.stdin!.write('close\n');
    await ok.line(/closed/);
    expect(ok.stdout()).toBe(`ready ${port}\nclosed\n`);
    expect(ok.stderr()).toBe('');
    expect(session.events).toEqual([]);
  });
});

describe('children are covered', () => {
  test('python: a forked child reports on its own connection; inherited fds stay the parent’s', async () => {
    const [parentPort, childPort] = [BASE + 10, BASE + 11];
    const script = `
import os, socket, time
p = socket.socket(); p.bind(('127.0.0.1', ${parentPort})); p.listen()
pid = os.fork()
if pid == 0:
    p.close()   # the parent's listener: the child must not report it closed
    c = socket.socket(); c.bind(('127.0.0.1', ${childPort})); c.listen()
    print('child', os.getpid(), flush=True)
    time.sleep(0.2)
    c.close()
    time.sleep(30)
else:
    time.sleep(30)
`;
    const app = layered([PYTHON, '-c', script]);
    const [, childPid] = await app.line(/child (\d+)/);
    const parent = await session.listenEvent(parentPort);
    const child = await session.listenEvent(childPort);
    expect(parent.pid).toBe(app.child.pid);
    expect(child.pid).toBe(Number(childPid));
    expect(child.conn).not.toBe(parent.conn);
    const closed = await session.closeEvent(childPort);
    expect(closed).toMatchObject({ pid: Number(childPid), conn: child.conn });
    // The child closed the parent's listener before it listened on its own port, and its
    // connection delivers in order: a close of the parent's port would have come before these.
    expect(session.events.filter((e) => e.port === parentPort).map((e) => e.event)).toEqual([
      'listen',
    ]);
  });

  test('node: a spawned child node server is covered, taken port and peer rewrite included', async () => {
    const port = BASE + 12;
    const other = net.createServer();
    await new Promise<void>((ok) => other.listen(port, '127.0.0.1', ok));
    try {
      const parentScript = `
const { spawn } = require('child_process');
const c = spawn(process.execPath, ['-e', process.argv[1], process.argv[2]], { stdio: 'inherit' });
console.log('spawned ' + c.pid);
`;
      const app = layered([NODE, '-e', parentScript, NODE_ECHO, String(port)]);
      const [, childPid] = await app.line(/spawned (\d+)/);
      const [, seen] = await app.line(/ready (\d+)/);
      expect(Number(seen)).toBe(port);
      const ev = await session.listenEvent(port);
      expect(ev.pid).toBe(Number(childPid));
      expect(ev.local_port).not.toBe(port);
      const body = await exchange(ev.local_port!, async (localPort) => {
        session.sendPeer(ev.conn, localPort, ev.local_port!, '10.213.9.9', 40000);
      });
      expect(body).toMatch(new RegExp(`10\\.213\\.9\\.9:40000 local ${port}$`));
    } finally {
      await new Promise((ok) => other.close(ok));
    }
  });
});
