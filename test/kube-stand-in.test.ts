/**
 * The stand-in Kubernetes API server (test/kube/), checked with the clients the CLI uses:
 * @kubernetes/client-node 1.4 and `ws`, configured only from the kubeconfig it writes. Its pods
 * are real processes in real netns and cgroups; its agent Jobs run the real agent.
 */
import { execFile, execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, statSync } from 'node:fs';
import { request } from 'node:https';
import { Duplex, PassThrough } from 'node:stream';
import { promisify } from 'node:util';
import {
  AppsV1Api,
  BatchV1Api,
  CoreV1Api,
  KubeConfig,
  Log,
  PortForward,
  Watch,
  type V1Job,
  type V1Pod,
} from '@kubernetes/client-node';
import WebSocket from 'ws';
import { findContainerPid } from '../src/agent/target.js';
import { isAlive, listNetns, ownerOf } from '../src/platform/local/netns.js';
import { AgentClient } from '../src/protocol/client.js';
import type { OpenedMessage } from '../src/protocol/messages.js';
import { startStandInCluster, type StandInCluster } from './kube/cluster.js';
import { listTestCgroups } from './support/leftovers.js';
import { SANDBOX_PREFIX } from './support/sandbox.js';

const execFileAsync = promisify(execFile);

const AGENT_IMAGE = 'ghcr.io/mirrord-dev/mirrord-agent:0.1.0';
const AGENT_PORT = 61337;
const HTTP_PORT = 8080;
/** A tiny HTTP service answering with its container's POD_GREETING variable. */
const HTTP_SERVICE = `require('http').createServer((req, res) => res.end('hello ' + process.env.POD_GREETING)).listen(${HTTP_PORT})`;

const ECHO_PORT = 7000;
const ECHO_SERVICE = `require('net').createServer((socket) => socket.pipe(socket)).listen(${ECHO_PORT})`;

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls until `check` returns a value (not undefined/false), or fails after `timeoutMs`. */
async function until<T>(
  what: string,
  check: () => T | undefined | false | Promise<T | undefined | false>,
  timeoutMs = 30_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined && value !== false) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

function inNetns(netns: string, command: string, args: string[]): Promise<string> {
  return execFileAsync('ip', ['netns', 'exec', netns, command, ...args], { encoding: 'utf8' }).then(
    (r) => r.stdout,
  );
}

function netnsInode(path: string): number {
  return statSync(path).ino;
}

/** The Status an API call failed with (client-node keeps the body as text or as an object). */
function statusOf(error: unknown): { code: number; reason: string; message: string } {
  const body = (error as { body?: unknown }).body;
  const parsed = typeof body === 'string' ? (JSON.parse(body) as object) : (body as object);
  return parsed as { code: number; reason: string; message: string };
}

async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  throw new Error('the call succeeded');
}

function agentJob(name: string, nodeName: string, containerId: string): V1Job {
  return {
    apiVersion: 'batch/v1',
    kind: 'Job',
    metadata: {
      name,
      labels: {
        'app.kubernetes.io/name': 'mirrord-agent',
        'app.kubernetes.io/managed-by': 'mirrord',
      },
    },
    spec: {
      backoffLimit: 0,
      ttlSecondsAfterFinished: 60,
      template: {
        metadata: {
          labels: { 'app.kubernetes.io/name': 'mirrord-agent', 'sidecar.istio.io/inject': 'false' },
          annotations: { 'sidecar.istio.io/inject': 'false', 'linkerd.io/inject': 'disabled' },
        },
        spec: {
          restartPolicy: 'Never',
          hostPID: true,
          tolerations: [{ operator: 'Exists' }],
          affinity: {
            nodeAffinity: {
              requiredDuringSchedulingIgnoredDuringExecution: {
                nodeSelectorTerms: [
                  { matchFields: [{ key: 'metadata.name', operator: 'In', values: [nodeName] }] },
                ],
              },
            },
          },
          containers: [
            {
              name: 'mirrord-agent',
              image: AGENT_IMAGE,
              command: [
                'mirrord',
                'agent',
                '--container-id',
                containerId,
                '--listen',
                `127.0.0.1:${AGENT_PORT}`,
                '--idle-timeout',
                '30',
              ],
              securityContext: { privileged: true },
            },
          ],
        },
      },
    },
  };
}

function localJob(
  name: string,
  command: string[],
  extra: Partial<V1Job['spec']> = {},
  terminationGracePeriodSeconds?: number,
): V1Job {
  return {
    apiVersion: 'batch/v1',
    kind: 'Job',
    metadata: { name },
    spec: {
      backoffLimit: 0,
      ...extra,
      template: {
        spec: {
          restartPolicy: 'Never',
          ...(terminationGracePeriodSeconds === undefined ? {} : { terminationGracePeriodSeconds }),
          containers: [{ name: 'main', image: 'stand-in/local', command }],
        },
      },
    },
  };
}

