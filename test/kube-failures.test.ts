/**
 * Every failure of `mirrord mirror` on a Kubernetes target, with the real CLI against the real
 * test cluster (test/cluster), each one produced for real: a missing kubeconfig or context,
 * loopback servers that refuse, fail TLS or never answer, targets that do not exist or do not
 * run, ServiceAccounts whose Role lacks one permission, an agent image on a loopback registry
 * that refuses or never answers, a namespace default the node cannot fit, a target container
 * that goes away before the agent looks for it, and Ctrl-C. Each is one line that says what is
 * wrong, a non-zero exit, well before any timeout that does not concern it, and nothing left
 * behind: no mirrord Job, Secret or pod, no agent process.
 *
 * Who may join an agent: a ServiceAccount allowed to port-forward to the agent's pod but not to
 * read Secrets is refused by the agent, before the CLI connects and during its session, and the
 * CLI's session is not disturbed.
 *
 * Mid-session, the API server stopped (SIGSTOP) for a few seconds is sat out and what reached
 * the target meanwhile is mirrored; silent for longer than the session's liveness window (a
 * loopback relay to it that goes silent, so that the shared cluster is not stalled that long),
 * the CLI reports, exits, and the agent and the Job's TTL clean up.
 */
import { CoreV1Api, KubeConfig, type V1PolicyRule } from '@kubernetes/client-node';
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { AGENT_CONTAINER, AGENT_PORT } from '../src/platform/kube/agent-job.js';
import { statusCodeOf } from '../src/platform/kube/api-errors.js';
import { openPortForward } from '../src/platform/kube/port-forward.js';
import { newSessionSecret, readinessOf } from '../src/protocol/agent-launch.js';
import { AgentClient, AgentClientError } from '../src/protocol/client.js';
import { PIDS } from './cluster/layout.js';
import {
  agentProcesses,
  containerProcesses,
  fixture,
  testCluster,
  type PodInfo,
  type TestCluster,
} from './support/kube.js';
import {
  identity as identityOf,
  rulesWithout,
  type KubeconfigJson,
} from './support/kube-identity.js';
import { CLI, tempDir } from './support/mirror-cli.js';
import { waitFor } from './support/wait.js';

const NAMESPACE = 'kube-failures';
const PORT = 8080;
/** What the CLI prints while it waits; everything else it prints on failure is the error. */
const PROGRESS =
  /^mirrord: (resolving|creating agent Job|pulling image|starting the agent|connecting to the agent|mirroring|pod \S+ \(container)/;
/**
 * Far longer than any failure here may take: a fail-fast case finishing well within it did not
 * wait for it.
 */
const STARTUP_TIMEOUT_S = 120;
/** The kube-apiserver's pid file, written by the cluster's start. */
const API_SERVER_PID_FILE = join(PIDS, 'kube-apiserver');
/**
 * How long the API server stays stopped mid-session: long enough for traffic to reach the target
 * while the port-forward is frozen, well below the session's 20 s liveness window, and short for
 * the other test files sharing the cluster.
 */
const API_SERVER_STOP_MS = 5_000;

interface Failure {
  code: number | null;
  stdout: string;
  /** stderr without the progress notes. */
  errors: string[];
  progress: string[];
  seconds: number;
}

interface Run {
  child: ChildProcess;
  stderr(): string;
  stdout(): string;
  done: Promise<Failure>;
}

function start(args: string[], env: NodeJS.ProcessEnv = process.env): Run {
  const began = Date.now();
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const done = new Promise<Failure>((resolve) =>
    child.on('close', (code) => {
      const lines = stderr.split('\n').filter(Boolean);
      resolve({
        code,
        stdout,
        errors: lines.filter((line) => !PROGRESS.test(line)),
        progress: lines.filter((line) => PROGRESS.test(line)),
        seconds: (Date.now() - began) / 1000,
      });
    }),
  );
  return { child, stderr: () => stderr, stdout: () => stdout, done };
}

/** A failed run: exactly one error line, matching `message`, and a non-zero exit. */
function expectOneLine(failure: Failure, message: RegExp): void {
  expect(failure.errors).toHaveLength(1);
  expect(failure.errors[0]).toMatch(/^mirrord: /);
  expect(failure.errors[0]).toMatch(message);
  expect(failure.code).not.toBe(0);
  expect(failure.code).not.toBeNull();
}

/** The agent Job a run created, from its progress notes. */
function jobOf(progress: string[]): string {
  const name = progress.map((line) => /creating agent Job (\S+)/.exec(line)?.[1]).find(Boolean);
  if (!name) throw new Error(`the run created no Job:\n${progress.join('\n')}`);
  return name;
}

const pause = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Thrown by a check that can never hold any more: ends the wait at once. */
class Hopeless extends Error {}

/**
 * Polls `check` until it holds; throws with `what` after `ms`. Its errors count as "not yet"
 * (an API request may fail while objects come and go), except {@link Hopeless}.
 */
async function eventually(
  what: string,
  check: () => boolean | Promise<boolean>,
  ms = 60_000,
): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    const holds = await Promise.resolve()
      .then(check)
      .catch((error: unknown) => {
        if (error instanceof Hopeless) throw error;
        return false;
      });
    if (holds) return;
    if (Date.now() > deadline)
      throw new Error(`timed out after ${ms / 1000} s waiting for ${what}`);
    await pause(100);
  }
}

