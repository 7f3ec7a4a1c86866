/**
 * The replay end to end: real clients in a sandbox netns talk to a real service in the target
 * netns, a real agent mirrors those connections, and the replay writes them into a real local
 * app listening on 127.0.0.1 in this (root) netns.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import http from 'node:http';
import net from 'node:net';
import { createInterface } from 'node:readline';
import { waitForTcp } from '../src/platform/local/netns.js';
import type { Endpoint } from '../src/protocol/messages.js';
import {
  Replay,
  type ReplayAccount,
  type ReplayEndInfo,
  type ReplayOptions,
} from '../src/session/replay.js';
import { expectReplayAccounted } from './support/accounting.js';
import { MirrorSession } from './support/mirror-session.js';
import { pythonClient, sinkServer, stdinClient, untilAcked } from './support/programs.js';
import { createSandbox, type Sandbox } from './support/sandbox.js';
import { waitFor } from './support/wait.js';

const PORT = 7000;
const APP_PORT = 34_517;
const LOCAL = '127.0.0.1';

const SINK_SERVER = sinkServer(PORT);

/** Connections one after the other, each sending three pipelined HTTP requests of its own. */
const HTTP_CLIENT = `
import json, socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for i in range(count):
    s = socket.create_connection((host, port))
    sent = b""
    for j in range(3):
        body = f"body of request {j} on connection {i}: ".encode() + bytes([65 + i + j]) * (100 * i + j)
        request = f"POST /c{i}/r{j} HTTP/1.1\\r\\nHost: staging\\r\\nContent-Length: {len(body)}\\r\\n\\r\\n".encode() + body
        s.sendall(request)
        sent += request
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536): pass
    out.append({"port": s.getsockname()[1], "sent": sent.hex()})
    s.close()
print(json.dumps(out))
`;

/** One connection closed with a FIN, one reset (SO_LINGER 0), each after sending its bytes. */
const FIN_RST_CLIENT = `
import fcntl, socket, struct, sys, termios, time
host, port = sys.argv[1], int(sys.argv[2])
a = socket.create_connection((host, port))
a.sendall(b"closed with fin")
a.shutdown(socket.SHUT_WR)
while a.recv(65536): pass
a.close()
b = socket.create_connection((host, port))
b.sendall(b"closed with rst")
# Reset only once the target acknowledged the bytes (nothing left in b's send queue).
while struct.unpack("i", fcntl.ioctl(b, termios.TIOCOUTQ, b"\\0" * 4))[0] > 0:
    time.sleep(0.01)
b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
b.close()
`;

/**
 * Sends SIZE random bytes, waits until the target acknowledged them all (nothing left in its
 * socket), then resets the connection; prints their sha256.
 */
const SEND_THEN_RESET_CLIENT = `
import fcntl, hashlib, os, socket, struct, sys, termios, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
data = os.urandom(int(sys.argv[3]))
s.sendall(data)
while struct.unpack("i", fcntl.ioctl(s, termios.TIOCOUTQ, b"\\0" * 4))[0] > 0:
    time.sleep(0.01)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
print(hashlib.sha256(data).hexdigest())
`;

/**
 * A large upload to a slow app and a smaller one, at the same time; prints the small one. Paced
 * (SO_MAX_PACING_RATE, 50 MB/s) so that the agent keeps up and only the replay drops anything.
 */
const SLOW_AND_FAST_CLIENT = `
import asyncio, hashlib, json, os, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
async def send(data):
    reader, writer = await asyncio.open_connection(host, port)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, 47, 50_000_000)
    writer.write(data)
    await writer.drain()
    writer.write_eof()
    await reader.read()
    writer.close()
async def main():
    fast = b"FAST" + os.urandom(2 << 20)
    await asyncio.gather(send(b"SLOW" + os.urandom(16 << 20)), send(fast))
    print(json.dumps({"sha256": hashlib.sha256(fast).hexdigest(), "bytes": len(fast)}))
asyncio.run(main())
`;

