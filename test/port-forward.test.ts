/**
 * The port-forward client against the stand-in API server: real TLS with the kubeconfig's CA
 * and token, the real v4.channel.k8s.io WebSocket protocol, a real TCP connection made inside
 * the pod's netns (by a dialer process there, which hands it to the API server) and a real
 * server process in the pod. Byte counts come from the pod's own server, read over a second
 * forward.
 */
import { KubeConfig } from '@kubernetes/client-node';
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { AgentClient } from '../src/protocol/client.js';
import { PortForwardError, openPortForward } from '../src/platform/kube/port-forward.js';
import { startStandInCluster, type PodHandle, type StandInCluster } from './kube/cluster.js';

const MiB = 1024 * 1024;
const DATA_PORT = 7001;
const CONTROL_PORT = 7002;
const AGENT_PORT = 61337;

/**
 * The pod's server. On DATA_PORT each connection starts with a JSON line
 * `{"send": bytes, "receive": bytes, "hold": bool}`: the server sends `send` random bytes as
 * fast as the connection takes them, reads `receive` bytes (only after a "go" on CONTROL_PORT
 * when `hold`), then answers the sha256 of what it sent and of what it received (64 hex digits
 * each) and closes. On CONTROL_PORT, "stats" answers what each connection got so far
 * (`accepted`: bytes the kernel took from the server; `received`; `ended`: EOF seen), and "go"
 * lets held connections read.
 */
const POD_SERVER = `
const net = require('net');
const crypto = require('crypto');
const connections = [];
const held = [];
net.createServer((socket) => {
  socket.on('error', () => {});
  let head = Buffer.alloc(0);
  const onHead = (chunk) => {
    head = Buffer.concat([head, chunk]);
    const newline = head.indexOf(10);
    if (newline < 0) return;
    socket.off('data', onHead);
    serve(socket, JSON.parse(head.subarray(0, newline).toString()), head.subarray(newline + 1));
  };
  socket.on('data', onHead);
}).listen(${DATA_PORT});

function serve(socket, spec, rest) {
  const stats = { accepted: 0, received: 0, ended: false };
  connections.push(stats);
  const sentHash = crypto.createHash('sha256');
  const receivedHash = crypto.createHash('sha256');
  let sent = 0;
  let doneSending = false;
  let finished = false;
  const finish = () => {
    if (finished || !doneSending || stats.received < spec.receive) return;
    finished = true;
    socket.end(sentHash.digest('hex') + receivedHash.digest('hex'));
  };
  const onData = (chunk) => {
    receivedHash.update(chunk);
    stats.received += chunk.length;
    finish();
  };
  socket.on('end', () => (stats.ended = true));
  socket.on('data', onData);
  if (spec.hold) {
    socket.pause();
    held.push(socket);
  }
  if (rest.length) onData(rest);
  const pump = () => {
    while (sent < spec.send) {
      const chunk = crypto.randomBytes(Math.min(256 * 1024, spec.send - sent));
      sentHash.update(chunk);
      sent += chunk.length;
      const more = socket.write(chunk, () => (stats.accepted += chunk.length));
      if (!more) return void socket.once('drain', pump);
    }
    doneSending = true;
    finish();
  };
  pump();
}

net.createServer((socket) => {
  socket.on('error', () => {});
  socket.once('data', (command) => {
    if (command.toString().trim() === 'go') for (const s of held.splice(0)) s.resume();
    socket.end(JSON.stringify(connections));
  });
}).listen(${CONTROL_PORT});
`;

interface ConnectionStats {
  accepted: number;
  received: number;
  ended: boolean;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

async function until<T>(what: string, probe: () => T | Promise<T>, timeoutMs = 60_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

/** Everything a stream delivers until it ends, or the error it fails with. */
function readAll(stream: Duplex): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    stream.on('data', (chunk: Buffer) => chunks.push(chunk));
    stream.once('end', () => resolve(Buffer.concat(chunks)));
    stream.once('error', reject);
  });
}

/** Resolves once the stream has closed (it may have already). */
function closed(stream: Duplex): Promise<void> {
  return stream.closed ? Promise.resolve() : once(stream, 'close').then(() => undefined);
}