describe('mirrord mirror on Kubernetes: failures (real cluster)', () => {
  let cluster: TestCluster;
  let dir: ReturnType<typeof tempDir>;
  let api: PodInfo;
  /** Container IDs of this file's targets: an agent process naming one is this file's. */
  const targetIds = new Set<string>();
  const children: ChildProcess[] = [];
  const servers: net.Server[] = [];
  const sockets = new Set<net.Socket>();
  let resumeApiServer: (() => void) | undefined;

  beforeAll(async () => {
    cluster = await testCluster(NAMESPACE);
    dir = tempDir('kube-failures');
    api = await cluster.addPod('api', [
      { name: 'app', command: fixture('digest-server.mjs', ['--port', String(PORT)]), port: PORT },
    ]);
    for (const container of api.containers) targetIds.add(container.containerId);
  });

  afterEach(async () => {
    resumeApiServer?.();
    for (const child of children.splice(0)) child.kill('SIGKILL');
    // Whatever a test's loopback servers still hold (a hanging pull, the relay's connections).
    for (const socket of sockets) socket.destroy();
    sockets.clear();
    for (const server of servers.splice(0)) server.close();
  });

  afterAll(async () => {
    resumeApiServer?.();
    await cluster?.remove();
    dir?.remove();
  });

  /** Agent processes on this machine started for one of this file's targets. */
  function ourAgents(): number[] {
    return agentProcesses().filter((pid) => {
      try {
        const commandLine = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
        return [...targetIds].some((id) => commandLine.includes(id));
      } catch {
        return false;
      }
    });
  }

  /** Nothing of mirrord is left: no Job, Secret or pod in the namespace, no agent process. */
  async function expectNothingLeft(): Promise<void> {
    await eventually('no mirrord Job, Secret, pod or agent process', async () => {
      return (await cluster.mirrordObjects()).length === 0 && ourAgents().length === 0;
    });
    expect(await cluster.mirrordObjects()).toEqual([]);
    expect(ourAgents()).toEqual([]);
  }

  /** The CLI deleted the Job it created (propagation Background), as the audit log shows. */
  async function expectJobDeleted(job: string): Promise<void> {
    await eventually(`the deletion of Job ${job} in the audit log`, () =>
      cluster
        .jobRequests()
        .some(
          (event) =>
            event.verb === 'delete' &&
            event.objectRef?.name === job &&
            event.requestURI.includes('propagationPolicy=Background') &&
            event.responseStatus?.code === 200,
        ),
    );
  }

  interface MirrorOptions {
    kubeconfig?: string;
    namespace?: string;
    /** --port: REMOTE[:LOCAL]. */
    port?: string;
    startupTimeoutSeconds?: number;
  }

  /** `mirrord mirror ARGS` against the test cluster, in this file's namespace. */
  function mirror(args: string[], options: MirrorOptions = {}): Run {
    const run = start([
      'mirror',
      '--kubeconfig',
      options.kubeconfig ?? cluster.kubeconfig,
      '-n',
      options.namespace ?? NAMESPACE,
      '--agent-startup-timeout',
      String(options.startupTimeoutSeconds ?? STARTUP_TIMEOUT_S),
      ...args,
      '--port',
      options.port ?? String(PORT),
    ]);
    children.push(run.child);
    return run;
  }

  /** The cluster as the admin kubeconfig names it: the API server's URL and CA. */
  function adminCluster(): { server: string; caData?: string } {
    const admin = new KubeConfig();
    admin.loadFromFile(cluster.kubeconfig);
    return admin.getCurrentCluster()!;
  }

  /** The admin kubeconfig (JSON) with `edit` applied, written to a file of its own. */
  function kubeconfigWith(name: string, edit: (config: KubeconfigJson) => void): string {
    const config = JSON.parse(readFileSync(cluster.kubeconfig, 'utf8')) as KubeconfigJson;
    edit(config);
    const path = join(dir.path, name);
    writeFileSync(path, JSON.stringify(config));
    return path;
  }

  async function listeningServer(onConnection: (socket: net.Socket) => void): Promise<number> {
    const server = net.createServer((socket) => {
      sockets.add(socket);
      socket.on('close', () => sockets.delete(socket));
      socket.on('error', () => undefined);
      onConnection(socket);
    });
    servers.push(server);
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return (server.address() as net.AddressInfo).port;
  }

  /**
   * A loopback "registry" that accepts connections and never answers: the kubelet's pull hangs
   * and the agent's pod stays in ContainerCreating. The kubelet does not give up a pull when
   * its pod is deleted, so the deleted pod stays (Terminating) until `cut()` ends the pull, as a
   * registry's timeout would.
   */
  async function silentRegistry(): Promise<{ image: string; cut(): void }> {
    const held = new Set<net.Socket>();
    const port = await listeningServer((socket) => held.add(socket));
    const server = servers.at(-1)!;
    return {
      image: `127.0.0.1:${port}/mirrord-agent:hangs`,
      // A pull that had not connected yet is refused from now on.
      cut: () => {
        server.close();
        held.forEach((socket) => socket.destroy());
      },
    };
  }

  /**
   * After a run that timed out on a hanging pull: the CLI deleted its Job (the pod is only
   * waiting for the kubelet's pull), and once the pull ends nothing is left.
   */
  async function expectRemovedDespitePull(
    failure: Failure,
    registry: { cut(): void },
  ): Promise<void> {
    const job = jobOf(failure.progress);
    await expectJobDeleted(job);
    const jobs = await cluster.batch.listNamespacedJob({ namespace: NAMESPACE });
    expect(jobs.items.map((item) => item.metadata?.name)).not.toContain(job);
    // The garbage collector deletes the Job's pod after it (propagation Background).
    await eventually(`the pod of Job ${job} to be deleted`, async () => {
      const pods = await cluster.core.listNamespacedPod({
        namespace: NAMESPACE,
        labelSelector: `job-name=${job}`,
      });
      return pods.items.every((pod) => pod.metadata?.deletionTimestamp);
    });
    registry.cut();
    await expectNothingLeft();
  }

  test('no kubeconfig: says where it looked', async () => {
    const env: NodeJS.ProcessEnv = { ...process.env, HOME: dir.path };
    delete env.KUBECONFIG;
    const failure = await start(['mirror', '--pod', 'api', '--port', String(PORT)], env).done;
    expectOneLine(
      failure,
      new RegExp(
        `no kubeconfig found \\(looked in ${dir.path}/\\.kube/config\\): give --kubeconfig`,
      ),
    );
    const missing = join(dir.path, 'missing');
    const fromEnv = await start(['mirror', '--pod', 'api', '--port', String(PORT)], {
      ...env,
      KUBECONFIG: `${missing}-a:${missing}-b`,
    }).done;
    expectOneLine(
      fromEnv,
      /no kubeconfig found \(looked in KUBECONFIG \(.*missing-a:.*missing-b\)\)/,
    );
  });

  test('unknown context: lists the known ones', async () => {
    expectOneLine(
      await mirror(['--pod', 'api', '--context', 'prod']).done,
      /context "prod" is not in the kubeconfig \(known: mirrord-dev\)/,
    );
  });

  test('unreachable API server: refused, TLS failure, no answer; each names the server', async () => {
    const url = adminCluster().server;

    const closedPort = await listeningServer(() => undefined);
    await new Promise((resolve) => servers.pop()!.close(resolve));
    const refused = kubeconfigWith('refused', (config) => {
      config.clusters[0]!.cluster.server = `https://127.0.0.1:${closedPort}`;
    });
    expectOneLine(
      await mirror(['--pod', 'api'], { kubeconfig: refused }).done,
      new RegExp(
        `cannot reach the Kubernetes API server https://127\\.0\\.0\\.1:${closedPort} \\(context "mirrord-dev"\\): connection refused`,
      ),
    );

    // The real API server, whose certificate does not name the host the client is told to expect.
    const wrongName = kubeconfigWith('tls', (config) => {
      config.clusters[0]!.cluster['tls-server-name'] = 'not-the-api.example';
    });
    expectOneLine(
      await mirror(['--pod', 'api'], { kubeconfig: wrongName }).done,
      new RegExp(
        `cannot reach the Kubernetes API server ${url.replace(/\./g, '\\.')} .*: TLS failed \\(.*not-the-api\\.example`,
      ),
    );

    // Accepts connections and never answers.
    const silentPort = await listeningServer(() => undefined);
    const silent = kubeconfigWith('silent', (config) => {
      config.clusters[0]!.cluster.server = `https://127.0.0.1:${silentPort}`;
    });
    const args = ['--kubeconfig', silent, '--pod', 'api', '--request-timeout', '2'];
    const timedOut = await start(['mirror', ...args, '--port', String(PORT)]).done;
    expectOneLine(
      timedOut,
      new RegExp(
        `cannot reach the Kubernetes API server https://127\\.0\\.0\\.1:${silentPort} .*: no answer within 2 s`,
      ),
    );
    // --dry-run needs the target resolved (its node and container ID): the same one line.
    const dryRun = await start(['mirror', ...args, '--dry-run']).done;
    expectOneLine(dryRun, /no answer within 2 s/);
    expect(dryRun.stdout).toBe('');
  });

  test('target not found, for each kind', async () => {
    for (const kind of ['pod', 'deployment', 'statefulset']) {
      expectOneLine(
        await mirror([`--${kind}`, 'nope']).done,
        new RegExp(
          `${kind} "nope" not found in namespace ${NAMESPACE}: check the name and namespace`,
        ),
      );
    }
    const elsewhere = mirror(['--pod', 'api'], { namespace: 'elsewhere' });
    expectOneLine(await elsewhere.done, /pod "api" not found in namespace elsewhere/);
    expectOneLine(
      await mirror(['--pod', 'api', '--deployment', 'api']).done,
      /give one target, not --pod and --deployment/,
    );
    expectOneLine(
      await mirror(['--pod', 'api', '--container', 'nope']).done,
      new RegExp(`container "nope" not found in pod ${NAMESPACE}/api \\(its containers: app\\)`),
    );
    expect(await cluster.mirrordObjects()).toEqual([]);
  });

  test('target not running: a pod whose image cannot be had, a deployment without a ready pod', async () => {
    // Never pulled, and not on the node: the kubelet reports ErrImageNeverPull and the pod stays Pending.
    await cluster.core.createNamespacedPod({
      namespace: NAMESPACE,
      body: {
        metadata: { name: 'pending' },
        spec: {
          terminationGracePeriodSeconds: 0,
          containers: [{ name: 'app', image: 'mirrord.test/absent:1', imagePullPolicy: 'Never' }],
        },
      },
    });
    // Runs, but its readiness probe knocks on a port nothing listens on.
    const labels = { app: 'unready' };
    await cluster.apps.createNamespacedDeployment({
      namespace: NAMESPACE,
      body: {
        metadata: { name: 'unready', labels },
        spec: {
          selector: { matchLabels: labels },
          template: {
            metadata: { labels },
            spec: {
              terminationGracePeriodSeconds: 0,
              containers: [
                {
                  name: 'app',
                  image: 'mirrord.test/node:20',
                  imagePullPolicy: 'Never',
                  command: ['node', '-e', 'setInterval(() => undefined, 1 << 30)'],
                  readinessProbe: { tcpSocket: { port: 9 }, periodSeconds: 1 },
                },
              ],
            },
          },
        },
      },
    });
    await eventually('pod pending to be refused its image', async () => {
      const pod = await cluster.core.readNamespacedPod({ name: 'pending', namespace: NAMESPACE });
      return pod.status?.containerStatuses?.[0]?.state?.waiting?.reason === 'ErrImageNeverPull';
    });
    await eventually("the deployment's pod to run", async () => {
      const { items } = await cluster.core.listNamespacedPod({
        namespace: NAMESPACE,
        labelSelector: 'app=unready',
      });
      return items.length === 1 && items[0]!.status?.phase === 'Running';
    });

    expectOneLine(
      await mirror(['--pod', 'pending']).done,
      new RegExp(
        `pod ${NAMESPACE}/pending is not running \\(Pending: ErrImageNeverPull\\): mirror a running pod`,
      ),
    );
    expectOneLine(
      await mirror(['--deployment', 'unready']).done,
      new RegExp(
        `deployment ${NAMESPACE}/unready has no running, ready pod \\(pods: unready-\\S+ Running but not ready\\)`,
      ),
    );
    expect(await cluster.mirrordObjects()).toEqual([]);
    await cluster.apps.deleteNamespacedDeployment({ name: 'unready', namespace: NAMESPACE });
    await cluster.core.deleteNamespacedPod({
      name: 'pending',
      namespace: NAMESPACE,
      gracePeriodSeconds: 0,
    });
  });

  /** A ServiceAccount whose Role grants `rules` (see support/kube-identity.ts). */
  const identity = (name: string, rules: V1PolicyRule[]): Promise<string> =>
    identityOf(cluster, name, rules, dir.path);

  describe('RBAC denials', () => {
    /** A ServiceAccount allowed FULL_RULES less `verb` on `resource` (see identity). */
    function identityWithout(verb: string, resource: string): Promise<string> {
      return identity(`no-${verb}-${resource.replace(/\W/g, '-')}`, rulesWithout(verb, resource));
    }

    const as = (name: string): string => `\\(as system:serviceaccount:${NAMESPACE}:${name}\\)`;
    const advice = ': ask your cluster admin for RBAC permission$';

    test('create jobs: nothing is created', async () => {
      const kubeconfig = await identityWithout('create', 'jobs');
      const before = cluster.jobRequests().length;
      const failure = await mirror(['--pod', 'api'], { kubeconfig }).done;
      expectOneLine(
        failure,
        new RegExp(
          `not allowed to create jobs\\.batch in namespace ${NAMESPACE} ${as('no-create-jobs')}${advice}`,
        ),
      );
      expect(
        cluster.jobRequests(before).map((event) => [event.verb, event.responseStatus?.code]),
      ).toEqual([['create', 403]]);
      expect(failure.seconds).toBeLessThan(STARTUP_TIMEOUT_S / 2);
      await expectNothingLeft();
    });

    test('create secrets: the Job made just before is deleted again; nothing is left', async () => {
      const kubeconfig = await identityWithout('create', 'secrets');
      const before = cluster.jobRequests().length;
      const failure = await mirror(['--pod', 'api'], { kubeconfig }).done;
      expectOneLine(
        failure,
        new RegExp(
          `not allowed to create secrets in namespace ${NAMESPACE} ${as('no-create-secrets')}${advice}`,
        ),
      );
      // The Job is created first (the Secret names its uid as its owner), then deleted at once.
      const job = jobOf(failure.progress);
      await expectJobDeleted(job);
      expect(
        cluster
          .jobRequests(before)
          .map((event) => [event.verb, event.objectRef?.name, event.responseStatus?.code]),
      ).toEqual([
        ['create', job, 201],
        ['delete', job, 200],
      ]);
      expect(failure.seconds).toBeLessThan(STARTUP_TIMEOUT_S / 2);
      await expectNothingLeft();
    });

    test('get pods: fails at the target, before anything is created', async () => {
      const kubeconfig = await identityWithout('get', 'pods');
      const before = cluster.jobRequests().length;
      expectOneLine(
        await mirror(['--pod', 'api'], { kubeconfig }).done,
        new RegExp(
          `not allowed to get pods in namespace ${NAMESPACE} ${as('no-get-pods')}${advice}`,
        ),
      );
      expect(cluster.jobRequests(before)).toEqual([]);
      await expectNothingLeft();
    });

    test('get pods/log: denied once the Job exists, which is deleted again', async () => {
      const kubeconfig = await identityWithout('get', 'pods/log');
      const failure = await mirror(['--pod', 'api'], { kubeconfig }).done;
      expectOneLine(
        failure,
        new RegExp(
          `not allowed to get pods/log in namespace ${NAMESPACE} ${as('no-get-pods-log')}${advice}`,
        ),
      );
      expect(failure.seconds).toBeLessThan(STARTUP_TIMEOUT_S / 2);
      await expectJobDeleted(jobOf(failure.progress));
      await expectNothingLeft();
    });

    test('pods/portforward: the verb the API server checks (a WebSocket forward is a GET); the Job is deleted', async () => {
      const kubeconfig = await identityWithout('get', 'pods/portforward');
      const failure = await mirror(['--pod', 'api'], { kubeconfig }).done;
      expectOneLine(
        failure,
        new RegExp(
          `not allowed to get pods/portforward in namespace ${NAMESPACE} ${as('no-get-pods-portforward')}${advice}`,
        ),
      );
      expect(failure.progress.some((line) => line.includes('connecting to the agent'))).toBe(true);
      await expectJobDeleted(jobOf(failure.progress));
      await expectNothingLeft();
    });
  });

  test('an agent image the registry refuses: names the image and says why, well before the startup timeout', async () => {
    // A loopback port nothing listens on: the kubelet's pull is refused at once.
    const image = '127.0.0.1:1/mirrord-agent:missing';
    const failure = await mirror([
      '--pod',
      'api',
      '--agent-image',
      image,
      '--agent-pull-policy',
      'Always',
    ]).done;
    expectOneLine(
      failure,
      /cannot pull the agent image 127\.0\.0\.1:1\/mirrord-agent:missing \((ErrImagePull|ImagePullBackOff)\): .*connection refused; check --agent-image and --agent-pull-secret$/,
    );
    expect(failure.seconds).toBeLessThan(STARTUP_TIMEOUT_S / 2);
    await expectJobDeleted(jobOf(failure.progress));
    await expectNothingLeft();
  });

  test('a namespace whose Pod Security admission refuses the agent: said in one line, well before the startup timeout', async () => {
    // Enforced at pod creation, so the Job is accepted and only its controller's FailedCreate
    // event tells why no pod comes.
    const setLevel = async (level: string | undefined) => {
      const namespace = await cluster.core.readNamespace({ name: NAMESPACE });
      const labels = { ...namespace.metadata!.labels };
      if (level) labels['pod-security.kubernetes.io/enforce'] = level;
      else delete labels['pod-security.kubernetes.io/enforce'];
      namespace.metadata!.labels = labels;
      await cluster.core.replaceNamespace({ name: NAMESPACE, body: namespace });
    };
    await setLevel('baseline');
    try {
      for (const args of [[], ['--agent-privileged']]) {
        const failure = await mirror(['--pod', 'api', ...args]).done;
        expectOneLine(
          failure,
          /the namespace's Pod Security admission \(baseline:latest\) refuses the agent's pod, which needs hostPID and .*violates PodSecurity "baseline:latest": .*host namespaces .*: mirror in a namespace whose level is privileged, or ask your cluster admin/,
        );
        expect(failure.seconds).toBeLessThan(STARTUP_TIMEOUT_S / 2);
        await expectJobDeleted(jobOf(failure.progress));
      }
    } finally {
      await setLevel(undefined);
    }
    await expectNothingLeft();
  });

  test("Unschedulable: the scheduler's own message, well before the startup timeout", async () => {
    // The agent requests no scratch space; this namespace's LimitRange gives every container a
    // default request of more than the node has, so the scheduler finds no room for the agent.
    // (A filler pod taking the node's CPU would starve the other test files' agents too.)
    await cluster.core.createNamespacedLimitRange({
      namespace: NAMESPACE,
      body: {
        metadata: { name: 'huge-scratch' },
        spec: { limits: [{ type: 'Container', defaultRequest: { 'ephemeral-storage': '1Pi' } }] },
      },
    });
    try {
      const failure = await mirror(['--pod', 'api']).done;
      expectOneLine(
        failure,
        /the agent cannot be scheduled on the target's node: 0\/1 nodes are available: 1 Insufficient ephemeral-storage/,
      );
      expect(failure.seconds).toBeLessThan(STARTUP_TIMEOUT_S / 2);
      await expectJobDeleted(jobOf(failure.progress));
    } finally {
      await cluster.core.deleteNamespacedLimitRange({ name: 'huge-scratch', namespace: NAMESPACE });
    }
    await expectNothingLeft();
  });

  test("an agent exiting at once: the agent's own error in the line", async () => {
    const target = await cluster.addPod('restarted', [
      { name: 'app', command: fixture('digest-server.mjs', ['--port', String(PORT)]), port: PORT },
    ]);
    const original = target.containers[0]!.containerId;
    targetIds.add(original);
    const run = mirror(['--pod', 'restarted']);
    // The CLI has resolved the container; its process goes before the agent's pod even exists,
    // so the agent is given an ID whose processes are gone (the kubelet restarts the container
    // under a new one).
    await eventually('the agent Job to be created', () =>
      run.stderr().includes('creating agent Job'),
    );
    const processes = containerProcesses(original);
    expect(processes.length).toBeGreaterThan(0);
    for (const pid of processes) process.kill(pid, 'SIGKILL');
    const failure = await run.done;
    const id = original.replace('containerd://', '');
    expectOneLine(
      failure,
      new RegExp(
        `the agent exited before it was ready \\(exit code \\d+\\): no process of container ${id} found in /proc/\\*/cgroup`,
      ),
    );
    expect(failure.seconds).toBeLessThan(STARTUP_TIMEOUT_S / 2);
    await expectJobDeleted(jobOf(failure.progress));
    await expectNothingLeft();
    await cluster.core.deleteNamespacedPod({
      name: 'restarted',
      namespace: NAMESPACE,
      gracePeriodSeconds: 0,
    });
  });

  test('startup timeout: says what the agent pod was waiting for', async () => {
    const registry = await silentRegistry();
    const run = mirror(
      ['--pod', 'api', '--agent-image', registry.image, '--agent-pull-policy', 'Always'],
      { startupTimeoutSeconds: 10 },
    );
    const failure = await run.done;
    expectOneLine(
      failure,
      /the agent did not start within 10 s \(pod mirrord-agent-[0-9a-f]{8}-\S+: Pending: ContainerCreating\): raise --agent-startup-timeout/,
    );
    await expectRemovedDespitePull(failure, registry);
  });

  test('Ctrl-C while the agent starts: exits 130 and deletes the Job', async () => {
    const registry = await silentRegistry();
    const run = mirror([
      '--pod',
      'api',
      '--agent-image',
      registry.image,
      '--agent-pull-policy',
      'Always',
    ]);
    await eventually('the agent pod to be pulling', () => run.stderr().includes('pulling image'));
    run.child.kill('SIGINT');
    const failure = await run.done;
    expectOneLine(failure, /interrupted while the agent was starting/);
    expect(failure.code).toBe(130);
    await expectRemovedDespitePull(failure, registry);
  });

  /** One client connection to the target pod; resolves with the target's answer (its sha256). */
  function send(text: string): Promise<string> {
    return new Promise((resolve, reject) => {
      const socket = net.connect(PORT, api.ip, () => socket.end(text));
      let answer = '';
      socket.on('data', (chunk: Buffer) => (answer += chunk.toString()));
      socket.on('end', () => resolve(answer));
      socket.on('error', reject);
      socket.setTimeout(30_000, () => socket.destroy(new Error('the target did not answer')));
    });
  }

  /**
   * A session mirroring the target into a local service that records what each replayed
   * connection carried; resolves once a connection to the target is replayed. `beforeReady`
   * runs once the CLI started, before the session is awaited.
   */
  async function mirroredSession(
    args: string[] = [],
    kubeconfig?: string,
    beforeReady?: (run: Run) => Promise<void>,
  ) {
    const replayed: string[] = [];
    const localPort = await listeningServer((socket) => {
      let text = '';
      socket.on('data', (chunk: Buffer) => (text += chunk.toString()));
      socket.on('end', () => {
        replayed.push(text);
        socket.end();
      });
    });
    const run = mirror(['--pod', 'api', '--json', ...args], {
      port: `${PORT}:${localPort}`,
      ...(kubeconfig ? { kubeconfig } : {}),
    });
    const running = (): boolean => run.child.exitCode === null && run.child.signalCode === null;
    const whileRunning = (check: () => boolean) => () => {
      if (!running()) throw new Hopeless(`mirror exited:\n${run.stderr()}`);
      return check();
    };
    await beforeReady?.(run);
    await eventually(
      'the session to be ready',
      whileRunning(() => run.stdout().includes('{"event":"ready"')),
    );
    // Connections made before the tap copies the port are not replayed: probe until one is.
    // Each probe waits for itself: when an earlier one is seen replayed, the probe just sent may
    // still be on its way and would end, unfinished, with a session a test then breaks.
    let probes = 0;
    await eventually('a connection to be mirrored', async () => {
      if (!running()) throw new Hopeless(`mirror exited:\n${run.stderr()}`);
      const probe = `probe ${++probes}`;
      await send(probe);
      return waitFor(probe, () => replayed.includes(probe), { ms: 2_000 }).catch(() => false);
    });
    return { run, replayed, running, whileRunning };
  }

  test('the API server stopped mid-session: the session waits it out and mirrors what came meanwhile', async () => {
    const { run, replayed, running, whileRunning } = await mirroredSession();
    const pid = Number(readFileSync(API_SERVER_PID_FILE, 'utf8'));
    process.kill(pid, 'SIGSTOP');
    let resumed = false;
    resumeApiServer = () => {
      if (resumed) return;
      resumed = true;
      process.kill(pid, 'SIGCONT');
    };
    // Resumed whatever this test awaits meanwhile: the cluster is shared.
    const guard = setTimeout(resumeApiServer, API_SERVER_STOP_MS * 3);
    try {
      const stoppedAt = Date.now();
      // The target answers without the API server; the copy to us waits in the frozen forward.
      expect(await send('while the API server is stopped')).toMatch(/^[0-9a-f]{64}/);
      // The outage itself, not a wait for a condition: the CLI must sit it out.
      await pause(Math.max(0, API_SERVER_STOP_MS - (Date.now() - stoppedAt)));
      expect(running()).toBe(true);
      expect(replayed).not.toContain('while the API server is stopped');
    } finally {
      clearTimeout(guard);
      resumeApiServer();
    }
    await eventually(
      'the connection made during the stop to be replayed',
      whileRunning(() => replayed.includes('while the API server is stopped')),
    );
    await send('after the stop');
    await eventually(
      'a connection after the stop to be replayed',
      whileRunning(() => replayed.includes('after the stop')),
    );

    run.child.kill('SIGINT');
    const ended = await run.done;
    expect(ended.errors).toEqual([]);
    expect(ended.code).toBe(130);
    await expectJobDeleted(jobOf(ended.progress));
    await expectNothingLeft();
  });

  test('the API server silent for longer than the session lives without a byte: reports, exits, and the agent and TTL clean up', async () => {
    // A stop this long would stall every other test file on the shared cluster: instead this
    // session alone reaches the API server through a loopback relay that goes silent both ways,
    // as behind a network partition (the server's certificate names 127.0.0.1 too).
    const upstream = new URL(adminCluster().server);
    let frozen = false;
    const pairs: [net.Socket, net.Socket][] = [];
    const relayPort = await listeningServer((client) => {
      // A partition: a new connection gets no further either.
      if (frozen) return;
      const server = net.connect(Number(upstream.port), upstream.hostname);
      server.on('error', () => undefined);
      sockets.add(server);
      pairs.push([client, server]);
      client.pipe(server);
      server.pipe(client);
      // A partition passes no close either.
      client.on('close', () => frozen || server.destroy());
      server.on('close', () => frozen || client.destroy());
    });
    const kubeconfig = kubeconfigWith('relay', (config) => {
      config.clusters[0]!.cluster.server = `https://127.0.0.1:${relayPort}`;
    });
    const { run } = await mirroredSession(
      ['--request-timeout', '3', '--agent-ttl', '0'],
      kubeconfig,
    );
    const job = jobOf(run.stderr().split('\n'));

    frozen = true;
    for (const [client, server] of pairs) {
      client.unpipe(server);
      server.unpipe(client);
      client.pause();
      server.pause();
    }
    const frozenAt = Date.now();
    const ended = await run.done;
    const seconds = (Date.now() - frozenAt) / 1000;
    // The session's liveness window (20 s without a byte from the agent), then the Job's
    // deletion, which gets no answer within --request-timeout.
    expect(ended.errors).toEqual([
      'mirrord: session failed: nothing received from the agent for 20000 ms',
      expect.stringMatching(
        new RegExp(
          `^mirrord: could not delete the agent Job ${NAMESPACE}/${job} \\(cannot reach the Kubernetes API server https://127\\.0\\.0\\.1:${relayPort} \\(context "mirrord-dev"\\): no answer within 3 s.*\\); the agent exits by itself within its idle timeout and Kubernetes removes the Job after its TTL, or run mirrord cleanup$`,
        ),
      ),
    ]);
    expect(ended.code).toBe(1);
    expect(seconds).toBeLessThan(45);

    // The partition ends: the port-forward closes, the agent ends with its session, and the
    // Job's TTL (0 s) removes it.
    frozen = false;
    for (const [client, server] of pairs) {
      client.destroy();
      server.destroy();
    }
    await expectNothingLeft();
  });

  test('a ServiceAccount allowed pods/portforward but not get secrets cannot join a running agent, before or during the session; the CLI gets its session', async () => {
    const kubeconfig = await identity('portforward-only', [
      { apiGroups: [''], resources: ['pods'], verbs: ['get', 'list'] },
      { apiGroups: [''], resources: ['pods/portforward'], verbs: ['get', 'create'] },
    ]);
    const intruder = new KubeConfig();
    intruder.loadFromFile(kubeconfig);
    const intruderCore = intruder.makeApiClient(CoreV1Api);

    /** The protocol's handshake as the ServiceAccount, with `secret`: how the agent ends it. */
    async function tryToJoin(pod: string, secret: string): Promise<AgentClientError> {
      const stream = await openPortForward(intruder, NAMESPACE, pod, AGENT_PORT);
      let client: AgentClient;
      try {
        client = await AgentClient.start(stream, { secret, clientName: 'intruder' });
      } catch (error) {
        if (error instanceof AgentClientError) return error;
        throw error;
      }
      await client.close();
      throw new Error(`the agent admitted a client with the secret ${JSON.stringify(secret)}`);
    }

    let job = '';
    let agentPod = '';
    const { run, replayed, whileRunning } = await mirroredSession(
      // The agent waits for its CLI while the intruders try.
      ['--agent-idle-timeout', '60'],
      undefined,
      async (cli) => {
        // The intruders come first: the CLI is stopped once its agent's pod is scheduled (its
        // Job and Secret exist), before the agent is ready, so before the CLI can connect.
        await new Promise<void>((resolve, reject) => {
          const late = setTimeout(
            () => reject(new Error(`the CLI never said it pulls the image:\n${cli.stderr()}`)),
            60_000,
          );
          const onData = (): void => {
            if (!cli.stderr().includes('mirrord: pulling image')) return;
            cli.child.kill('SIGSTOP');
            cli.child.stderr!.off('data', onData);
            clearTimeout(late);
            resolve();
          };
          cli.child.stderr!.on('data', onData);
          cli.child.once('exit', () => reject(new Error(`mirror exited:\n${cli.stderr()}`)));
        });
        try {
          expect(cli.stderr()).not.toContain('connecting to the agent');
          job = jobOf(cli.stderr().split('\n'));
          await eventually('the agent to be ready, its CLI stopped', async () => {
            const { items } = await cluster.core.listNamespacedPod({
              namespace: NAMESPACE,
              labelSelector: `job-name=${job}`,
            });
            agentPod = items[0]?.metadata?.name ?? '';
            const log = await cluster.core.readNamespacedPodLog({
              name: agentPod,
              namespace: NAMESPACE,
              container: AGENT_CONTAINER,
            });
            return log.split('\n').some((line) => readinessOf(line) !== undefined);
          });
          for (const secret of ['', newSessionSecret()]) {
            const refused = await tryToJoin(agentPod, secret);
            expect({ secret, code: refused.code, message: refused.message }).toEqual({
              secret,
              code: 'refused',
              message: expect.stringContaining('secret'),
            });
          }
        } finally {
          cli.child.kill('SIGCONT');
        }
      },
    );

    // The secret is the Secret's, which the ServiceAccount may not read, and nowhere in the
    // agent's pod, which it may read.
    const secret = await cluster.core.readNamespacedSecret({ name: job, namespace: NAMESPACE });
    const value = Buffer.from(secret.data!.secret!, 'base64').toString();
    for (const read of [
      () => intruderCore.readNamespacedSecret({ name: job, namespace: NAMESPACE }),
      () => intruderCore.listNamespacedSecret({ namespace: NAMESPACE }),
    ]) {
      const denied = await read().then(
        () => undefined,
        (error: unknown) => statusCodeOf(error),
      );
      expect(denied).toBe(403);
    }
    const pod = await intruderCore.readNamespacedPod({ name: agentPod, namespace: NAMESPACE });
    expect(JSON.stringify(pod)).not.toContain(value);
    expect(JSON.stringify(pod)).not.toContain(secret.data!.secret!);

    // During the session, the agent's one session is taken: an intruder is cut off at once.
    const during = await tryToJoin(agentPod, newSessionSecret());
    expect(during.code).toBe('closed');
    // The CLI's session goes on: a connection to the target is still replayed.
    await send('after the intruders');
    await eventually(
      'a connection after the intruders to be replayed',
      whileRunning(() => replayed.includes('after the intruders')),
    );
    run.child.kill('SIGINT');
    const ended = await run.done;
    expect(ended.errors).toEqual([]);
    expect(ended.code).toBe(130);
    await expectJobDeleted(job);
    await expectNothingLeft();
  });
});
