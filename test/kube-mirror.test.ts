/**
 * `mirrord mirror --pod/--deployment/--statefulset` end to end on the real test cluster: the
 * real CLI creates the agent Job through the API server, the kubelet runs the agent from its
 * image next to the target pod, clients on this machine talk to the pod's IP (routed to the pod
 * bridge), and every connection arrives byte for byte in a local app, through a real
 * port-forward. The API server's audit log shows the Job the CLI created and how it deleted it;
 * the agent's session secret is in a Secret the Job owns, never in the Job or its pod.
 * Afterwards no Job, Secret, pod or agent process is left; when the CLI is killed, the agent
 * ends by itself and the TTL-after-finished controller removes the Job (and the garbage
 * collector its Secret).
 */
import type { V1Container, V1Job, V1Pod } from '@kubernetes/client-node';
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import {
  AGENT_CAPABILITIES,
  AGENT_CONTAINER,
  LABELS,
  agentJobManifest,
  defaultAgentImage,
} from '../src/platform/kube/agent-job.js';
import { CLUSTER_DOMAIN } from './cluster/layout.js';
import {
  REDIS_IMAGE,
  agentProcesses,
  fixture,
  requestedJob,
  testCluster,
  type AuditEvent,
  type PodInfo,
  type TargetContainer,
  type TestCluster,
} from './support/kube.js';
import {
  FIXTURES,
  killRun,
  logLines,
  mirrord,
  processesMatching,
  tempDir,
  until,
  untilAsync,
  untilWhileRunning,
  type MirrorRun,
} from './support/mirror-cli.js';

const execFileAsync = promisify(execFile);
const NAMESPACE = 'kube-mirror';
/**
 * The targets' ports (pods have network namespaces of their own). The local app listens on the
 * same port, as a developer's would: that is what the session subscribes. The layer lets it bind
 * even where something on this machine holds the port.
 */
const POD_PORT = 8080;
const OTHER_POD_PORT = 9090;
const REDIS_PORT = 6379;
const DIGEST_SERVER = join(FIXTURES, 'digest-server.mjs');
const DIGEST_CLIENTS = join(FIXTURES, 'digest-clients.mjs');
const CONNECTIONS = 40;
const MiB = 1024 * 1024;
const UPLOAD_BYTES = 64 * MiB;
/** Who the TTL-after-finished controller deletes as (each controller has its ServiceAccount). */
const TTL_CONTROLLER = 'system:serviceaccount:kube-system:ttl-after-finished-controller';
/** A loaded two-core machine starts containers slowly: generous, as a deadline, not a pause. */
const SLOW = 180_000;
/** The agent's TTL and idle timeout when no flag sets them. */
const AGENT_DEFAULTS = { ttlSeconds: 60, idleTimeoutSeconds: 30 };

/** An audit event with the user who made the request. */
type Received = AuditEvent & { user?: { username?: string } };

interface ClientResult {
  port: number;
  bytes: number;
  sha: string;
  answer: string;
  error?: string;
}

/** A connection as `BYTES SHA256`, to compare what went in with what came out. */
const digestOf = (c: { bytes: number | string; sha: string }): string => `${c.bytes} ${c.sha}`;
/** The same with the client's port first: the layer reports the original client to the app. */
const connectionOf = (c: { port: number | string; bytes: number | string; sha: string }): string =>
  `${c.port} ${digestOf(c)}`;

/**
 * Real clients on this machine, to the pod's IP: each sends its own random payload and gets the
 * sha256 of what the pod's app read.
 */
async function digestClients(
  ip: string,
  port: number,
  args: { count: number; minBytes: number; maxBytes: number; chunks: number; intervalMs: number },
): Promise<ClientResult[]> {
  const { stdout } = await execFileAsync(
    process.execPath,
    [
      DIGEST_CLIENTS,
      ip,
      String(port),
      String(args.count),
      String(args.minBytes),
      String(args.maxBytes),
      String(args.chunks),
      String(args.intervalMs),
    ],
    { maxBuffer: 16 * MiB },
  );
  const { connections } = JSON.parse(stdout) as { connections: ClientResult[] };
  // The pod's app read exactly what each client sent.
  expect(connections.filter((c) => c.error || c.answer !== c.sha)).toEqual([]);
  return connections;
}

/** Opens and closes an empty connection (no bytes, so the local app logs nothing of it). */
function probe(ip: string, port: number): Promise<void> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: ip, port }, () => socket.end());
    // Reads the app's answer: a paused socket would never see its end, nor close.
    socket.resume();
    socket.setTimeout(10_000, () => socket.destroy());
    socket.on('error', () => resolve());
    socket.on('close', () => resolve());
  });
}

