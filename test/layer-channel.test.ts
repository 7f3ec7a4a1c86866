/**
 * The CLI's side of the layer socket, with the real layer preloaded into a real Node server on
 * loopback.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { LayerChannel, type AppListener } from '../src/session/layer-channel.js';
import { REPLAY_SOURCE } from '../src/session/replay.js';
import { untilAccepted } from './support/accepted.js';
import { waitFor } from './support/wait.js';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const LAYER = join(ROOT, 'layer', '.output', 'mirrord_layer.so');
const FIXTURES = join(ROOT, 'test', 'fixtures');
const PYTHON = '/usr/bin/python3';
const PORT = 36000 + Math.floor(Math.random() * 900);

/** Listens on `port` and answers every request with the peer address the app itself sees. */
const appOn = (port: number): string => `
require('http')
  .createServer((req, res) => res.end(req.socket.remoteAddress + ':' + req.socket.remotePort))
  .listen(${port}, '127.0.0.1');`;
const APP = appOn(PORT);

function request(
  port: number,
  onConnect: (socket: net.Socket) => void | Promise<void>,
  { path = '/', localPort }: { path?: string; localPort?: number } = {},
): Promise<string> {
  return new Promise((resolve, reject) => {
    // From the replay's source address, as the session connects.
    const options = { port, host: '127.0.0.1', localAddress: REPLAY_SOURCE, localPort };
    const socket = net.connect(options, () => {
      void Promise.resolve(onConnect(socket)).then(() =>
        socket.end(`GET ${path} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n`),
      );
    });
    let answer = '';
    socket.on('data', (chunk: Buffer) => (answer += chunk.toString()));
    socket.on('end', () => resolve(answer.split('\r\n\r\n')[1] ?? ''));
    socket.on('error', reject);
  });
}

