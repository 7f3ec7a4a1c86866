/**
 * The port-forward client through the real test cluster: TLS to kube-apiserver, which
 * authenticates and authorizes (RBAC) the upgrade and proxies it to the kubelet, which proxies
 * it to containerd's streaming server, which dials the port inside the pod's netns and serves
 * the v4.channel.k8s.io WebSocket itself. The pod runs a real server; what it sent, received and
 * saw is read from it over a direct TCP connection to the pod's IP (routed from this machine to
 * the pod bridge), so the checks do not depend on the path under test.
 */
import { KubeConfig, type V1Pod } from '@kubernetes/client-node';
import { createHash, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { hostname } from 'node:os';
import type { Duplex } from 'node:stream';
import { AgentClient } from '../src/protocol/client.js';
import {
  AGENT_SECRET_KEY,
  agentJobManifest,
  agentSecretManifest,
  defaultAgentImage,
} from '../src/platform/kube/agent-job.js';
import { newSessionSecret } from '../src/protocol/agent-launch.js';
import { PortForwardError, openPortForward } from '../src/platform/kube/port-forward.js';
import { API_PORT, NODE_IP } from './cluster/layout.js';
import { waitFor } from './support/wait.js';
import { containerProcesses, testCluster, type PodInfo, type TestCluster } from './support/kube.js';

const NAMESPACE = 'port-forward';
const MiB = 1024 * 1024;
const DATA_PORT = 7001;
const CONTROL_PORT = 7002;
const AGENT_PORT = 61337;

/**
 * The pod's server. On DATA_PORT each connection starts with a JSON line
 * `{"id": string, "send": bytes, "receive": bytes, "hold": bool}`: the server sends `send`
 * random bytes as fast as the connection takes them, reads `receive` bytes (only after a "go" on
 * CONTROL_PORT when `hold`), then answers the sha256 of what it sent and of what it received (64
 * hex digits each) and closes. On CONTROL_PORT, "stats" answers what each connection got so far,
 * by id (`accepted`: bytes the kernel took from the server; `received`; `ended`: EOF seen;
 * `closed`: the socket is gone, by EOF or by a reset), and "go" lets held connections read.
 */
const POD_SERVER = `
const net = require('net');
const crypto = require('crypto');
const connections = {};
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
  const stats = { accepted: 0, received: 0, ended: false, closed: false, held: false };
  Object.defineProperty(stats, 'buffered', { enumerable: true, get: () => socket.readableLength });
  connections[spec.id] = stats;
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
  socket.on('close', () => (stats.closed = true));
  socket.on('data', onData);
  if (spec.hold) {
    socket.pause();
    held.push(socket);
    stats.held = true;
  }
  if (rest.length) onData(rest);
  const pump = () => {
    while (sent < spec.send && !socket.destroyed) {
      const chunk = crypto.randomBytes(Math.min(256 * 1024, spec.send - sent));
      sentHash.update(chunk);
      sent += chunk.length;
      const more = socket.write(chunk, (error) => { if (!error) stats.accepted += chunk.length; });
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
    if (command.toString().trim() === 'go') {
      for (const s of held.splice(0)) s.resume();
      for (const stats of Object.values(connections)) stats.held = false;
    }
    socket.end(JSON.stringify(connections));
  });
}).listen(${CONTROL_PORT});
`;

interface ConnectionStats {
  accepted: number;
  received: number;
  ended: boolean;
  closed: boolean;
  /** The server does not read the connection (until "go"). */
  held: boolean;
  /** Bytes the server's socket read from the kernel that the server has not taken yet. */
  buffered: number;
}

/** How long the test waits for a condition of the cluster, and how often it looks. */
const PATIENCE = { ms: 60_000, everyMs: 100 };

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
 * The value `sample` settles at: the same over five readings in a row, 300 ms apart. A sender
 * held back by backpressure settles; one that is not goes on to the end.
 */
async function settled(sample: () => Promise<number>): Promise<number> {
  let last = -1;
  let same = 0;
  const { value } = await waitFor(
    'the count to settle',
    async () => {
      const value = await sample();
      same = value === last ? same + 1 : 0;
      last = value;
      return same >= 4 && { value };
    },
    { ms: 60_000, everyMs: 300 },
  );
  return value;
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

/**
 * A TCP relay on loopback in front of the API server, whose connections the test can cut. TLS
 * goes through it end to end: the client verifies the API server's certificate (which names
 * 127.0.0.1) and authenticates with its own, as without the relay.
 */
async function startCuttableRelay() {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const upstream = net.connect(API_PORT, NODE_IP);
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
    server: `https://127.0.0.1:${(server.address() as net.AddressInfo).port}`,
    /** Resets every connection both ways, as a network that breaks does. */
    cut() {
      for (const socket of sockets) socket.resetAndDestroy();
    },
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

/**
 * Bytes the kernel holds unread on the established TCP connections to `port` in the network
 * namespace of process `pid` (the rx_queue column of /proc/PID/net/tcp and tcp6).
 */
function kernelUnread(pid: number, port: number): number {
  const localPort = `:${port.toString(16).toUpperCase().padStart(4, '0')}`;
  let unread = 0;
  for (const file of ['tcp', 'tcp6']) {
    for (const line of readFileSync(`/proc/${pid}/net/${file}`, 'utf8').split('\n').slice(1)) {
      const [, local, , state, queues] = line.trim().split(/\s+/);
      if (local?.endsWith(localPort) && state === '01') {
        unread += parseInt(queues!.split(':')[1]!, 16);
      }
    }
  }
  return unread;
}

describe('port-forward through the real API server, kubelet and containerd', () => {
  let cluster: TestCluster;
  let kubeConfig: KubeConfig;
  let pod: PodInfo;
  const open: Duplex[] = [];
  let connectionCount = 0;

  /** The admin kubeconfig, or a copy with its server, CA or user replaced. */
  function kubeConfigWith(
    change: { server?: string; caData?: string | undefined; token?: string } = {},
  ): KubeConfig {
    const admin = new KubeConfig();
    admin.loadFromFile(cluster.kubeconfig);
    const original = admin.getCurrentCluster()!;
    const user = admin.getCurrentUser()!;
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
      users: [change.token === undefined ? user : { name: 'token', token: change.token }],
      contexts: [
        {
          name: 'test',
          cluster: original.name,
          user: change.token === undefined ? user.name : 'token',
        },
      ],
      currentContext: 'test',
    });
    return changed;
  }

  async function forward(port = DATA_PORT, config = kubeConfig, name = pod.name) {
    const stream = await openPortForward(config, NAMESPACE, name, port);
    open.push(stream);
    return stream;
  }

  /** Opens a forward to DATA_PORT and sends the server its spec; returns the connection's id. */
  async function dataForward(
    spec: { send: number; receive: number; hold?: boolean },
    config = kubeConfig,
    target = pod,
  ): Promise<{ stream: Duplex; id: string }> {
    const stream = await forward(DATA_PORT, config, target.name);
    connectionCount += 1;
    const id = `c${connectionCount}`;
    stream.write(`${JSON.stringify({ id, ...spec })}\n`);
    return { stream, id };
  }

  /** A command to the pod's control port, straight to the pod's IP. */
  async function control(command: 'stats' | 'go', target = pod): Promise<string> {
    const socket = net.connect(CONTROL_PORT, target.ip);
    socket.end(`${command}\n`);
    const chunks: Buffer[] = [];
    for await (const chunk of socket) chunks.push(chunk as Buffer);
    return Buffer.concat(chunks).toString();
  }

  async function statsOf(id: string, target = pod): Promise<ConnectionStats> {
    const all = JSON.parse(await control('stats', target)) as Record<string, ConnectionStats>;
    return (
      all[id] ?? { accepted: 0, received: 0, ended: false, closed: false, held: false, buffered: 0 }
    );
  }

  /** A forward from which the pod streams 256 MiB, once the first MiB arrived. */
  async function streamingForward(config = kubeConfig, target = pod) {
    const { stream, id } = await dataForward({ send: 256 * MiB, receive: 0 }, config, target);
    let received = 0;
    stream.on('data', (chunk: Buffer) => (received += chunk.length));
    await waitFor('bytes to flow', () => received > MiB, PATIENCE);
    return { stream, id, received: () => received };
  }

  function serverPod(name: string): Promise<PodInfo> {
    return cluster.addPod(name, [
      { name: 'server', command: ['node', '-e', POD_SERVER], port: DATA_PORT },
    ]);
  }

  beforeAll(async () => {
    cluster = await testCluster(NAMESPACE);
    kubeConfig = kubeConfigWith();
    pod = await serverPod('peer');
  });

  afterEach(() => {
    for (const stream of open.splice(0)) stream.destroy();
  });

  afterAll(async () => {
    await cluster?.remove();
  });

  test('carries 64 MiB each way at once, byte for byte; the pod closing ends the stream', async () => {
    const size = 64 * MiB;
    const { stream } = await dataForward({ send: size, receive: size });
    const received = readAll(stream);
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
    const { stream, id } = await dataForward({ send: size, receive: 0 });
    stream.pause();
    const memoryBefore = process.memoryUsage().arrayBuffers;
    // Nothing is read: what the pod got out settles far below what it wants to send.
    const stalledAt = await settled(async () => (await statsOf(id)).accepted);
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
    const { stream, id } = await dataForward({ send: 0, receive: size, hold: true });
    const answer = readAll(stream);
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
    expect((await statsOf(id)).received).toBeLessThan(MiB);
    expect(process.memoryUsage().arrayBuffers - memoryBefore).toBeLessThan(32 * MiB);

    await control('go');
    await writing;
    const reply = (await answer).toString();
    expect(reply).toHaveLength(128);
    expect((await statsOf(id)).received).toBe(size);
  });

  test('end() closes the forward: the pod gets every byte, then EOF', async () => {
    const { stream, id } = await dataForward({ send: 0, receive: 64 * MiB });
    stream.resume();
    await writeRepeated(stream, randomBytes(MiB), 10 * MiB + 17);
    stream.end();
    await closed(stream);
    const stats = await waitFor(
      'the pod to see EOF',
      async () => {
        const current = await statsOf(id);
        return current.ended ? current : undefined;
      },
      PATIENCE,
    );
    expect(stats.received).toBe(10 * MiB + 17);
  });

  test('text on the error channel becomes the stream error, on one line', async () => {
    // Nothing listens on this port in the pod: containerd's dial there fails and says so.
    const error = await failureOf(openPortForward(kubeConfig, NAMESPACE, pod.name, 7999));
    expect(error).toBeInstanceOf(PortForwardError);
    // containerd names the pod by its sandbox's ID and leaves the uid empty; it tries IPv6 too.
    expect(error.message).toMatch(
      /^port-forward to pod port-forward\/peer port 7999 failed: error forwarding port 7999 to pod [0-9a-f]{64}, uid : failed to execute portforward in network namespace "[^"]+": failed to connect to localhost:7999 inside namespace "[0-9a-f]{64}", IPv4: dial tcp4 127\.0\.0\.1:7999: connect: connection refused IPv6 .+$/,
    );
    expect(error.message).not.toContain('\n');
  });

  test('a missing pod, a bad token, RBAC, no API server and an untrusted certificate: one line each', async () => {
    // A ServiceAccount that may read pods but not forward to them, with a token from the
    // TokenRequest API, as a user's kubeconfig would hold.
    const account = 'no-forward';
    await cluster.core.createNamespacedServiceAccount({
      namespace: NAMESPACE,
      body: { metadata: { name: account } },
    });
    await cluster.rbac.createNamespacedRole({
      namespace: NAMESPACE,
      body: {
        metadata: { name: account },
        rules: [{ apiGroups: [''], resources: ['pods'], verbs: ['get', 'list', 'watch'] }],
      },
    });
    await cluster.rbac.createNamespacedRoleBinding({
      namespace: NAMESPACE,
      body: {
        metadata: { name: account },
        roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name: account },
        subjects: [{ kind: 'ServiceAccount', name: account, namespace: NAMESPACE }],
      },
    });
    const { status } = await cluster.core.createNamespacedServiceAccountToken({
      name: account,
      namespace: NAMESPACE,
      body: { spec: { audiences: [], expirationSeconds: 600 } },
    });

    const closedServer = net.createServer().listen(0, '127.0.0.1');
    await once(closedServer, 'listening');
    const freePort = (closedServer.address() as net.AddressInfo).port;
    await new Promise((resolve) => closedServer.close(resolve));

    const failures: Record<string, () => Promise<Duplex>> = {
      'missing pod': () => openPortForward(kubeConfig, NAMESPACE, 'nope', DATA_PORT),
      'bad token': () =>
        openPortForward(kubeConfigWith({ token: 'not-the-token' }), NAMESPACE, pod.name, 1),
      RBAC: () => openPortForward(kubeConfigWith({ token: status!.token }), NAMESPACE, pod.name, 1),
      'no API server': () =>
        openPortForward(
          kubeConfigWith({ server: `https://127.0.0.1:${freePort}` }),
          NAMESPACE,
          pod.name,
          1,
        ),
      'untrusted certificate': () =>
        openPortForward(kubeConfigWith({ caData: undefined }), NAMESPACE, pod.name, 1),
    };
    const messages: Record<string, string> = {};
    const statusCodes: Record<string, number | undefined> = {};
    for (const [what, opening] of Object.entries(failures)) {
      const error = await failureOf(opening());
      expect(error).toBeInstanceOf(PortForwardError);
      messages[what] = error.message;
      statusCodes[what] = (error as PortForwardError).statusCode;
    }
    const prefix = `port-forward to pod ${NAMESPACE}/peer port 1 failed`;
    expect(messages).toEqual({
      'missing pod': `port-forward to pod ${NAMESPACE}/nope port ${DATA_PORT} failed: pods "nope" not found (HTTP 404)`,
      'bad token': `${prefix}: Unauthorized (HTTP 401)`,
      RBAC: `${prefix}: pods "peer" is forbidden: User "system:serviceaccount:${NAMESPACE}:${account}" cannot get resource "pods/portforward" in API group "" in the namespace "${NAMESPACE}" (HTTP 403)`,
      'no API server': `${prefix}: cannot reach the API server: connect ECONNREFUSED 127.0.0.1:${freePort}`,
      'untrusted certificate': expect.stringMatching(
        new RegExp(`^${prefix}: the API server's TLS certificate was rejected: .+$`),
      ),
    });
    for (const message of Object.values(messages)) expect(message).not.toContain('\n');
    // The refusals that came with an HTTP status carry it (place-kube-agent reads a 403).
    expect(statusCodes).toEqual({
      'missing pod': 404,
      'bad token': 401,
      RBAC: 403,
      'no API server': undefined,
      'untrusted certificate': undefined,
    });
  });

  describe('the target process killed mid-stream', () => {
    /** A server pod of its own (a kill restarts its container), and its server's pid. */
    async function victim(name: string) {
      const target = await serverPod(name);
      const pids = containerProcesses(target.containers[0]!.containerId);
      expect(pids).toHaveLength(1);
      return { target, pid: pids[0]! };
    }

    /** How the stream finished: 'end', or its error's message. */
    function outcome(stream: Duplex): Promise<string> {
      return new Promise((resolve) => {
        stream.once('error', (error) => resolve(error.message));
        stream.once('end', () => resolve('end'));
      });
    }

    test('with nothing unread: the pod closes, and so does the stream, without error', async () => {
      const { target, pid } = await victim('victim-sending');
      const { stream, received } = await streamingForward(kubeConfig, target);
      const finished = outcome(stream);
      // The kernel closes a dead process's sockets: with nothing unread, a plain FIN, which
      // containerd passes on as the end of the forward.
      process.kill(pid, 'SIGKILL');
      expect(await finished).toBe('end');
      await closed(stream);
      expect(received()).toBeLessThan(256 * MiB);
    });

    test("with bytes unread: the reset comes back as containerd's error text, on one line", async () => {
      const { target, pid } = await victim('victim-unread');
      const { stream, id } = await dataForward(
        { send: 0, receive: 64 * MiB, hold: true },
        kubeConfig,
        target,
      );
      stream.resume();
      // Once the server holds the connection, bytes sent stay unread: first in its socket's
      // buffer, then in the kernel's. They go 16 KiB at a time, each once all before it reached
      // the pod, until the kernel holds some: nothing is left on the way when containerd closes.
      await waitFor(
        'the pod to hold the connection',
        async () => (await statsOf(id, target)).held,
        PATIENCE,
      );
      let sent = 0;
      while (kernelUnread(pid, DATA_PORT) === 0) {
        stream.write(randomBytes(16 * 1024));
        sent += 16 * 1024;
        await waitFor(
          `${sent} bytes to reach the pod`,
          async () => (await statsOf(id, target)).buffered + kernelUnread(pid, DATA_PORT) === sent,
          PATIENCE,
        );
      }
      const finished = outcome(stream);
      // Closing a socket with unread bytes resets the connection: containerd's copy fails.
      process.kill(pid, 'SIGKILL');
      expect(await finished).toMatch(
        new RegExp(
          `^port-forward to pod ${NAMESPACE}/victim-unread port ${DATA_PORT} failed: error forwarding port ${DATA_PORT} to pod [0-9a-f]{64}, uid : failed to execute portforward in network namespace "[^"]+": read tcp4 127\\.0\\.0\\.1:\\d+->127\\.0\\.0\\.1:${DATA_PORT}: read: connection reset by peer$`,
        ),
      );
      await closed(stream);
    });

    test('while the client writes: the failure says what the servers said, not that a write failed', async () => {
      const { target, pid } = await victim('victim-writing');
      const { stream, id } = await dataForward(
        { send: 0, receive: 512 * MiB, hold: true },
        kubeConfig,
        target,
      );
      stream.resume();
      const finished = outcome(stream);
      const writing = writeRepeated(stream, randomBytes(MiB), 512 * MiB).catch(() => undefined);
      await waitFor(
        'the pod to hold the connection',
        async () => (await statsOf(id, target)).held,
        PATIENCE,
      );
      await waitFor('unread bytes in the pod', () => kernelUnread(pid, DATA_PORT) > 0, PATIENCE);
      process.kill(pid, 'SIGKILL');
      // containerd writes its error text and closes while this side's bytes still arrive: each
      // hop closes with bytes unread, which resets the next one and may drop the text on the
      // way. Either way the stream says so, rather than that a write found the forward closed.
      expect(await finished).toMatch(
        new RegExp(
          `^port-forward to pod ${NAMESPACE}/victim-writing port ${DATA_PORT} failed: (error forwarding port ${DATA_PORT} to pod [0-9a-f]{64}, uid : .*connection reset by peer|the connection to the API server closed abnormally \\(code 1006\\))$`,
        ),
      );
      await writing;
      await closed(stream);
    });
  });

  test('the connection to the API server broken mid-stream: the stream fails, never hangs', async () => {
    const relay = await startCuttableRelay();
    try {
      const { stream, id } = await streamingForward(kubeConfigWith({ server: relay.server }));
      const failed = once(stream, 'error');
      relay.cut();
      const [error] = (await failed) as [Error];
      expect(error.message).toMatch(
        /^port-forward to pod port-forward\/peer port 7001 failed: the connection to the API server closed abnormally \(code 1006\)$/,
      );
      await closed(stream);
      // The API server noticed too: the pod's end of the forwarded connection is gone.
      await waitFor(
        'the pod connection to close',
        async () => (await statsOf(id)).closed,
        PATIENCE,
      );
    } finally {
      await relay.close();
    }
  });

  describe('an agent session over the forward', () => {
    /** An agent pod as the Job's template makes it, tapping `peer`, serving on AGENT_PORT. */
    async function startAgentPod(name: string): Promise<string> {
      const job = agentJobManifest({
        sessionId: name,
        namespace: NAMESPACE,
        node: cluster.nodeName,
        containerId: pod.containers[0]!.containerId,
        target: `pod/${pod.name}`,
        image: defaultAgentImage(),
        pullPolicy: 'Never',
        pullSecrets: [],
        capabilities: true,
        ttlSeconds: 60,
        idleTimeoutSeconds: 60,
        cli: { host: hostname(), pid: process.pid },
      });
      const template = job.spec!.template;
      // The Secret the pod mounts, as the CLI makes it but owned by no Job (there is none: an
      // owner that does not exist would have the garbage collector delete it).
      const secret = newSessionSecret();
      await cluster.core.createNamespacedSecret({
        namespace: NAMESPACE,
        body: {
          ...agentSecretManifest(job),
          data: { [AGENT_SECRET_KEY]: Buffer.from(secret).toString('base64') },
        },
      });
      await cluster.core.createNamespacedPod({
        namespace: NAMESPACE,
        body: { metadata: { name, labels: template.metadata?.labels }, spec: template.spec! },
      });
      secrets.set(name, secret);
      return name;
    }

    /** The session secret of each agent pod, by name. */
    const secrets = new Map<string, string>();

    async function agentPod(name: string): Promise<V1Pod> {
      return cluster.core.readNamespacedPod({ name, namespace: NAMESPACE });
    }

    async function exitCode(name: string): Promise<number | undefined> {
      return (await agentPod(name)).status?.containerStatuses?.[0]?.state?.terminated?.exitCode;
    }

    /** A session through a forward, once the agent listens (until then the dial fails). */
    async function startSession(agent: string, config = kubeConfig): Promise<AgentClient> {
      await waitFor(
        'the agent container to run',
        async () => (await agentPod(agent)).status?.containerStatuses?.[0]?.state?.running,
        PATIENCE,
      );
      return waitFor(
        'the agent to answer through the forward',
        async () => {
          try {
            const stream = await forward(AGENT_PORT, config, agent);
            return await AgentClient.start(stream, {
              clientName: 'port-forward test',
              secret: secrets.get(agent)!,
            });
          } catch (error) {
            if (!/connection refused/.test((error as Error).message)) throw error;
            return undefined;
          }
        },
        { ...PATIENCE, ms: 120_000 },
      );
    }

    test('close() ends the session: the agent exits 0', async () => {
      const agent = await startAgentPod('agent-close');
      const client = await startSession(agent);
      expect(client.agent.target).toBe(`container ${pod.containers[0]!.containerId}`);
      await client.subscribe(DATA_PORT);
      await client.close();
      await waitFor(
        'the agent to exit',
        async () => (await exitCode(agent)) !== undefined,
        PATIENCE,
      );
      expect(await exitCode(agent)).toBe(0);
    });

    test('the forward broken: the session ends with an error, and the agent exits', async () => {
      const agent = await startAgentPod('agent-broken');
      const relay = await startCuttableRelay();
      try {
        const client = await startSession(agent, kubeConfigWith({ server: relay.server }));
        await client.subscribe(DATA_PORT);
        const errors: Error[] = [];
        client.on('error', (error) => errors.push(error));
        // Not events.once(): it rejects on the 'error' that comes first.
        const ended = new Promise<void>((resolve) => client.once('end', resolve));
        relay.cut();
        await ended;
        expect(errors.map((e) => e.message)).toEqual([
          expect.stringMatching(
            /^connection to the agent failed: port-forward to pod port-forward\/agent-broken port 61337 failed: the connection to the API server closed abnormally \(code 1006\)$/,
          ),
        ]);
        // Its end of the session broke with the connection: the agent exits by itself, failed.
        await waitFor(
          'the agent to exit',
          async () => (await exitCode(agent)) !== undefined,
          PATIENCE,
        );
        expect(await exitCode(agent)).toBe(1);
      } finally {
        await relay.close();
      }
    });
  });
});