/** Writes `total` bytes of `chunk` repeated, waiting for 'drain' whenever write() says so. */
async function writeRepeated(stream: Duplex, chunk: Buffer, total: number): Promise<void> {
  for (let written = 0; written < total; written += chunk.length) {
    const piece = total - written < chunk.length ? chunk.subarray(0, total - written) : chunk;
    if (!stream.write(piece)) await once(stream, 'drain');
  }
}

/**
 * The value `sample` settles at: the same over five readings in a row. A sender held back by
 * backpressure settles; one that is not goes on to the end.
 */
async function settled(sample: () => Promise<number>): Promise<number> {
  let last = -1;
  let same = 0;
  for (;;) {
    const value = await sample();
    same = value === last ? same + 1 : 0;
    last = value;
    if (same >= 4) return value;
    await sleep(300);
  }
}

/** The kubeconfig of the stand-in, or a copy with its server, token or CA replaced. */
function kubeConfigOf(
  cluster: StandInCluster,
  change: { server?: string; token?: string; caData?: string | undefined } = {},
): KubeConfig {
  const config = new KubeConfig();
  config.loadFromFile(cluster.kubeconfigPath);
  if (Object.keys(change).length === 0) return config;
  const original = config.getCurrentCluster()!;
  const changed = new KubeConfig();
  changed.loadFromOptions({
    clusters: [
      {
        name: original.name,
        server: change.server ?? original.server,
        caData: 'caData' in change ? change.caData : original.caData,
        skipTLSVerify: false,
      },
    ],
    users: [{ name: 'stand-in', token: change.token ?? config.getCurrentUser()!.token }],
    contexts: [{ name: 'stand-in', cluster: original.name, user: 'stand-in' }],
    currentContext: 'stand-in',
  });
  return changed;
}

/** The message of a forward's failure, whether it failed to open or failed once open. */
async function failureOf(opening: Promise<Duplex>): Promise<Error> {
  let stream: Duplex;
  try {
    stream = await opening;
  } catch (error) {
    return error as Error;
  }
  stream.resume();
  if (stream.errored) return stream.errored;
  const [error] = (await once(stream, 'error')) as [Error];
  return error;
}

/** A TCP relay in front of the API server whose connections the test can cut. */
async function startCuttableProxy(target: URL) {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(target.port), target.hostname);
    for (const socket of [client, upstream]) {
      sockets.add(socket);
      socket.on('error', () => undefined);
      socket.once('close', () => sockets.delete(socket));
    }
    client.pipe(upstream).pipe(client);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    url: `https://127.0.0.1:${(server.address() as net.AddressInfo).port}`,
    /** Resets every connection, as a network that breaks does. */
    cut() {
      for (const socket of sockets) socket.resetAndDestroy();
    },
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