/**
 * Waits until connections to the pod are mirrored: after the app's listen event, empty probe
 * connections to `ip:port` until one shows up as `opened` on `mirroredPort` (the tap copies a
 * port only once the agent acknowledged the subscription).
 */
async function untilMirroring(
  run: MirrorRun,
  ip: string,
  port: number,
  mirroredPort = port,
): Promise<void> {
  await untilWhileRunning(
    run,
    () => run.events().some((e) => e.event === 'listen' && e.port === mirroredPort),
    'the app to listen',
    SLOW,
  );
  const opened = (): boolean =>
    run
      .events()
      .some((e) => e.event === 'opened' && (e.server as { port: number }).port === mirroredPort);
  const deadline = Date.now() + 60_000;
  while (!opened()) {
    if (Date.now() > deadline) throw new Error('no probe connection was mirrored');
    await probe(ip, port);
    await untilWhileRunning(run, opened, 'the probe', 1_000).catch((error: Error) => {
      if (!error.message.startsWith('timed out')) throw error;
    });
  }
}

/**
 * The connections that carried bytes in a digest-server log: the client's address as the app saw
 * it, and the connection as `connectionOf` and `digestOf` write it.
 */
function logged(file: string): { address: string; connection: string; digest: string }[] {
  return logLines(file)
    .map((line) => line.split(' '))
    .filter(([, , , bytes]) => Number(bytes) > 0)
    .map(([address, port, , bytes, sha]) => ({
      address: address!.replace(/^::ffff:/, ''),
      connection: connectionOf({ port: port!, bytes: bytes!, sha: sha! }),
      digest: digestOf({ bytes: bytes!, sha: sha! }),
    }));
}

/**
 * mirror's exit code, once its app exited after its last connection; if that does not happen in
 * time, fails with what the session reported (connections closed uncleanly or with drops, the
 * last counters) instead of a bare timeout.
 */