describe('layer channel', () => {
  let channel: LayerChannel;
  const children: ChildProcess[] = [];
  const servers: net.Server[] = [];

  /** Replayed connections (`sourcePort/localPort`) a process asked for and waits for. */
  const asked = new Set<string>();
  const keyOf = (socket: net.Socket): string => `${socket.localPort}/${socket.remotePort}`;

  beforeEach(async () => {
    channel = await LayerChannel.open();
    channel.on('waiting', ({ sourcePort, localPort }) => asked.add(`${sourcePort}/${localPort}`));
  });

  afterEach(async () => {
    for (const child of children.splice(0)) {
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        child.kill('SIGKILL'); // not a group leader (started without detached)
      }
    }
    for (const server of servers.splice(0)) server.close();
    asked.clear();
    await channel.close();
  });

  /** Tells the app who the original client of the replayed connection `socket` is. */
  function announce(socket: net.Socket, original: { address: string; port: number }): void {
    asked.delete(keyOf(socket));
    channel.announcePeer(socket.localPort!, socket.remotePort!, original);
  }

  /**
   * The same, late (as a busy session may announce): once the app has asked and waits. For a
   * process that asks: a pre-fork worker, or one of several accepting on the port.
   */
  async function announceOnceAsked(
    socket: net.Socket,
    original: { address: string; port: number },
  ): Promise<void> {
    await waitFor(
      `the app to ask for the client of port ${socket.localPort}`,
      () => asked.has(keyOf(socket)),
      { ms: 10_000, everyMs: 5 },
    );
    announce(socket, original);
  }

  /**
   * The same, late: once the app has accepted the connection. For a process that listens alone,
   * which waits for the client to be pushed to it, without asking.
   */
  async function announceOnceAccepted(
    socket: net.Socket,
    original: { address: string; port: number },
  ): Promise<void> {
    await untilAccepted(socket.remotePort!, socket.localPort!);
    announce(socket, original);
  }

  function startApp(token = channel.token, user?: number): ChildProcess {
    const env = {
      ...process.env,
      LD_PRELOAD: LAYER,
      MIRRORD_LAYER_SOCKET: channel.path,
      MIRRORD_LAYER_TOKEN: token,
    };
    const child =
      user === undefined
        ? spawn(process.execPath, ['-e', APP], { env, stdio: 'ignore' })
        : spawn(
            'setpriv',
            [`--reuid=${user}`, `--regid=${user}`, '--clear-groups', process.execPath, '-e', APP],
            { env, stdio: 'ignore' },
          );
    children.push(child);
    return child;
  }

  test('learns where the app listens, and the app sees the original client', async () => {
    const listening = once(channel, 'listen') as Promise<[AppListener]>;
    const app = startApp();
    const [listener] = await listening;
    expect(listener).toMatchObject({ pid: app.pid, port: PORT, localPort: PORT, family: 4 });
    expect(channel.listening()).toEqual([listener]);

    const seen = await request(listener.localPort, (socket) =>
      announce(socket, {
        address: '10.213.9.9',
        port: 40000,
      }),
    );
    expect(seen).toBe('10.213.9.9:40000');

    const closed = once(channel, 'close');
    app.kill('SIGKILL');
    expect(await closed).toEqual([{ pid: app.pid, port: PORT }]);
    expect(channel.listening()).toEqual([]);
  });

  test('an app whose port is taken listens elsewhere and says which', async () => {
    const squatter = net.createServer();
    servers.push(squatter);
    await new Promise<void>((resolve) => squatter.listen(PORT, '127.0.0.1', resolve));
    const listening = once(channel, 'listen') as Promise<[AppListener]>;
    startApp();
    const [listener] = await listening;
    expect(listener.port).toBe(PORT);
    expect(listener.localPort).not.toBe(PORT);
    const seen = await request(listener.localPort, (socket) =>
      announce(socket, {
        address: '10.213.9.10',
        port: 40001,
      }),
    );
    expect(seen).toBe('10.213.9.10:40001');
  });

  test('an app that dropped privileges still reaches the session; a wrong token is not heard', async () => {
    const heard: AppListener[] = [];
    channel.on('listen', (listener) => heard.push(listener));
    startApp('0'.repeat(32));
    // It answers once its listen() has returned, so its layer has sent its report by then: the
    // channel reads that before the report of an app started after it.
    await waitFor(
      'the impostor to answer',
      () =>
        fetch(`http://127.0.0.1:${PORT}/`).then(
          (response) => response.ok,
          () => false,
        ),
      { ms: 10_000 },
    );
    const listening = once(channel, 'listen') as Promise<[AppListener]>;
    const nobody = startApp(channel.token, 65534);
    const [listener] = await listening;
    // It asked for PORT too, and listens elsewhere: the impostor has it. Only it was heard.
    expect(listener).toMatchObject({ pid: nobody.pid, port: PORT });
    expect(heard.map((l) => l.pid)).toEqual([nobody.pid]);
  });

  /** Starts `command args` under the layer, reporting to this channel; its stdout so far. */
  function startLayered(
    command: string,
    args: string[],
    extraEnv: Record<string, string> = {},
  ): { child: ChildProcess; out(): string } {
    const env = {
      ...process.env,
      ...extraEnv,
      LD_PRELOAD: LAYER,
      MIRRORD_LAYER_SOCKET: channel.path,
      MIRRORD_LAYER_TOKEN: channel.token,
    };
    // Its own process group, so that afterEach's SIGKILL reaches the workers too.
    const child = spawn(command, args, {
      env,
      stdio: ['ignore', 'pipe', 'inherit'],
      detached: true,
    });
    children.push(child);
    let out = '';
    child.stdout!.on('data', (chunk: Buffer) => (out += chunk.toString()));
    return { child, out: () => out };
  }

  /** Resolves once `check` holds; fails after 10 s. */
  async function until(check: () => boolean, what: string): Promise<void> {
    await waitFor(what, check, { ms: 10_000, everyMs: 20 });
  }

  test('pre-fork workers see the original client of what they accept, also from a reused source port', async () => {
    const listening = once(channel, 'listen') as Promise<[AppListener]>;
    const app = startLayered(PYTHON, [join(FIXTURES, 'prefork_server.py'), String(PORT), '4']);
    const [listener] = await listening;
    // The parent listened; its workers, forked after, accept.
    expect(listener).toMatchObject({ pid: app.child.pid, port: PORT });
    await until(() => app.out().split('worker').length > 4, 'four workers');

    const answers = await Promise.all(
      Array.from({ length: 40 }, (_, i) =>
        request(listener.localPort, (socket) =>
          announce(socket, {
            address: `10.213.9.${i + 1}`,
            port: 40000 + i,
          }),
        ),
      ),
    );
    answers.forEach((answer, i) =>
      expect(answer).toMatch(new RegExp(`^10\\.213\\.9\\.${i + 1}:${40000 + i} worker=\\d+$`)),
    );
    const workers = new Set(answers.map((answer) => answer.split('worker=')[1]));
    expect(workers.size).toBeGreaterThan(1);

    // The same source port again, announced late (as a busy session may): the worker asks
    // first, and must wait for this connection's client rather than take the earlier one's.
    const localPort = 30000 + Math.floor(Math.random() * 2000);
    const first = await request(
      listener.localPort,
      (socket) =>
        announce(socket, {
          address: '10.213.8.1',
          port: 41000,
        }),
      { localPort },
    );
    expect(first).toMatch(/^10\.213\.8\.1:41000 /);
    const second = await request(
      listener.localPort,
      (socket) => announceOnceAsked(socket, { address: '10.213.8.2', port: 41001 }),
      { localPort },
    );
    expect(second).toMatch(/^10\.213\.8\.2:41001 /);
  });

  // rr (Node's default): the primary accepts and hands the socket over; none: the workers accept
  // on the listener the primary handed them.
  test.each(['rr', 'none'])(
    'Node cluster workers see the original client (scheduling %s)',
    async (policy) => {
      const dir = mkdtempSync(join(tmpdir(), 'mirrord-cluster-'));
      try {
        const log = join(dir, 'requests.log');
        const listening = once(channel, 'listen') as Promise<[AppListener]>;
        const app = startLayered(
          process.execPath,
          [join(FIXTURES, 'http-log-cluster.mjs'), String(PORT), '3', log],
          { NODE_CLUSTER_SCHED_POLICY: policy },
        );
        // rr: the primary listens; none: each worker calls listen() on the socket it was handed.
        const [listener] = await listening;
        expect(listener.port).toBe(PORT);
        await until(() => app.out().split('listening').length > 3, 'three workers');

        const count = 30;
        await Promise.all(
          Array.from({ length: count }, (_, i) =>
            request(
              listener.localPort,
              (socket) =>
                announce(socket, {
                  address: `10.213.7.${i + 1}`,
                  port: 42000 + i,
                }),
              { path: `/r${i}` },
            ),
          ),
        );
        // Then one source port for several connections in turn, each announced late: a worker
        // must not take what was announced for an earlier connection from that port.
        const localPort = 32000 + Math.floor(Math.random() * 2000);
        for (let i = count; i < count + 6; i += 1) {
          await request(
            listener.localPort,
            // Asked for by the process that accepts: the port is shared by now (a worker asked
            // in the first round, and with rr the primary accepts but the workers ask).
            (socket) =>
              announceOnceAsked(socket, { address: `10.213.7.${i + 1}`, port: 42000 + i }),
            { path: `/r${i}`, localPort },
          );
        }
        const lines = readFileSync(log, 'utf8').trim().split('\n');
        expect(lines).toHaveLength(count + 6);
        for (const line of lines) {
          const [client, , path] = line.split(' ');
          const i = Number(path!.slice(2));
          expect(`${path} from ${client}`).toBe(
            `/r${i} from ::ffff:10.213.7.${i + 1}:${42000 + i}`,
          );
        }
        const workers = new Set(lines.map((line) => line.split(' ')[4]));
        expect(workers.size).toBeGreaterThan(1);
        expect(workers).not.toContain(String(app.child.pid));
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    },
  );

  test('one source port towards one process’s port, then another’s: each sees its own client', async () => {
    // Two processes, each listening alone on its own port (a forking app's main process and its
    // child): the kernel gives one source port to connections to both.
    const ports = [PORT, PORT + 1];
    const listened: AppListener[] = [];
    channel.on('listen', (listener) => listened.push(listener));
    for (const port of ports) startLayered(process.execPath, ['-e', appOn(port)]);
    await until(() => listened.length === 2, 'both processes to listen');
    const localPort = 34000 + Math.floor(Math.random() * 2000);
    // The second process's connection, announced at once.
    expect(
      await request(
        ports[1]!,
        (socket) =>
          announce(socket, {
            address: '10.213.6.2',
            port: 43002,
          }),
        { localPort },
      ),
    ).toBe('10.213.6.2:43002');
    // The first's, from the same source port, announced late: it waits for its own client.
    expect(
      await request(
        ports[0]!,
        (socket) => announceOnceAccepted(socket, { address: '10.213.6.1', port: 43001 }),
        { localPort },
      ),
    ).toBe('10.213.6.1:43001');
  });

  test('a pre-fork server whose parent accepts too: a reused source port never brings an earlier connection’s client', async () => {
    const listening = once(channel, 'listen') as Promise<[AppListener]>;
    const app = startLayered(PYTHON, [
      join(FIXTURES, 'prefork_server.py'),
      String(PORT),
      '2',
      'parent-serves',
    ]);
    const [listener] = await listening;
    await until(() => app.out().split('worker').length > 3, 'three accepting processes');
    const base = 36000 + Math.floor(Math.random() * 2000);
    const sourcePorts = Array.from({ length: 30 }, (_, i) => base + i);
    const round = (subnet: number, late: boolean) =>
      Promise.all(
        sourcePorts.map((localPort, i) =>
          request(
            listener.localPort,
            (socket) => {
              const original = { address: `10.213.${subnet}.${i + 1}`, port: 44000 + i };
              // Every process asks by then: the workers always, the parent since a worker did.
              if (late) return announceOnceAsked(socket, original);
              announce(socket, original);
            },
            { localPort },
            // Closed on both sides: forgotten, as the session forgets its replayed connections.
          ).then((answer) => {
            channel.forgetPeer(localPort, listener.localPort);
            return answer;
          }),
        ),
      );
    // Announced at once, then the same source ports again, announced late: whichever process
    // accepts must wait for that connection's client, not take a copy left by the first round.
    const first = await round(5, false);
    const second = await round(4, true);
    first.forEach((answer, i) =>
      expect(answer).toMatch(new RegExp(`^10\\.213\\.5\\.${i + 1}:${44000 + i} worker=\\d+$`)),
    );
    second.forEach((answer, i) =>
      expect(answer).toMatch(new RegExp(`^10\\.213\\.4\\.${i + 1}:${44000 + i} worker=\\d+$`)),
    );
    const workers = new Set([...first, ...second].map((answer) => answer.split('worker=')[1]));
    expect(workers).toContain(String(app.child.pid));
    expect(workers.size).toBeGreaterThan(1);
  });

  test('close removes the socket; opening removes what a killed CLI left, not a live one’s', async () => {
    const { path } = channel;
    expect(existsSync(path)).toBe(true);
    await channel.close();
    expect(existsSync(path)).toBe(false);
    // A CLI killed with SIGKILL closes nothing: its directory stays until the next open.
    const killed = spawn('sleep', ['60']);
    const leftover = mkdtempSync(join(tmpdir(), `mirrord-layer-${killed.pid}-`));
    mkdirSync(join(leftover, 'dirs', '1.0', 'etc'), { recursive: true });
    killed.kill('SIGKILL');
    await once(killed, 'exit');
    const live = mkdtempSync(join(tmpdir(), `mirrord-layer-${process.pid}-`));
    channel = await LayerChannel.open();
    expect([existsSync(leftover), existsSync(live)]).toEqual([false, true]);
    rmSync(live, { recursive: true });
  });
});