describe('port-forward over the stand-in API server', () => {
  let cluster: StandInCluster;
  let kubeConfig: KubeConfig;
  let pod: PodHandle;
  const open: Duplex[] = [];

  async function forward(port = DATA_PORT, config = kubeConfig, name = pod.name) {
    const stream = await openPortForward(config, 'default', name, port);
    open.push(stream);
    return stream;
  }

  async function podStats(): Promise<ConnectionStats[]> {
    const control = await forward(CONTROL_PORT);
    control.write('stats\n');
    return JSON.parse((await readAll(control)).toString()) as ConnectionStats[];
  }

  async function lastConnection(): Promise<ConnectionStats> {
    const stats = await podStats();
    return stats.at(-1) ?? { accepted: 0, received: 0, ended: false };
  }

  async function letHeldConnectionsRead(): Promise<void> {
    const control = await forward(CONTROL_PORT);
    control.write('go\n');
    await readAll(control);
  }

  /**
   * The dialers the stand-in's kubelet runs in a pod's netns, one for each forward's connection:
   * each made its connection there and stays until it ends; killing one cuts it.
   */
  function dialerPids(netns = pod.netns): number[] {
    const inPod = execFileSync('ip', ['netns', 'pids', netns], { encoding: 'utf8' })
      .split('\n')
      .filter(Boolean)
      .map(Number);
    const containers = new Set(cluster.processes());
    return inPod.filter((pid) => !containers.has(pid));
  }

  /**
   * The dialer of the forward opened while `opening` ran (others may linger a moment). A dialer
   * is only sure to be in the pod's netns once bytes went through its connection.
   */
  async function dialerOf<T>(netns: string, opening: () => Promise<T>): Promise<[T, number]> {
    const before = new Set(dialerPids(netns));
    const result = await opening();
    const dialers = dialerPids(netns).filter((pid) => !before.has(pid));
    expect(dialers).toHaveLength(1);
    return [result, dialers[0]!];
  }

  /** A forward from which the pod streams 256 MiB, once the first MiB arrived. */
  async function streamingForward(config = kubeConfig) {
    const stream = await forward(DATA_PORT, config);
    stream.write(`${JSON.stringify({ send: 256 * MiB, receive: 0 })}\n`);
    let received = 0;
    stream.on('data', (chunk: Buffer) => (received += chunk.length));
    await until('bytes to flow', () => received > MiB);
    return { stream, received: () => received };
  }

  beforeAll(async () => {
    cluster = await startStandInCluster();
    kubeConfig = kubeConfigOf(cluster);
    pod = await cluster.addPod({
      name: 'peer',
      containers: [
        {
          name: 'server',
          image: 'stand-in/local',
          command: [process.execPath, '-e', POD_SERVER],
          ports: [{ containerPort: DATA_PORT }, { containerPort: CONTROL_PORT }],
        },
      ],
    });
  });

  afterEach(() => {
    for (const stream of open.splice(0)) stream.destroy();
  });

  afterAll(async () => {
    await cluster?.close();
  });

  test('carries 64 MiB each way at once, byte for byte; the pod closing ends the stream', async () => {
    const size = 64 * MiB;
    const stream = await forward();
    const received = readAll(stream);
    stream.write(`${JSON.stringify({ send: size, receive: size })}\n`);
    const sentHash = createHash('sha256');
    for (let sent = 0; sent < size; sent += MiB) {
      const chunk = randomBytes(MiB);
      sentHash.update(chunk);
      if (!stream.write(chunk)) await once(stream, 'drain');
    }
    // The pod answers once it has everything, then closes: the stream ends without error.
    const all = await received;
    expect(all.length).toBe(size + 128);
    const answer = all.subarray(size).toString();
    expect(createHash('sha256').update(all.subarray(0, size)).digest('hex')).toBe(
      answer.slice(0, 64),
    );
    expect(answer.slice(64)).toBe(sentHash.digest('hex'));
    await closed(stream);
    expect(stream.errored).toBeNull();
  });

  test('a reader that falls behind holds the pod back; then every byte arrives', async () => {
    const size = 512 * MiB;
    const stream = await forward();
    stream.pause();
    stream.write(`${JSON.stringify({ send: size, receive: 0 })}\n`);
    const memoryBefore = process.memoryUsage().arrayBuffers;
    // Nothing is read: what the pod got out settles far below what it wants to send.
    const stalledAt = await settled(async () => (await lastConnection()).accepted);
    expect(stalledAt).toBeGreaterThan(0);
    expect(stalledAt).toBeLessThan(size / 4);
    // What waits in this process is bounded: the stream's buffer and the WebSocket's.
    expect(stream.readableLength).toBeLessThanOrEqual(2 * MiB);
    expect(process.memoryUsage().arrayBuffers - memoryBefore).toBeLessThan(32 * MiB);

    let received = 0;
    stream.on('data', (chunk: Buffer) => (received += chunk.length));
    stream.resume();
    await once(stream, 'end');
    expect(received).toBe(size + 128);
  });

  test('a pod that does not read holds writes back; then every byte arrives', async () => {
    const size = 512 * MiB;
    const stream = await forward();
    const answer = readAll(stream);
    stream.write(`${JSON.stringify({ send: 0, receive: size, hold: true })}\n`);
    // One buffer written over and over: whatever memory grows is what the stream holds.
    const chunk = randomBytes(MiB);
    let accepted = 0;
    const memoryBefore = process.memoryUsage().arrayBuffers;
    const writing = (async () => {
      for (let written = 0; written < size; written += chunk.length) {
        const more = stream.write(chunk, () => (accepted += chunk.length));
        if (!more) await once(stream, 'drain');
      }
    })();
    const stalledAt = await settled(async () => accepted);
    expect(stalledAt).toBeGreaterThan(0);
    expect(stalledAt).toBeLessThan(size / 4);
    // The pod read the header, and the rest of that one read, before it stopped.
    expect((await lastConnection()).received).toBeLessThan(MiB);
    expect(process.memoryUsage().arrayBuffers - memoryBefore).toBeLessThan(32 * MiB);

    await letHeldConnectionsRead();
    await writing;
    const reply = (await answer).toString();
    expect(reply).toHaveLength(128);
    expect((await lastConnection()).received).toBe(size);
  });

  test('end() closes the forward: the pod gets every byte, then EOF', async () => {
    const stream = await forward();
    stream.resume();
    stream.write(`${JSON.stringify({ send: 0, receive: 64 * MiB })}\n`);
    await writeRepeated(stream, randomBytes(MiB), 10 * MiB + 17);
    stream.end();
    await closed(stream);
    const stats = await until('the pod to see EOF', async () => {
      const last = await lastConnection();
      return last.ended ? last : undefined;
    });
    expect(stats.received).toBe(10 * MiB + 17);
  });

  test('text on the error channel becomes the stream error, on one line', async () => {
    // Nothing listens on this port in the pod: the kubelet's dial fails and says so.
    const error = await failureOf(openPortForward(kubeConfig, 'default', pod.name, 7999));
    expect(error).toBeInstanceOf(PortForwardError);
    expect(error.message).toMatch(
      /^port-forward to pod default\/peer port 7999 failed: .*dial tcp4 127\.0\.0\.1:7999: connect: connection refused$/,
    );
    expect(error.message).not.toContain('\n');
  });

  test('a missing pod, a bad token, RBAC, no API server and an untrusted certificate: one line each', async () => {
    const failures = [
      ['missing pod', openPortForward(kubeConfig, 'default', 'nope', DATA_PORT)],
      [
        'bad token',
        openPortForward(kubeConfigOf(cluster, { token: 'not-the-token' }), 'default', pod.name, 1),
      ],
      [
        'untrusted certificate',
        openPortForward(kubeConfigOf(cluster, { caData: undefined }), 'default', pod.name, 1),
      ],
    ] as const;
    const messages: Record<string, string> = {};
    const statusCodes: Record<string, number | undefined> = {};
    const note = (what: string, error: Error): void => {
      expect(error).toBeInstanceOf(PortForwardError);
      messages[what] = error.message;
      statusCodes[what] = (error as PortForwardError).statusCode;
    };
    for (const [what, opening] of failures) note(what, await failureOf(opening));

    const closed = net.createServer().listen(0, '127.0.0.1');
    await once(closed, 'listening');
    const freePort = (closed.address() as net.AddressInfo).port;
    await new Promise((resolve) => closed.close(resolve));
    note(
      'no API server',
      await failureOf(
        openPortForward(
          kubeConfigOf(cluster, { server: `https://127.0.0.1:${freePort}` }),
          'default',
          pod.name,
          1,
        ),
      ),
    );

    cluster.faults.deny('create', 'pods/portforward');
    try {
      note('RBAC', await failureOf(openPortForward(kubeConfig, 'default', pod.name, 1)));
    } finally {
      cluster.faults.clear();
    }

    expect(messages).toEqual({
      'missing pod':
        'port-forward to pod default/nope port 7001 failed: pods "nope" not found (HTTP 404)',
      'bad token': 'port-forward to pod default/peer port 1 failed: Unauthorized (HTTP 401)',
      'untrusted certificate': expect.stringMatching(
        /^port-forward to pod default\/peer port 1 failed: the API server's TLS certificate was rejected: .+$/,
      ),
      'no API server': `port-forward to pod default/peer port 1 failed: cannot reach the API server: connect ECONNREFUSED 127.0.0.1:${freePort}`,
      RBAC: expect.stringMatching(
        /^port-forward to pod default\/peer port 1 failed: pods "peer" is forbidden: .*portforward.* \(HTTP 403\)$/,
      ),
    });
    for (const message of Object.values(messages)) expect(message).not.toContain('\n');
    // The refusals that came with an HTTP status carry it (place-kube-agent reads a 403).
    expect(statusCodes).toEqual({
      'missing pod': 404,
      'bad token': 401,
      'untrusted certificate': undefined,
      'no API server': undefined,
      RBAC: 403,
    });
  });

  test('the dialer of the connection killed mid-stream: the stream fails with the kubelet error', async () => {
    const [{ stream, received }, dialer] = await dialerOf(pod.netns, () => streamingForward());
    const failed = once(stream, 'error');
    process.kill(dialer, 'SIGKILL');
    const [error] = (await failed) as [Error];
    expect(error).toBeInstanceOf(PortForwardError);
    expect(error.message).toMatch(
      /^port-forward to pod default\/peer port 7001 failed: error forwarding port 7001 to pod peer, uid [0-9a-f-]+: read tcp4 127\.0\.0\.1:\d+->127\.0\.0\.1:7001: use of closed network connection$/,
    );
    expect(error.message).not.toContain('\n');
    await closed(stream);
    expect(received()).toBeLessThan(256 * MiB);
  });

  test('the connection to the API server broken mid-stream: the stream fails, never hangs', async () => {
    const proxy = await startCuttableProxy(new URL(cluster.url));
    try {
      const [{ stream }, dialer] = await dialerOf(pod.netns, () =>
        streamingForward(kubeConfigOf(cluster, { server: proxy.url })),
      );
      const failed = once(stream, 'error');
      proxy.cut();
      const [error] = (await failed) as [Error];
      expect(error.message).toMatch(
        /^port-forward to pod default\/peer port 7001 failed: the connection to the API server (broke|closed abnormally)/,
      );
      await closed(stream);
      // The API server noticed too: the pod's connection ended and its dialer is gone.
      await until('the dialer to exit', () => !dialerPids().includes(dialer));
    } finally {
      await proxy.close();
    }
  });

  describe('an agent session over the forward', () => {
    async function startAgentPod(name: string): Promise<PodHandle> {
      return cluster.addPod({
        name,
        containers: [
          {
            name: 'mirrord-agent',
            image: 'ghcr.io/mirrord-dev/mirrord-agent:0.1.0',
            command: [
              'mirrord',
              'agent',
              '--container-id',
              pod.containers[0]!.containerId,
              '--listen',
              `127.0.0.1:${AGENT_PORT}`,
              '--idle-timeout',
              '60',
            ],
          },
        ],
      });
    }

    /** A session through a forward, once the agent listens (until then the dial fails). */
    async function startSession(agent: PodHandle): Promise<[AgentClient, number]> {
      return until('the agent to answer through the forward', async () => {
        try {
          return await dialerOf(agent.netns, async () => {
            const stream = await forward(AGENT_PORT, kubeConfig, agent.name);
            return AgentClient.start(stream, { clientName: 'port-forward test' });
          });
        } catch (error) {
          if (!/connection refused/.test((error as Error).message)) throw error;
          return undefined;
        }
      });
    }

    /** The exit code of the agent's first run (the stand-in's addPod restarts containers). */
    function firstExitCode(agent: PodHandle): number | undefined {
      const status = agent.object()?.status.containerStatuses?.[0];
      return status?.lastState.terminated?.exitCode;
    }

    test('close() ends the session: the agent exits 0', async () => {
      const agent = await startAgentPod('agent-close');
      const [client] = await startSession(agent);
      expect(client.agent.target).toBe(`container ${pod.containers[0]!.containerId}`);
      await client.subscribe(DATA_PORT);
      await client.close();
      await until('the agent to exit', () => firstExitCode(agent) !== undefined);
      expect(firstExitCode(agent)).toBe(0);
    });

    test('the forward broken: the session ends with an error, and the agent exits', async () => {
      const agent = await startAgentPod('agent-broken');
      const [client, dialer] = await startSession(agent);
      await client.subscribe(DATA_PORT);
      const errors: Error[] = [];
      client.on('error', (error) => errors.push(error));
      // Not events.once(): it rejects on the 'error' that comes first.
      const ended = new Promise<void>((resolve) => client.once('end', resolve));
      process.kill(dialer, 'SIGKILL');
      await ended;
      expect(errors.map((e) => e.message)).toEqual([
        expect.stringMatching(
          /^connection to the agent failed: port-forward to pod default\/agent-broken port 61337 failed: /,
        ),
      ]);
      // Its end of the session broke with the connection: the agent exits by itself.
      await until('the agent to exit', () => firstExitCode(agent) !== undefined);
    });
  });
});