/** Sends one message and closes. */
const ONE_SHOT_CLIENT = `
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(sys.argv[3].encode())
s.shutdown(socket.SHUT_WR)
while s.recv(65536): pass
s.close()
`;

/** The local app as its own process, so that it can be killed: one JSON line per event. */
const APP_PROCESS = `
require('net').createServer((s) => {
  s.on('data', (d) => console.log(JSON.stringify({ port: s.remotePort, data: d.toString() })));
  s.on('error', () => {});
}).listen(${APP_PORT}, '${LOCAL}', () => console.log(JSON.stringify({ listening: true })));`;

interface AppConnection {
  remotePort: number;
  chunks: Buffer[];
  ended: boolean;
  errorCode: string | undefined;
}

interface LocalApp {
  connections: AppConnection[];
  close(): Promise<void>;
}

/** Records what each connection to `server` receives and how it ends. */
async function listen(
  server: net.Server,
  onData?: (socket: net.Socket, connection: AppConnection) => void,
): Promise<LocalApp> {
  const connections: AppConnection[] = [];
  const sockets = new Set<net.Socket>();
  server.on('connection', (socket: net.Socket) => {
    const connection: AppConnection = {
      remotePort: socket.remotePort as number,
      chunks: [],
      ended: false,
      errorCode: undefined,
    };
    connections.push(connection);
    sockets.add(socket);
    socket.on('data', (chunk: Buffer) => {
      connection.chunks.push(chunk);
      onData?.(socket, connection);
    });
    socket.on('end', () => {
      connection.ended = true;
    });
    socket.on('error', (error: NodeJS.ErrnoException) => {
      connection.errorCode = error.code;
    });
    socket.on('close', () => sockets.delete(socket));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(APP_PORT, LOCAL, resolve);
  });
  return {
    connections,
    async close() {
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

function bytesOf(connection: AppConnection): Buffer {
  return Buffer.concat(connection.chunks);
}

async function until(done: () => boolean, what: string, timeoutMs = 15_000): Promise<void> {
  await waitFor(what, done, { ms: timeoutMs, everyMs: 20 });
}

describe('replay into a local app', () => {
  let sandbox: Sandbox;
  let session: MirrorSession | undefined;
  const cleanups: (() => Promise<void> | void)[] = [];
  /** Every replay of the test with its final counts, checked once it is closed. */
  const replays: { replay: Replay; accounts: ReplayAccount[] }[] = [];

  beforeEach(async () => {
    sandbox = createSandbox('replay');
    sandbox.spawn(sandbox.target, process.execPath, ['-e', SINK_SERVER]);
    await waitForTcp(sandbox.client, sandbox.targetAddress, PORT);
  });

  afterEach(async () => {
    try {
      for (const { replay, accounts } of replays.splice(0)) {
        await replay.close();
        expectReplayAccounted(replay.stats(), accounts);
      }
    } finally {
      for (const cleanup of cleanups.splice(0).reverse()) {
        await Promise.resolve(cleanup()).catch(() => undefined);
      }
      await session?.stop().catch(() => undefined);
      session = undefined;
      sandbox.destroy();
    }
  });

  async function startSession(): Promise<MirrorSession> {
    session = await MirrorSession.start({ netns: sandbox.target }, [PORT]);
    return session;
  }

  function startReplay(current: MirrorSession, options: Partial<ReplayOptions> = {}): Replay {
    const replay = new Replay(current.client, {
      route: (port) => (port === PORT ? { host: LOCAL, port: APP_PORT } : undefined),
      ...options,
    });
    cleanups.push(() => replay.close());
    const accounts: ReplayAccount[] = [];
    replay.on('accounted', (account) => accounts.push(account));
    replays.push({ replay, accounts });
    return replay;
  }

  function endsOf(replay: Replay): ReplayEndInfo[] {
    const ends: ReplayEndInfo[] = [];
    replay.on('connectionEnd', (end) => ends.push(end));
    return ends;
  }

  test('an HTTP app gets every request byte-exact and in order, from the original peer', async () => {
    const requests = new Map<number, string[]>();
    const server = http.createServer((request, response) => {
      const urls = requests.get(request.socket.remotePort as number) ?? [];
      urls.push(request.url as string);
      requests.set(request.socket.remotePort as number, urls);
      request.resume();
      request.on('end', () => response.end('local answer'));
    });
    const app = await listen(server);
    cleanups.push(() => app.close());
    const current = await startSession();
    const peers = new Map<number, Endpoint>();
    const replay = startReplay(current, {
      onConnected: (sourcePort, appPort, original) => {
        expect(appPort).toBe((server.address() as net.AddressInfo).port);
        peers.set(sourcePort, original);
      },
    });
    const sent = JSON.parse(await pythonClient(sandbox, HTTP_CLIENT, PORT, '4')) as {
      port: number;
      sent: string;
    }[];
    await until(
      () => replay.stats().completed === 4 && app.connections.filter((c) => c.ended).length === 4,
      'four replayed connections to end',
    );
    expect(app.connections).toHaveLength(4);
    for (const [i, expected] of sent.entries()) {
      const localPort = [...peers].find(([, peer]) => peer.port === expected.port)?.[0];
      expect(peers.get(localPort as number)).toEqual({
        address: sandbox.clientAddress,
        port: expected.port,
      });
      const connection = app.connections.find((c) => c.remotePort === localPort);
      expect(bytesOf(connection as AppConnection).toString('hex')).toBe(expected.sent);
      expect(connection?.ended).toBe(true);
      expect(requests.get(localPort as number)).toEqual([`/c${i}/r0`, `/c${i}/r1`, `/c${i}/r2`]);
    }
    expect(replay.stats()).toMatchObject({
      opened: 4,
      replayed: 4,
      completed: 4,
      bytesDropped: 0,
      bytesReplayed: sent.reduce((n, s) => n + s.sent.length / 2, 0),
    });
    // Every byte's lag was measured, from the tap's stamp to the hand-over to the app.
    const { lagP50Ms, lagP99Ms } = replay.stats();
    expect(lagP50Ms).toBeGreaterThan(0);
    expect(lagP99Ms).toBeGreaterThanOrEqual(lagP50Ms as number);
  });

  test('when the agent dies, open replayed connections are reset, not ended as if complete', async () => {
    const app = await listen(net.createServer());
    cleanups.push(() => app.close());
    const current = await startSession();
    const replay = startReplay(current);
    const ends = endsOf(replay);
    const client = stdinClient(sandbox, PORT);
    cleanups.push(() => void client.kill('SIGKILL'));
    client.stdin!.write('half of a request');
    await until(() => app.connections[0]?.chunks.length === 1, 'the first bytes to arrive');
    process.kill(current.agent.pid, 'SIGKILL');
    await until(() => ends.length === 1, 'the replayed connection to end');
    expect(ends[0]).toMatchObject({ reason: 'sessionEnded', bytesReplayed: 17 });
    await until(() => app.connections[0]?.errorCode !== undefined, 'the app to see the reset');
    expect(app.connections[0]).toMatchObject({ errorCode: 'ECONNRESET', ended: false });
    expect(replay.stats()).toMatchObject({ replayed: 1, droppedSessionEnded: 1 });
    session = undefined;
  });

  test("the client's FIN is replayed as a FIN and its RST as an RST", async () => {
    const app = await listen(net.createServer());
    cleanups.push(() => app.close());
    const current = await startSession();
    const replay = startReplay(current);
    const ends = endsOf(replay);
    await pythonClient(sandbox, FIN_RST_CLIENT, PORT);
    await until(() => ends.length === 2, 'both connections to end');
    await until(
      () => app.connections.filter((c) => c.ended || c.errorCode).length === 2,
      'the app to see both ends',
    );
    const [fin, rst] = app.connections;
    expect(bytesOf(fin as AppConnection).toString()).toBe('closed with fin');
    expect(fin).toMatchObject({ ended: true, errorCode: undefined });
    expect(bytesOf(rst as AppConnection).toString()).toBe('closed with rst');
    expect(rst).toMatchObject({ ended: false, errorCode: 'ECONNRESET' });
    expect(ends.map((e) => e.reason)).toEqual(['fin', 'rst']);
    expect(replay.stats()).toMatchObject({ completed: 2, bytesDropped: 0 });
  });

  // A client's RST replayed at once discarded what the app had not read yet (in our socket and
  // in its own), and the connection was reported 'rst' with nothing dropped.
  test("a client's RST reaches the app after it read every byte before it; bytes it never reads are counted", async () => {
    // The app reads nothing of a connection until the test resumes it (not even into Node's
    // buffers, which would count as taken: the kernel no longer holds those bytes).
    const paused: net.Socket[] = [];
    const server = net.createServer({ pauseOnConnect: true });
    server.on('connection', (socket: net.Socket) => paused.push(socket));
    const app = await listen(server);
    cleanups.push(() => app.close());
    const current = await startSession();
    const replay = startReplay(current, { lingerMs: 3000 });
    const ends = endsOf(replay);
    const size = 512 * 1024; // several times what the app's socket holds unread
    const first = await pythonClient(sandbox, SEND_THEN_RESET_CLIENT, PORT, String(size));
    await until(() => paused.length === 1, 'the app to accept the first connection');
    await pythonClient(sandbox, SEND_THEN_RESET_CLIENT, PORT, String(size));
    await current.until(() => current.closedConnections().length === 2, 'both resets');
    expect(current.closedConnections().map((c) => c.closed?.reason)).toEqual(['rst', 'rst']);
    // The replay holds both resets while the app has not read.
    expect(ends).toEqual([]);

    paused[0]!.resume();
    await until(() => ends.length === 1, 'the first reset to be replayed');
    expect(ends[0]).toMatchObject({ reason: 'rst', bytesReplayed: size, bytesDropped: 0 });
    await until(() => app.connections[0]?.errorCode !== undefined, 'the app to see the reset');
    const got = bytesOf(app.connections[0] as AppConnection);
    expect(createHash('sha256').update(got).digest('hex')).toBe(first.trim());
    expect(app.connections[0]).toMatchObject({ errorCode: 'ECONNRESET', ended: false });

    // The other is never read: given up after lingerMs, and what the app did not take counted.
    await until(() => ends.length === 2, 'the unread connection to be given up', 15_000);
    expect(ends[1]).toMatchObject({ reason: 'slow', bytesReplayed: 0, bytesDropped: size });
    expect(bytesOf(app.connections[1] as AppConnection)).toHaveLength(0);
    expect(replay.stats()).toMatchObject({
      completed: 1,
      droppedSlow: 1,
      bytesReplayed: size,
      bytesDropped: size,
    });
  });

  test('connections joined mid-stream are skipped unless asked for', async () => {
    const app = await listen(net.createServer());
    cleanups.push(() => app.close());
    const client = stdinClient(sandbox, PORT);
    client.stdin!.write('sent before mirroring\n');
    await untilAcked(sandbox, PORT, 'sent before mirroring\n'.length);
    const current = await startSession();
    const byDefault = startReplay(current);
    const withMidStream = startReplay(current, { midStream: true });
    const ends = endsOf(withMidStream);
    client.stdin!.end('sent while mirrored\n');
    await until(() => ends.length === 1, 'the mid-stream connection to end');
    await until(() => app.connections[0]?.ended === true, 'the app to see the end');
    expect(app.connections).toHaveLength(1);
    expect(bytesOf(app.connections[0] as AppConnection).toString()).toBe('sent while mirrored\n');
    expect(byDefault.stats()).toMatchObject({
      opened: 1,
      replayed: 0,
      skippedMidStream: 1,
      bytesSkipped: 'sent while mirrored\n'.length,
    });
    expect(withMidStream.stats()).toMatchObject({ opened: 1, replayed: 1, completed: 1 });
    expect(ends[0]?.reason).toBe('fin');
  });

  test.each([
    ['its own bound', { maxBufferedPerConnection: 1 << 20 }],
    ['the bound of all connections', { maxBufferedTotal: 1 << 20 }],
  ])(
    'a connection the app reads too slowly is dropped at %s, the others go on',
    async (_, bounds) => {
      // The app stops reading the big upload after its first chunk.
      const app = await listen(net.createServer(), (socket, connection) => {
        if (connection.chunks[0]?.subarray(0, 4).toString() === 'SLOW') socket.pause();
      });
      cleanups.push(() => app.close());
      const current = await startSession();
      const replay = startReplay(current, bounds);
      const ends = endsOf(replay);
      const fast = JSON.parse(await pythonClient(sandbox, SLOW_AND_FAST_CLIENT, PORT)) as {
        sha256: string;
        bytes: number;
      };
      await until(() => ends.length === 2, 'both connections to end');
      // The agent's closed messages come after all their data.
      await current.until(() => current.closedConnections().length === 2, 'both to be closed');
      const fastApp = app.connections.find((c) => bytesOf(c).subarray(0, 4).toString() === 'FAST');
      await until(() => fastApp?.ended === true, 'the fast connection to end in the app');
      const digest = createHash('sha256').update(bytesOf(fastApp as AppConnection));
      expect(digest.digest('hex')).toBe(fast.sha256);
      expect(ends.map((e) => e.reason).sort()).toEqual(['fin', 'slow']);
      const stats = replay.stats();
      expect(stats).toMatchObject({ completed: 1, droppedSlow: 1 });
      expect(stats.bytesDropped).toBeGreaterThan(0);
      const mirrored = [...current.connections.values()];
      expect(mirrored.map((c) => c.closed?.reason)).toEqual(['fin', 'fin']);
      expect(stats.bytesReplayed + stats.bytesDropped).toBe(fast.bytes + 4 + (16 << 20));
      expect(replay.buffered).toBe(0);
    },
  );

  test('an app killed mid-session costs only its connections, and a restarted one gets new ones', async () => {
    const apps: ChildProcess[] = [];
    cleanups.push(() => {
      for (const app of apps) app.kill('SIGKILL');
    });
    const received: { port: number; data: string }[] = [];
    const startApp = async (): Promise<ChildProcess> => {
      const app = spawn(process.execPath, ['-e', APP_PROCESS], {
        stdio: ['ignore', 'pipe', 'inherit'],
      });
      apps.push(app);
      await new Promise<void>((resolve) => {
        createInterface({ input: app.stdout! }).on('line', (line) => {
          const event = JSON.parse(line) as { listening?: true; port: number; data: string };
          if (event.listening) resolve();
          else received.push(event);
        });
      });
      return app;
    };
    const first = await startApp();
    const current = await startSession();
    const replay = startReplay(current);
    const ends = endsOf(replay);
    const longLived = stdinClient(sandbox, PORT);
    longLived.stdin!.write('before the crash\n');
    await until(() => received.length === 1, 'the app to receive the first bytes');
    first.kill('SIGKILL');
    await new Promise((resolve) => first.once('exit', resolve));
    longLived.stdin!.write('after the crash\n');
    await until(() => ends.length === 1, 'the connection to the killed app to end');
    expect(ends[0]).toMatchObject({ reason: 'appGone' });

    await pythonClient(sandbox, ONE_SHOT_CLIENT, PORT, 'while the app is down');
    await until(() => ends.length === 2, 'the connection made while the app was down to end');
    expect(ends[1]).toMatchObject({ reason: 'refused' });

    await startApp();
    await pythonClient(sandbox, ONE_SHOT_CLIENT, PORT, 'after the restart');
    await until(() => ends.length === 3, 'the connection to the restarted app to end');
    expect(ends[2]).toMatchObject({ reason: 'fin' });
    await until(() => received.length === 2, 'the restarted app to receive');
    expect(received[1]?.data).toBe('after the restart');
    longLived.stdin!.end();
    await current.until(() => current.closedConnections().length === 3, 'all three to close');
    expect(replay.stats()).toMatchObject({
      replayed: 3,
      completed: 1,
      droppedAppGone: 1,
      failedToConnect: 1,
      bytesDropped: 'after the crash\n'.length + 'while the app is down'.length,
      bytesReplayed: 'before the crash\n'.length + 'after the restart'.length,
    });
  });
});
