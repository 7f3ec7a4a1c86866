/**
 * `mirrord mirror --pod/--deployment/--statefulset` end to end through the stand-in cluster:
 * the real CLI creates the agent Job, the stand-in's kubelet runs the real agent next to the
 * target pod, real clients in the cluster network talk to the pod, and every connection arrives
 * byte for byte in a local app. Afterwards no Job, pod or process is left; when the CLI is
 * killed, the agent ends by itself and the Job's TTL removes it.
 */
import { execFile } from 'node:child_process';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { agentJobManifest } from '../src/platform/kube/agent-job.js';
import { startStandInCluster, type PodHandle, type StandInCluster } from './kube/cluster.js';
import {
  FIXTURES,
  killRun,
  logLines,
  mirrord,
  processesMatching,
  tempDir,
  until,
  untilWhileRunning,
  type MirrorRun,
} from './support/mirror-cli.js';

const execFileAsync = promisify(execFile);
const PORT = 38100 + Math.floor(Math.random() * 800);
const DIGEST_SERVER = join(FIXTURES, 'digest-server.mjs');
const DIGEST_CLIENTS = join(FIXTURES, 'digest-clients.mjs');
const JOBS_PATH = '/apis/batch/v1/namespaces/default/jobs';
const CONNECTIONS = 12;

/** `mirrord mirror ARGS` against the stand-in, with its `--json` events. */
function mirror(cluster: StandInCluster, args: string[]): MirrorRun {
  return mirrord(['--kubeconfig', cluster.kubeconfigPath, '--json', ...args]);
}

/** Runs a program in the stand-in's client netns (where pod IPs are reachable); its stdout. */
async function inCluster(cluster: StandInCluster, args: string[]): Promise<string> {
  const { stdout } = await execFileAsync('ip', ['netns', 'exec', cluster.clientNetns, ...args], {
    maxBuffer: 16 * 1024 * 1024,
  });
  return stdout;
}

/**
 * Waits until connections to the pod's port are mirrored: after the app's listen event, empty
 * probe connections until one shows up as `opened` (the tap copies a port only once the agent
 * acknowledged the subscription).
 */
async function untilMirroring(cluster: StandInCluster, run: MirrorRun, ip: string): Promise<void> {
  await untilWhileRunning(
    run,
    () => run.events().some((e) => e.event === 'listen' && e.port === PORT),
    'the app to listen',
    90_000,
  );
  const opened = (): boolean => run.events().some((e) => e.event === 'opened');
  const deadline = Date.now() + 30_000;
  while (!opened()) {
    if (Date.now() > deadline) throw new Error('no probe connection was mirrored');
    await inCluster(cluster, ['bash', '-c', `exec 3<>/dev/tcp/${ip}/${PORT}`]);
    await untilWhileRunning(run, opened, 'the probe', 1_000).catch((error: Error) => {
      if (!error.message.startsWith('timed out')) throw error;
    });
  }
}

interface ClientResult {
  port: number;
  bytes: number;
  sha: string;
  answer: string;
  error?: string;
}

/** The agent pods and Jobs of mirrord in the stand-in. */
function mirrordObjects(cluster: StandInCluster): string[] {
  const managed = (labels?: Record<string, string>) =>
    labels?.['app.kubernetes.io/managed-by'] === 'mirrord';
  return [
    ...cluster.jobs().map((job) => `job/${job.metadata.name}`),
    ...cluster
      .pods()
      .filter((pod) => managed(pod.metadata.labels))
      .map((pod) => `pod/${pod.metadata.name}`),
  ];
}