/** A port-forward as a byte stream: channel 0 carries data, channel 1 errors. */
function portForwardStream(ws: WebSocket): Duplex {
  const portPrefixSeen = new Set<number>();
  const stream = new Duplex({
    write(chunk: Buffer, _encoding, callback) {
      ws.send(Buffer.concat([Buffer.from([0]), chunk]), callback);
    },
    // v4 has no half-close: ending the stream's writable side sends nothing; destroying it
    // closes the port-forward.
    destroy(error, callback) {
      ws.close();
      callback(error);
    },
    read() {
      ws.resume();
    },
  });
  ws.on('message', (data: Buffer) => {
    const channel = data[0] ?? -1;
    let payload = data.subarray(1);
    if (!portPrefixSeen.has(channel)) {
      portPrefixSeen.add(channel);
      payload = payload.subarray(2);
    }
    if (payload.length === 0) return;
    if (channel === 0 && !stream.push(payload)) ws.pause();
    if (channel === 1) stream.destroy(new Error(payload.toString()));
  });
  ws.on('close', () => stream.push(null));
  ws.on('error', (error) => stream.destroy(error));
  return stream;
}

describe('stand-in Kubernetes API server', () => {
  let cluster: StandInCluster;
  let kubeConfig: KubeConfig;
  let core: CoreV1Api;
  let apps: AppsV1Api;
  let batch: BatchV1Api;

  beforeAll(async () => {
    cluster = await startStandInCluster({ ttlScale: 0.02 });
    kubeConfig = new KubeConfig();
    kubeConfig.loadFromFile(cluster.kubeconfigPath);
    core = kubeConfig.makeApiClient(CoreV1Api);
    apps = kubeConfig.makeApiClient(AppsV1Api);
    batch = kubeConfig.makeApiClient(BatchV1Api);
  });

  afterAll(async () => {
    await cluster?.close();
  });

  /** A client-node watch, once established; the function returned stops it. */
  async function watchEvents<T>(
    path: string,
    query: Record<string, string>,
    onEvent: (type: string, object: T) => void,
  ): Promise<() => Promise<void>> {
    let done!: () => void;
    const ended = new Promise<void>((resolve) => (done = resolve));
    const controller = await new Watch(kubeConfig).watch(path, query, onEvent, () => done());
    return async () => {
      controller.abort();
      await ended;
    };
  }

  /** A pod's current state from the API. */
  async function readPod(name: string): Promise<V1Pod | undefined> {
    try {
      return await core.readNamespacedPod({ name, namespace: 'default' });
    } catch (error) {
      if ((error as { code?: number }).code === 404) return undefined;
      throw error;
    }
  }

  /** The pod's PodScheduled condition, once the scheduler has set it. */
  async function podScheduled(name: string) {
    return (await readPod(name))?.status?.conditions?.find((c) => c.type === 'PodScheduled');
  }

  async function deleteJobs(...names: string[]): Promise<void> {
    for (const name of names) {
      await batch.deleteNamespacedJob({
        name,
        namespace: 'default',
        propagationPolicy: 'Background',
      });
    }
  }

  async function podOfJob(jobName: string): Promise<V1Pod> {
    return until(`the pod of job ${jobName}`, async () => {
      const list = await core.listNamespacedPod({
        namespace: 'default',
        labelSelector: `job-name=${jobName}`,
      });
      return list.items[0];
    });
  }

  test("a Deployment's pod runs a real process in its own netns and cgroup, answering at its pod IP", async () => {
    const web = await cluster.addDeployment({
      name: 'web',
      replicas: 1,
      containers: [
        {
          name: 'web',
          image: 'stand-in/local:1',
          command: [process.execPath, '-e', HTTP_SERVICE],
          env: [{ name: 'POD_GREETING', value: 'from the stand-in' }],
          ports: [{ containerPort: HTTP_PORT, name: 'http' }],
        },
      ],
    });
    const pods = await core.listNamespacedPod({ namespace: 'default', labelSelector: 'app=web' });
    expect(pods.items).toHaveLength(1);
    const pod = pods.items[0]!;
    expect(pod.status?.phase).toBe('Running');
    expect(pod.spec?.nodeName).toBe(cluster.nodeName);
    expect(pod.metadata?.ownerReferences?.[0]?.kind).toBe('ReplicaSet');
    const status = pod.status?.containerStatuses?.[0];
    expect(status?.ready).toBe(true);
    expect(status?.containerID).toMatch(/^containerd:\/\/[0-9a-f]{64}$/);

    // The agent's own lookup finds the container's process through /proc/*/cgroup, and that
    // process lives in the pod's netns.
    const pid = findContainerPid(status!.containerID!);
    expect(pid).toBe(web.pods[0]!.containers[0]!.pid);
    expect(netnsInode(`/proc/${pid}/ns/net`)).toBe(netnsInode(`/run/netns/${web.pods[0]!.netns}`));

    expect(pod.status?.podIP).toBe(web.pods[0]!.ip);
    const answer = await inNetns(cluster.clientNetns, 'curl', [
      '-s',
      '--max-time',
      '10',
      `http://${pod.status!.podIP}:${HTTP_PORT}/`,
    ]);
    expect(answer).toBe('hello from the stand-in');

    const deployment = await apps.readNamespacedDeployment({ name: 'web', namespace: 'default' });
    expect(deployment.spec?.selector.matchLabels).toEqual({ app: 'web' });
    await until('the Deployment to report its ready replica', async () => {
      const current = await apps.readNamespacedDeployment({ name: 'web', namespace: 'default' });
      return current.status?.readyReplicas === 1;
    });
    const replicaSets = await apps.listNamespacedReplicaSet({
      namespace: 'default',
      labelSelector: 'app=web',
    });
    expect(replicaSets.items.map((rs) => rs.metadata?.ownerReferences?.[0]?.name)).toEqual(['web']);
  });

  test('a Job with the agent image runs the real agent in its pod netns, reached through a port-forward', async () => {
    const target = await cluster.addPod({
      name: 'target',
      containers: [
        {
          name: 'app',
          image: 'stand-in/local',
          command: [process.execPath, '-e', HTTP_SERVICE],
          ports: [{ containerPort: HTTP_PORT }],
        },
      ],
    });
    const events: string[] = [];
    const stopWatch = await watchEvents<V1Pod>(
      '/api/v1/namespaces/default/pods',
      { labelSelector: 'job-name=mirrord-agent-e2e' },
      (type, pod) => events.push(`${type} ${pod.status?.phase ?? ''}`),
    );

    const containerId = target.containers[0]!.containerId;
    await batch.createNamespacedJob({
      namespace: 'default',
      body: agentJob('mirrord-agent-e2e', cluster.nodeName, containerId),
    });
    const created = cluster.requests.find(
      (r) => r.method === 'POST' && r.path === '/apis/batch/v1/namespaces/default/jobs',
    );
    expect((created?.body as V1Job).metadata?.name).toBe('mirrord-agent-e2e');

    const pod = await podOfJob('mirrord-agent-e2e');
    const podName = pod.metadata!.name!;
    expect(pod.metadata?.labels?.['batch.kubernetes.io/job-name']).toBe('mirrord-agent-e2e');
    expect(pod.metadata?.ownerReferences?.[0]).toMatchObject({
      kind: 'Job',
      name: 'mirrord-agent-e2e',
    });
    await until(
      'the agent pod to run',
      async () => (await readPod(podName))?.status?.phase === 'Running',
    );

    // The readiness line arrives through pods/log with follow.
    const output = new PassThrough();
    let logged = '';
    output.on('data', (chunk: Buffer) => (logged += chunk.toString()));
    const logEnded = new Promise<void>((resolve) => output.once('end', resolve));
    await new Log(kubeConfig).log('default', podName, 'mirrord-agent', output, {
      follow: true,
    });
    const readiness = await until('the agent readiness line', () => {
      const line = logged.split('\n').find((l) => l.startsWith('{"ready":true'));
      return line
        ? (JSON.parse(line) as { port: number; target: string; interfaces: string[] })
        : undefined;
    });
    expect(readiness.port).toBe(AGENT_PORT);
    expect(readiness.target).toBe(`container ${containerId}`);
    expect(readiness.interfaces.sort()).toEqual(['eth0', 'lo']);

    // The agent runs as the kubelet ran it: in its own pod's netns (neither the target's nor
    // the host's), found like any container by its id.
    const running = await readPod(podName);
    const agentPid = findContainerPid(running!.status!.containerStatuses![0]!.containerID!);
    expect(cluster.processes()).toContain(agentPid);
    const agentNetns = netnsInode(`/proc/${agentPid}/ns/net`);
    expect(agentNetns).not.toBe(netnsInode(`/run/netns/${target.netns}`));
    expect(agentNetns).not.toBe(netnsInode('/proc/self/ns/net'));

    // A raw WebSocket port-forward, configured from the kubeconfig alone.
    const user = kubeConfig.getCurrentUser()!;
    const server = kubeConfig.getCurrentCluster()!;
    const ws = new WebSocket(
      `${server.server.replace(/^https/, 'wss')}/api/v1/namespaces/default/pods/${podName}/portforward?ports=${AGENT_PORT}`,
      ['v4.channel.k8s.io'],
      {
        headers: { Authorization: `Bearer ${user.token}` },
        ca: Buffer.from(server.caData!, 'base64'),
      },
    );
    await new Promise<void>((resolve, reject) => {
      ws.once('open', () => resolve());
      ws.once('error', reject);
    });
    expect(ws.protocol).toBe('v4.channel.k8s.io');
    const client = await AgentClient.start(portForwardStream(ws), { clientName: 'stand-in test' });
    try {
      expect(client.agent.target).toBe(`container ${containerId}`);
      await client.subscribe(HTTP_PORT);
      const opened = new Promise<OpenedMessage>((resolve) => client.once('opened', resolve));
      let mirrored = '';
      client.on('data', ({ bytes }) => (mirrored += bytes.toString()));
      await inNetns(cluster.clientNetns, 'curl', [
        '-s',
        '--max-time',
        '10',
        '--data',
        'mirrored through the port-forward',
        `http://${target.ip}:${HTTP_PORT}/`,
      ]);
      const connection = await opened;
      expect(connection.server.port).toBe(HTTP_PORT);
      await until('the request bytes', () =>
        mirrored.includes('mirrored through the port-forward'),
      );
    } finally {
      await client.close();
    }
    // Its session over, the agent exits 0, the followed log ends, and the Job completes.
    await until(
      'the agent pod to succeed',
      async () => (await readPod(podName))?.status?.phase === 'Succeeded',
    );
    await logEnded;
    await until('the Job to complete', async () => {
      const job = await batch.readNamespacedJob({
        name: 'mirrord-agent-e2e',
        namespace: 'default',
      });
      return job.status?.conditions?.some((c) => c.type === 'Complete' && c.status === 'True');
    });
    await until(
      'the watch to see the pod run and succeed',
      () =>
        events.some((e) => e === 'MODIFIED Running') &&
        events.some((e) => e === 'MODIFIED Succeeded'),
    );
    expect(events[0]).toBe('ADDED Pending');
    await stopWatch();
  });

  test('port-forward carries bytes both ways intact, reports a refused port on the error channel, and works with client-node', async () => {
    await cluster.addPod({
      name: 'echo',
      containers: [
        {
          name: 'echo',
          image: 'stand-in/local',
          command: [process.execPath, '-e', ECHO_SERVICE],
          ports: [{ containerPort: ECHO_PORT }],
        },
      ],
    });
    const payload = randomBytes(8 * 1024 * 1024);
    const ws = await openPortForward('echo', ECHO_PORT);
    const stream = portForwardStream(ws);
    const received: Buffer[] = [];
    let receivedBytes = 0;
    stream.on('data', (chunk: Buffer) => {
      received.push(chunk);
      receivedBytes += chunk.length;
      // A slow reader: the echo has to wait, all the way back through the relay.
      if (receivedBytes % (1024 * 1024) < chunk.length) {
        stream.pause();
        setTimeout(() => stream.resume(), 20);
      }
    });
    stream.write(payload);
    await until('the whole payload to come back', () => receivedBytes >= payload.length);
    stream.destroy();
    const echoed = Buffer.concat(received);
    expect(echoed.length).toBe(payload.length);
    expect(createHash('sha256').update(echoed).digest('hex')).toBe(
      createHash('sha256').update(payload).digest('hex'),
    );

    const refusedWs = await openPortForward('echo', 9);
    const errors: string[] = [];
    const announcedPorts: number[] = [];
    refusedWs.on('message', (data: Buffer) => {
      // Each channel's first message is its port (2 bytes, little-endian); then errors as text.
      if (announcedPorts.length < 2) announcedPorts.push(data.readUInt16LE(1));
      else if (data[0] === 1) errors.push(data.subarray(1).toString());
    });
    const closeCode = await new Promise<number>((resolve) => refusedWs.once('close', resolve));
    expect(closeCode).toBe(1000);
    expect(announcedPorts).toEqual([9, 9]);
    expect(errors.join('')).toMatch(
      /^error forwarding port 9 to pod echo, uid [0-9a-f-]+: .*connection refused$/,
    );

    // client-node offers v5.channel.k8s.io first; the stand-in, like the kubelet, answers v4.
    const output = new PassThrough();
    const input = new PassThrough();
    let answer = '';
    output.on('data', (chunk: Buffer) => (answer += chunk.toString()));
    const socket = (await new PortForward(kubeConfig).portForward(
      'default',
      'echo',
      [ECHO_PORT],
      output,
      null,
      input,
    )) as WebSocket;
    input.write('through client-node');
    await until('the echo through client-node', () => answer === 'through client-node');
    socket.close();
  });

  test('pods/log keeps stdout and stderr; a failing pod fails its Job (backoffLimit 0)', async () => {
    await batch.createNamespacedJob({
      namespace: 'default',
      body: localJob('failing', ['sh', '-c', 'echo one; echo two >&2; echo three; exit 3']),
    });
    const job = await until('the Job to fail', async () => {
      const current = await batch.readNamespacedJob({ name: 'failing', namespace: 'default' });
      return current.status?.conditions?.some((c) => c.type === 'Failed' && c.status === 'True')
        ? current
        : undefined;
    });
    expect(job.status?.conditions?.find((c) => c.type === 'Failed')?.reason).toBe(
      'BackoffLimitExceeded',
    );
    expect(job.status?.failed).toBe(1);
    const pod = await podOfJob('failing');
    expect(pod.status?.phase).toBe('Failed');
    expect(pod.status?.containerStatuses?.[0]?.state?.terminated).toMatchObject({
      exitCode: 3,
      reason: 'Error',
    });
    const name = pod.metadata!.name!;
    // stdout and stderr are two pipes: their lines interleave in the order they were read.
    const log = await core.readNamespacedPodLog({ name, namespace: 'default' });
    const lines = log.split('\n').filter(Boolean);
    expect([...lines].sort()).toEqual(['one', 'three', 'two']);
    expect(lines.filter((l) => l !== 'two')).toEqual(['one', 'three']);
    expect(
      await core.readNamespacedPodLog({
        name,
        namespace: 'default',
        container: 'main',
        tailLines: 2,
      }),
    ).toBe(`${lines.slice(-2).join('\n')}\n`);
    const wrong = statusOf(
      await rejection(core.readNamespacedPodLog({ name, namespace: 'default', container: 'nope' })),
    );
    expect(wrong).toMatchObject({
      code: 400,
      message: `container nope is not valid for pod ${name}`,
    });
  });

  test('activeDeadlineSeconds fails a Job that runs too long and stops its pod', async () => {
    await batch.createNamespacedJob({
      namespace: 'default',
      body: localJob('overdue', ['sleep', '300'], { activeDeadlineSeconds: 1 }),
    });
    const pod = await podOfJob('overdue');
    const running = await until('the pod to run', async () => {
      const current = await readPod(pod.metadata!.name!);
      return current?.status?.phase === 'Running' ? current : undefined;
    });
    const pid = findContainerPid(running.status!.containerStatuses![0]!.containerID!);
    const failed = await until('the deadline to fail the Job', async () => {
      const job = await batch.readNamespacedJob({ name: 'overdue', namespace: 'default' });
      return job.status?.conditions?.find((c) => c.type === 'Failed' && c.status === 'True');
    });
    expect(failed.reason).toBe('DeadlineExceeded');
    await until(
      'the pod to be gone',
      async () => (await readPod(pod.metadata!.name!)) === undefined,
    );
    expect(isAlive(pid)).toBe(false);
  });

  test('a crashing container of a Deployment restarts with a new container id', async () => {
    const crashing = await cluster.addDeployment({
      name: 'crashing',
      containers: [
        { name: 'main', image: 'stand-in/local', command: ['sh', '-c', 'sleep 0.5; exit 1'] },
      ],
    });
    const first = crashing.pods[0]!;
    const restarted = await until('a restart', async () => {
      const status = (await readPod(first.name))?.status?.containerStatuses?.[0];
      return status && status.restartCount >= 1 && status.state?.running ? status : undefined;
    });
    expect(restarted.containerID).not.toBe(first.containers[0]!.containerId);
    expect(restarted.lastState?.terminated).toMatchObject({ exitCode: 1, reason: 'Error' });
    await apps.deleteNamespacedDeployment({ name: 'crashing', namespace: 'default' });
    await until('its pod to be gone', async () => (await readPod(first.name)) === undefined);
  });

  test('watch events arrive; TTL removes a finished Job and its pod', async () => {
    const seen: string[] = [];
    const stopWatch = await watchEvents<V1Job>(
      '/apis/batch/v1/namespaces/default/jobs',
      { fieldSelector: 'metadata.name=short-lived' },
      (type, job) => {
        const complete = job.status?.conditions?.some(
          (c) => c.type === 'Complete' && c.status === 'True',
        );
        seen.push(complete ? `${type} Complete` : type);
      },
    );
    // 50 s at ttlScale 0.02: one second.
    await batch.createNamespacedJob({
      namespace: 'default',
      body: localJob('short-lived', ['sh', '-c', 'echo done'], { ttlSecondsAfterFinished: 50 }),
    });
    await until('the Job to be deleted by its TTL', () => seen.includes('DELETED Complete'));
    expect(seen[0]).toBe('ADDED');
    expect(seen).toContain('MODIFIED Complete');
    expect(seen.at(-1)).toBe('DELETED Complete');
    await until('its pod to be gone', async () => {
      const pods = await core.listNamespacedPod({
        namespace: 'default',
        labelSelector: 'job-name=short-lived',
      });
      return pods.items.length === 0;
    });
    await stopWatch();
  });

  test('deleting a Job with Background removes its pod and kills its process', async () => {
    await batch.createNamespacedJob({
      namespace: 'default',
      body: localJob('background', ['sleep', '300']),
    });
    const pod = await podOfJob('background');
    const running = await until('the pod to run', async () => {
      const current = await readPod(pod.metadata!.name!);
      return current?.status?.phase === 'Running' ? current : undefined;
    });
    const pid = findContainerPid(running.status!.containerStatuses![0]!.containerID!);
    expect(isAlive(pid)).toBe(true);
    await batch.deleteNamespacedJob({
      name: 'background',
      namespace: 'default',
      propagationPolicy: 'Background',
    });
    const gone = statusOf(
      await rejection(batch.readNamespacedJob({ name: 'background', namespace: 'default' })),
    );
    expect(gone).toMatchObject({ code: 404, reason: 'NotFound' });
    await until(
      'the pod to be gone',
      async () => (await readPod(pod.metadata!.name!)) === undefined,
    );
    await until('its process to be gone', () => !isAlive(pid));
  });

  test('Foreground keeps the Job until its pod is gone, which takes SIGKILL after the grace period when SIGTERM is ignored; Orphan (the batch/v1 default) keeps the pod', async () => {
    await batch.createNamespacedJob({
      namespace: 'default',
      body: localJob('fg', ['sh', '-c', 'trap "" TERM; sleep 300'], {}, 2),
    });
    const fgPod = await podOfJob('fg');
    const running = await until('the pod to run', async () => {
      const current = await readPod(fgPod.metadata!.name!);
      return current?.status?.phase === 'Running' ? current : undefined;
    });
    const fgPid = findContainerPid(running.status!.containerStatuses![0]!.containerID!);
    const deleted = await rawRequest(
      'DELETE',
      '/apis/batch/v1/namespaces/default/jobs/fg?propagationPolicy=Foreground',
    );
    expect(deleted.status).toBe(200);
    const marked = JSON.parse(deleted.body) as V1Job;
    expect(marked.metadata?.deletionTimestamp).toBeDefined();
    expect(marked.metadata?.finalizers).toEqual(['foregroundDeletion']);
    // SIGTERM is ignored: within the 2 s grace period the pod terminates and the Job waits.
    const terminating = await readPod(fgPod.metadata!.name!);
    expect(terminating?.metadata?.deletionTimestamp).toBeDefined();
    expect(isAlive(fgPid)).toBe(true);
    const waiting = await batch.readNamespacedJob({ name: 'fg', namespace: 'default' });
    expect(waiting.metadata?.finalizers).toEqual(['foregroundDeletion']);
    await until(
      'the pod to be gone',
      async () => (await readPod(fgPod.metadata!.name!)) === undefined,
    );
    expect(isAlive(fgPid)).toBe(false);
    await until(
      'the Job to be gone',
      async () =>
        (await rejection(batch.readNamespacedJob({ name: 'fg', namespace: 'default' }))) !==
        undefined,
    );

    await batch.createNamespacedJob({
      namespace: 'default',
      body: localJob('orphan', ['sleep', '300']),
    });
    const pod = await podOfJob('orphan');
    await until(
      'the pod to run',
      async () => (await readPod(pod.metadata!.name!))?.status?.phase === 'Running',
    );
    const answer = await rawRequest('DELETE', '/apis/batch/v1/namespaces/default/jobs/orphan');
    expect(answer.status).toBe(200);
    expect(answer.headers.warning).toContain(
      'child pods are preserved by default when jobs are deleted',
    );
    const orphaned = await readPod(pod.metadata!.name!);
    expect(orphaned?.status?.phase).toBe('Running');
    expect(orphaned?.metadata?.ownerReferences).toBeUndefined();
    const pid = findContainerPid(orphaned!.status!.containerStatuses![0]!.containerID!);
    await core.deleteNamespacedPod({
      name: pod.metadata!.name!,
      namespace: 'default',
      gracePeriodSeconds: 0,
    });
    await until('the orphan process to be gone', () => !isAlive(pid));
  });

  test('a StatefulSet names its pods by ordinal and replaces a deleted one', async () => {
    const db = await cluster.addStatefulSet({
      name: 'db',
      replicas: 2,
      containers: [{ name: 'db', image: 'stand-in/local', command: ['sleep', '300'] }],
    });
    expect(db.pods.map((p) => p.name)).toEqual(['db-0', 'db-1']);
    const set = await apps.readNamespacedStatefulSet({ name: 'db', namespace: 'default' });
    expect(set.spec?.selector.matchLabels).toEqual({ app: 'db' });
    await until('the StatefulSet to report 2 ready replicas', async () => {
      const current = await apps.readNamespacedStatefulSet({ name: 'db', namespace: 'default' });
      return current.status?.readyReplicas === 2;
    });
    const listed = await apps.listNamespacedStatefulSet({ namespace: 'default' });
    expect(listed.items.map((s) => s.metadata?.name)).toEqual(['db']);
    const byName = await core.listNamespacedPod({
      namespace: 'default',
      fieldSelector: 'metadata.name=db-1',
    });
    expect(
      byName.items.map((p) => p.metadata?.labels?.['statefulset.kubernetes.io/pod-name']),
    ).toEqual(['db-1']);
    const oldUid = db.pods[0]!.uid;
    await core.deleteNamespacedPod({ name: 'db-0', namespace: 'default' });
    await until('db-0 to be replaced and run', async () => {
      const pod = await readPod('db-0');
      return pod?.metadata?.uid !== oldUid && pod?.status?.phase === 'Running';
    });
  });

  describe('faults', () => {
    afterEach(() => cluster.faults.clear());

    test('deny: 403 Forbidden with the RBAC message, for API calls and the port-forward', async () => {
      cluster.faults.deny('create', 'jobs', 'batch');
      const status = statusOf(
        await rejection(
          batch.createNamespacedJob({ namespace: 'default', body: localJob('denied', ['true']) }),
        ),
      );
      expect(status).toMatchObject({
        code: 403,
        reason: 'Forbidden',
        message:
          'jobs.batch is forbidden: User "stand-in-user" cannot create resource "jobs" in API group "batch" in the namespace "default"',
      });
      cluster.faults.deny('create', 'pods/portforward');
      const refused = await portForwardRefusal('target', HTTP_PORT);
      expect(refused.status).toBe(403);
      expect(JSON.parse(refused.body)).toMatchObject({
        reason: 'Forbidden',
        message:
          'pods "target" is forbidden: User "stand-in-user" cannot create resource "pods/portforward" in API group "" in the namespace "default"',
      });
    });

    test('failImagePull: ErrImagePull, then ImagePullBackOff; unknown images never pull', async () => {
      cluster.faults.failImagePull(/mirrord-agent:broken$/);
      const job = agentJob('broken-image', cluster.nodeName, 'containerd://0123456789ab');
      job.spec!.template.spec!.containers[0]!.image = 'ghcr.io/mirrord-dev/mirrord-agent:broken';
      await batch.createNamespacedJob({ namespace: 'default', body: job });
      const reasons = new Set<string>();
      const pod = await podOfJob('broken-image');
      const backOff = await until('ImagePullBackOff', async () => {
        const waiting = (await readPod(pod.metadata!.name!))?.status?.containerStatuses?.[0]?.state
          ?.waiting;
        if (waiting?.reason) reasons.add(waiting.reason);
        return waiting?.reason === 'ImagePullBackOff' ? waiting : undefined;
      });
      expect(reasons).toContain('ErrImagePull');
      expect(backOff.message).toBe(
        'Back-off pulling image "ghcr.io/mirrord-dev/mirrord-agent:broken"',
      );
      expect((await readPod(pod.metadata!.name!))?.status?.phase).toBe('Pending');

      const other = localJob('unknown-image', ['true']);
      other.spec!.template.spec!.containers[0]!.image = 'docker.io/library/busybox:1.36';
      await batch.createNamespacedJob({ namespace: 'default', body: other });
      const otherPod = await podOfJob('unknown-image');
      const pulled = await until('ErrImagePull', async () => {
        const waiting = (await readPod(otherPod.metadata!.name!))?.status?.containerStatuses?.[0]
          ?.state?.waiting;
        return waiting?.reason === 'ErrImagePull' || waiting?.reason === 'ImagePullBackOff'
          ? waiting
          : undefined;
      });
      expect(pulled.message).toContain('docker.io/library/busybox:1.36');
      await deleteJobs('broken-image', 'unknown-image');
    });

    test('unschedulable: Pending with PodScheduled False until the node takes pods again; affinity to another node never fits', async () => {
      cluster.faults.unschedulable(true);
      await batch.createNamespacedJob({
        namespace: 'default',
        body: localJob('waits', ['sleep', '300']),
      });
      const pod = await podOfJob('waits');
      const scheduled = await until('the scheduler to give up', () =>
        podScheduled(pod.metadata!.name!),
      );
      expect(scheduled).toMatchObject({ status: 'False', reason: 'Unschedulable' });
      expect(scheduled.message).toMatch(/^0\/1 nodes are available/);
      expect((await readPod(pod.metadata!.name!))?.status?.phase).toBe('Pending');
      cluster.faults.unschedulable(false);
      await until(
        'the pod to run',
        async () => (await readPod(pod.metadata!.name!))?.status?.phase === 'Running',
      );

      await batch.createNamespacedJob({
        namespace: 'default',
        body: agentJob('elsewhere', 'another-node', 'containerd://0123456789ab'),
      });
      const pinned = await podOfJob('elsewhere');
      const refused = await until('the scheduler to refuse', () =>
        podScheduled(pinned.metadata!.name!),
      );
      expect(refused).toMatchObject({
        status: 'False',
        reason: 'Unschedulable',
        message: expect.stringContaining(
          "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.",
        ),
      });
      await deleteJobs('waits', 'elsewhere');
    });

    test('holdContainerCreating: scheduled but ContainerCreating, no log, no port-forward, until released', async () => {
      cluster.faults.holdContainerCreating(true);
      await batch.createNamespacedJob({
        namespace: 'default',
        body: localJob('held', ['sleep', '300']),
      });
      const pod = await podOfJob('held');
      const name = pod.metadata!.name!;
      const held = await until('the pod to be bound', async () => {
        const current = await readPod(name);
        return current?.spec?.nodeName && current.status?.containerStatuses ? current : undefined;
      });
      expect(held.status?.phase).toBe('Pending');
      expect(held.status?.containerStatuses?.[0]?.state?.waiting?.reason).toBe('ContainerCreating');
      expect(
        statusOf(await rejection(core.readNamespacedPodLog({ name, namespace: 'default' }))),
      ).toMatchObject({
        code: 400,
        message: `container "main" in pod "${name}" is waiting to start: ContainerCreating`,
      });
      const refused = await portForwardRefusal(name, HTTP_PORT);
      expect(refused.status).toBe(400);
      expect(JSON.parse(refused.body)).toMatchObject({
        reason: 'BadRequest',
        message: 'unable to upgrade connection: pod is not running - current status=Pending',
      });
      cluster.faults.holdContainerCreating(false);
      await until('the pod to run', async () => (await readPod(name))?.status?.phase === 'Running');
      await batch.deleteNamespacedJob({
        name: 'held',
        namespace: 'default',
        propagationPolicy: 'Background',
      });
    });
  });

  test('errors are Status objects: 401, 404, 409, 422', async () => {
    const anonymous = await rawRequest('GET', '/api/v1/namespaces/default/pods', { token: '' });
    expect(anonymous.status).toBe(401);
    expect(JSON.parse(anonymous.body)).toMatchObject({
      kind: 'Status',
      reason: 'Unauthorized',
      code: 401,
    });
    expect(
      (await rawRequest('GET', '/api/v1/namespaces/default/pods', { token: 'wrong' })).status,
    ).toBe(401);

    expect(
      statusOf(await rejection(core.readNamespacedPod({ name: 'nope', namespace: 'default' }))),
    ).toMatchObject({
      code: 404,
      reason: 'NotFound',
      message: 'pods "nope" not found',
    });

    await batch.createNamespacedJob({ namespace: 'default', body: localJob('twice', ['true']) });
    expect(
      statusOf(
        await rejection(
          batch.createNamespacedJob({ namespace: 'default', body: localJob('twice', ['true']) }),
        ),
      ),
    ).toMatchObject({
      code: 409,
      reason: 'AlreadyExists',
      message: 'jobs.batch "twice" already exists',
    });

    const invalid = localJob('invalid', ['true']);
    delete invalid.spec!.template.spec!.restartPolicy;
    invalid.spec!.template.spec!.containers[0]!.image = '';
    expect(
      statusOf(await rejection(batch.createNamespacedJob({ namespace: 'default', body: invalid }))),
    ).toMatchObject({
      code: 422,
      reason: 'Invalid',
      message:
        'Job.batch "invalid" is invalid: [spec.template.spec.containers[0].image: Required value, spec.template.spec.restartPolicy: Required value: valid values: "OnFailure", "Never"]',
    });
  });

  function portForwardSocket(pod: string, port: number): WebSocket {
    return new WebSocket(
      `${cluster.url.replace(/^https/, 'wss')}/api/v1/namespaces/default/pods/${pod}/portforward?ports=${port}`,
      ['v4.channel.k8s.io'],
      { headers: { Authorization: `Bearer ${cluster.token}` }, ca: cluster.caPem },
    );
  }

  async function openPortForward(pod: string, port: number): Promise<WebSocket> {
    const ws = portForwardSocket(pod, port);
    await new Promise<void>((resolve, reject) => {
      ws.once('open', () => resolve());
      ws.once('error', reject);
    });
    return ws;
  }

  /** The HTTP answer to a port-forward the server refuses to upgrade. */
  function portForwardRefusal(
    pod: string,
    port: number,
  ): Promise<{ status: number; body: string }> {
    const ws = portForwardSocket(pod, port);
    return new Promise((resolve, reject) => {
      ws.once('open', () => reject(new Error('the port-forward was allowed')));
      ws.once('unexpected-response', (_req, res) => {
        let body = '';
        res.on('data', (chunk: Buffer) => (body += chunk.toString()));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      });
    });
  }

  /** A request with the kubeconfig's CA and (unless overridden) its token. */
  function rawRequest(
    method: string,
    path: string,
    options: { token?: string } = {},
  ): Promise<{
    status: number;
    headers: Record<string, string | string[] | undefined>;
    body: string;
  }> {
    const token = options.token ?? cluster.token;
    return new Promise((resolve, reject) => {
      const req = request(
        `${cluster.url}${path}`,
        {
          method,
          ca: cluster.caPem,
          headers: token ? { Authorization: `Bearer ${token}` } : {},
        },
        (res) => {
          let body = '';
          res.on('data', (chunk: Buffer) => (body += chunk.toString()));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
        },
      );
      req.on('error', reject);
      req.end();
    });
  }
});