async function exitCode(run: MirrorRun, ms = SLOW): Promise<number | null> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      const events = run.events();
      const lossy = events.filter(
        (e) =>
          e.event === 'closed' &&
          (e.bytesDropped !== 0 || !['fin', 'rst'].includes(String(e.reason))),
      );
      const counters = events.findLast((e) => e.event === 'counters');
      reject(
        new Error(
          `mirror still runs after ${ms / 1000} s; lossy closes: ${JSON.stringify(lossy)}; last counters: ${JSON.stringify(counters)}`,
        ),
      );
    }, ms);
  });
  try {
    return await Promise.race([run.exited, late]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * The Job as the API server's defaulting makes it of `job`: the audit log records the request
 * body after decoding, which fills in what the Job left unset. Only unset fields are filled, so
 * every field the CLI sent is still compared as sent.
 */
function withServerDefaults(job: V1Job): V1Job {
  const pullPolicy = (image: string): string =>
    /:latest$/.test(image) || !/:[^/]+$/.test(image) ? 'Always' : 'IfNotPresent';
  const container = (c: V1Container): V1Container => ({
    terminationMessagePath: '/dev/termination-log',
    terminationMessagePolicy: 'File',
    imagePullPolicy: pullPolicy(c.image ?? ''),
    resources: {},
    ...c,
  });
  const template = job.spec!.template;
  return {
    ...job,
    spec: {
      parallelism: 1,
      completions: 1,
      manualSelector: false,
      completionMode: 'NonIndexed',
      suspend: false,
      podReplacementPolicy: 'TerminatingOrFailed',
      ...job.spec!,
      template: {
        ...template,
        spec: {
          terminationGracePeriodSeconds: 30,
          dnsPolicy: 'ClusterFirst',
          securityContext: {},
          schedulerName: 'default-scheduler',
          ...template.spec!,
          containers: template.spec!.containers.map(container),
        },
      },
    },
    status: {},
  };
}

describe('mirrord mirror on Kubernetes targets (real cluster)', () => {
  let kube: TestCluster;
  let logs: ReturnType<typeof tempDir>;
  const runs: MirrorRun[] = [];
  /** This file's target containers: other files' agents run on the same machine. */
  const targetContainerIds = new Set<string>();

  beforeAll(async () => {
    kube = await testCluster(NAMESPACE);
    logs = tempDir('kube-mirror');
  }, 600_000);

  afterEach(async () => {
    for (const run of runs.splice(0)) await killRun(run);
    // A killed CLI leaves its app behind: the app's command line names this file's log dir.
    for (const pid of processesMatching(logs.path)) process.kill(Number(pid), 'SIGKILL');
  });

  afterAll(async () => {
    await kube?.remove();
    logs?.remove();
  }, SLOW);

  /** Remembers the pods' containers, whose agents this file then tells apart from others'. */
  function track(pods: PodInfo[]): PodInfo[] {
    for (const pod of pods) for (const c of pod.containers) targetContainerIds.add(c.containerId);
    return pods;
  }

  /** Agent processes (on this machine: hostPID containers) tapping this file's targets. */
  function ownAgents(): number[] {
    return agentProcesses().filter((pid) => {
      try {
        const args = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
        return args.some((arg) => targetContainerIds.has(arg));
      } catch {
        return false;
      }
    });
  }

  const digestServer = (name: string, port = POD_PORT): TargetContainer => ({
    name,
    command: fixture('digest-server.mjs', ['--port', String(port)]),
    port,
  });

  /** `mirrord mirror ARGS` on the test cluster, in this file's namespace, with `--json` events. */
  function mirror(args: string[]): MirrorRun {
    const run = mirrord([
      '--kubeconfig',
      kube.kubeconfig,
      '-n',
      NAMESPACE,
      '--json',
      '--agent-startup-timeout',
      String(SLOW / 1000),
      ...args,
    ]);
    runs.push(run);
    return run;
  }

  /** The local digest-server as mirror's COMMAND, on the pod's `port`, logging to `log`. */
  const localDigestServer = (log: string, extra: string[] = [], port = POD_PORT): string[] => [
    '--',
    process.execPath,
    DIGEST_SERVER,
    '--port',
    String(port),
    '--log',
    log,
    ...extra,
  ];

  /** The one Job create of this session in the audit log, with the Job's body. */
  function createdJob(since: number): { event: Received; job: V1Job } {
    const creates = kube.jobRequests(since).filter((e) => e.verb === 'create');
    expect(creates).toHaveLength(1);
    expect(creates[0]!.responseStatus?.code).toBe(201);
    return { event: creates[0]!, job: requestedJob(creates[0]!) };
  }

  /** The audit log's DELETEs of `job` since request number `since`. */
  function jobDeletes(job: V1Job, since: number): Received[] {
    return kube
      .jobRequests(since)
      .filter((e) => e.verb === 'delete' && e.objectRef?.name === job.metadata!.name);
  }

  /** After a session: no mirrord Job, Secret or pod, and no agent process. */
  async function untilNothingLeft(): Promise<void> {
    let objects: string[] = [];
    await untilAsync(
      async () => {
        objects = await kube.mirrordObjects();
        return objects.length === 0;
      },
      'the Job and its pod to go',
      SLOW,
    ).catch((error: Error) => {
      throw new Error(`${error.message}; still there: ${objects.join(', ')}`);
    });
    await until(() => ownAgents().length === 0, 'the agent process to go', SLOW);
  }

  /**
   * While its session runs: the agent's session secret is in a Secret named and labelled like
   * its Job and owned by it (the garbage collector deletes it with the Job), and in nothing that
   * `get jobs` or `get pods` shows.
   */
  async function expectSecretOwnedByJob(received: V1Job): Promise<void> {
    const name = received.metadata!.name!;
    const job = await kube.batch.readNamespacedJob({ name, namespace: NAMESPACE });
    const secret = await kube.core.readNamespacedSecret({ name, namespace: NAMESPACE });
    expect(secret.metadata?.labels).toEqual(received.metadata!.labels);
    expect(secret.metadata?.ownerReferences).toEqual([
      { apiVersion: 'batch/v1', kind: 'Job', name, uid: job.metadata!.uid },
    ]);
    expect(secret.type).toBe('Opaque');
    expect(secret.immutable).toBe(true);
    expect(Object.keys(secret.data ?? {})).toEqual(['secret']);
    const encoded = secret.data!.secret!;
    const value = Buffer.from(encoded, 'base64').toString();
    // 32 random bytes, base64url.
    expect(value).toMatch(/^[A-Za-z0-9_-]{43}$/);
    const { items: agentPods } = await kube.core.listNamespacedPod({
      namespace: NAMESPACE,
      labelSelector: `job-name=${name}`,
    });
    expect(agentPods.length).toBeGreaterThan(0);
    for (const shown of [received, job, ...agentPods]) {
      const text = JSON.stringify(shown);
      expect(text).not.toContain(value);
      expect(text).not.toContain(encoded);
    }
  }

  /** The pod a session mirrors, from its ready event (`pod NAMESPACE/NAME …`). */
  function mirroredPod(run: MirrorRun, candidates: PodInfo[]): PodInfo {
    const ready = run.events().find((e) => e.event === 'ready');
    const name = new RegExp(`^pod ${NAMESPACE}/(\\S+)`).exec(String(ready?.target))?.[1];
    const pod = candidates.find((candidate) => candidate.name === name);
    if (!pod) throw new Error(`mirrored an unexpected pod: ${String(ready?.target)}`);
    return pod;
  }

  /** The Job the CLI would make for `run` (see agentJobManifest), for comparison. */
  function expectedJob(
    run: MirrorRun,
    received: V1Job,
    target: { pod: PodInfo; container: string; of?: string },
    agent: { ttlSeconds: number; idleTimeoutSeconds: number },
  ): V1Job {
    return agentJobManifest({
      sessionId: received.metadata!.labels![LABELS.session]!,
      namespace: NAMESPACE,
      node: kube.nodeName,
      containerId: target.pod.containers.find((c) => c.name === target.container)!.containerId,
      target: `pod ${NAMESPACE}/${target.pod.name}${target.of ? ` of ${target.of}` : ''} (container ${target.container})`,
      image: defaultAgentImage(),
      pullSecrets: [],
      capabilities: true,
      ...agent,
      cli: { host: hostname(), pid: run.child.pid! },
    });
  }

  /**
   * How the agent of a session ended: its exit code and log, read while its finished pod is
   * still there (the tests give the Job a TTL long enough for that).
   */
  async function agentEnding(job: V1Job): Promise<{ exitCode?: number; log: string }> {
    const selector = `${LABELS.session}=${job.metadata!.labels![LABELS.session]}`;
    let ended: V1Pod | undefined;
    await untilAsync(
      async () => {
        const { items } = await kube.core.listNamespacedPod({
          namespace: NAMESPACE,
          labelSelector: selector,
        });
        ended = items.find((pod) => ['Succeeded', 'Failed'].includes(pod.status?.phase ?? ''));
        return ended !== undefined;
      },
      'the agent pod to end',
      SLOW,
    );
    const status = ended!.status?.containerStatuses?.find((s) => s.name === AGENT_CONTAINER);
    const log = await kube.core.readNamespacedPodLog({
      name: ended!.metadata!.name!,
      namespace: NAMESPACE,
      container: AGENT_CONTAINER,
    });
    return { exitCode: status?.state?.terminated?.exitCode, log };
  }

  test.each([
    ['pod', 'api'],
    ['deployment', 'web'],
    ['statefulset', 'db'],
  ])(
    '--%s %s: many connections arrive byte-exact in the local app; the Job is the manifest; nothing is left afterwards',
    async (kind, name) => {
      const containers = [digestServer('app')];
      const pods = track(
        kind === 'pod'
          ? [await kube.addPod(name, containers)]
          : kind === 'deployment'
            ? await kube.addDeployment(name, containers, 2)
            : await kube.addStatefulSet(name, containers),
      );
      const since = kube.jobRequests().length;
      const log = join(logs.path, `${kind}.log`);
      const run = mirror([
        `--${kind}`,
        name,
        '--agent-idle-timeout',
        '20',
        ...localDigestServer(log, ['--exit-after-completed', `${CONNECTIONS}:0`]),
      ]);
      await untilWhileRunning(
        run,
        () => run.events().some((e) => e.event === 'ready'),
        'ready',
        SLOW,
      );
      const pod = mirroredPod(run, pods);
      expect(run.output()).toContain(`mirroring pod ${NAMESPACE}/${pod.name}`);
      await untilMirroring(run, pod.ip, POD_PORT);
      await expectSecretOwnedByJob(createdJob(since).job);

      // The pod answers each client with the sha256 of what it got; the local app logs the
      // sha256 of what was replayed into it.
      const clients = await digestClients(pod.ip, POD_PORT, {
        count: CONNECTIONS,
        minBytes: 1000,
        maxBytes: 300_000,
        chunks: 4,
        intervalMs: 5,
      });
      expect(await exitCode(run)).toBe(0);
      const replayed = logged(log).map((c) => c.connection);
      expect(replayed.sort()).toEqual(clients.map(connectionOf).sort());

      // The Job the API server received is the manifest, with every field.
      const { event, job } = createdJob(since);
      expect(job).toEqual(
        withServerDefaults(
          expectedJob(
            run,
            job,
            { pod, container: 'app', ...(kind === 'pod' ? {} : { of: `${kind}/${name}` }) },
            { ttlSeconds: 60, idleTimeoutSeconds: 20 },
          ),
        ),
      );
      expect(job.spec?.template.spec?.hostPID).toBe(true);
      // Least privilege: the capabilities the agent needs, and it mirrored with just those.
      expect(job.spec?.template.spec?.containers[0]?.securityContext).toEqual({
        privileged: false,
        capabilities: { add: [...AGENT_CAPABILITIES] },
      });

      // Teardown: the CLI deleted the Job, with propagation Background, once; its pod and the
      // agent process go with it.
      const deletes = jobDeletes(job, since);
      expect(deletes.map((e) => [e.user?.username, e.requestURI])).toEqual([
        [event.user?.username, expect.stringContaining('propagationPolicy=Background')],
      ]);
      await untilNothingLeft();
    },
    2 * SLOW,
  );

  test(
    `one ${UPLOAD_BYTES / MiB} MiB upload arrives byte-exact in the local app`,
    async () => {
      const [pod] = track([await kube.addPod('bulk', [digestServer('app')])]);
      const log = join(logs.path, 'bulk.log');
      const run = mirror([
        '--pod',
        'bulk',
        ...localDigestServer(log, ['--exit-after-completed', '1:0']),
      ]);
      await untilMirroring(run, pod!.ip, POD_PORT);
      // 1 MiB pieces, 20 ms apart: a fast client (up to 50 MB/s) that a port-forward through
      // the API server on a two-core machine keeps up with. Unpaced, at the bridge's speed, the
      // tap's ring buffer overflows and the agent gives the connection up (reported, as designed).
      const [client] = await digestClients(pod!.ip, POD_PORT, {
        count: 1,
        minBytes: UPLOAD_BYTES,
        maxBytes: UPLOAD_BYTES,
        chunks: UPLOAD_BYTES / MiB,
        intervalMs: 20,
      });
      expect(await exitCode(run)).toBe(0);
      // Both ends: the pod's app answered the client's sha256 (digestClients), the local app
      // logged the same sha256 of the same number of bytes.
      expect(logged(log).map((c) => c.connection)).toEqual([connectionOf(client!)]);
      const closed = run
        .events()
        .filter((e) => e.event === 'closed' && e.bytesReplayed === UPLOAD_BYTES);
      expect(closed).toEqual([expect.objectContaining({ reason: 'fin', bytesDropped: 0 })]);
      await untilNothingLeft();
    },
    2 * SLOW,
  );

  test(
    'a Redis pod: what redis-benchmark and redis-cli write to it, the local Redis holds too',
    async () => {
      // Protected mode off on both: it admits only 127.0.0.1 and ::1 without a password, and
      // replayed connections come from 127.0.0.2 (the replay source), as in the pod from afar.
      const redisArgs = [
        '--port',
        String(REDIS_PORT),
        '--protected-mode',
        'no',
        '--save',
        '',
      ].concat(['--appendonly', 'no']);
      const [pod] = track([
        await kube.addPod('cache', [
          {
            name: 'redis',
            image: REDIS_IMAGE,
            command: ['redis-server', ...redisArgs],
            port: REDIS_PORT,
          },
        ]),
      ]);
      // The local copy also answers on a unix socket, which the test reads it through.
      const socket = join(logs.path, 'redis.sock');
      const run = mirror([
        '--pod',
        'cache',
        '--',
        'redis-server',
        '--unixsocket',
        socket,
        ...redisArgs,
      ]);
      await untilMirroring(run, pod!.ip, REDIS_PORT);
      const remote = ['-h', pod!.ip, '-p', String(REDIS_PORT)];
      const local = ['-s', socket];
      // 50 connections of SETs, INCRs (commutative: the same totals in any interleaving) and
      // LPUSHes, then one connection of commands written by hand.
      await execFileAsync(
        'redis-benchmark',
        [...remote, '-t', 'set,incr,lpush', '-n', '3000'].concat(['-r', '300', '-q']),
      );
      await execFileAsync('bash', [
        '-c',
        `printf 'SET greeting hello\\nRPUSH queue a b c\\n' | redis-cli ${remote.join(' ')}`,
      ]);
      const redis = async (at: string[], ...command: string[]): Promise<string> =>
        (await execFileAsync('redis-cli', [...at, ...command])).stdout.trim();
      const state = async (at: string[]): Promise<string[]> => {
        const keys = (await redis(at, '--scan')).split('\n').filter(Boolean).sort();
        const values = [];
        for (const key of keys) {
          const type = await redis(at, 'TYPE', key);
          values.push(
            `${key} ${type} ${type === 'list' ? await redis(at, 'LLEN', key) : await redis(at, 'GET', key)}`,
          );
        }
        return values;
      };
      const expected = await state(remote);
      expect(expected.length).toBeGreaterThan(300);
      await untilAsync(
        async () => (await redis(local, 'DBSIZE')) === String(expected.length),
        'the local Redis to hold as many keys',
        30_000,
      ).catch(async (error: Error) => {
        const counters = run
          .events()
          .filter((e) => e.event === 'counters')
          .at(-1);
        const keys = async (at: string[]) => new Set((await redis(at, '--scan')).split('\n'));
        const [here, there] = [await keys(local), await keys(remote)];
        const differ = [
          ...[...here].filter((key) => !there.has(key)).map((key) => `only here: ${key}`),
          ...[...there].filter((key) => !here.has(key)).map((key) => `only there: ${key}`),
        ];
        throw new Error(
          `${error.message}: ${await redis(local, 'DBSIZE')} of ${expected.length} (${differ.join(', ')}); ${JSON.stringify(counters)}`,
        );
      });
      expect(await state(local)).toEqual(expected);
      expect(await redis(local, 'LRANGE', 'queue', '0', '-1')).toBe('a\nb\nc');
      run.child.kill('SIGINT');
      expect(await exitCode(run)).toBe(130);
      await untilNothingLeft();
    },
    2 * SLOW,
  );

  test(
    '--container picks the named container of two: the agent taps it by its containerd ID',
    async () => {
      // Both containers share the pod's network namespace; "second" is not the default (the
      // first container would be), so the Job's container ID shows the flag was followed.
      const [pod] = track([
        await kube.addPod('duo', [
          digestServer('first', OTHER_POD_PORT),
          digestServer('second', POD_PORT),
        ]),
      ]);
      const since = kube.jobRequests().length;
      const log = join(logs.path, 'duo.log');
      const run = mirror([
        '--pod',
        'duo',
        '--container',
        'second',
        '--agent-idle-timeout',
        '20',
        ...localDigestServer(log, ['--exit-after-completed', '10:0']),
      ]);
      await untilWhileRunning(
        run,
        () => run.events().some((e) => e.event === 'ready'),
        'ready',
        SLOW,
      );
      expect(run.events().find((e) => e.event === 'ready')?.target).toBe(
        `pod ${NAMESPACE}/duo (container second)`,
      );
      await untilMirroring(run, pod!.ip, POD_PORT);
      const traffic = { count: 10, minBytes: 1000, maxBytes: 100_000, chunks: 2, intervalMs: 5 };
      const [second] = await Promise.all([
        digestClients(pod!.ip, POD_PORT, traffic),
        digestClients(pod!.ip, OTHER_POD_PORT, traffic),
      ]);
      expect(await exitCode(run)).toBe(0);
      // The local app listens on the named container's port, as a developer mirroring that
      // container does: its connections arrive; the other container's (same netns, other port)
      // are not replayed.
      const replayed = logged(log).map((c) => c.connection);
      expect(replayed.sort()).toEqual(second.map(connectionOf).sort());
      const openedPorts = run
        .events()
        .filter((e) => e.event === 'opened')
        .map((e) => (e.server as { port: number }).port);
      expect(new Set(openedPorts)).toEqual(new Set([POD_PORT]));

      const { job } = createdJob(since);
      expect(job).toEqual(
        withServerDefaults(
          expectedJob(
            run,
            job,
            { pod: pod!, container: 'second' },
            { ttlSeconds: 60, idleTimeoutSeconds: 20 },
          ),
        ),
      );
      await untilNothingLeft();
    },
    2 * SLOW,
  );

  test(
    'behind a mesh-like sidecar: the plaintext the proxy forwards over lo arrives in the local app',
    async () => {
      // The proxy holds the pod's port and forwards to the app on 127.0.0.1:OTHER_POD_PORT, as a
      // mesh's sidecar does; named like Istio's, it is skipped when choosing the default
      // container, so the app is mirrored without --container.
      const [pod] = track([
        await kube.addPod('meshed', [
          {
            name: 'istio-proxy',
            command: fixture('tcp-proxy.mjs', [String(POD_PORT), String(OTHER_POD_PORT)]),
            port: POD_PORT,
          },
          digestServer('app', OTHER_POD_PORT),
        ]),
      ]);
      const since = kube.jobRequests().length;
      const log = join(logs.path, 'meshed.log');
      // The local app listens on the app container's port, not on the proxy's.
      const session = mirror([
        '--pod',
        'meshed',
        ...localDigestServer(log, ['--exit-after-completed', '10:0'], OTHER_POD_PORT),
      ]);
      await untilMirroring(session, pod!.ip, POD_PORT, OTHER_POD_PORT);
      const clients = await digestClients(pod!.ip, POD_PORT, {
        count: 10,
        minBytes: 1000,
        maxBytes: 200_000,
        chunks: 3,
        intervalMs: 5,
      });
      expect(await exitCode(session)).toBe(0);
      const replayed = logged(log);
      expect(replayed.map((c) => c.digest).sort()).toEqual(clients.map(digestOf).sort());
      // Copied on lo: the mirrored connections are the proxy's, not the clients' (those went to
      // the proxy's port, which the local app does not listen on).
      expect(new Set(replayed.map((c) => c.address))).toEqual(new Set(['127.0.0.1']));
      const { job } = createdJob(since);
      expect(job).toEqual(
        withServerDefaults(
          expectedJob(session, job, { pod: pod!, container: 'app' }, AGENT_DEFAULTS),
        ),
      );
      await untilNothingLeft();
    },
    2 * SLOW,
  );

  test(
    'Ctrl-C ends the session: the CLI deletes the Job, nothing is left',
    async () => {
      const [pod] = track(await kube.addStatefulSet('interrupted', [digestServer('app')]));
      const since = kube.jobRequests().length;
      const run = mirror(['--statefulset', 'interrupted', '--port', String(POD_PORT)]);
      await untilWhileRunning(
        run,
        () => run.events().some((e) => e.event === 'ready'),
        'ready',
        SLOW,
      );
      expect(mirroredPod(run, [pod!]).name).toBe(pod!.name);
      const { event, job } = createdJob(since);
      expect(await kube.mirrordObjects()).toContain(`job/${job.metadata!.name}`);
      expect(ownAgents()).toHaveLength(1);
      run.child.kill('SIGINT');
      expect(await exitCode(run)).toBe(130);
      expect(jobDeletes(job, since).map((e) => [e.user?.username, e.requestURI])).toEqual([
        [event.user?.username, expect.stringContaining('propagationPolicy=Background')],
      ]);
      await untilNothingLeft();
    },
    2 * SLOW,
  );

  test(
    '--pod: the pod deleted ends the session with exit 1, naming it; nothing is left',
    async () => {
      const [pod] = track([await kube.addPod('deleted', [digestServer('app')])]);
      const run = mirror([
        '--pod',
        'deleted',
        ...localDigestServer(join(logs.path, 'deleted.log')),
      ]);
      await untilMirroring(run, pod!.ip, POD_PORT);
      // As a rollout or kubectl delete does: through the API, with the pod's grace period.
      await kube.core.deleteNamespacedPod({ name: 'deleted', namespace: NAMESPACE });
      expect(await exitCode(run)).toBe(1);
      expect(
        run
          .output()
          .split('\n')
          .filter((line) => line.startsWith('mirrord:')),
      ).toContain(
        `mirrord: pod ${NAMESPACE}/deleted (container app) went away (no process is left in its pod’s network namespace: the pod was deleted or stopped): the session ended`,
      );
      await untilNothingLeft();
    },
    2 * SLOW,
  );

  test.each([
    ['deployment', 'rolled out (a changed template: a new ReplicaSet’s pod replaces it)'],
    ['statefulset', 'deleted (the StatefulSet makes a pod of the same name)'],
  ])(
    '--%s follows its pod when it is %s: the gap is said, the new pod is mirrored by a new agent',
    async (kind) => {
      const name = `followed-${kind}`;
      const [first] = track(
        kind === 'deployment'
          ? await kube.addDeployment(name, [digestServer('app')])
          : await kube.addStatefulSet(name, [digestServer('app')]),
      );
      const since = kube.jobRequests().length;
      const log = join(logs.path, `${name}.log`);
      // The app looks a name up and connects out, through the agent, as most apps do at start:
      // the agent's resolver and its sockets are then in the pod's network namespace, which
      // must not keep the pod there for the agent (it did: the first agent never saw it go).
      const api = `kubernetes.default.svc.${CLUSTER_DOMAIN}:443`;
      const run = mirror([
        `--${kind}`,
        name,
        ...localDigestServer(log, ['--exit-after-completed', `${CONNECTIONS}:0`, '--reach', api]),
      ]);
      await untilMirroring(run, first!.ip, POD_PORT);
      await untilWhileRunning(
        run,
        () => run.output().includes(`reached ${api}`),
        `the app to reach ${api}`,
      );

      if (kind === 'deployment') {
        const deployment = await kube.apps.readNamespacedDeployment({ name, namespace: NAMESPACE });
        deployment.spec!.template.metadata!.annotations = {
          restartedAt: new Date().toISOString(),
        };
        await kube.apps.replaceNamespacedDeployment({
          name,
          namespace: NAMESPACE,
          body: deployment,
        });
      } else {
        await kube.core.deleteNamespacedPod({ name: first!.name, namespace: NAMESPACE });
      }
      const readyEvents = () => run.events().filter((e) => e.event === 'ready');
      await untilWhileRunning(
        run,
        () => readyEvents().length === 2,
        'the second agent',
        SLOW,
      ).catch(async (error: Error) => {
        throw new Error(`${error.message}\nthe pods then:\n${await kube.podStates()}`);
      });
      const [second] = track(await kube.readyPods(name, 1));
      expect(second!.containers[0]!.containerId).not.toBe(first!.containers[0]!.containerId);
      expect(readyEvents()[1]!.target).toBe(
        `pod ${NAMESPACE}/${second!.name} of ${kind}/${name} (container app)`,
      );
      const lines = run
        .output()
        .split('\n')
        .filter((line) => line.startsWith('mirrord:'));
      expect(lines).toContain(
        `mirrord: pod ${NAMESPACE}/${first!.name} of ${kind}/${name} (container app) went away (no process is left in its pod’s network namespace: the pod was deleted or stopped): waiting for its replacement`,
      );
      expect(lines).toContainEqual(
        expect.stringMatching(
          /^mirrord: connections that reached the target in the \d+\.\d s between were not mirrored$/,
        ),
      );

      // The new pod's clients reach the local app, byte-exact.
      const clients = await digestClients(second!.ip, POD_PORT, {
        count: CONNECTIONS,
        minBytes: 1000,
        maxBytes: 100_000,
        chunks: 2,
        intervalMs: 5,
      });
      expect(await exitCode(run)).toBe(0);
      expect(
        logged(log)
          .map((c) => c.connection)
          .sort(),
      ).toEqual(clients.map(connectionOf).sort());
      // Two agents, one Job each, both deleted by the CLI.
      const creates = kube.jobRequests(since).filter((e) => e.verb === 'create');
      expect(creates).toHaveLength(2);
      await untilNothingLeft();
    },
    3 * SLOW,
  );

  test(
    'kill -9 of the CLI: the agent ends with its session, the TTL removes the Job',
    async () => {
      const [pod] = track(await kube.addDeployment('killed', [digestServer('app')]));
      const since = kube.jobRequests().length;
      const log = join(logs.path, 'killed.log');
      const run = mirror([
        '--deployment',
        'killed',
        // Long enough to see the finished agent pod before the TTL removes it.
        '--agent-ttl',
        '10',
        '--agent-idle-timeout',
        '5',
        ...localDigestServer(log),
      ]);
      await untilMirroring(run, pod!.ip, POD_PORT);
      const { job } = createdJob(since);
      expect(await kube.mirrordObjects()).toContain(`job/${job.metadata!.name}`);
      expect(ownAgents()).toHaveLength(1);

      run.child.kill('SIGKILL');
      await run.exited;
      // The port-forward's stream closed with the CLI: the agent's session ended without the
      // CLI's goodbye, which the agent reports as an error (a failed Job, which the TTL removes
      // all the same), and exited.
      await until(() => ownAgents().length === 0, 'the agent to exit', SLOW);
      const ending = await agentEnding(job);
      expect(ending.log).toMatch(/^mirrord: session ended: /m);
      expect(ending.exitCode).toBe(1);
      await untilAsync(
        async () => (await kube.mirrordObjects()).length === 0,
        'the TTL to remove the Job',
        SLOW,
      );
      // Removed by the TTL controller: the killed CLI never asked.
      const deletes = jobDeletes(job, since);
      expect(deletes.length).toBeGreaterThanOrEqual(1);
      expect(deletes.filter((e) => e.user?.username !== TTL_CONTROLLER)).toEqual([]);
    },
    2 * SLOW,
  );

  test(
    'kill -9 of the CLI before any session: the agent exits after its idle timeout',
    async () => {
      await kube.addPod('idle', [digestServer('app')]).then((pod) => track([pod]));
      const since = kube.jobRequests().length;
      const run = mirror([
        '--pod',
        'idle',
        '--agent-ttl',
        '10',
        '--agent-idle-timeout',
        '3',
        '--port',
        String(POD_PORT),
      ]);
      // Killed the moment the API server has created the Job and then its Secret (a CLI killed
      // between the two leaves a Job whose pod waits for the Secret: `mirrord cleanup`'s case):
      // the agent pod is yet to be scheduled and started, so the CLI cannot have connected to it.
      await untilWhileRunning(
        run,
        () => kube.jobRequests(since).some((e) => e.verb === 'create'),
        'the Job to be created',
        SLOW,
      );
      const { job } = createdJob(since);
      // A read fails (not found) until the Secret is there.
      await untilAsync(
        async () =>
          Boolean(
            await kube.core.readNamespacedSecret({
              name: job.metadata!.name!,
              namespace: NAMESPACE,
            }),
          ),
        'the Secret to be created',
        SLOW,
      );
      run.child.kill('SIGKILL');
      await run.exited;
      expect(run.output()).not.toContain('connecting to the agent');

      // Now the agent starts, with nobody to connect to it, and gives up after its idle timeout.
      await until(() => ownAgents().length === 1, 'the agent to start', SLOW);
      await until(() => ownAgents().length === 0, 'the agent to give up waiting', SLOW);
      const ending = await agentEnding(job);
      expect(ending.log).toContain('mirrord: no session arrived within 3 s');
      expect(ending.exitCode).toBe(1);
      await untilAsync(
        async () => (await kube.mirrordObjects()).length === 0,
        'the TTL to remove the Job',
        SLOW,
      );
      const deletes = jobDeletes(job, since);
      expect(deletes.length).toBeGreaterThanOrEqual(1);
      expect(deletes.filter((e) => e.user?.username !== TTL_CONTROLLER)).toEqual([]);
    },
    2 * SLOW,
  );
});