describe('mirrord mirror on Kubernetes targets (stand-in cluster)', () => {
  let cluster: StandInCluster;
  let logs: ReturnType<typeof tempDir>;
  const runs: MirrorRun[] = [];
  /** Container processes of the stand-in other than the targets': the agents. */
  let targetPids = new Set<number>();
  const agentProcesses = (): number[] => cluster.processes().filter((pid) => !targetPids.has(pid));

  beforeAll(async () => {
    cluster = await startStandInCluster();
    logs = tempDir('kube-mirror');
  });

  afterEach(async () => {
    for (const run of runs.splice(0)) await killRun(run);
    // A killed CLI leaves its app behind: the app's command line names this test's log dir.
    for (const pid of processesMatching(logs.path)) process.kill(Number(pid), 'SIGKILL');
    cluster.faults.clear();
  });

  afterAll(async () => {
    await cluster?.close();
    logs?.remove();
  });

  const targetContainers = (name: string) => [
    {
      name,
      image: 'stand-in/local',
      command: [process.execPath, DIGEST_SERVER, '--port', String(PORT)],
      ports: [{ containerPort: PORT, name: 'digest' }],
    },
  ];

  /** The DELETEs of `job` the stand-in received since request number `since`. */
  function jobDeletes(job: { metadata?: { name?: string } }, since: number) {
    return cluster.requests
      .slice(since)
      .filter((r) => r.method === 'DELETE' && r.path === `${JOBS_PATH}/${job.metadata!.name}`);
  }

  /** After a session: no mirrord Job or pod, and no agent process. */
  async function untilNothingLeft(): Promise<void> {
    await until(() => mirrordObjects(cluster).length === 0, 'the Job and its pod to go', 60_000);
    await until(() => agentProcesses().length === 0, 'the agent process to go', 60_000);
  }

  /** The pod a session mirrors, from its ready event (`pod default/NAME …`). */
  function mirroredPod(run: MirrorRun, candidates: PodHandle[]): PodHandle {
    const ready = run.events().find((e) => e.event === 'ready');
    const name = /^pod default\/(\S+)/.exec(String(ready?.target))?.[1];
    const pod = candidates.find((candidate) => candidate.name === name);
    if (!pod) throw new Error(`mirrored an unexpected pod: ${String(ready?.target)}`);
    return pod;
  }

  /** The Job body the CLI sent (the one create of this session). */
  function createdJob(since: number) {
    const creates = cluster.requests
      .slice(since)
      .filter((request) => request.method === 'POST' && request.path === JOBS_PATH);
    expect(creates).toHaveLength(1);
    return creates[0]!.body as ReturnType<typeof agentJobManifest>;
  }

  test.each([
    ['pod', 'api'],
    ['deployment', 'web'],
    ['statefulset', 'db'],
  ])(
    '--%s %s: real traffic arrives byte-exact in the local app; nothing is left afterwards',
    async (kind, name) => {
      const pods =
        kind === 'pod'
          ? [await cluster.addPod({ name, containers: targetContainers('app') })]
          : kind === 'deployment'
            ? (
                await cluster.addDeployment({
                  name,
                  replicas: 2,
                  containers: targetContainers('app'),
                })
              ).pods
            : (await cluster.addStatefulSet({ name, containers: targetContainers('app') })).pods;
      targetPids = new Set(cluster.processes());
      const requestsBefore = cluster.requests.length;
      const log = join(logs.path, `${kind}.log`);
      const run = mirror(cluster, [
        `--${kind}`,
        name,
        '--agent-image',
        'registry.example/mirrord-agent:test',
        '--agent-idle-timeout',
        '20',
        '--',
        process.execPath,
        DIGEST_SERVER,
        '--port',
        String(PORT),
        '--log',
        log,
        '--exit-after-completed',
        `${CONNECTIONS}:0`,
      ]);
      runs.push(run);
      await untilWhileRunning(
        run,
        () => run.events().some((e) => e.event === 'ready'),
        'ready',
        90_000,
      );
      const pod = mirroredPod(run, pods);
      expect(run.output()).toContain(`mirroring pod default/${pod.name}`);
      await untilMirroring(cluster, run, pod.ip);

      // Real clients in the cluster network, to the pod's IP: the pod answers each with the
      // sha256 of what it got, the local app logs the sha256 of what was replayed into it.
      const clients = JSON.parse(
        await inCluster(cluster, [
          process.execPath,
          DIGEST_CLIENTS,
          pod.ip,
          String(PORT),
          String(CONNECTIONS),
          '1000',
          '300000',
          '4',
          '5',
        ]),
      ) as { connections: ClientResult[] };
      expect(clients.connections.every((c) => !c.error && c.answer === c.sha)).toBe(true);
      expect(await run.exited).toBe(0);
      const replayed = logLines(log)
        .map((line) => line.split(' '))
        .filter(([, , , bytes]) => Number(bytes) > 0)
        .map(([, clientPort, , bytes, sha]) => `${clientPort} ${bytes} ${sha}`)
        .sort();
      const sent = clients.connections.map((c) => `${c.port} ${c.bytes} ${c.sha}`).sort();
      expect(replayed).toEqual(sent);

      // The Job the API server received is the manifest, with every field.
      const job = createdJob(requestsBefore);
      const containerId = pod.containers.find((c) => c.name === 'app')!.containerId;
      const of = kind === 'pod' ? '' : ` of ${kind}/${name}`;
      expect(job).toEqual(
        agentJobManifest({
          sessionId: job.metadata!.labels!['mirrord.dev/session']!,
          namespace: 'default',
          node: cluster.nodeName,
          containerId,
          target: `pod default/${pod.name}${of} (container app)`,
          image: 'registry.example/mirrord-agent:test',
          pullSecrets: [],
          capabilities: false,
          ttlSeconds: 60,
          idleTimeoutSeconds: 20,
          cli: { host: hostname(), pid: run.child.pid! },
        }),
      );
      expect(job.spec?.template.spec?.hostPID).toBe(true);
      expect(job.spec?.template.spec?.containers[0]?.securityContext?.privileged).toBe(true);

      // Teardown: the CLI deleted the Job with propagation Background; its pod and the agent
      // process go with it.
      const deletes = jobDeletes(job, requestsBefore);
      expect(deletes.length).toBeGreaterThanOrEqual(1);
      expect(deletes[0]!.query.propagationPolicy).toBe('Background');
      await untilNothingLeft();
    },
  );

  test('Ctrl-C ends the session: the CLI deletes the Job, nothing is left', async () => {
    const [pod] = (
      await cluster.addStatefulSet({ name: 'interrupted', containers: targetContainers('app') })
    ).pods;
    targetPids = new Set(cluster.processes());
    const requestsBefore = cluster.requests.length;
    const run = mirror(cluster, ['--statefulset', 'interrupted', '--port', String(PORT)]);
    runs.push(run);
    await untilWhileRunning(
      run,
      () => run.events().some((e) => e.event === 'ready'),
      'ready',
      90_000,
    );
    expect(mirroredPod(run, [pod!]).name).toBe(pod!.name);
    const job = createdJob(requestsBefore);
    run.child.kill('SIGINT');
    expect(await run.exited).toBe(0);
    const deletes = jobDeletes(job, requestsBefore);
    expect(deletes.map((r) => r.query.propagationPolicy)).toEqual(['Background']);
    await untilNothingLeft();
  });

  test('kill -9 of the CLI: the agent ends with its session, the TTL removes the Job', async () => {
    const [pod] = (
      await cluster.addDeployment({ name: 'killed', containers: targetContainers('app') })
    ).pods;
    targetPids = new Set(cluster.processes());
    const requestsBefore = cluster.requests.length;
    const log = join(logs.path, 'killed.log');
    const run = mirror(cluster, [
      '--deployment',
      'killed',
      '--agent-ttl',
      '2',
      '--agent-idle-timeout',
      '5',
      '--',
      process.execPath,
      DIGEST_SERVER,
      '--port',
      String(PORT),
      '--log',
      log,
    ]);
    runs.push(run);
    await untilMirroring(cluster, run, pod!.ip);
    const job = createdJob(requestsBefore);
    expect(mirrordObjects(cluster)).toContain(`job/${job.metadata!.name}`);
    expect(agentProcesses()).toHaveLength(1);

    run.child.kill('SIGKILL');
    await run.exited;
    await until(() => agentProcesses().length === 0, 'the agent to exit', 60_000);
    await until(() => mirrordObjects(cluster).length === 0, 'the TTL to remove the Job', 60_000);
    // Removed by its TTL: the killed CLI never asked.
    expect(
      cluster.requests.slice(requestsBefore).filter((request) => request.method === 'DELETE'),
    ).toEqual([]);
  });

  test('kill -9 of the CLI before any session: the agent exits after its idle timeout', async () => {
    await cluster.addPod({ name: 'idle', containers: targetContainers('app') });
    targetPids = new Set(cluster.processes());
    const requestsBefore = cluster.requests.length;
    cluster.faults.holdContainerCreating(true);
    const run = mirror(cluster, [
      '--pod',
      'idle',
      '--agent-ttl',
      '2',
      '--agent-idle-timeout',
      '3',
      '--port',
      String(PORT),
    ]);
    runs.push(run);
    await untilWhileRunning(
      run,
      () => run.output().includes('pulling image'),
      'the agent pod',
      60_000,
    );
    const job = createdJob(requestsBefore);
    run.child.kill('SIGKILL');
    await run.exited;
    // Now the agent starts, with nobody to connect to it.
    cluster.faults.holdContainerCreating(false);
    await until(() => agentProcesses().length === 1, 'the agent to start', 60_000);
    await until(() => agentProcesses().length === 0, 'the agent to give up waiting', 60_000);
    const agentPod = cluster
      .pods()
      .find(
        (p) =>
          p.metadata.labels?.['mirrord.dev/session'] ===
          job.metadata!.labels!['mirrord.dev/session'],
      );
    // Either still there as finished, or already removed with its Job by the TTL.
    expect(agentPod === undefined || ['Succeeded', 'Failed'].includes(agentPod.status.phase)).toBe(
      true,
    );
    await until(() => mirrordObjects(cluster).length === 0, 'the TTL to remove the Job', 60_000);
    expect(
      cluster.requests.slice(requestsBefore).filter((request) => request.method === 'DELETE'),
    ).toEqual([]);
  });
});