describe('stand-in cluster close()', () => {
  test('leaves no netns, cgroup, veth or process behind, with a watch and a port-forward open', async () => {
    // Other test processes may make namespaces meanwhile: only this one's count.
    const ours = (name: string): boolean => ownerOf(name) === process.pid;
    const netnsBefore = new Set(listNetns(SANDBOX_PREFIX).filter(ours));
    const cgroupsBefore = new Set(listTestCgroups().filter(ours));
    const cluster = await startStandInCluster();
    let closed = false;
    try {
      const kubeConfig = new KubeConfig();
      kubeConfig.loadFromFile(cluster.kubeconfigPath);
      const echo = await cluster.addPod({
        name: 'echo',
        containers: [
          {
            name: 'echo',
            image: 'stand-in/local',
            command: [process.execPath, '-e', ECHO_SERVICE],
            ports: [{ containerPort: ECHO_PORT }],
          },
        ],
      });
      await kubeConfig.makeApiClient(BatchV1Api).createNamespacedJob({
        namespace: 'default',
        body: localJob('sleeper', ['sleep', '300']),
      });
      await until('the Job pod to run', () =>
        cluster
          .pods()
          .some((p) => p.metadata.name?.startsWith('sleeper-') && p.status.phase === 'Running'),
      );
      const watchDone = new Promise<unknown>((resolve) => {
        void new Watch(kubeConfig).watch(
          '/api/v1/namespaces/default/pods',
          {},
          () => undefined,
          resolve,
        );
      });
      const ws = new WebSocket(
        `${cluster.url.replace(/^https/, 'wss')}/api/v1/namespaces/default/pods/echo/portforward?ports=${ECHO_PORT}`,
        ['v4.channel.k8s.io'],
        { headers: { Authorization: `Bearer ${cluster.token}` }, ca: cluster.caPem },
      );
      await new Promise((resolve) => ws.once('open', resolve));
      const wsClosed = new Promise<void>((resolve) => ws.once('close', () => resolve()));
      const forward = portForwardStream(ws);
      let echoed = '';
      forward.on('data', (chunk: Buffer) => (echoed += chunk.toString()));
      forward.on('error', () => undefined);
      forward.write('ping');
      await until('the echo', () => echoed === 'ping');

      const made = listNetns(SANDBOX_PREFIX).filter((n) => ours(n) && !netnsBefore.has(n));
      expect(made).toEqual(expect.arrayContaining([cluster.clientNetns, echo.netns]));
      expect(made).toHaveLength(3);
      // The containers, and the port-forward's relay in the echo pod's netns.
      const pids = made.flatMap((name) =>
        execFileSync('ip', ['netns', 'pids', name], { encoding: 'utf8' })
          .split('\n')
          .filter(Boolean)
          .map(Number),
      );
      expect(pids).toEqual(expect.arrayContaining(cluster.processes()));
      expect(pids.length).toBeGreaterThan(cluster.processes().length);
      expect(listTestCgroups().filter((n) => ours(n) && !cgroupsBefore.has(n))).toHaveLength(1);
      // The host ends of the pods' veths, on the bridge in the client netns.
      const veths = execFileSync(
        'ip',
        ['-n', cluster.clientNetns, '-o', 'link', 'show', 'master', 'br0'],
        { encoding: 'utf8' },
      );
      expect(veths.split('\n').filter(Boolean)).toHaveLength(2);

      closed = true;
      await cluster.close();

      await wsClosed;
      await watchDone;
      // Every veth had one end in a netns that is gone, so the veths are gone too.
      expect(listNetns(SANDBOX_PREFIX).filter((n) => ours(n) && !netnsBefore.has(n))).toEqual([]);
      expect(pids.filter(isAlive)).toEqual([]);
      expect(listTestCgroups().filter((n) => ours(n) && !cgroupsBefore.has(n))).toEqual([]);
      expect(existsSync(cluster.kubeconfigPath)).toBe(false);
    } finally {
      if (!closed) await cluster.close();
    }
  });
});
